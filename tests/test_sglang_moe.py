"""Qwen3-MoE on a REAL sglang 0.5.23 server on CPU (see test_sglang_real.py for the setup): SGLang's own
Qwen3MoeForCausalLM serves a tiny checkpoint with log-probs equal to transformers', and takes full weight syncs
under the per-expert HF names the trainer's export produces (``mlp.experts.<g>.gate_proj|up_proj|down_proj``,
not transformers' fused in-memory ``gate_up_proj``) in both sync modes, after which it scores like the new
weights. SGLang 0.5.23 builds every Qwen3-MoE layer as an MoE layer (``stage_facts`` in its qwen3_moe.py ignores
``mlp_only_layers`` / ``decoder_sparse_step``; such a checkpoint is served wrong, seen here: greedy log-prob gap
0.39), so the trainer refuses that combination (tests/test_train_config.py) and the model here is all-MoE, as
Qwen3-30B-A3B and Qwen3-235B-A22B are."""

from __future__ import annotations

import pytest
import torch

from spin_megatron.models.tiny import make_tiny_hf_model
from spin_megatron.rollout.protocol import SamplingParams
from spin_megatron.rollout.sglang.config import SGLangConfig
from spin_megatron.rollout.sglang.engine import SGLangEngine
from tests.sglang_real_server import cpu_server_config, hf_logprobs, perturbed_state

pytestmark = [pytest.mark.sglang_real, pytest.mark.slow]
PROMPTS = [[9707, 11, 1879, 0], [3838, 374, 220, 17, 10, 17, 30], [785, 6722]]


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory, qwen_tokenizer_dir):
    return make_tiny_hf_model(
        tmp_path_factory.mktemp("hf") / "qwen3_moe_qwen_vocab", "qwen3_moe", seed=7,
        tokenizer_dir=qwen_tokenizer_dir, vocab_size=151936, num_hidden_layers=2,
    )  # fmt: skip


@pytest.fixture(scope="module")
def server(sglang_python, moe_model, tmp_path_factory):
    config = cpu_server_config(sglang_python, moe_model, log_dir=tmp_path_factory.mktemp("sglang_moe_logs"))
    with SGLangEngine(config) as engine:
        yield engine


def per_expert(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """transformers' in-memory state with its fused experts split into the on-disk, per-expert names."""
    named = []
    for name, tensor in state.items():
        prefix, _, kind = name.rpartition(".")
        if kind == "gate_up_proj":
            for g, fused in enumerate(tensor):
                gate, up = fused.chunk(2, dim=0)
                named += [(f"{prefix}.{g}.gate_proj.weight", gate), (f"{prefix}.{g}.up_proj.weight", up)]
        elif kind == "down_proj" and tensor.dim() == 3:
            named += [(f"{prefix}.{g}.down_proj.weight", t) for g, t in enumerate(tensor)]
        else:
            named.append((name, tensor))
    return named


def _greedy_gap(engine, model_dir, state) -> float:
    samples = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=8))
    gaps = []
    for sample in samples:
        ours = hf_logprobs(model_dir, state, sample.prompt_ids, sample.response_ids)
        gaps.append(max(abs(a - b) for a, b in zip(ours, sample.logprobs)))
    return max(gaps)


def test_sglang_serves_qwen3_moe_like_transformers(server, moe_model):
    assert _greedy_gap(server, moe_model, None) < 1e-4


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_per_expert_weight_sync_then_the_server_scores_like_the_new_weights(server, moe_model, mode):
    state = perturbed_state(moe_model, seed={"colocated": 1, "disaggregated": 2}[mode])
    named = per_expert(state)
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in dict(named)
    assert "model.layers.1.self_attn.k_norm.weight" in dict(named)
    with SGLangEngine(SGLangConfig(urls=tuple(server.urls), sync_mode=mode, request_timeout_s=120)) as engine:
        for first in range(0, len(named), 8):
            engine.update_weights(named[first : first + 8])
        engine.finish_weight_update()
        assert _greedy_gap(engine, moe_model, state) < 1e-4
