"""Tiny random-weight Qwen2 / Llama / Qwen3 / Qwen3-MoE checkpoints in HF format, for tests, the demo and benchmarks.

Nothing can be downloaded here, so small models are built from configs. Norm weights and biases are randomised
too (HF initialises them to 1 and 0), so a mapping that swaps or drops them cannot pass a parity test.
"""

from __future__ import annotations

from pathlib import Path

import torch

from spin_megatron.models.hf_io import copy_tokenizer_files

TINY_DEFAULTS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=250,  # not a multiple of 128: exercises Megatron's vocab padding
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    initializer_range=0.05,
)
# Qwen3's head_dim is its own setting (Qwen3-0.6B: 128 with hidden 1024 and 16 heads): 24 ≠ 64 / 4 here.
QWEN3_DEFAULTS = dict(head_dim=24)
# A Qwen3-MoE small enough for 2 CPU cores: 4 experts of width 32, 2 routed per token, renormalised.
QWEN3_MOE_DEFAULTS = dict(
    head_dim=24,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    norm_topk_prob=True,
    router_aux_loss_coef=0.001,
)
_ARCH_DEFAULTS = {"qwen3": QWEN3_DEFAULTS, "qwen3_moe": QWEN3_MOE_DEFAULTS}
_ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def tiny_arch_settings(architecture: str, **moe) -> dict:
    """The config.json keys that :func:`make_tiny_hf_model` adds for ``architecture`` (beyond the shape keys),
    MoE ones (``num_experts``, ...) overriding the defaults: for reading a tiny model's architecture unbuilt."""
    settings = {"architectures": [_ARCHITECTURES[architecture]], **_ARCH_DEFAULTS.get(architecture, {})}
    if architecture == "qwen3_moe":
        settings.update(moe)
    return settings


def make_tiny_hf_model(
    out_dir: str | Path,
    architecture: str = "qwen2",
    *,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    **overrides,
) -> Path:
    """Write a random model (``architecture`` qwen2 | llama | qwen3 | qwen3_moe) to ``out_dir``."""
    import transformers as tf

    classes = {
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
    }
    if architecture not in classes:
        raise ValueError(f"architecture must be one of {sorted(classes)}, got {architecture!r}")
    config_cls, model_cls = classes[architecture]
    kwargs = {
        **TINY_DEFAULTS,
        **_ARCH_DEFAULTS.get(architecture, {}),
        "tie_word_embeddings": architecture == "llama",
        **overrides,
    }
    kwargs.setdefault("architectures", [model_cls.__name__])
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.05)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out_dir)
    return out_dir
