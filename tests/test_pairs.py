"""Preference pairs: online (best vs worst sample) and spin (gold vs sample), grouped by prompt id."""

import itertools
import random

import pytest

from spin_megatron.algorithm.pairs import PairStats, build_online_pairs, build_spin_pairs
from spin_megatron.errors import ConfigError
from spin_megatron.types import Sample


def _sample(prompt_id, sample_index, reward, *, length=3, finish="stop"):
    # Response tokens encode (prompt, sample) so a test can see which sample became chosen/rejected.
    return Sample(
        prompt_id=prompt_id,
        prompt_ids=[ord(c) for c in str(prompt_id)],
        response_ids=[100 + sample_index] * length,
        finish_reason=finish,
        sample_index=sample_index,
        reward=reward,
    )


def _group(prompt_id, rewards, lengths=None):
    lengths = lengths or [3] * len(rewards)
    return [_sample(prompt_id, i, r, length=n) for i, (r, n) in enumerate(zip(rewards, lengths))]


def _by_prompt(pairs):
    return {pair.prompt_id: pair for pair in pairs}


def test_chosen_is_best_and_rejected_is_worst():
    samples = _group(0, [0.0, 1.0, 0.5, 0.0]) + _group(1, [0.2, 0.9])
    pairs, stats = build_online_pairs(samples)
    first, second = pairs
    assert (first.prompt_id, first.chosen_sample_index, first.chosen_reward, first.rejected_reward) == (
        0,
        1,
        1.0,
        0.0,
    )
    assert first.chosen_ids == [101] * 3 and first.prompt_ids == [ord("0")]
    assert not first.chosen_is_gold
    assert (second.chosen_sample_index, second.rejected_sample_index) == (1, 0)
    assert stats == PairStats(prompts=2, pairs_built=2)


def test_equal_best_scores_use_tie_break_then_sample_index():
    # Two correct and two wrong, opt-in tie_break="shorter": the shorter correct one is chosen, the longer
    # wrong one rejected.
    samples = _group(0, [1.0, 1.0, 0.0, 0.0], lengths=[5, 2, 4, 6])
    pair = build_online_pairs(samples, tie_break="shorter")[0][0]
    assert (pair.chosen_sample_index, pair.rejected_sample_index) == (1, 3)
    samples = _group(0, [1.0, 1.0, 0.0, 0.0])  # equal lengths: lowest index chosen, highest rejected
    pair = build_online_pairs(samples, tie_break="shorter")[0][0]
    assert (pair.chosen_sample_index, pair.rejected_sample_index) == (0, 3)


@pytest.mark.parametrize("lengths", [[9, 2, 1, 8], [1, 2, 9, 8], [3, 3, 3, 3], [2, 9, 8, 1]])
def test_default_tie_break_ranks_by_reward_then_index_never_by_length(lengths):
    # n=4, a non-tied prompt: two correct, two wrong. The default picks the lowest-index correct sample and the
    # highest-index wrong one whatever the lengths; the length-biased opt-in would follow the lengths instead.
    samples = _group(0, [1.0, 0.0, 1.0, 0.0], lengths=lengths)
    pair = build_online_pairs(samples)[0][0]
    assert (pair.chosen_sample_index, pair.rejected_sample_index) == (0, 3)
    assert build_online_pairs(samples, tie_break="first")[0][0] == pair
    shorter = build_online_pairs(samples, tie_break="shorter")[0][0]
    correct, wrong = [0, 2], [1, 3]
    assert shorter.chosen_sample_index == min(correct, key=lambda i: (lengths[i], i))
    assert shorter.rejected_sample_index == max(wrong, key=lambda i: (lengths[i], i))


def test_default_tie_break_matches_the_config_default():
    import dataclasses

    from spin_megatron.config import AlgorithmConfig

    config_default = {f.name: f.default for f in dataclasses.fields(AlgorithmConfig)}["tie_break"]
    assert config_default == "first"
    samples = _group(0, [1.0, 1.0, 0.0, 0.0], lengths=[5, 2, 4, 6])
    default = build_online_pairs(samples)[0][0]
    assert default == build_online_pairs(samples, tie_break=config_default)[0][0]
    assert (default.chosen_sample_index, default.rejected_sample_index) == (0, 3)


def test_ties_are_dropped_and_counted():
    samples = (
        _group("all-right", [1.0, 1.0, 1.0]) + _group("all-wrong", [0.0, 0.0]) + _group("mixed", [1.0, 0.0])
    )
    pairs, stats = build_online_pairs(samples)
    assert [pair.prompt_id for pair in pairs] == ["mixed"]
    assert (stats.prompts, stats.pairs_built, stats.dropped_ties) == (3, 1, 2)
    assert (stats.all_correct, stats.all_wrong, stats.kept_ties) == (1, 1, 0)
    metrics = stats.as_metrics()
    assert metrics["pairs/kept"] == 1.0 and metrics["pairs/dropped_ties"] == 2.0
    assert metrics["pairs/all_correct"] == 1.0 and metrics["pairs/all_wrong"] == 1.0
    assert all(key.startswith("pairs/") and isinstance(value, float) for key, value in metrics.items())


def test_correct_threshold_classifies_ties():
    # A custom reward may tie at 0.5: below the default threshold that is "all wrong", at 0.5 "all correct".
    _, stats = build_online_pairs(_group(0, [0.5, 0.5]))
    assert (stats.dropped_ties, stats.all_correct, stats.all_wrong) == (1, 0, 1)
    _, stats = build_online_pairs(_group(0, [0.5, 0.5]), correct_threshold=0.5)
    assert (stats.dropped_ties, stats.all_correct, stats.all_wrong) == (1, 1, 0)


@pytest.mark.parametrize(
    "tie_break, expected",
    [("shorter", (1, 2)), ("longer", (2, 1)), ("first", (0, 3))],
)
def test_kept_ties_follow_the_tie_break(tie_break, expected):
    samples = _group(0, [1.0] * 4, lengths=[4, 2, 9, 4])
    pairs, stats = build_online_pairs(samples, tie_policy="keep", tie_break=tie_break)
    assert (pairs[0].chosen_sample_index, pairs[0].rejected_sample_index) == expected
    assert (stats.kept_ties, stats.dropped_ties, stats.all_correct) == (1, 0, 1)


def test_kept_tie_with_equal_lengths_uses_sample_index():
    pairs, _ = build_online_pairs(_group(0, [0.0] * 3), tie_policy="keep")
    assert (pairs[0].chosen_sample_index, pairs[0].rejected_sample_index) == (0, 2)


def _truncation_case():
    # Sample 0 has the right answer but ran out of tokens; sample 1 is wrong but ended with EOS.
    return [_sample(0, 0, 1.0, length=2, finish="length"), _sample(0, 1, 0.0, length=5)]


def test_missing_eos_keep_prefers_the_reward():
    pair = build_online_pairs(_truncation_case())[0][0]
    assert (pair.chosen_sample_index, pair.chosen_truncated, pair.rejected_truncated) == (0, True, False)


def test_missing_eos_penalize():
    pairs, stats = build_online_pairs(_truncation_case(), missing_eos="penalize")
    assert pairs == [] and stats.dropped_ties == 1 and stats.penalized_truncated == 1
    assert (stats.all_correct, stats.all_wrong) == (0, 0)  # raw rewards are mixed
    pairs, _ = build_online_pairs(_truncation_case(), missing_eos="penalize", missing_eos_penalty=2.0)
    assert (pairs[0].chosen_sample_index, pairs[0].rejected_sample_index) == (1, 0)
    assert pairs[0].rejected_reward == 1.0  # raw reward is reported, not the penalised score


def test_missing_eos_exclude():
    pairs, stats = build_online_pairs(_truncation_case(), missing_eos="exclude")
    assert pairs == [] and stats.dropped_too_few == 1 and stats.excluded_truncated == 1
    samples = _truncation_case() + [_sample(0, 2, 1.0, length=9)]
    pairs, stats = build_online_pairs(samples, missing_eos="exclude")
    assert (pairs[0].chosen_sample_index, pairs[0].rejected_sample_index) == (2, 1)
    assert stats.excluded_truncated == 1


def _random_batch(rng):
    samples = []
    for prompt_id in range(20):
        for sample_index in range(rng.randint(1, 5)):
            samples.append(
                _sample(
                    prompt_id,
                    sample_index,
                    rng.choice([0.0, 0.1, 1.0, 1.1]),
                    length=rng.randint(1, 4),
                    finish=rng.choice(["stop", "stop", "length"]),
                )
            )
    return samples


@pytest.mark.parametrize(
    "options",
    [
        dict(tie_policy=p, tie_break=b, missing_eos=m)
        for p, b, m in itertools.product(
            ["drop", "keep"], ["shorter", "longer", "first"], ["keep", "penalize", "exclude"]
        )
    ],
)
def test_shuffled_input_gives_identical_pairs(options):
    samples = _random_batch(random.Random(0))
    expected = build_online_pairs(samples, **options)
    assert expected[0], "the random batch should produce some pairs"
    for seed in range(5):
        shuffled = list(samples)
        random.Random(seed).shuffle(shuffled)
        assert build_online_pairs(shuffled, **options) == expected


def test_interleaved_prompts_are_grouped_by_id():
    # Positional pairing (0,1), (2,3) would pair samples of different prompts.
    samples = [_sample("b", 0, 0.0), _sample("a", 0, 1.0), _sample("b", 1, 1.0), _sample("a", 1, 0.0)]
    pairs, _ = build_online_pairs(samples)
    assert [pair.prompt_id for pair in pairs] == ["a", "b"]  # sorted by prompt id
    for pair in pairs:
        assert pair.prompt_ids == [ord(pair.prompt_id)]
    assert (_by_prompt(pairs)["a"].chosen_sample_index, _by_prompt(pairs)["b"].chosen_sample_index) == (0, 1)


def test_mixed_type_prompt_ids_have_a_fixed_order():
    samples = _group(1, [1.0, 0.0]) + _group("x", [1.0, 0.0])
    orders = {
        tuple(pair.prompt_id for pair in build_online_pairs(order)[0]) for order in (samples, samples[::-1])
    }
    assert len(orders) == 1


def test_single_sample_prompts():
    pairs, stats = build_online_pairs(_group(0, [1.0, 0.0]) + _group(1, [1.0]))
    assert len(pairs) == 1 and stats.dropped_too_few == 1
    with pytest.raises(ConfigError, match="at least 2 samples per prompt.*rollout.n"):
        build_online_pairs(_group(0, [1.0]) + _group(1, [0.0]))
    assert build_online_pairs([]) == ([], PairStats())


def test_missing_or_bad_rewards_are_errors():
    with pytest.raises(ValueError, match="sample 1 of prompt 0 has no reward"):
        build_online_pairs(_group(0, [1.0, None]))
    with pytest.raises(ValueError, match="non-finite"):
        build_online_pairs(_group(0, [1.0, float("nan")]))


def test_malformed_groups_are_errors():
    with pytest.raises(ValueError, match="duplicate sample_index"):
        build_online_pairs([_sample(0, 0, 1.0), _sample(0, 0, 0.0)])
    other_prompt = _sample(0, 1, 0.0)
    other_prompt.prompt_ids = [9, 9]
    with pytest.raises(ValueError, match="different prompt_ids"):
        build_online_pairs([_sample(0, 0, 1.0), other_prompt])


@pytest.mark.parametrize(
    "options, fragment",
    [
        (dict(tie_policy="random"), "algorithm.tie_policy must be one of 'drop', 'keep'; got 'random'"),
        (dict(tie_break="shortest"), "algorithm.tie_break must be one of 'first', 'shorter', 'longer'"),
        (dict(missing_eos="drop"), "algorithm.missing_eos must be one of 'keep', 'penalize', 'exclude'"),
        (dict(missing_eos_penalty=-1.0), "algorithm.missing_eos_penalty"),
        (dict(missing_eos_penalty=float("inf")), "algorithm.missing_eos_penalty"),
    ],
)
def test_invalid_options(options, fragment):
    with pytest.raises(ConfigError) as info:
        build_online_pairs(_group(0, [1.0, 0.0]), **options)
    assert fragment in str(info.value)


# ---------------------------------------------------------------------------------------------- spin


GOLD = {0: [7, 7, 7], 1: [8, 8]}


def test_spin_pairs_gold_against_lowest_index_sample():
    samples = [_sample(1, 1, None), _sample(0, 2, None), _sample(0, 0, 0.0), _sample(1, 0, None)]
    pairs, stats = build_spin_pairs(samples, GOLD)
    assert [(pair.prompt_id, pair.rejected_sample_index) for pair in pairs] == [(0, 0), (1, 0)]
    first = pairs[0]
    assert first.chosen_is_gold and first.chosen_ids == [7, 7, 7] and first.rejected_ids == [100] * 3
    assert (first.chosen_reward, first.rejected_reward, first.chosen_sample_index) == (None, 0.0, None)
    assert first.prompt_ids == [ord("0")]
    assert (stats.prompts, stats.pairs_built) == (2, 2)


@pytest.mark.parametrize("pairs_per_prompt, expected", [(2, [0, 1]), ("all", [0, 1, 2]), (5, [0, 1, 2])])
def test_spin_pairs_per_prompt(pairs_per_prompt, expected):
    samples = [_sample(0, i, None) for i in (2, 0, 1)]
    pairs, _ = build_spin_pairs(samples, GOLD, pairs_per_prompt=pairs_per_prompt)
    assert [pair.rejected_sample_index for pair in pairs] == expected


def test_spin_exclude_truncated():
    samples = [
        _sample(0, 0, None, finish="length"),
        _sample(0, 1, None),
        _sample(1, 0, None, finish="length"),
    ]
    pairs, stats = build_spin_pairs(samples, GOLD, missing_eos="exclude")
    assert [(pair.prompt_id, pair.rejected_sample_index) for pair in pairs] == [(0, 1)]
    assert (stats.excluded_truncated, stats.dropped_too_few) == (2, 1)
    pairs, _ = build_spin_pairs(samples, GOLD)
    assert [pair.rejected_truncated for pair in pairs] == [True, True]


def test_spin_shuffle_invariance():
    samples = [_sample(prompt_id, i, None) for prompt_id in (0, 1) for i in range(3)]
    expected = build_spin_pairs(samples, GOLD, pairs_per_prompt="all")
    for seed in range(5):
        shuffled = list(samples)
        random.Random(seed).shuffle(shuffled)
        assert build_spin_pairs(shuffled, GOLD, pairs_per_prompt="all") == expected


def test_spin_errors():
    with pytest.raises(ConfigError, match="no gold response for prompt id\\(s\\) 'q9'"):
        build_spin_pairs([_sample("q9", 0, None)], GOLD)
    with pytest.raises(ValueError, match="gold response of prompt 0 is empty"):
        build_spin_pairs([_sample(0, 0, None)], {0: []})
    with pytest.raises(ConfigError, match="'penalize'.*spin mode"):
        build_spin_pairs([_sample(0, 0, None)], GOLD, missing_eos="penalize")
    with pytest.raises(ConfigError, match="algorithm.missing_eos must be one of 'keep', 'exclude'"):
        build_spin_pairs([_sample(0, 0, None)], GOLD, missing_eos="bogus")
    for bad in (0, "some", 1.5, True):
        with pytest.raises(ConfigError, match="algorithm.pairs_per_prompt"):
            build_spin_pairs([_sample(0, 0, None)], GOLD, pairs_per_prompt=bad)
