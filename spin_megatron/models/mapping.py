"""HF ↔ Megatron-Core weight mapping, one pure mapping per architecture.

Names on the Megatron side are *global* names of the local layer spec (``decoder.layers.<global i>.…``); the TE
spec's fused-norm names are accepted through :func:`canonical_name`. A mapping never touches process groups:

* :meth:`WeightMapping.to_mcore` — the shard of one Megatron parameter held by ``tp_rank`` of ``tp_size``, built
  from full HF tensors (fused QKV in Megatron's grouped GQA layout, fused gate/up, row/column splits, vocab
  padding);
* :meth:`WeightMapping.to_hf` — the inverse, from the list of all TP shards of one Megatron parameter (in TP-rank
  order) to full HF-named tensors.

Mixture-of-experts layers (Qwen3-MoE): the router is replicated; each expert's fc1/fc2 is split over the
*expert*-tensor-parallel ranks (the caller passes that rank and size). Megatron-side expert names carry the
*global* expert index (``mlp.experts.local_experts.<g>``, as :func:`~spin_megatron.models.weights.stage_parameters`
names them), HF names ``mlp.experts.<g>.gate_proj|up_proj|down_proj``; :meth:`WeightMapping.ep_peers` is where the
``g = ep_rank · E/EP + i`` arithmetic lives.

The converter and the live weight sync both call these.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from spin_megatron.errors import CheckpointError, UnsupportedModelError
from spin_megatron.models.arch import ModelArch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")
_TE_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc1|linear_fc2)\.weight(\d+)$")  # TEGroupedMLP
_HF_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_INDEX = re.compile(r"(experts\.(?:local_experts\.)?)(\d+)(\.)")

# TE fuses the pre-attention / pre-MLP RMSNorm into the following linear layer.
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}

# Megatron layer suffix -> (kind, HF layer suffixes). Kinds say how a tensor is split over TP ranks.
_ATTENTION_TABLE = {
    "input_layernorm.weight": ("replicated", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.weight": (
        "qkv",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    ),
    "self_attention.linear_qkv.bias": (
        "qkv",
        ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    ),
    "self_attention.linear_proj.weight": ("row", ("self_attn.o_proj.weight",)),
}
# Qwen3: per-head RMSNorm weights [head_dim], the same on every TP rank (Megatron sums their gradients over TP).
_QK_NORM_TABLE = {
    "self_attention.q_layernorm.weight": ("replicated", ("self_attn.q_norm.weight",)),
    "self_attention.k_layernorm.weight": ("replicated", ("self_attn.k_norm.weight",)),
}
_DENSE_MLP_TABLE = {
    "pre_mlp_layernorm.weight": ("replicated", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.weight": ("gate_up", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": ("row", ("mlp.down_proj.weight",)),
}
# MoE layers: the norm before the MLP stays a module of its own (not fused into fc1, also in TE's spec).
_MOE_TABLE = {
    "pre_mlp_layernorm.weight": ("replicated", ("post_attention_layernorm.weight",)),
    "mlp.router.weight": ("replicated", ("mlp.gate.weight",)),
}
_LAYER_TABLE = {**_ATTENTION_TABLE, **_QK_NORM_TABLE, **_DENSE_MLP_TABLE, **_MOE_TABLE}
_EXPERT_TABLE = {  # per expert g: Megatron linear -> (kind, HF suffixes under mlp.experts.<g>.)
    "linear_fc1": ("gate_up", ("gate_proj.weight", "up_proj.weight")),
    "linear_fc2": ("row", ("down_proj.weight",)),
}

# HF tensors that carry no weights of their own.
_IGNORABLE_HF = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def canonical_name(name: str) -> str:
    """Map a TE-spec parameter name to the local-spec name used by the mapping."""
    match = _LAYER.match(name)
    if match and match.group(2) in _TE_ALIASES:
        return f"decoder.layers.{match.group(1)}.{_TE_ALIASES[match.group(2)]}"
    grouped = _TE_GROUPED_EXPERT.match(match.group(2)) if match else None
    if grouped:
        linear, index = grouped.groups()
        return f"decoder.layers.{match.group(1)}.mlp.experts.local_experts.{index}.{linear}.weight"
    return name


def is_expert_name(name: str) -> bool:
    """Whether a (canonical, Megatron or HF) parameter name belongs to one routed expert."""
    match = _LAYER.match(name)
    return bool(match and _EXPERT.match(match.group(2))) or bool(_HF_EXPERT.search(name))


class WeightMapping:
    """HF Llama-family decoder ↔ Megatron GPTModel. Subclasses fix per-architecture details."""

    hf_layer_prefix = "model.layers"

    def __init__(self, arch: ModelArch, padded_vocab_size: int):
        if padded_vocab_size < arch.vocab_size:
            raise ValueError(f"padded vocab {padded_vocab_size} < vocab {arch.vocab_size}")
        self.arch = arch
        self.padded_vocab_size = padded_vocab_size
        self._suffix_sets: dict[int, frozenset[str]] = {}

    # ----- names -------------------------------------------------------------------------------------------
    def layer_suffixes(self, layer: int) -> list[str]:
        """Megatron parameter suffixes of decoder layer ``layer`` (global index), experts numbered globally."""
        a = self.arch
        suffixes = [k for k in _ATTENTION_TABLE if a.qkv_bias or not k.endswith(".bias")]
        suffixes += list(_QK_NORM_TABLE) if a.qk_norm else []
        if a.moe is None or not a.moe.is_moe_layer(layer):
            return suffixes + list(_DENSE_MLP_TABLE)
        suffixes += list(_MOE_TABLE)
        for g in range(a.moe.num_experts):
            suffixes += [f"mlp.experts.local_experts.{g}.{linear}.weight" for linear in _EXPERT_TABLE]
        return suffixes

    def _suffix_set(self, layer: int) -> frozenset[str]:
        if layer not in self._suffix_sets:
            valid = 0 <= layer < self.arch.num_layers
            self._suffix_sets[layer] = frozenset(self.layer_suffixes(layer) if valid else ())
        return self._suffix_sets[layer]

    def mcore_names(self, layers: range, pre_process: bool, post_process: bool) -> list[str]:
        """Global Megatron parameter names of a pipeline stage holding ``layers``."""
        names = ["embedding.word_embeddings.weight"] if pre_process else []
        for i in layers:
            names += [f"decoder.layers.{i}.{suffix}" for suffix in self.layer_suffixes(i)]
        if post_process:
            names.append("decoder.final_layernorm.weight")
            if not (self.arch.tie_word_embeddings and pre_process):
                names.append("output_layer.weight")
        return names

    def _entry(self, name: str) -> tuple[str, list[str]]:
        name = canonical_name(name)
        if name == "embedding.word_embeddings.weight":
            return "vocab", ["model.embed_tokens.weight"]
        if name == "output_layer.weight":
            return "vocab", [
                "model.embed_tokens.weight" if self.arch.tie_word_embeddings else "lm_head.weight"
            ]
        if name == "decoder.final_layernorm.weight":
            return "replicated", ["model.norm.weight"]
        match = _LAYER.match(name)
        if match and match.group(2) in self._suffix_set(int(match.group(1))):
            layer, suffix = match.groups()
            expert = _EXPERT.match(suffix)
            if expert:
                kind, hf_suffixes = _EXPERT_TABLE[expert.group(2)]
                prefix = f"{self.hf_layer_prefix}.{layer}.mlp.experts.{expert.group(1)}"
                return kind, [f"{prefix}.{s}" for s in hf_suffixes]
            kind, suffixes = _LAYER_TABLE[suffix]
            return kind, [f"{self.hf_layer_prefix}.{layer}.{s}" for s in suffixes]
        raise CheckpointError(f"no HF mapping for Megatron parameter {name!r} ({self.arch.architecture})")

    def is_tp_sharded(self, mcore_name: str) -> bool:
        """Whether each (expert-)TP rank holds a different slice of this parameter (else it is replicated)."""
        return self._entry(mcore_name)[0] != "replicated"

    def is_expert(self, mcore_name: str) -> bool:
        """Experts are split over the expert-parallel group, and over expert-TP ranks instead of TP ranks."""
        return is_expert_name(canonical_name(mcore_name))

    def ep_peers(self, name: str, ep_size: int) -> list[str]:
        """The same local expert slot on every expert-parallel rank, in EP-rank order: the expert of global
        index ``g`` is local expert ``i = g mod E/EP`` of EP rank ``g div E/EP``, so rank ``r`` holds
        ``r · E/EP + i`` (Megatron's ``local_expert_indices``). Works on Megatron and HF expert names."""
        per_rank = self.arch.moe.num_experts // ep_size
        match = _EXPERT_INDEX.search(name)
        if match is None:
            raise CheckpointError(f"{name!r} is not an expert parameter")
        local = int(match.group(2)) % per_rank
        return [
            name[: match.start(2)] + str(rank * per_rank + local) + name[match.end(2) :]
            for rank in range(ep_size)
        ]

    def hf_names(self, mcore_name: str) -> list[str]:
        """The HF tensors a Megatron parameter is made of."""
        return self._entry(mcore_name)[1]

    def hf_shape(self, hf_name: str) -> tuple[int, ...]:
        """Expected full shape of an HF tensor."""
        a = self.arch
        q_out, kv_out = a.num_attention_heads * a.head_dim, a.num_kv_heads * a.head_dim
        shapes = {
            "model.embed_tokens.weight": (a.vocab_size, a.hidden_size),
            "lm_head.weight": (a.vocab_size, a.hidden_size),
            "model.norm.weight": (a.hidden_size,),
        }
        if hf_name in shapes:
            return shapes[hf_name]
        expert = _HF_EXPERT.search(hf_name)
        if expert and a.moe is not None and int(expert.group(1)) < a.moe.num_experts:
            width = a.moe.intermediate_size
            return (a.hidden_size, width) if expert.group(2) == "down_proj" else (width, a.hidden_size)
        layer_shapes = {
            "input_layernorm.weight": (a.hidden_size,),
            "post_attention_layernorm.weight": (a.hidden_size,),
            "self_attn.q_proj.weight": (q_out, a.hidden_size),
            "self_attn.k_proj.weight": (kv_out, a.hidden_size),
            "self_attn.v_proj.weight": (kv_out, a.hidden_size),
            "self_attn.q_proj.bias": (q_out,),
            "self_attn.k_proj.bias": (kv_out,),
            "self_attn.v_proj.bias": (kv_out,),
            "self_attn.o_proj.weight": (a.hidden_size, q_out),
            "self_attn.q_norm.weight": (a.head_dim,),
            "self_attn.k_norm.weight": (a.head_dim,),
            "mlp.gate_proj.weight": (a.intermediate_size, a.hidden_size),
            "mlp.up_proj.weight": (a.intermediate_size, a.hidden_size),
            "mlp.down_proj.weight": (a.hidden_size, a.intermediate_size),
        }
        if a.moe is not None:
            layer_shapes["mlp.gate.weight"] = (a.moe.num_experts, a.hidden_size)
        for key, shape in layer_shapes.items():
            if hf_name.endswith("." + key):
                return shape
        raise CheckpointError(f"unknown HF tensor {hf_name!r}")

    def expected_hf_names(self) -> list[str]:
        """Every HF tensor the whole model needs (all layers, all stages)."""
        names = self.mcore_names(range(self.arch.num_layers), pre_process=True, post_process=True)
        seen: dict[str, None] = {}
        for name in names:
            for hf in self.hf_names(name):
                seen.setdefault(hf)
        return list(seen)

    def is_ignorable_hf(self, hf_name: str) -> bool:
        """HF tensors that may be present but carry nothing we load (tied lm_head copies, RoPE buffers)."""
        return bool(_IGNORABLE_HF.search(hf_name)) or (
            self.arch.tie_word_embeddings and hf_name == "lm_head.weight"
        )

    # ----- HF -> Megatron -----------------------------------------------------------------------------------
    def to_mcore(
        self, mcore_name: str, hf: Mapping[str, torch.Tensor], tp_rank: int, tp_size: int
    ) -> torch.Tensor:
        """This TP rank's shard of ``mcore_name``, from the full HF tensors it is made of."""
        kind, names = self._entry(mcore_name)
        tensors = [hf[n] for n in names]
        for n, t in zip(names, tensors):
            if tuple(t.shape) != self.hf_shape(n):
                raise CheckpointError(
                    f"HF tensor {n} has shape {tuple(t.shape)}, expected {self.hf_shape(n)} from config.json"
                )
        if kind == "replicated":
            return tensors[0].clone()
        if kind == "row":
            return tensors[0].chunk(tp_size, dim=1)[tp_rank].clone()
        if kind == "gate_up":
            gate, up = (t.chunk(tp_size, dim=0)[tp_rank] for t in tensors)
            return torch.cat([gate, up], dim=0)
        if kind == "vocab":
            full = tensors[0]
            pad = self.padded_vocab_size - full.shape[0]
            if pad:
                full = torch.cat([full, full.new_zeros(pad, *full.shape[1:])], dim=0)
            return full.chunk(tp_size, dim=0)[tp_rank].clone()
        if kind == "qkv":
            return self._qkv_to_mcore(*tensors).chunk(tp_size, dim=0)[tp_rank].clone()
        raise AssertionError(kind)

    def _qkv_to_mcore(self, q, k, v) -> torch.Tensor:
        # Megatron's fused layout: for each KV group, its query heads, then its key head, then its value head.
        a = self.arch
        groups, trailing = a.num_kv_heads, q.shape[1:]
        q = q.reshape(groups, -1, *trailing)
        k = k.reshape(groups, -1, *trailing)
        v = v.reshape(groups, -1, *trailing)
        return torch.cat([q, k, v], dim=1).reshape(-1, *trailing)

    # ----- Megatron -> HF -----------------------------------------------------------------------------------
    def to_hf(self, mcore_name: str, shards: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        """Full HF tensors from all TP shards (TP-rank order) of one Megatron parameter."""
        kind, names = self._entry(mcore_name)
        if kind == "replicated":
            return [(names[0], shards[0])]
        if kind == "row":
            return [(names[0], torch.cat(shards, dim=1))]
        if kind == "gate_up":
            halves = [s.chunk(2, dim=0) for s in shards]
            return [
                (names[0], torch.cat([h[0] for h in halves])),
                (names[1], torch.cat([h[1] for h in halves])),
            ]
        if kind == "vocab":
            return [(names[0], torch.cat(shards, dim=0)[: self.arch.vocab_size])]
        if kind == "qkv":
            return list(zip(names, self._qkv_to_hf(torch.cat(shards, dim=0))))
        raise AssertionError(kind)

    def _qkv_to_hf(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.arch
        per_group = a.num_attention_heads // a.num_kv_heads
        trailing = fused.shape[1:]
        grouped = fused.reshape(a.num_kv_heads, per_group + 2, a.head_dim, *trailing)
        q, k, v = grouped.split([per_group, 1, 1], dim=1)
        return tuple(t.reshape(-1, *trailing) for t in (q, k, v))


class Qwen2Mapping(WeightMapping):
    """Qwen2: QKV projections carry a bias; o_proj and the MLP do not."""


class LlamaMapping(WeightMapping):
    """Llama: no biases (``attention_bias``/``mlp_bias`` are refused when reading the config)."""


class Qwen3Mapping(WeightMapping):
    """Qwen3: no QKV bias; per-head ``q_norm``/``k_norm`` ↔ ``q_layernorm``/``k_layernorm``; head_dim from the
    config (may differ from hidden / heads)."""


class Qwen3MoeMapping(Qwen3Mapping):
    """Qwen3-MoE: Qwen3 attention; MoE layers with router ``mlp.gate`` and per-expert SwiGLU MLPs on disk
    (transformers fuses them in memory only); dense layers where ``mlp_only_layers``/``decoder_sparse_step`` say."""


MAPPINGS: dict[str, type[WeightMapping]] = {
    "Qwen2ForCausalLM": Qwen2Mapping,
    "LlamaForCausalLM": LlamaMapping,
    "Qwen3ForCausalLM": Qwen3Mapping,
    "Qwen3MoeForCausalLM": Qwen3MoeMapping,
}


def mapping_for(arch: ModelArch, padded_vocab_size: int) -> WeightMapping:
    if arch.architecture not in MAPPINGS:
        raise UnsupportedModelError(
            f"no weight mapping for {arch.architecture}; supported: {', '.join(MAPPINGS)}"
        )
    return MAPPINGS[arch.architecture](arch, padded_vocab_size)
