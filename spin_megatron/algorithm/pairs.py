"""Preference pairs (chosen, rejected) from rollout samples, grouped by ``prompt_id``.

Samples are always grouped by their ``prompt_id`` and ordered by ``sample_index`` inside a group, never by their
position in the input list, so an engine that returns samples in any order gives the same pairs. Pairs come
out sorted by prompt id.

- ``online``: chosen = the best-scored sample of a prompt, rejected = the worst-scored one.
- ``spin``: chosen = the dataset's gold response, rejected = a policy sample.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

from spin_megatron.errors import ConfigError
from spin_megatron.types import Sample

TIE_POLICIES = ("drop", "keep")
# "first" (the default) is length-neutral: the n samples of a prompt are i.i.d., so their index order says
# nothing about them. "shorter"/"longer" are opt-in and length-biased (see build_online_pairs).
TIE_BREAKS = ("first", "shorter", "longer")
MISSING_EOS_POLICIES = ("keep", "penalize", "exclude")


@dataclass(frozen=True, kw_only=True)
class PreferencePair:
    """One DPO pair. Rewards are the raw rewards of the samples (before any missing-EOS penalty)."""

    prompt_id: Hashable
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_reward: float | None  # None for a gold response (spin mode)
    rejected_reward: float | None  # None when a spin-mode sample was not scored
    chosen_is_gold: bool = False
    chosen_sample_index: int | None = None  # None for a gold response
    rejected_sample_index: int | None = None
    chosen_truncated: bool = False  # ended at max_new_tokens without EOS
    rejected_truncated: bool = False


@dataclass(kw_only=True)
class PairStats:
    """What happened to the prompts of one batch; ``as_metrics`` names follow the TRL style."""

    prompts: int = 0  # distinct prompt ids in the input
    pairs_built: int = 0
    dropped_ties: int = 0  # prompts whose samples all scored the same, dropped (tie_policy=drop)
    kept_ties: int = 0  # tied prompts paired anyway by the tie-break (tie_policy=keep)
    all_correct: int = 0  # tied prompts whose samples all reached correct_threshold (dropped or kept)
    all_wrong: int = 0  # tied prompts whose samples were all below correct_threshold (dropped or kept)
    dropped_too_few: int = 0  # prompts left with too few samples (online < 2, spin < 1), e.g. after exclusion
    excluded_truncated: int = 0  # truncated samples removed (missing_eos=exclude)
    penalized_truncated: int = 0  # truncated samples whose reward was lowered (missing_eos=penalize)

    def as_metrics(self) -> dict[str, float]:
        renamed = {"pairs_built": "kept"}
        return {f"pairs/{renamed.get(key, key)}": float(value) for key, value in asdict(self).items()}


def _check_choice(option: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{option} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _group_by_prompt(samples: Iterable[Sample]) -> dict[Hashable, list[Sample]]:
    """Samples per prompt id, each group sorted by ``sample_index`` (unique within a prompt)."""
    groups: dict[Hashable, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.prompt_id, []).append(sample)
    for prompt_id, group in groups.items():
        group.sort(key=lambda sample: sample.sample_index)
        indices = [sample.sample_index for sample in group]
        if len(set(indices)) != len(indices):
            # Order-independence rests on (prompt_id, sample_index) being a unique key.
            raise ValueError(
                f"prompt {prompt_id!r} has duplicate sample_index values {indices}: each of the n "
                "samples of a prompt needs its own sample_index"
            )
        if any(sample.prompt_ids != group[0].prompt_ids for sample in group):
            raise ValueError(
                f"samples with prompt id {prompt_id!r} carry different prompt_ids: two prompts share "
                "one id; give every prompt a unique id (e.g. its dataset index)"
            )
    return groups


def _without_truncated(group: list[Sample], stats: PairStats) -> list[Sample]:
    kept = [sample for sample in group if not sample.truncated]
    stats.excluded_truncated += len(group) - len(kept)
    return kept


def _sorted_ids(prompt_ids: Iterable[Hashable]) -> list[Hashable]:
    prompt_ids = list(prompt_ids)
    try:
        return sorted(prompt_ids)
    except TypeError:  # ids of mixed types (e.g. int and str) do not compare; any fixed order will do
        return sorted(prompt_ids, key=lambda prompt_id: (type(prompt_id).__qualname__, repr(prompt_id)))


def build_online_pairs(
    samples: Iterable[Sample],
    *,
    tie_policy: str = "drop",
    tie_break: str = "first",
    missing_eos: str = "keep",
    missing_eos_penalty: float = 1.0,
    correct_threshold: float = 1.0,
    margin: float = 0.0,
) -> tuple[list[PreferencePair], PairStats]:
    """Pair the best- and worst-scored sample of every prompt (rewards must be filled in).

    ``Sample.reward_tiebreak`` (a reward model's score under ``reward_model.combine=rule_then_model``), when
    set, ranks samples of equal score before ``tie_break`` does. ``margin`` makes near-ties ties: a prompt whose
    best and worst differ by at most ``margin`` — in score, or with tiebreaks, in tiebreak at equal score — is
    tied (``tie_policy`` decides). 0: only exact ties.

    Ranking score = reward, minus ``missing_eos_penalty`` for a truncated sample when ``missing_eos="penalize"``
    (TRL's ``missing_eos_penalty``); ``"exclude"`` removes truncated samples first. Equal scores are ordered by
    ``tie_break`` and then by ``sample_index`` (lower is better), which makes the choice independent of input
    order. ``"first"`` (default) orders by ``sample_index`` alone: samples are i.i.d., so this adds no bias.
    ``"shorter"``/``"longer"`` put length first among equal scores and are **length-biased**: with n ≥ 3 they
    decide which correct sample is chosen and which wrong one is rejected even when the prompt is not tied
    ("shorter": the shortest correct vs the longest wrong), a preference for length the reward does not hold.
    When every sample of a prompt has the same score, ``tie_policy="drop"`` skips the prompt and ``"keep"``
    pairs the tie-break's best against its worst.
    ``correct_threshold`` only classifies tied prompts as all-correct / all-wrong for the statistics.

    A prompt with fewer than 2 (remaining) samples is skipped and counted; if *every* prompt came with a single
    sample the rollout is misconfigured and a :class:`ConfigError` says so.
    """
    _check_choice("algorithm.tie_policy", tie_policy, TIE_POLICIES)
    _check_choice("algorithm.tie_break", tie_break, TIE_BREAKS)
    _check_choice("algorithm.missing_eos", missing_eos, MISSING_EOS_POLICIES)
    if not isinstance(margin, (int, float)) or not 0 <= margin < math.inf:
        raise ConfigError(f"reward_model.margin must be a finite number ≥ 0; got {margin!r}")
    if not isinstance(missing_eos_penalty, (int, float)) or not 0 <= missing_eos_penalty < math.inf:
        raise ConfigError(
            f"algorithm.missing_eos_penalty must be a finite number ≥ 0; got {missing_eos_penalty!r}"
        )
    groups = _group_by_prompt(samples)
    if groups and all(len(group) < 2 for group in groups.values()):
        raise ConfigError(
            "online pairing needs at least 2 samples per prompt but every prompt has 1: set "
            "rollout.n ≥ 2, or use the spin mode (chosen = the dataset's gold response)"
        )
    stats = PairStats(prompts=len(groups))
    pairs = []
    for prompt_id in _sorted_ids(groups):
        group = groups[prompt_id]
        _require_rewards(group)
        if missing_eos == "exclude":
            group = _without_truncated(group, stats)
        elif missing_eos == "penalize":
            stats.penalized_truncated += sum(sample.truncated for sample in group)
        penalty = missing_eos_penalty if missing_eos == "penalize" else 0.0
        pair = _online_pair(
            group,
            stats,
            penalty=penalty,
            tie_policy=tie_policy,
            tie_break=tie_break,
            correct_threshold=correct_threshold,
            margin=margin,
        )
        if pair is not None:
            pairs.append(pair)
    stats.pairs_built = len(pairs)
    return pairs, stats


def _require_rewards(group: list[Sample]) -> None:
    for sample in group:
        if sample.reward is None:
            raise ValueError(
                f"sample {sample.sample_index} of prompt {sample.prompt_id!r} has no reward: score "
                "the samples (rewards.score_samples) before building online pairs"
            )
        if not math.isfinite(sample.reward):
            raise ValueError(
                f"sample {sample.sample_index} of prompt {sample.prompt_id!r} has a non-finite "
                f"reward {sample.reward!r}"
            )


def _online_pair(
    group: list[Sample],
    stats: PairStats,
    *,
    penalty: float,
    tie_policy: str,
    tie_break: str,
    correct_threshold: float,
    margin: float = 0.0,
) -> PreferencePair | None:
    if len(group) < 2:
        stats.dropped_too_few += 1
        return None

    def score(sample: Sample) -> float:
        return sample.reward - penalty if sample.truncated else sample.reward

    def tiebreak(sample: Sample) -> float:
        return sample.reward_tiebreak if sample.reward_tiebreak is not None else 0.0

    def preference(sample: Sample) -> tuple[float, float, int, int]:
        # Higher is better; the last element makes the order total, hence independent of input order.
        length = len(sample.response_ids)
        by_length = {"shorter": -length, "longer": length, "first": 0}[tie_break]
        return score(sample), tiebreak(sample), by_length, -sample.sample_index

    chosen, rejected = max(group, key=preference), min(group, key=preference)
    if any(sample.reward_tiebreak is not None for sample in group):
        tied = score(chosen) == score(rejected) and tiebreak(chosen) - tiebreak(rejected) <= margin
    else:
        tied = score(chosen) - score(rejected) <= margin
    if tied:
        if all(sample.reward >= correct_threshold for sample in group):
            stats.all_correct += 1
        elif all(sample.reward < correct_threshold for sample in group):
            stats.all_wrong += 1
        if tie_policy == "drop":
            stats.dropped_ties += 1
            return None
        stats.kept_ties += 1
    return PreferencePair(
        prompt_id=chosen.prompt_id,
        prompt_ids=chosen.prompt_ids,
        chosen_ids=chosen.response_ids,
        rejected_ids=rejected.response_ids,
        chosen_reward=chosen.reward,
        rejected_reward=rejected.reward,
        chosen_sample_index=chosen.sample_index,
        rejected_sample_index=rejected.sample_index,
        chosen_truncated=chosen.truncated,
        rejected_truncated=rejected.truncated,
    )


def build_spin_pairs(
    samples: Iterable[Sample],
    gold_ids: Mapping[Hashable, Sequence[int]],
    *,
    missing_eos: str = "keep",
    pairs_per_prompt: int | str = 1,
) -> tuple[list[PreferencePair], PairStats]:
    """SPIN pairs: chosen = ``gold_ids[prompt_id]`` (the dataset response), rejected = a policy sample.

    ``pairs_per_prompt`` samples of each prompt are used, lowest ``sample_index`` first (``"all"``: every
    sample). Rewards are not needed. ``missing_eos="exclude"`` drops truncated samples first; ``"penalize"``
    is refused because nothing is ranked here.
    """
    _check_spin_options(missing_eos=missing_eos, pairs_per_prompt=pairs_per_prompt)
    groups = _group_by_prompt(samples)
    missing = [prompt_id for prompt_id in _sorted_ids(groups) if prompt_id not in gold_ids]
    if missing:
        shown = ", ".join(map(repr, missing[:5])) + (
            f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        )
        raise ConfigError(
            f"no gold response for prompt id(s) {shown}: spin mode needs the dataset's reference "
            "response for every prompt; check that the dataset has a response column"
        )
    stats = PairStats(prompts=len(groups))
    pairs = []
    for prompt_id in _sorted_ids(groups):
        gold = list(gold_ids[prompt_id])
        if not gold:
            raise ValueError(f"the gold response of prompt {prompt_id!r} is empty (no tokens)")
        group = groups[prompt_id]
        if missing_eos == "exclude":
            group = _without_truncated(group, stats)
        if not group:
            stats.dropped_too_few += 1
            continue
        used = group if pairs_per_prompt == "all" else group[:pairs_per_prompt]
        pairs.extend(
            PreferencePair(
                prompt_id=prompt_id,
                prompt_ids=sample.prompt_ids,
                chosen_ids=gold,
                rejected_ids=sample.response_ids,
                chosen_reward=None,
                rejected_reward=sample.reward,
                chosen_is_gold=True,
                rejected_sample_index=sample.sample_index,
                rejected_truncated=sample.truncated,
            )
            for sample in used
        )
    stats.pairs_built = len(pairs)
    return pairs, stats


def _check_spin_options(*, missing_eos: str, pairs_per_prompt: int | str) -> None:
    if missing_eos == "penalize":
        raise ConfigError(
            "algorithm.missing_eos='penalize' lowers rewards before ranking, and spin mode ranks "
            "nothing (chosen is always the gold response): use 'keep' or 'exclude'"
        )
    _check_choice("algorithm.missing_eos", missing_eos, ("keep", "exclude"))
    is_count = isinstance(pairs_per_prompt, int) and not isinstance(pairs_per_prompt, bool)
    if pairs_per_prompt != "all" and not (is_count and pairs_per_prompt >= 1):
        raise ConfigError(
            f"algorithm.pairs_per_prompt must be an integer ≥ 1 or 'all'; got {pairs_per_prompt!r}"
        )
