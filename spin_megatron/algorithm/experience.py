"""One step's experience: generate on the engine rank, score, share with the model-parallel group, pair.

Generation and scoring happen on the replica's engine rank only; the scored samples are then broadcast to the
other ranks of its model-parallel group, which all build the same pairs from them (pairing is deterministic).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from spin_megatron.algorithm.pairs import build_online_pairs, build_spin_pairs
from spin_megatron.algorithm.rewards import RewardFn, get_reward_fn, score_samples
from spin_megatron.config import AlgorithmConfig, RolloutConfig
from spin_megatron.data import PromptExample
from spin_megatron.parallel.collectives import broadcast_object, max_over_world
from spin_megatron.parallel.packing import ScoredSequence
from spin_megatron.parallel.state import ParallelGroups
from spin_megatron.rollout.protocol import SamplingParams
from spin_megatron.types import Sample

ROLLOUT_SUMS = (
    "prompts",
    "samples",
    "reward/sum",
    "reward/correct",
    "reward/scored",  # samples a rule or a reward model scored (none in spin mode with algorithm.reward=none)
    "response_length/sum",
    "response/truncated",
    "pairs/kept",
    "pairs/dropped_ties",
    "pairs/all_correct",
    "pairs/all_wrong",
    "pairs/dropped_too_few",
    "pairs/excluded_truncated",
    # with a reward model: its scores and the rule's, summed over the samples each scored, and over the pairs of
    # a prompt's samples the rule tells apart, how many the model orders the same way
    "reward/model_sum",
    "reward/model_scored",
    "reward/rule_sum",
    "reward/rule_scored",
    "reward/rule_model_agree",
    "reward/rule_model_pairs",
)


def rollout_sum_keys(cfg: AlgorithmConfig) -> tuple[str, ...]:
    """The rollout counters summed over the world: ROLLOUT_SUMS, then ``reward/<name>/correct`` for each of
    ``algorithm.reward_metrics`` in config order, so every rank reduces the same keys in the same order."""
    return ROLLOUT_SUMS + tuple(f"reward/{name}/correct" for name in cfg.reward_metrics)


def metric_reward_fns(cfg: AlgorithmConfig) -> dict[str, RewardFn]:
    """The logged-only rewards of ``algorithm.reward_metrics`` (name → function), for ``generate_scored``."""
    return {name: get_reward_fn(name) for name in cfg.reward_metrics}


_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """The tokenizer's EOS plus the usual end-of-turn tokens it holds as special tokens (in Qwen's vocabulary
    ``</s>`` is ordinary text, id 128247: a sample that writes it must not end there)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    special = set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in _STOP_TOKENS if t in vocab and t in special)
    return tuple(sorted(ids))


def sampling_params(cfg: RolloutConfig, stop_ids: tuple[int, ...], seed: int, *, greedy: bool = False):
    if greedy:
        return SamplingParams(
            n=1,
            temperature=0.0,
            max_new_tokens=cfg.val_max_new_tokens or cfg.max_new_tokens,
            stop_token_ids=stop_ids,
            seed=seed,
        )
    return SamplingParams(
        n=cfg.n,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        max_new_tokens=cfg.max_new_tokens,
        stop_token_ids=stop_ids,
        seed=seed,
    )


def sampling_seed(cfg, step: int, groups: ParallelGroups) -> int:
    """The sampling seed of a step: distinct per step and per data-parallel replica (each replica samples its own
    prompts; equal seeds would correlate their draws)."""
    return cfg.trainer.seed + 7919 * step + 1_000_003 * groups.dp_rank


def attempt_scored(engine, examples, params, reward_fn, tokenizer, metric_fns=None, reward_model=None):
    """On the engine rank: ("ok", samples) | ("rollout_failed", message) | ("error", exception).

    ``reward_fn`` (None: no rule reward) scores first; then ``reward_model`` (a ``RewardModelScoring``), if
    given, scores the conversations and sets the ranking reward. A reward-model backend failure is an error,
    like the reward function's: raised on every rank."""
    from spin_megatron.rollout.supervisor import RolloutError

    try:
        samples = (
            engine.generate(
                [ex.prompt_ids for ex in examples], params, prompt_keys=[ex.prompt_id for ex in examples]
            )
            if examples
            else []
        )
    except RolloutError as exc:
        return "rollout_failed", str(exc)
    try:
        rows = {ex.prompt_id: ex.row for ex in examples}

        def decode(ids):
            return tokenizer.decode(ids, skip_special_tokens=True)

        score_samples(samples, reward_fn, decode=decode, rows=rows, metric_fns=metric_fns)
        if reward_model is not None:
            reward_model.apply(
                samples,
                rows,
                lambda s: s.response_text if s.response_text is not None else decode(s.response_ids),
            )
    except Exception as exc:  # re-raised on every rank of the group below, so none of them waits forever
        return "error", exc
    return "ok", samples


def generate_scored(
    engine,
    examples: list[PromptExample],
    params: SamplingParams,
    *,
    reward_fn,
    tokenizer,
    groups: ParallelGroups,
    engine_src: int,
    max_restarts: int = 0,
    resync=None,
    metric_fns: dict[str, RewardFn] | None = None,
    reward_model=None,
) -> tuple[list[Sample] | None, str | None]:
    """Samples (with rewards) of this replica's prompts, on every rank of its model-parallel group.

    ``metric_fns`` (``metric_reward_fns(cfg.algorithm)``) are scored beside ``reward_fn``, on the same decoded
    text, into ``Sample.metric_rewards``: logged, never paired on.

    A failed generation (engine error, timeout, malformed samples) restarts the engine, re-syncs the weights
    (``resync()``) and retries, ``max_restarts`` times; then returns ``(None, last error)``. Every replica takes
    part in each retry (a replica that succeeded keeps its samples and only joins the re-sync): a weight export
    can be collective across replicas (MoE experts over EP), so the re-sync is the whole world's. An error of the
    reward function is raised on every rank.
    """
    samples, error = None, None
    for attempt in range(max_restarts + 1):
        if samples is None:
            outcome = (
                attempt_scored(engine, examples, params, reward_fn, tokenizer, metric_fns, reward_model)
                if groups.rank == engine_src
                else None
            )
            status, payload = broadcast_object(outcome, engine_src, groups.replica)
            if status == "error":
                raise payload
            samples, error = (payload, None) if status == "ok" else (None, payload)
        if max_over_world(float(samples is None), groups) == 0.0 or attempt == max_restarts:
            return samples, error
        if samples is None and groups.rank == engine_src:
            print(
                f"rollout: {error}; restarting the engine ({attempt + 1}/{max_restarts})",
                file=sys.stderr,
                flush=True,
            )
            engine.restart()
        if resync is not None:
            resync()
    raise AssertionError("unreachable")


@dataclass
class Experience:
    samples: list[Sample]
    items: list[list[ScoredSequence]]  # [chosen, rejected] per pair
    item_prompts: list  # the prompt id of each pair (mini-batches split the rollout batch by prompt)
    sums: dict[str, float]  # rollout_sum_keys(cfg) of this replica


def make_pairs(
    samples: list[Sample], examples: list[PromptExample], cfg: AlgorithmConfig, *, margin: float = 0.0
) -> Experience:
    """Pairs and the rollout sums; ``margin``: ``reward_model.margin`` (near-ties are ties)."""
    if cfg.mode == "online":
        pairs, stats = build_online_pairs(
            samples,
            tie_policy=cfg.tie_policy,
            tie_break=cfg.tie_break,
            missing_eos=cfg.missing_eos,
            missing_eos_penalty=cfg.missing_eos_penalty,
            margin=margin,
        )
    else:
        gold = {ex.prompt_id: ex.gold_ids for ex in examples}
        pairs, stats = build_spin_pairs(
            samples, gold, missing_eos=cfg.missing_eos, pairs_per_prompt=cfg.pairs_per_prompt
        )
    by_key = {(s.prompt_id, s.sample_index): s for s in samples}

    def sequence(pair, ids, index) -> ScoredSequence:
        sample = by_key.get((pair.prompt_id, index)) if index is not None else None
        return ScoredSequence(pair.prompt_ids, ids, sample.logprobs if sample is not None else None)

    items = [
        [
            sequence(p, p.chosen_ids, None if p.chosen_is_gold else p.chosen_sample_index),
            sequence(p, p.rejected_ids, p.rejected_sample_index),
        ]
        for p in pairs
    ]
    metrics = stats.as_metrics()
    sums = {
        "prompts": float(len(examples)),
        "samples": float(len(samples)),
        "reward/sum": sum(s.reward for s in samples if s.reward is not None),
        "reward/correct": float(sum(s.reward >= 1.0 for s in samples if s.reward is not None)),
        "reward/scored": float(sum(s.reward is not None for s in samples)),
        "response_length/sum": float(sum(len(s.response_ids) for s in samples)),
        "response/truncated": float(sum(s.truncated for s in samples)),
        **{k: metrics.get(k, 0.0) for k in ROLLOUT_SUMS if k.startswith("pairs/")},
        **_model_and_rule(samples),
        **_metric_correct(samples, cfg.reward_metrics),
    }
    return Experience(samples=samples, items=items, item_prompts=[p.prompt_id for p in pairs], sums=sums)


def _model_and_rule(samples: list[Sample]) -> dict[str, float]:
    """The reward-model sums of ROLLOUT_SUMS (zeros without a reward model)."""
    model = [s.model_reward for s in samples if s.model_reward is not None]
    rule = [s.rule_reward for s in samples if s.rule_reward is not None]
    agree = pairs = 0
    by_prompt: dict = {}
    for s in samples:
        if s.model_reward is not None and s.rule_reward is not None:
            by_prompt.setdefault(s.prompt_id, []).append(s)
    for group in by_prompt.values():
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                if a.rule_reward != b.rule_reward:
                    pairs += 1
                    agree += (a.rule_reward > b.rule_reward) == (a.model_reward > b.model_reward)
    return {
        "reward/model_sum": float(sum(model)),
        "reward/model_scored": float(len(model)),
        "reward/rule_sum": float(sum(rule)),
        "reward/rule_scored": float(len(rule)),
        "reward/rule_model_agree": float(agree),
        "reward/rule_model_pairs": float(pairs),
    }


def _metric_correct(samples: list[Sample], names: list[str]) -> dict[str, float]:
    """``reward/<name>/correct``: samples scoring ≥ 1 under each logged-only reward metric."""
    unscored = [name for name in names if any(name not in s.metric_rewards for s in samples)]
    if unscored:
        raise ValueError(
            f"algorithm.reward_metrics {unscored} were not scored: pass "
            "metric_fns=metric_reward_fns(cfg.algorithm) to generate_scored"
        )
    return {
        f"reward/{name}/correct": float(sum(s.metric_rewards[name] >= 1.0 for s in samples)) for name in names
    }
