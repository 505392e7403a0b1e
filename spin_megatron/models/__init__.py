"""HF config → Megatron-Core GPTModel (Qwen2, Llama), layer specs, and HF↔Megatron weight mapping."""

from spin_megatron.models.arch import SUPPORTED_ARCHITECTURES, ModelArch, arch_from_hf_config, load_arch
from spin_megatron.models.builder import (
    build_gpt_model,
    layer_spec,
    parse_dtype,
    te_available,
    transformer_config,
)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ModelArch",
    "arch_from_hf_config",
    "build_gpt_model",
    "layer_spec",
    "load_arch",
    "parse_dtype",
    "te_available",
    "transformer_config",
]
