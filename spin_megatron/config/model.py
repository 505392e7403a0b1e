"""``model.*``: where the weights come from (an HF folder, a spin-convert checkpoint, or a tiny random model)."""

from __future__ import annotations

from dataclasses import dataclass

from spin_megatron.config.common import (
    _choice,
    _positive,
)
from spin_megatron.errors import ConfigError


@dataclass(kw_only=True)
class TinyModelConfig:
    """A random-weight model created at start (demo, tests): Qwen2/Llama/Qwen3/Qwen3-MoE shape, real tokenizer."""

    architecture: str = "qwen2"  # qwen2 | llama | qwen3 | qwen3_moe
    hidden_size: int = 64  # width of the residual stream
    intermediate_size: int = 128  # SwiGLU width
    num_hidden_layers: int = 2  # transformer layers
    num_attention_heads: int = 4  # query heads
    num_key_value_heads: int = 2  # KV heads (GQA)
    vocab_size: int = 151936  # embedding rows; Qwen2.5's vocabulary by default
    tie_word_embeddings: bool = True  # share embedding and output layer, as Qwen2.5-0.5B
    seed: int = 0  # weight initialisation seed
    num_experts: int = 4  # qwen3_moe: routed experts per MoE layer
    num_experts_per_tok: int = 2  # qwen3_moe: experts each token is routed to (top-k)
    moe_intermediate_size: int = 32  # qwen3_moe: each expert's SwiGLU width

    def __post_init__(self):
        _choice("model.tiny.architecture", self.architecture, ("qwen2", "llama", "qwen3", "qwen3_moe"))
        for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            _positive(f"model.tiny.{key}", getattr(self, key))
        for key in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        ):
            _positive(f"model.tiny.{key}", getattr(self, key))


@dataclass(kw_only=True)
class ModelConfig:
    hf_path: str | None = None  # HF folder: architecture, initial weights, tokenizer
    mcore_ckpt: str | None = None  # `spin-convert hf-to-mcore` output; used for the weights when set
    tokenizer_path: str | None = None  # default: hf_path, else the checkpoint's tokenizer/, else Qwen2.5's
    tiny: TinyModelConfig | None = None  # build a random tiny model instead of loading one
    dtype: str = "fp32"  # parameter dtype: fp32 | bf16
    fused_swiglu: bool = True  # GPU: Megatron's fused bias-SwiGLU (compiled with torch.compile); CPU: never
    # MoE load-balancing loss weight (Megatron's moe_aux_loss_coeff, logged as moe/load_balancing_loss); 0: off,
    # the DPO default (slime's Qwen3-MoE RL recipes also train with 0); null: the checkpoint's router_aux_loss_coef
    moe_aux_loss_coeff: float | None = 0.0

    def __post_init__(self):
        _choice("model.dtype", self.dtype, ("fp32", "bf16"))
        if self.moe_aux_loss_coeff is not None and not self.moe_aux_loss_coeff >= 0:
            raise ConfigError(
                f"model.moe_aux_loss_coeff must be ≥ 0 (or null), got {self.moe_aux_loss_coeff}"
            )

    def check_source(self) -> None:
        sources = [k for k in ("hf_path", "mcore_ckpt", "tiny") if getattr(self, k) is not None]
        if not sources:
            raise ConfigError(
                "no model given: set model.hf_path=HF_DIR or model.mcore_ckpt=DIR, or use a preset such as "
                "experiment=tiny_cpu"
            )
        if self.tiny is not None and len(sources) > 1:
            raise ConfigError(
                f"model.tiny builds a random model and model.{sources[0]} loads one: set only one; to load "
                f"{sources[0]} in a preset that sets model.tiny (e.g. experiment=tiny_cpu), add model.tiny=null"
            )
