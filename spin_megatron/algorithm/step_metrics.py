"""Turning the summed counters of a step into the logged metrics (TRL's names where they exist)."""

from __future__ import annotations


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def step_metrics(
    rollout: dict,
    dpo: dict,
    counts: dict,
    *,
    grad_norm,
    lr: float,
    times: dict,
    skipped_steps: int,
    rpo_alpha: float = 0.0,
    sampler: str = "policy",
    score_is_rule: bool = True,
) -> dict[str, float]:
    """Means over every pair the step's optimizer updates saw (a pair trained in E epochs counts E times).
    ``sampler``: which model generated the samples (``algorithm.sample_from``): the objective/* estimates are
    taken under it. ``score_is_rule``: the ranking score is the rule reward's (no reward model, or
    ``reward_model.combine=rule_then_model``); otherwise ``reward/accuracy`` (score ≥ 1) means nothing and is left
    out (``reward/rule_mean`` and ``reward/<name>/accuracy`` of ``algorithm.reward_metrics`` stay)."""
    pairs = dpo["pairs"]
    # KL(sampler ‖ other) and the sampler's entropy, estimated on its own samples (TRL's online-DPO metrics when
    # the policy samples; with the reference as SPIN's opponent, KL(ref ‖ π) and the reference's entropy)
    own, other = dpo["logp_sample/sum"], dpo["ref_logp_sample/sum"]
    if sampler == "reference":
        own, other = other, own
    nll = _ratio(dpo["nll/chosen"], dpo["tokens/chosen"])
    tokens = dpo["tokens/chosen"] + dpo["tokens/rejected"]
    metrics = {
        # the optimised objective: the DPO-family loss plus the RPO term when it is on
        "loss": _ratio(dpo["loss"], pairs) + (rpo_alpha * nll if rpo_alpha else 0.0),
        "loss/dpo": _ratio(dpo["loss"], pairs),
        "rewards/chosen": _ratio(dpo["rewards/chosen"], pairs),
        "rewards/rejected": _ratio(dpo["rewards/rejected"], pairs),
        "rewards/margins": _ratio(dpo["rewards/chosen"] - dpo["rewards/rejected"], pairs),
        "rewards/accuracies": _ratio(dpo["rewards/accuracies"], pairs),
        "logps/chosen": _ratio(dpo["logps/chosen"], pairs),
        "logps/rejected": _ratio(dpo["logps/rejected"], pairs),
        "logits/chosen": _ratio(dpo["logits/chosen"], dpo["tokens/chosen"]),
        "logits/rejected": _ratio(dpo["logits/rejected"], dpo["tokens/rejected"]),
        "mean_token_accuracy": _ratio(dpo["top1/chosen"], dpo["tokens/chosen"]),
        "entropy": _ratio(dpo["entropy/sum"], tokens),
        "objective/kl": _ratio(own - other, dpo["generated"]),
        "objective/entropy": -_ratio(own, dpo["generated"]),
        "nll/chosen": nll,
        "reward/score_mean": _ratio(rollout["reward/sum"], rollout["samples"]),
        "reward/accuracy": _ratio(rollout["reward/correct"], rollout["samples"]),
        "response_length/mean": _ratio(rollout["response_length/sum"], rollout["samples"]),
        "response/truncated_frac": _ratio(rollout["response/truncated"], rollout["samples"]),
        # TRL online DPO's name (it is a training-sample metric there too): samples that ended with a stop token
        "val/contain_eos_token": 1.0 - _ratio(rollout["response/truncated"], rollout["samples"]),
        "rollout/logp_diff": _ratio(dpo["logp_diff/sum"], dpo["logp_diff/tokens"]),
        "rollout/logp_diff_max": dpo["logp_diff/max"],
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": lr,
        "train/skipped_steps": float(skipped_steps),
        "train/updates": counts.get("updates", 0.0),
        "train/nan_skipped_updates": counts.get("nan_skipped", 0.0),
        "train/zero_pair_updates": counts.get("zero_pair", 0.0),
        # trainer.balance_dp: the largest replica's tokens over the mean replica's, as sampled and as trained
        **{f"perf/{k}": v for k, v in counts.items() if k.startswith("dp_token_spread/")},
        "train/tokens": counts["tokens"],
        "rollout/restarts": counts.get("restarts", 0.0),
        "rollout/staleness": counts.get(
            "staleness", 0.0
        ),  # policy versions between sampler and trainee (max)
        **{k: v for k, v in rollout.items() if k.startswith("pairs/")},
        # algorithm.reward_metrics (logged only): the summed reward/<name>/correct → reward/<name>/accuracy
        **{
            k.removesuffix("/correct") + "/accuracy": _ratio(v, rollout["samples"])
            for k, v in rollout.items()
            if k.startswith("reward/") and k.endswith("/correct") and k != "reward/correct"
        },
        **_reward_model_metrics(rollout),
        **times,
    }
    if not rollout.get(
        "reward/scored", rollout["samples"]
    ):  # nothing scores the samples: no reward to report
        del metrics["reward/score_mean"], metrics["reward/accuracy"]
    if not score_is_rule:
        metrics.pop("reward/accuracy", None)
    aux_terms = dpo.get("moe/load_balancing_loss/terms")  # MoE, model.moe_aux_loss_coeff > 0
    if aux_terms:  # its mean over MoE layers and micro-batches, unscaled: the DPO loss does not include it
        metrics["moe/load_balancing_loss"] = dpo["moe/load_balancing_loss/sum"] / aux_terms
    busy = sum(times.values())
    metrics["perf/tokens_per_s"] = _ratio(counts["tokens"], busy)
    return metrics


def _reward_model_metrics(rollout: dict) -> dict[str, float]:
    """With a reward model: the mean of its scores and of the rule's, and how often they agree on the order of
    two samples of a prompt that the rule tells apart (NaN when no such pair)."""
    if not rollout.get("reward/model_scored"):
        return {}
    metrics = {"reward/model_mean": _ratio(rollout["reward/model_sum"], rollout["reward/model_scored"])}
    if rollout.get("reward/rule_scored"):
        metrics["reward/rule_mean"] = _ratio(rollout["reward/rule_sum"], rollout["reward/rule_scored"])
        metrics["reward/rule_model_agreement"] = _ratio(
            rollout["reward/rule_model_agree"], rollout["reward/rule_model_pairs"]
        )
    return metrics
