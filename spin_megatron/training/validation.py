"""Validation: greedy answers of the rollout engine (synced with the policy) scored by the rule reward (GSM8K
accuracy) or else the reward model, and the policy's mean NLL of the gold responses (a conversation's last
assistant turn), on this data-parallel rank's share of the validation prompts."""

from __future__ import annotations

from spin_megatron.algorithm.experience import generate_scored, sampling_params
from spin_megatron.data import PromptExample
from spin_megatron.parallel.collectives import sum_over_world
from spin_megatron.parallel.dpo_step import DPOSettings, gold_nll
from spin_megatron.parallel.packing import ScoredSequence, pack_items
from spin_megatron.parallel.state import ParallelGroups
from spin_megatron.rollout.supervisor import RolloutError

_GEN_KEYS = (
    "val/prompts",
    "val/score_sum",
    "val/correct",
    "val/response_length_sum",
    "val/eos",
    "val/failed",
)
_NLL_KEYS = ("val/nll_sum", "val/nll_tokens")


def validate(
    engine,
    model,
    examples: list[PromptExample],
    *,
    rollout_cfg,
    stop_ids,
    reward_fn,
    tokenizer,
    groups: ParallelGroups,
    reward_model=None,
    engine_src: int,
    settings: DPOSettings,
    token_budget: int,
    max_restarts: int = 0,
    resync=None,
    gold: bool = True,
) -> dict[str, float]:
    """``val/accuracy`` (rule reward ≥ 1 under greedy decoding; only with a rule), ``val/score_mean`` (the
    rule's, else the reward model's score; only when one scores), ``val/gold_nll`` (per token; only with gold).

    A failed generation restarts the engine and re-syncs it (``resync()``) up to ``max_restarts`` times, as in
    training; past that :class:`RolloutError` is raised on every rank."""
    params = sampling_params(rollout_cfg, stop_ids, seed=0, greedy=True)
    samples, error = generate_scored(
        engine,
        examples,
        params,
        reward_fn=reward_fn,
        reward_model=reward_model,
        tokenizer=tokenizer,
        groups=groups,
        engine_src=engine_src,
        max_restarts=max_restarts,
        resync=resync,
    )
    samples = samples or []
    local = {
        "val/failed": float(error is not None),
        "val/prompts": float(len(samples)),
        "val/score_sum": sum(s.reward for s in samples if s.reward is not None),
        "val/correct": float(sum(s.reward >= 1.0 for s in samples if s.reward is not None)),
        "val/response_length_sum": float(sum(len(s.response_ids) for s in samples)),
        "val/eos": float(sum(not s.truncated for s in samples)),  # ended with a stop token, not at the limit
    }
    gen = sum_over_world(local, _GEN_KEYS, groups, contribute=groups.rank == engine_src)
    if gen["val/failed"]:  # every rank learns it from the sum, so all stop together
        raise RolloutError(
            f"validation generation failed on {int(gen['val/failed'])} replica(s)"
            + (f": {error}" if error else "")
        )
    scored = {"rule": reward_fn is not None, "scored": reward_fn is not None or reward_model is not None}
    if not gold:  # data.answer_key=null: no reference answers to measure
        return _val_metrics(gen, None, **scored)
    batches = pack_items(
        [[ScoredSequence(ex.prompt_ids, ex.gold_ids)] for ex in examples],
        token_budget=token_budget,
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    nll = gold_nll(model, groups, [b.to(groups.device) for b in batches], settings).tolist()
    nll = sum_over_world(
        dict(zip(_NLL_KEYS, nll)), _NLL_KEYS, groups, contribute=groups.is_last_stage and groups.tp_rank == 0
    )
    return _val_metrics(gen, nll, **scored)


def _val_metrics(gen: dict, nll: dict | None, *, rule: bool = True, scored: bool = True) -> dict[str, float]:
    """``rule``: a rule reward scored the answers (accuracy means something); ``scored``: a rule or a model did."""
    count = max(1.0, gen["val/prompts"])
    metrics = {
        "val/response_length": gen["val/response_length_sum"] / count,
        "val/greedy_contain_eos_token": gen["val/eos"] / count,
    }
    if rule:
        metrics["val/accuracy"] = gen["val/correct"] / count
    if scored:
        metrics["val/score_mean"] = gen["val/score_sum"] / count
    if nll is not None:
        metrics["val/gold_nll"] = nll["val/nll_sum"] / max(1.0, nll["val/nll_tokens"])
    return metrics
