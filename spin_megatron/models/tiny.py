"""Tiny random-weight Qwen2 / Llama checkpoints in HF format, for tests, the demo and benchmarks.

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


def make_tiny_hf_model(
    out_dir: str | Path,
    architecture: str = "qwen2",
    *,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    **overrides,
) -> Path:
    """Write a random ``Qwen2ForCausalLM`` or ``LlamaForCausalLM`` (``architecture`` qwen2 | llama) to ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    if architecture not in classes:
        raise ValueError(f"architecture must be one of {sorted(classes)}, got {architecture!r}")
    config_cls, model_cls = classes[architecture]
    kwargs = {**TINY_DEFAULTS, "tie_word_embeddings": architecture == "llama", **overrides}
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
