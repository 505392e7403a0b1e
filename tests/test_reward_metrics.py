"""algorithm.reward_metrics: extra rewards scored beside the pairing reward, summed and logged, never paired on."""

from collections import defaultdict

import pytest

from spin_megatron.algorithm.experience import (
    ROLLOUT_SUMS,
    attempt_scored,
    make_pairs,
    metric_reward_fns,
    rollout_sum_keys,
)
from spin_megatron.algorithm.rewards import get_reward_fn
from spin_megatron.algorithm.step_metrics import step_metrics
from spin_megatron.config import AlgorithmConfig
from spin_megatron.data import PromptExample
from spin_megatron.errors import ConfigError
from spin_megatron.rollout.protocol import SamplingParams
from spin_megatron.types import Sample

ROW = {"question": "q", "answer": "48+24=72\n#### 72"}
# (response text, gsm8k flexible, gsm8k_verl): the two rewards disagree on samples 2 and 3
RESPONSES = [("#### 72", 1, 1), ("#### 5", 0, 0), ("#### $72", 1, 0), ("The answer is 72.", 1, 0)]


class _Tokenizer:
    """Token ids are indexes into a list of texts; decode looks them up (prompt id 0 → "q")."""

    texts = ["q"] + [text for text, _, _ in RESPONSES]

    def decode(self, ids, skip_special_tokens=False):
        assert skip_special_tokens
        return "".join(self.texts[i] for i in ids)


class _Engine:
    def generate(self, prompt_ids, params, prompt_keys=None):
        return [
            Sample(
                prompt_id=key,
                prompt_ids=ids,
                response_ids=[1 + index],
                finish_reason="stop",
                sample_index=index,
            )
            for key, ids in zip(prompt_keys, prompt_ids)
            for index in range(params.n)
        ]


def _example():
    return PromptExample(prompt_id=7, prompt_ids=[0], gold_ids=[1], row=ROW)


def _scored(cfg):
    status, samples = attempt_scored(
        _Engine(),
        [_example()],
        SamplingParams(n=len(RESPONSES)),
        get_reward_fn(cfg.reward),
        _Tokenizer(),
        metric_reward_fns(cfg),
    )
    assert status == "ok", samples
    return samples


def test_sum_keys_append_the_metrics_in_config_order():
    cfg = AlgorithmConfig(reward_metrics=["gsm8k_verl", "gsm8k_strict"])
    assert rollout_sum_keys(cfg) == (
        *ROLLOUT_SUMS,
        "reward/gsm8k_verl/correct",
        "reward/gsm8k_strict/correct",
    )
    assert rollout_sum_keys(AlgorithmConfig()) == ROLLOUT_SUMS
    assert list(metric_reward_fns(cfg)) == ["gsm8k_verl", "gsm8k_strict"]


def test_metrics_are_scored_on_the_engine_rank_and_summed_but_not_paired_on():
    cfg = AlgorithmConfig(reward="gsm8k", reward_metrics=["gsm8k_verl"])
    samples = _scored(cfg)
    assert [s.reward for s in samples] == [float(flexible) for _, flexible, _ in RESPONSES]
    assert [s.metric_rewards for s in samples] == [{"gsm8k_verl": float(verl)} for _, _, verl in RESPONSES]
    experience = make_pairs(samples, [_example()], cfg)
    assert list(experience.sums)[-1] == "reward/gsm8k_verl/correct"
    assert experience.sums["reward/gsm8k_verl/correct"] == 1.0
    assert experience.sums["reward/correct"] == 3.0
    # Pairing follows algorithm.reward only: gsm8k rejects sample 1 (its only wrong one); paired on gsm8k_verl,
    # the rejected sample would be 3 (the last of three wrong ones).
    assert [[seq.response_ids for seq in pair] for pair in experience.items] == [[[1], [2]]]
    verl_cfg = AlgorithmConfig(reward="gsm8k_verl")
    paired_on_verl = make_pairs(_scored(verl_cfg), [_example()], verl_cfg)
    assert [[seq.response_ids for seq in pair] for pair in paired_on_verl.items] == [[[1], [4]]]
    assert "reward/gsm8k_verl/correct" not in paired_on_verl.sums


def test_unscored_metrics_are_an_error():
    samples = _scored(AlgorithmConfig())
    with pytest.raises(ValueError, match=r"reward_metrics \['gsm8k_verl'\] were not scored"):
        make_pairs(samples, [_example()], AlgorithmConfig(reward_metrics=["gsm8k_verl"]))


def test_step_metrics_turn_the_sums_into_accuracies():
    rollout = defaultdict(float, {"samples": 4.0, "reward/correct": 3.0, "reward/gsm8k_verl/correct": 1.0})
    metrics = step_metrics(
        rollout, defaultdict(float), defaultdict(float), grad_norm=None, lr=0.0, times={}, skipped_steps=0
    )
    assert metrics["reward/gsm8k_verl/accuracy"] == 0.25
    assert metrics["reward/accuracy"] == 0.75
    assert not [k for k in metrics if k.endswith("/correct")]
    # a reward model sets the ranking score: "score ≥ 1" is no accuracy (the rule's own metrics stay)
    by_model = step_metrics(rollout, defaultdict(float), defaultdict(float), grad_norm=None, lr=0.0, times={},
                            skipped_steps=0, score_is_rule=False)  # fmt: skip
    assert "reward/accuracy" not in by_model and by_model["reward/gsm8k_verl/accuracy"] == 0.25


def test_reward_metrics_must_be_distinct_names():
    with pytest.raises(ConfigError, match="algorithm.reward_metrics must list distinct reward names"):
        AlgorithmConfig(reward_metrics=["gsm8k_verl", "gsm8k_verl"])
    with pytest.raises(ConfigError, match="algorithm.reward_metrics"):
        AlgorithmConfig(reward_metrics=[""])
