"""The hf engine (sampling, determinism, log-probs, weight updates), dump/replay, and the agreement metric."""

import json

import pytest
import torch

from spin_megatron.errors import ConfigError
from spin_megatron.parallel.batching import response_logps, scoring_batch
from spin_megatron.rollout.agreement import logprob_agreement
from spin_megatron.rollout.hf_engine import HFEngine, sample_next_token
from spin_megatron.rollout.protocol import SamplingParams
from spin_megatron.rollout.replay import ReplayEngine, RolloutDump
from spin_megatron.types import Sample

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9], [10]]


@pytest.fixture(scope="module")
def engine(tiny_qwen2):
    return HFEngine.from_pretrained(tiny_qwen2)


def _teacher_forced_logps(engine, sample, temperature):
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = engine.model(ids).logits[0].float() / temperature
    positions = slice(len(sample.prompt_ids) - 1, ids.shape[1] - 1)
    return torch.log_softmax(logits, -1)[positions].gather(1, torch.tensor(sample.response_ids)[:, None])[
        :, 0
    ]


def test_sampling_is_deterministic_and_keyed_by_prompt(engine):
    params = SamplingParams(n=3, temperature=0.9, top_p=0.95, top_k=50, max_new_tokens=8, seed=11)
    first = engine.generate(PROMPTS, params, prompt_keys=["a", "b", "c"])
    second = engine.generate(PROMPTS, params, prompt_keys=["a", "b", "c"])
    assert [s.response_ids for s in first] == [s.response_ids for s in second]
    assert [(s.prompt_id, s.sample_index) for s in first] == [(k, i) for k in "abc" for i in range(3)]
    assert all(s.prompt_ids == PROMPTS["abc".index(s.prompt_id)] for s in first)
    other_seed = engine.generate(PROMPTS, SamplingParams(n=3, temperature=0.9, max_new_tokens=8, seed=12))
    assert [s.response_ids for s in other_seed] != [s.response_ids for s in first]


def test_logprobs_are_the_temperature_scaled_ones_of_the_sampled_tokens(engine):
    samples = engine.generate(PROMPTS, SamplingParams(n=2, temperature=0.7, max_new_tokens=10, seed=0))
    for sample in samples:  # left padding in the batch must not change anything
        torch.testing.assert_close(
            torch.tensor(sample.logprobs), _teacher_forced_logps(engine, sample, 0.7), atol=2e-6, rtol=0
        )


def test_greedy_decoding_and_stop_tokens(engine):
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=6))
    for sample in greedy:
        ids = list(sample.prompt_ids)
        for _ in range(6):
            with torch.no_grad():
                ids.append(int(engine.model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert sample.response_ids == ids[len(sample.prompt_ids) :] and sample.finish_reason == "length"
    stop = greedy[1].response_ids[2]
    stopped = engine.generate(
        PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=(stop,))
    )
    assert stopped[1].response_ids == greedy[1].response_ids[:3] and stopped[1].finish_reason == "stop"


def test_top_k_one_is_greedy():
    logits = torch.randn(4, 50)
    token, _ = sample_next_token(
        logits, SamplingParams(temperature=1.0, top_k=1), torch.Generator().manual_seed(0)
    )
    assert torch.equal(token, logits.argmax(-1))


def test_update_weights_checks_names_and_shapes(tiny_qwen2):
    engine = HFEngine.from_pretrained(tiny_qwen2)
    weight = engine.model.model.norm.weight
    engine.update_weights([("model.norm.weight", torch.full_like(weight, 2.0))])
    assert torch.all(engine.model.model.norm.weight == 2.0)
    with pytest.raises(KeyError, match="no parameter 'model.nope'"):
        engine.update_weights([("model.nope", weight)])
    with pytest.raises(ValueError, match="has shape"):
        engine.update_weights([("model.norm.weight", weight[:3])])


def test_engine_from_config_has_the_checkpoint_shapes(tiny_qwen2):
    config = json.loads((tiny_qwen2 / "config.json").read_text())
    engine = HFEngine.from_config(config)
    reference = HFEngine.from_pretrained(tiny_qwen2)
    assert {n: p.shape for n, p in engine.model.named_parameters()} == {
        n: p.shape for n, p in reference.model.named_parameters()
    }


def test_per_expert_weights_fill_the_fused_in_memory_experts(tiny_qwen3_moe):
    """transformers holds Qwen3-MoE experts fused ([E, 2I, H], [E, H, I]); the sync sends them per expert."""
    from safetensors.torch import load_file

    engine = HFEngine.from_config(json.loads((tiny_qwen3_moe / "config.json").read_text()))
    assert "model.layers.0.mlp.experts.gate_up_proj" in dict(engine.model.named_parameters())
    on_disk = load_file(tiny_qwen3_moe / "model.safetensors")
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in on_disk
    engine.update_weights(on_disk.items())
    reference = HFEngine.from_pretrained(tiny_qwen3_moe)
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        assert torch.equal(engine.model(ids).logits, reference.model(ids).logits)
    with pytest.raises(KeyError, match="experts.4.gate_proj"):  # 4 experts: 0..3
        engine.update_weights([("model.layers.0.mlp.experts.4.gate_proj.weight", on_disk["lm_head.weight"])])


def test_dump_and_replay_round_trip(engine, tmp_path):
    dump = RolloutDump(tmp_path / "rollouts.jsonl")
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=5, seed=3)
    recorded = [engine.generate(PROMPTS, params, prompt_keys=[10, 11, 12]) for _ in range(2)]
    recorded[0][0].reward = 1.0
    for step, samples in enumerate(recorded):
        dump.write(step, samples)
    replay = ReplayEngine(tmp_path / "rollouts.jsonl")
    for samples in recorded:
        again = replay.generate(PROMPTS, params, prompt_keys=[10, 11, 12])
        assert [vars(a) for a in again] == [vars(b) for b in samples]
    with pytest.raises(ConfigError, match="only 2 steps"):
        replay.generate(PROMPTS, params, prompt_keys=[10, 11, 12])
    with pytest.raises(ConfigError, match="recorded prompts differ"):
        ReplayEngine(tmp_path / "rollouts.jsonl").generate(PROMPTS[:2], params, prompt_keys=[11, 10])


def test_replay_reports_a_broken_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"step": 0, "prompt_id": 1}\nnot json\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1"):
        ReplayEngine(path)


def test_scoring_batch_lines_targets_up_with_responses():
    ids, targets = scoring_batch([[1, 2], [3]], [[7, 8, 9], [4]], pad_token_id=0)
    assert ids.tolist() == [[1, 2, 7, 8, 9], [3, 4, 0, 0, 0]]
    assert targets.tolist() == [[-100, 7, 8, 9, -100], [4, -100, -100, -100, -100]]
    logps = torch.arange(10, dtype=torch.float32).view(2, 5)
    assert [r.tolist() for r in response_logps(logps, targets)] == [[1.0, 2.0, 3.0], [5.0]]


def test_agreement_metric():
    samples = [
        Sample(prompt_id=0, prompt_ids=[1], response_ids=[2, 3], finish_reason="stop", logprobs=[-1.0, -2.0]),
        Sample(prompt_id=1, prompt_ids=[1], response_ids=[4], finish_reason="stop"),
    ]
    metrics = logprob_agreement(samples, [torch.tensor([-1.5, -2.0]), torch.tensor([-9.0])])
    assert metrics == {"rollout/logp_diff": 0.25, "rollout/logp_diff_max": 0.5}
    with pytest.raises(ValueError, match="engine gave 2 log-probs for 3"):
        logprob_agreement(samples[:1], [torch.zeros(3)])


def test_replay_serves_a_replicas_share_of_a_step(engine, tmp_path):
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=4, seed=5)
    recorded = engine.generate(PROMPTS, params, prompt_keys=[10, 11, 12])
    RolloutDump(tmp_path / "d.jsonl").write(1, recorded)
    share = ReplayEngine(tmp_path / "d.jsonl").generate(PROMPTS[1:], params, prompt_keys=[11, 12])
    assert [(s.prompt_id, s.sample_index) for s in share] == [(11, 0), (11, 1), (12, 0), (12, 1)]


def test_engine_check_counts_per_position_and_says_what_is_wrong():
    """A prompt asked twice needs 2n samples (the old check collapsed repeats into one key and refused a correct
    answer with 'returned 4 samples for 4 prompts'); a wrong answer names the prompt and the counts."""
    from spin_megatron.rollout.supervisor import RolloutError, check_samples
    from spin_megatron.types import Sample

    def sample(key, index):
        return Sample(
            prompt_id=key, prompt_ids=[1], response_ids=[2], finish_reason="stop", sample_index=index
        )

    check_samples(
        [sample("a", 0), sample("b", 0), sample("a", 0), sample("c", 0)], ["a", "b", "a", "c"], 1, 8
    )
    with pytest.raises(RolloutError, match=r"1 for prompt 'b' \(expected 2\)"):
        check_samples([sample("a", 0), sample("a", 1), sample("b", 0)], ["a", "b"], 2, 8)
    with pytest.raises(RolloutError, match="'z', which was not asked"):
        check_samples([sample("a", 0), sample("z", 0)], ["a", "b"], 1, 8)
    with pytest.raises(RolloutError, match="sample_index 0 of prompt 'a' more than once"):
        check_samples([sample("a", 0), sample("a", 0)], ["a"], 2, 8)
