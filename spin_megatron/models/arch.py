"""Read a Hugging Face ``config.json`` into a validated, framework-neutral description of the model.

Only what the Megatron model and the weight mapping need is kept. Both the transformers-4 layout
(``rope_theta`` + ``rope_scaling``) and the transformers-5 layout (``rope_parameters``) are accepted.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from spin_megatron.errors import ConfigError, MissingPathError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
_MODEL_TYPES = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (the only kind Megatron-Core's RotaryEmbedding implements)."""

    kind: str  # "llama3" or "linear"
    factor: float


@dataclass(frozen=True)
class MoEArch:
    """The mixture-of-experts part of a Qwen3-MoE config (no shared experts)."""

    num_experts: int
    top_k: int  # num_experts_per_tok
    norm_topk_prob: bool  # renormalise the top-k router probabilities to sum to 1
    intermediate_size: int  # moe_intermediate_size: each expert's SwiGLU width
    router_aux_loss_coef: float  # the checkpoint's value (the trainer's default is model.moe_aux_loss_coeff)
    layer_pattern: tuple[int, ...]  # per layer: 1 = MoE, 0 = dense MLP (mlp_only_layers, decoder_sparse_step)

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.layer_pattern[layer])


@dataclass(frozen=True)
class ModelArch:
    """A decoder-only Qwen2/Llama/Qwen3/Qwen3-MoE model, as read from its HF config."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    initializer_range: float = 0.02
    rope_scaling: RopeScaling | None = None
    qk_norm: bool = False  # Qwen3: per-head RMSNorm of queries and keys before RoPE
    moe: MoEArch | None = None
    hf_config: dict = field(default_factory=dict, repr=False, compare=False)

    def padded_vocab_size(self, tp_size: int, divisible_by: int = 128) -> int:
        """Megatron's embedding rows: the vocabulary rounded up so every TP rank holds an equal, aligned slice."""
        multiple = math.lcm(divisible_by, tp_size)
        return -(-self.vocab_size // multiple) * multiple

    @property
    def has_dense_mlp(self) -> bool:
        return self.moe is None or not all(self.moe.layer_pattern)

    def valid_tp_sizes(self) -> list[int]:
        """TP sizes that split heads, KV heads and the (dense) MLP evenly."""
        dims = (self.num_attention_heads, self.num_kv_heads)
        dims += (self.intermediate_size,) if self.has_dense_mlp else ()
        return [d for d in range(1, self.num_kv_heads + 1) if all(x % d == 0 for x in dims)]

    def valid_pp_sizes(self) -> list[int]:
        return [d for d in range(1, self.num_layers + 1) if self.num_layers % d == 0]

    def valid_ep_sizes(self) -> list[int]:
        experts = self.moe.num_experts if self.moe else 1
        return [d for d in range(1, experts + 1) if experts % d == 0]

    def valid_etp_sizes(self) -> list[int]:
        width = self.moe.intermediate_size if self.moe else 1
        return [d for d in range(1, min(width, 64) + 1) if width % d == 0]

    def check_parallel(
        self,
        tp: int,
        pp: int,
        tp_key: str = "parallel.tp",
        pp_key: str = "parallel.pp",
        *,
        ep: int = 1,
        etp: int | None = None,
        ep_key: str = "parallel.ep",
        etp_key: str = "parallel.etp",
        vpp: int = 1,
        vpp_key: str = "parallel.vpp",
    ) -> None:
        """Raise ConfigError if this model cannot be split tp-ways across tensors, pp-ways across layers (each
        stage into vpp chunks of equal layers) and (MoE) ep-ways across experts with each expert split etp-ways
        (None: etp = tp, as Megatron)."""
        checks = [
            (self.num_attention_heads, tp, "attention heads", tp_key, self.valid_tp_sizes()),
            (self.num_kv_heads, tp, "key/value heads", tp_key, self.valid_tp_sizes()),
            (self.num_layers, pp, "layers", pp_key, self.valid_pp_sizes()),
        ]
        if self.has_dense_mlp:
            checks.append(
                (self.intermediate_size, tp, "MLP intermediate size", tp_key, self.valid_tp_sizes())
            )
        if self.moe is None and ep > 1:
            raise ConfigError(
                f"{ep_key}={ep} splits experts, but {self.architecture} has none; use {ep_key}=1 (expert "
                "parallelism is for mixture-of-experts models such as Qwen3MoeForCausalLM)"
            )
        if self.moe is not None:
            etp = tp if etp is None else etp
            checks.append((self.moe.num_experts, ep, "experts", ep_key, self.valid_ep_sizes()))
            checks.append(
                (self.moe.intermediate_size, etp, "expert intermediate size", etp_key, self.valid_etp_sizes())
            )
        for total, size, what, key, valid in checks:
            if total % size != 0:
                raise ConfigError(
                    f"{key}={size} does not divide the model's {total} {what}; "
                    f"valid values for this model: {', '.join(map(str, valid))}"
                )
        if vpp > 1 and self.num_layers % (pp * vpp):
            valid = [v for v in range(1, self.num_layers // pp + 1) if self.num_layers % (pp * v) == 0]
            raise ConfigError(
                f"{pp_key}×{vpp_key} = {pp}×{vpp} model chunks do not divide the model's {self.num_layers} layers; "
                f"valid {vpp_key} values at {pp_key}={pp}: {', '.join(map(str, valid))}"
            )

    def signature(self) -> dict:
        """The fields that make two checkpoints the same model (used to refuse mismatched resumes)."""
        sig = asdict(self)
        sig.pop("hf_config")
        sig.pop("initializer_range")
        for key in (
            "qk_norm",
            "moe",
        ):  # absent from dense Qwen2/Llama signatures (checkpoints written before)
            if not sig[key]:
                sig.pop(key)
        return json.loads(json.dumps(sig))  # as stored in a checkpoint's JSON (tuples become lists)


def check_expert_grid(tp: int, dp: int, ep: int, etp: int) -> None:
    """Experts are laid out over the ranks of one pipeline stage (tp × dp of them): ep × etp must divide it."""
    if (tp * dp) % (ep * etp):
        raise ConfigError(
            f"parallel.ep × etp = {ep}×{etp} = {ep * etp} does not divide the {tp * dp} ranks of a pipeline stage "
            f"(tp×dp = {tp}×{dp}); launch more processes or lower parallel.ep / parallel.etp (etp defaults to tp)"
        )


def _rope_settings(cfg: dict) -> tuple[float, RopeScaling | None]:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or None
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", float(scaling["factor"]))
    if kind == "llama3":
        # Megatron-Core hard-codes low/high frequency factors 1 and 4 and an original context of 8192
        # (the Llama-3.1/3.2 values); anything else would silently compute different frequencies.
        expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for key, want in expected.items():
            if float(scaling.get(key, want)) != want:
                raise UnsupportedModelError(
                    f"rope_scaling {key}={scaling[key]} is not supported (Megatron-Core implements llama3 "
                    f"scaling only with {key}={want})"
                )
        return theta, RopeScaling("llama3", float(scaling.get("factor", 8.0)))
    raise UnsupportedModelError(
        f"rope scaling type {kind!r} is not supported; supported: default, linear, llama3"
    )


def _require(cfg: dict, key: str, source: str):
    if key not in cfg:
        raise ConfigError(
            f"{source} has no {key!r}: not a complete {cfg.get('model_type', 'decoder')} config.json"
        )
    return cfg[key]


def _architecture(cfg: dict, source: str) -> str:
    archs = cfg.get("architectures") or []
    if not archs:
        archs = [_MODEL_TYPES[cfg["model_type"]]] if cfg.get("model_type") in _MODEL_TYPES else []
    if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{source}: unsupported architecture {archs or cfg.get('model_type')!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return archs[0]


def _refuse_unsupported(cfg: dict, architecture: str, source: str) -> None:
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(
            f"{source}: hidden_act={cfg['hidden_act']!r} is not supported (only silu)"
        )
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"{source}: mlp_bias=true is not supported")
    if architecture != "Qwen2ForCausalLM" and cfg.get("attention_bias"):
        raise UnsupportedModelError(f"{source}: attention_bias=true (bias on o_proj) is not supported")
    if cfg.get("use_sliding_window"):
        raise UnsupportedModelError(f"{source}: use_sliding_window=true is not supported")


def _moe_settings(cfg: dict, num_layers: int, source: str) -> MoEArch:
    """Qwen3-MoE's expert settings; layer i is MoE unless listed in mlp_only_layers, every decoder_sparse_step-th
    layer (transformers' rule), which Megatron builds from a per-layer pattern (``moe_layer_freq``)."""
    # Qwen's own configs say num_experts; transformers 5 saves it as num_local_experts (its attribute_map)
    experts = int(cfg.get("num_experts") or _require(cfg, "num_local_experts", source))
    top_k = int(_require(cfg, "num_experts_per_tok", source))
    step = int(cfg.get("decoder_sparse_step") or 1)
    dense = {int(i) for i in cfg.get("mlp_only_layers") or []}
    if not 1 <= top_k <= experts:
        raise UnsupportedModelError(
            f"{source}: num_experts_per_tok={top_k} must be in [1, num_experts={experts}]"
        )
    if cfg.get("shared_expert_intermediate_size") or cfg.get("num_shared_experts"):
        raise UnsupportedModelError(
            f"{source}: shared experts are not supported (Qwen2-MoE style); Qwen3-MoE has none"
        )
    pattern = tuple(int(i not in dense and (i + 1) % step == 0) for i in range(num_layers))
    if not any(pattern):
        raise UnsupportedModelError(
            f"{source}: no layer is a mixture-of-experts layer (mlp_only_layers={sorted(dense)}, "
            f"decoder_sparse_step={step}); load it as a dense model instead"
        )
    return MoEArch(
        num_experts=experts,
        top_k=top_k,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        intermediate_size=int(_require(cfg, "moe_intermediate_size", source)),
        router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.0)),
        layer_pattern=pattern,
    )


def arch_from_hf_config(cfg: dict, source: str = "config.json") -> ModelArch:
    """Build a :class:`ModelArch` from a parsed HF config dict, refusing what Megatron cannot reproduce."""
    architecture = _architecture(cfg, source)
    _refuse_unsupported(cfg, architecture, source)
    hidden = int(_require(cfg, "hidden_size", source))
    heads = int(_require(cfg, "num_attention_heads", source))
    num_layers = int(_require(cfg, "num_hidden_layers", source))
    rope_theta, rope_scaling = _rope_settings(cfg)
    is_qwen3 = architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
    return ModelArch(
        architecture=architecture,
        vocab_size=int(_require(cfg, "vocab_size", source)),
        hidden_size=hidden,
        intermediate_size=int(_require(cfg, "intermediate_size", source)),
        num_layers=num_layers,
        num_attention_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=architecture == "Qwen2ForCausalLM",
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        rope_scaling=rope_scaling,
        qk_norm=is_qwen3,
        moe=_moe_settings(cfg, num_layers, source) if architecture == "Qwen3MoeForCausalLM" else None,
        hf_config=dict(cfg),
    )


def load_arch(hf_dir: str | Path) -> ModelArch:
    """Read ``<hf_dir>/config.json``."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise MissingPathError(
            f"{path} not found: the model path (model.hf_path, spin-convert --hf-dir) must be a Hugging Face "
            "model folder with a config.json"
        )
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return arch_from_hf_config(cfg, source=str(path))
