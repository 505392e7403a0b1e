"""The HF <-> Megatron mapping as pure functions: layouts checked by hand, round trips bit-exact at every TP."""

import pytest
import torch

from spin_megatron.errors import CheckpointError
from spin_megatron.models.arch import arch_from_hf_config
from spin_megatron.models.mapping import canonical_name, mapping_for

CFG = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 50,
    "tie_word_embeddings": False,
}


def _mapping(**change):
    arch = arch_from_hf_config({**CFG, **change})
    return mapping_for(arch, arch.padded_vocab_size(4))


def _random_hf(mapping):
    gen = torch.Generator().manual_seed(0)
    return {n: torch.randn(mapping.hf_shape(n), generator=gen) for n in mapping.expected_hf_names()}


def test_qkv_layout_is_grouped_per_kv_head():
    # 4 query heads, 2 KV groups, head_dim 1, hidden 1: Megatron wants [q0 q1 k0 v0 | q2 q3 k1 v1].
    arch = arch_from_hf_config(
        {
            **CFG,
            "hidden_size": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 1,
            "intermediate_size": 2,
        }
    )
    mapping = mapping_for(arch, 128)
    hf = {
        "model.layers.0.self_attn.q_proj.bias": torch.tensor([0.0, 1, 2, 3]),
        "model.layers.0.self_attn.k_proj.bias": torch.tensor([10.0, 11]),
        "model.layers.0.self_attn.v_proj.bias": torch.tensor([20.0, 21]),
    }
    name = "decoder.layers.0.self_attention.linear_qkv.bias"
    assert mapping.to_mcore(name, hf, 0, 1).tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert mapping.to_mcore(name, hf, 1, 2).tolist() == [2, 3, 11, 21]


def test_fc1_shard_is_gate_then_up_of_the_same_rows():
    mapping = _mapping()
    hf = _random_hf(mapping)
    shard = mapping.to_mcore("decoder.layers.1.mlp.linear_fc1.weight", hf, 1, 2)
    gate, up = hf["model.layers.1.mlp.gate_proj.weight"], hf["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(shard, torch.cat([gate[12:], up[12:]]))


def test_vocab_rows_are_padded_with_zeros_and_split():
    mapping = _mapping()
    hf = _random_hf(mapping)
    shards = [mapping.to_mcore("embedding.word_embeddings.weight", hf, r, 2) for r in range(2)]
    assert [s.shape[0] for s in shards] == [64, 64]
    assert torch.equal(shards[0][:50], hf["model.embed_tokens.weight"])
    assert torch.count_nonzero(shards[0][50:]) == 0 and torch.count_nonzero(shards[1]) == 0


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_bit_exact(tp, tied):
    mapping = _mapping(tie_word_embeddings=tied)
    hf = _random_hf(mapping)
    rebuilt = {}
    names = mapping.mcore_names(range(2), pre_process=True, post_process=True)
    assert ("output_layer.weight" in names) == (not tied)
    for name in names:
        shards = [mapping.to_mcore(name, hf, r, tp) for r in range(tp)]
        for hf_name, tensor in mapping.to_hf(name, shards):
            rebuilt[hf_name] = tensor
    assert sorted(rebuilt) == sorted(hf)
    for name, tensor in hf.items():
        assert torch.equal(rebuilt[name], tensor), name


def test_last_pipeline_stage_of_a_tied_model_holds_a_copy_of_the_embedding():
    mapping = _mapping(tie_word_embeddings=True)
    names = mapping.mcore_names(range(1, 2), pre_process=False, post_process=True)
    assert names[-1] == "output_layer.weight"
    assert mapping.hf_names("output_layer.weight") == ["model.embed_tokens.weight"]


def test_te_spec_names_map_to_local_names():
    assert canonical_name("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight") == (
        "decoder.layers.3.input_layernorm.weight"
    )
    assert canonical_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") == (
        "decoder.layers.0.pre_mlp_layernorm.weight"
    )


def test_wrong_shape_and_unknown_names_are_clear_errors():
    mapping = _mapping()
    hf = _random_hf(mapping)
    hf["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 16)
    with pytest.raises(CheckpointError, match=r"k_proj.weight has shape \(3, 16\), expected \(8, 16\)"):
        mapping.to_mcore("decoder.layers.0.self_attention.linear_qkv.weight", hf, 0, 1)
    with pytest.raises(CheckpointError, match="no HF mapping"):
        mapping.hf_names("decoder.layers.0.mlp.router.weight")


def test_llama_has_no_qkv_bias_parameter():
    mapping = _mapping(architectures=["LlamaForCausalLM"])
    assert not any(n.endswith("linear_qkv.bias") for n in mapping.mcore_names(range(2), True, True))
    assert not any(n.endswith(".bias") for n in mapping.expected_hf_names())


MOE_CFG = {
    **CFG,
    "architectures": ["Qwen3MoeForCausalLM"],
    "num_hidden_layers": 3,
    "head_dim": 6,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 10,
    "mlp_only_layers": [1],
}


def test_qwen3_qk_norms_are_replicated_and_experts_numbered_globally():
    mapping = _mapping(**MOE_CFG)
    assert mapping.hf_names("decoder.layers.0.self_attention.q_layernorm.weight") == [
        "model.layers.0.self_attn.q_norm.weight"
    ]
    assert not mapping.is_tp_sharded("decoder.layers.2.self_attention.k_layernorm.weight")
    assert mapping.hf_shape("model.layers.0.self_attn.k_norm.weight") == (6,)
    assert mapping.hf_names("decoder.layers.2.mlp.router.weight") == ["model.layers.2.mlp.gate.weight"]
    fc1 = "decoder.layers.2.mlp.experts.local_experts.3.linear_fc1.weight"
    assert mapping.is_expert(fc1) and not mapping.is_expert("decoder.layers.2.mlp.router.weight")
    assert mapping.hf_names(fc1) == [
        "model.layers.2.mlp.experts.3.gate_proj.weight",
        "model.layers.2.mlp.experts.3.up_proj.weight",
    ]
    # layer 1 is dense (mlp_only_layers): no router, no experts there
    names = mapping.mcore_names(range(3), True, True)
    assert (
        "decoder.layers.1.mlp.linear_fc1.weight" in names
        and "decoder.layers.1.mlp.router.weight" not in names
    )
    with pytest.raises(CheckpointError, match="no HF mapping"):
        mapping.hf_names("decoder.layers.0.mlp.experts.local_experts.4.linear_fc1.weight")  # only 4 experts


def test_expert_slot_on_every_ep_rank():
    mapping = _mapping(**MOE_CFG)
    # 4 experts over EP=2: rank r holds r·2 + i; local slot 1 is experts 1 and 3
    assert mapping.ep_peers("model.layers.0.mlp.experts.3.down_proj.weight", 2) == [
        "model.layers.0.mlp.experts.1.down_proj.weight",
        "model.layers.0.mlp.experts.3.down_proj.weight",
    ]
    assert mapping.ep_peers("decoder.layers.2.mlp.experts.local_experts.0.linear_fc2.weight", 4) == [
        f"decoder.layers.2.mlp.experts.local_experts.{g}.linear_fc2.weight" for g in range(4)
    ]
    # TE's grouped-GEMM experts name their weights per local expert on the linear itself
    assert canonical_name("decoder.layers.5.mlp.experts.linear_fc2.weight7") == (
        "decoder.layers.5.mlp.experts.local_experts.7.linear_fc2.weight"
    )


@pytest.mark.parametrize("etp", [1, 2])
def test_moe_round_trip_is_bit_exact(etp):
    mapping = _mapping(**MOE_CFG)
    hf = _random_hf(mapping)
    rebuilt = {}
    for name in mapping.mcore_names(range(3), pre_process=True, post_process=True):
        size = etp if mapping.is_expert(name) else 2
        shards = [mapping.to_mcore(name, hf, r, size) for r in range(size)]
        rebuilt.update(mapping.to_hf(name, shards))
    assert sorted(rebuilt) == sorted(hf) and all(torch.equal(rebuilt[k], hf[k]) for k in hf)
