import json

import pytest

from spin_megatron.errors import ConfigError, MissingPathError, UnsupportedModelError
from spin_megatron.models.arch import arch_from_hf_config, load_arch

QWEN_05B = {  # Qwen2.5-0.5B-Instruct's config.json (transformers 4.x layout)
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_act": "silu",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
    "torch_dtype": "bfloat16",
}


def test_qwen25_config_parses():
    arch = arch_from_hf_config(QWEN_05B)
    assert arch.architecture == "Qwen2ForCausalLM" and arch.qkv_bias and arch.tie_word_embeddings
    assert (arch.num_attention_heads, arch.num_kv_heads, arch.head_dim) == (14, 2, 64)
    assert arch.rope_theta == 1e6 and arch.rope_scaling is None
    assert arch.padded_vocab_size(1) == arch.padded_vocab_size(2) == 151936
    assert arch.valid_tp_sizes() == [1, 2]


def test_shared_qwen_config_if_present(qwen_tokenizer_dir):
    arch = load_arch(qwen_tokenizer_dir)
    assert arch.hidden_size == 896 and arch.num_layers == 24


def test_transformers5_rope_parameters_layout():
    cfg = {**QWEN_05B, "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}}
    del cfg["rope_theta"]
    assert arch_from_hf_config(cfg).rope_theta == 5000.0


def test_llama3_rope_scaling_accepted_and_other_params_refused():
    base = {
        **QWEN_05B,
        "architectures": ["LlamaForCausalLM"],
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
    }
    scaling = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    arch = arch_from_hf_config({**base, "rope_scaling": scaling})
    assert arch.rope_scaling.kind == "llama3" and arch.rope_scaling.factor == 32.0 and not arch.qkv_bias
    with pytest.raises(UnsupportedModelError, match="high_freq_factor"):
        arch_from_hf_config({**base, "rope_scaling": {**scaling, "high_freq_factor": 2.0}})
    with pytest.raises(UnsupportedModelError, match="yarn"):
        arch_from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["MistralForCausalLM"]}, "unsupported architecture"),
        ({"architectures": ["LlamaForCausalLM"], "attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"use_sliding_window": True}, "sliding_window"),
    ],
)
def test_unsupported_features_are_refused(change, message):
    with pytest.raises(UnsupportedModelError, match=message):
        arch_from_hf_config({**QWEN_05B, **change})


def test_missing_key_is_named():
    cfg = dict(QWEN_05B)
    del cfg["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        arch_from_hf_config(cfg)


def test_parallel_checks_name_the_problem_and_valid_values():
    arch = arch_from_hf_config(QWEN_05B)
    arch.check_parallel(2, 4)
    with pytest.raises(
        ConfigError,
        match=r"parallel.tp=4 does not divide the model's 14 attention heads; valid values for this model: 1, 2",
    ):
        arch.check_parallel(4, 1)
    with pytest.raises(ConfigError, match=r"parallel.pp=5 does not divide the model's 24 layers"):
        arch.check_parallel(1, 5)
    with pytest.raises(ConfigError, match="key/value heads"):
        arch_from_hf_config({**QWEN_05B, "num_attention_heads": 16}).check_parallel(4, 1)


def test_padding_depends_on_tp_only_when_needed():
    arch = arch_from_hf_config({**QWEN_05B, "vocab_size": 250})
    assert arch.padded_vocab_size(1) == 256 and arch.padded_vocab_size(2) == 256
    assert arch.padded_vocab_size(3) == 384


def test_load_arch_errors(tmp_path):
    with pytest.raises(MissingPathError, match="config.json"):
        load_arch(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_arch(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(QWEN_05B))
    assert load_arch(tmp_path).vocab_size == 151936


QWEN3_8B = {  # Qwen3-8B's config.json (the fields that matter)
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
QWEN3_30B_A3B = {  # Qwen3-30B-A3B's config.json (the fields that matter)
    **QWEN3_8B,
    "architectures": ["Qwen3MoeForCausalLM"],
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "router_aux_loss_coef": 0.001,
}


def test_qwen3_head_dim_comes_from_the_config():
    arch = arch_from_hf_config({**QWEN3_8B, "hidden_size": 1024, "num_attention_heads": 16})  # as Qwen3-0.6B
    assert arch.head_dim == 128 != 1024 // 16 and arch.qk_norm and not arch.qkv_bias and arch.moe is None
    assert arch_from_hf_config({"model_type": "qwen3", **QWEN3_8B, "architectures": []}).qk_norm


def test_qwen3_moe_settings_and_the_per_layer_pattern():
    moe = arch_from_hf_config(QWEN3_30B_A3B).moe
    assert (moe.num_experts, moe.top_k, moe.intermediate_size, moe.norm_topk_prob) == (128, 8, 768, True)
    assert moe.layer_pattern == (1,) * 48 and moe.router_aux_loss_coef == 0.001
    # transformers 5 saves num_experts as num_local_experts; dense layers by mlp_only_layers and sparse step
    cfg = {**QWEN3_30B_A3B, "num_hidden_layers": 6, "mlp_only_layers": [0], "decoder_sparse_step": 2}
    cfg["num_local_experts"] = cfg.pop("num_experts")
    moe = arch_from_hf_config(cfg).moe
    assert moe.num_experts == 128 and moe.layer_pattern == (0, 1, 0, 1, 0, 1)
    with pytest.raises(UnsupportedModelError, match="no layer is a mixture-of-experts layer"):
        arch_from_hf_config({**QWEN3_30B_A3B, "num_hidden_layers": 2, "mlp_only_layers": [0, 1]})
    with pytest.raises(UnsupportedModelError, match="attention_bias"):
        arch_from_hf_config({**QWEN3_30B_A3B, "attention_bias": True})


def test_expert_parallel_checks_name_the_setting():
    arch = arch_from_hf_config({**QWEN3_30B_A3B, "num_experts": 6, "num_experts_per_tok": 2})
    arch.check_parallel(4, 2, ep=3, etp=1)
    with pytest.raises(
        ConfigError, match=r"parallel.ep=4 does not divide the model's 6 experts; valid .*: 1, 2, 3, 6"
    ):
        arch.check_parallel(1, 1, ep=4)
    with pytest.raises(
        ConfigError, match=r"parallel.etp=5 does not divide the model's 768 expert intermediate"
    ):
        arch.check_parallel(1, 1, etp=5)
    with pytest.raises(ConfigError, match=r"parallel.tp=8 does not divide the model's 4 key/value heads"):
        arch.check_parallel(8, 1, etp=1)  # Qwen3 TP larger than the KV heads
    with pytest.raises(ConfigError, match=r"parallel.ep=2 splits experts, but Qwen3ForCausalLM has none"):
        arch_from_hf_config(QWEN3_8B).check_parallel(1, 1, ep=2)


def test_signatures_of_dense_models_are_unchanged_and_moe_ones_are_json():
    assert "moe" not in arch_from_hf_config(QWEN_05B).signature()  # checkpoints written before still resume
    sig = arch_from_hf_config(QWEN3_30B_A3B).signature()
    assert sig == json.loads(json.dumps(sig)) and sig["moe"]["layer_pattern"] == [1] * 48
