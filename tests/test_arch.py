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
