"""Turning the summed counters of a step into the logged metrics (TRL's names where they exist)."""

from __future__ import annotations


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def step_metrics(
    rollout: dict, dpo: dict, counts: dict, *, grad_norm, lr: float, times: dict, skipped_steps: int
) -> dict[str, float]:
    pairs = dpo["pairs"]
    metrics = {
        "loss": _ratio(dpo["loss"], pairs),
        "rewards/chosen": _ratio(dpo["rewards/chosen"], pairs),
        "rewards/rejected": _ratio(dpo["rewards/rejected"], pairs),
        "rewards/margins": _ratio(dpo["rewards/chosen"] - dpo["rewards/rejected"], pairs),
        "rewards/accuracies": _ratio(dpo["rewards/accuracies"], pairs),
        "logps/chosen": _ratio(dpo["logps/chosen"], pairs),
        "logps/rejected": _ratio(dpo["logps/rejected"], pairs),
        "nll/chosen": _ratio(dpo["nll/chosen"], dpo["tokens/chosen"]),
        "reward/score_mean": _ratio(rollout["reward/sum"], rollout["samples"]),
        "reward/accuracy": _ratio(rollout["reward/correct"], rollout["samples"]),
        "response_length/mean": _ratio(rollout["response_length/sum"], rollout["samples"]),
        "response/truncated_frac": _ratio(rollout["response/truncated"], rollout["samples"]),
        "rollout/logp_diff": _ratio(dpo["logp_diff/sum"], dpo["logp_diff/tokens"]),
        "rollout/logp_diff_max": dpo["logp_diff/max"],
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": lr,
        "train/skipped_steps": float(skipped_steps),
        "train/tokens": counts["tokens"],
        "rollout/restarts": counts.get("restarts", 0.0),
        **{k: v for k, v in rollout.items() if k.startswith("pairs/")},
        # algorithm.reward_metrics (logged only): the summed reward/<name>/correct → reward/<name>/accuracy
        **{
            k.removesuffix("/correct") + "/accuracy": _ratio(v, rollout["samples"])
            for k, v in rollout.items()
            if k.startswith("reward/") and k.endswith("/correct") and k != "reward/correct"
        },
        **times,
    }
    busy = sum(times.values())
    metrics["perf/tokens_per_s"] = _ratio(counts["tokens"], busy)
    return metrics
