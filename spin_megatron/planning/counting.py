"""What one GPU holds, counted from the model shape and the layout: parameters per stage and expert shard, the
reward model's, activations per layer and token, the pipeline's micro-batches in flight and its bubble, the MoE
token dispatch, the DDP bucket (the formulas and their measurements: ``memory.py``'s docstring)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

GB = 1 << 30
_DTYPE_BYTES = {"fp32": 4, "bf16": 2}


# ------------------------------------------------------------------------------------------------ counting
def layer_param_split(arch, tp: int, layer: int = 0, ep: int = 1, etp: int | None = None) -> tuple[int, int]:
    """``(dense, expert)`` parameters of decoder layer ``layer`` on one rank: attention, norms (and Qwen3's
    QK-norms) plus the TP-split MLP; or, in an MoE layer, the replicated router and this rank's E/EP experts split
    ``etp`` ways (default ``tp``) — expert parameters have their own data-parallel group (module docstring)."""
    h, q, kv, f = (
        arch.hidden_size,
        arch.num_attention_heads * arch.head_dim,
        _kv(arch),
        arch.intermediate_size,
    )
    qkv = (q + 2 * kv) // tp * (h + (1 if arch.qkv_bias else 0))
    dense = qkv + h * q // tp + 2 * h + (2 * arch.head_dim if arch.qk_norm else 0)
    if arch.moe is None or not arch.moe.is_moe_layer(layer):
        return dense + 3 * h * f // tp, 0
    m, etp = arch.moe, tp if etp is None else etp
    return dense + m.num_experts * h, m.num_experts // ep * 3 * h * (m.intermediate_size // etp)


def layer_params(arch, tp: int, layer: int = 0, ep: int = 1, etp: int | None = None) -> int:
    """Parameters of one transformer layer on one TP rank (QKV bias for Qwen2, norms replicated)."""
    return sum(layer_param_split(arch, tp, layer, ep, etp))


def stage_layer_indices(arch, pp: int, stage: int, vpp: int = 1) -> list[int]:
    """The layers of pipeline stage ``stage``: one contiguous block, or with ``vpp`` model chunks (interleaving)
    the blocks of virtual stages ``stage, stage + pp, …`` of ``L/(pp·vpp)`` layers each."""
    per_chunk = arch.num_layers // (pp * vpp)
    return [c * per_chunk + i for c in range(stage, pp * vpp, pp) for i in range(per_chunk)]


def stage_param_split(
    arch, tp: int, pp: int, stage: int, padded_vocab: int, ep: int = 1, etp: int | None = None, vpp: int = 1
) -> tuple[int, int]:
    """``(dense, expert)`` parameters of one rank of pipeline stage ``stage`` (as Megatron allocates them)."""
    h, vocab_rows = arch.hidden_size, padded_vocab // tp
    dense = expert = 0
    for layer in stage_layer_indices(arch, pp, stage, vpp):
        d, x = layer_param_split(arch, tp, layer, ep, etp)
        dense, expert = dense + d, expert + x
    if stage == 0:
        dense += vocab_rows * h
    if stage == pp - 1:
        dense += h  # final norm
        if not arch.tie_word_embeddings or pp > 1:  # tied at pp > 1: the last stage keeps a copy
            dense += vocab_rows * h
    return dense, expert


def stage_params(
    arch, tp: int, pp: int, stage: int, padded_vocab: int, ep: int = 1, etp: int | None = None, vpp: int = 1
) -> int:
    """Parameters of one rank of pipeline stage ``stage`` (as Megatron's GPTModel allocates them)."""
    return sum(stage_param_split(arch, tp, pp, stage, padded_vocab, ep, etp, vpp))


def full_model_params(arch) -> int:
    """Parameters of the HF checkpoint (unpadded vocabulary, every expert; what a weight sync sends)."""
    embeddings = arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
    return sum(layer_params(arch, 1, i) for i in range(arch.num_layers)) + embeddings + arch.hidden_size


def active_params(arch) -> int:
    """Parameters one token uses (MoE: the top-k experts of each layer; dense: all)."""
    total = full_model_params(arch)
    if arch.moe is None:
        return total
    m = arch.moe
    idle = sum(m.layer_pattern) * (m.num_experts - m.top_k) * 3 * arch.hidden_size * m.intermediate_size
    return total - idle


def reward_model_params(config: dict) -> int:
    """Parameters of a decoder reward model from its HF config (embeddings, layers, final norm, scalar head)."""
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv, hd = config.get("num_key_value_heads") or heads, config.get("head_dim") or h // heads
    attention = h * heads * hd * 2 + 2 * h * kv * hd
    if config.get("model_type") == "qwen2" or config.get("attention_bias"):  # q, k, v biases
        attention += heads * hd + 2 * kv * hd
    mlp = 3 * h * config["intermediate_size"]
    return config["vocab_size"] * h + layers * (attention + mlp + 2 * h) + h + h * config.get("num_labels", 1)


@functools.lru_cache(maxsize=8)
def _reward_config(path: str) -> dict:
    from spin_megatron.errors import ConfigError

    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConfigError(
            f"reward_model.path={path} has no config.json: point it at a Hugging Face reward model"
        )
    config = json.loads(file.read_text())
    return config.get("text_config", config)


def reward_model_bytes(cfg) -> int:
    """The hf reward model on the engine's GPU: its weights and one micro-batch's forward (micro_batch_size ×
    max_length tokens; flash attention: no score matrix). SGLang-served or judge backends: 0 here."""
    rm = cfg.reward_model
    if not rm.enabled or rm.backend != "hf":
        return 0
    config = _reward_config(rm.path)
    e = 4 if rm.dtype == "float32" else 2
    tokens = rm.micro_batch_size * rm.max_length
    forward = tokens * (4 * config["hidden_size"] + 2 * config["intermediate_size"]) * e
    return reward_model_params(config) * e + forward


def _kv(arch) -> int:
    return arch.num_kv_heads * arch.head_dim


def layer_activation_elements(
    arch,
    tp: int,
    tokens: int,
    kernels: str,
    recompute: bool,
    *,
    moe: bool = False,
    etp: int | None = None,
    sequence_parallel: bool = False,
    selective: tuple[str, ...] = (),
) -> int:
    """Elements (of the parameter dtype) one layer keeps for backward for ``tokens`` tokens (module docstring).
    ``moe``: an MoE layer, whose MLP keeps, per token, its k routed copies (the dispatched input ``h`` and the
    expert's SwiGLU ``6·I/etp``) and the router's scores (measured on CPU: ``k·(h + 6·I + 6) + 1.25·E``).
    ``sequence_parallel``: the residual-stream terms (norm inputs and outputs, residuals) ÷ tp. ``selective``:
    ``parallel.recompute_modules`` whose activations are recomputed instead of kept."""
    h, q, f = arch.hidden_size, arch.num_attention_heads * arch.head_dim, arch.intermediate_size
    if recompute:
        return tokens * h
    mlp = 0 if "mlp" in selective else 5 * f // tp
    if moe:
        m, etp = arch.moe, tp if etp is None else etp
        routed = m.top_k * (h + 6) + 5 * m.num_experts // 4
        routed = routed // tp if sequence_parallel else routed  # a rank routes its own tokens
        mlp = 0 if "moe" in selective else routed + m.top_k * 6 * m.intermediate_size // etp
    residual = 4 * h + (2 * h if kernels != "gpu" else 0)  # torch RMSNorm (local spec) keeps more than TE's
    per_token = (residual // tp if sequence_parallel else residual) + (3 * q + 3 * _kv(arch)) // tp + mlp
    per_token += 4 * arch.head_dim
    if "core_attn" not in selective:  # recomputed: its softmax statistics are not kept, nor (our SDPA module:
        per_token += arch.num_attention_heads // tp  # its output is a reshaped copy) its output
    elif kernels != "gpu":
        per_token -= q // tp
    if kernels == "cpu":  # SDPA's CPU kernels, per sequence (measured: ÷ tp, ~the row length at TP1)
        per_token += tokens // tp
    return tokens * per_token


def ddp_bucket_params(cfg, dp: int, *, cuda: bool) -> int | None:
    """Parameters per DDP bucket (``parallel/ddp.py``): None (one bucket per buffer) without overlap."""
    from spin_megatron.parallel.ddp import bucket_size, overlap_settings

    distributed = cfg.optim.use_distributed_optimizer
    overlap = overlap_settings(cfg.parallel, distributed_optimizer=distributed, cuda=cuda)
    return bucket_size(cfg.parallel, overlap=any(overlap), dp_size=dp)


def cp_rank_tokens(tokens: int, cp: int) -> int:
    """Tokens of a ``tokens``-long packed row that one of ``cp`` context-parallel ranks runs through the model:
    its 2 of the 2·cp chunks of every sequence (sequences padded to a multiple of 2·cp, ≤ 2·cp − 1 tokens each)."""
    return -(-tokens // (2 * cp)) * 2


def stage_layers(arch, pp: int, stage: int, vpp: int = 1) -> tuple[int, int]:
    """``(dense, MoE)`` layers of pipeline stage ``stage``."""
    layers = stage_layer_indices(arch, pp, stage, vpp)
    moe = sum(1 for i in layers if arch.moe is not None and arch.moe.is_moe_layer(i))
    return len(layers) - moe, moe


def in_flight_microbatches(pp: int, vpp: int, stage: int, microbatches: int) -> int:
    """Micro-batches whose activations pipeline stage ``stage`` holds at once (Megatron's warm-up forwards plus
    the one of the steady phase). 1F1B: ``min(pp − stage, M)``, each through the stage's L/pp layers.
    Interleaved: ``min(2·(pp − stage − 1) + (vpp − 1)·pp + 1, vpp·M)`` forwards of a model chunk (L/(pp·vpp)
    layers each; M padded to a multiple of pp) — stage 0 holds ``1 + (pp − 1)/(pp·vpp)`` times 1F1B's."""
    if vpp == 1:
        return min(pp - stage, microbatches)
    return min(2 * (pp - stage - 1) + (vpp - 1) * pp + 1, vpp * padded_microbatches(microbatches, pp, vpp))


def padded_microbatches(microbatches: int, pp: int, vpp: int) -> int:
    """The interleaved schedule runs a multiple of pp micro-batches (placeholders fill up the last group)."""
    return microbatches if vpp == 1 else -(-microbatches // pp) * pp


def pipeline_bubble(pp: int, vpp: int, microbatches: int) -> float:
    """The pipeline's idle fraction of a training step, ``(pp − 1) / (vpp·M + pp − 1)`` (Narayanan et al.:
    bubble/compute = (p − 1)/(v·m)); interleaving divides it by about vpp."""
    return (pp - 1) / (vpp * padded_microbatches(microbatches, pp, vpp) + pp - 1)


def dispatch_bytes(cfg, arch, tokens: int, microbatches: int, dp: int) -> int:
    """Bytes one GPU sends for the MoE token dispatch in one optimizer step (policy forward + backward, and the
    reference's forward): alltoall sends each token's k copies off-rank with probability (EP−1)/EP, out and back;
    allgather gathers every token of the TP×EP group and reduce-scatters the result."""
    par, e = cfg.parallel, _DTYPE_BYTES[cfg.model.dtype]
    if arch.moe is None or par.ep == 1:
        return 0
    moe_layers = max(stage_layers(arch, par.pp, s, par.vpp)[1] for s in range(par.pp))
    if par.moe_token_dispatcher == "alltoall":
        per_layer = 2 * arch.moe.top_k * tokens * arch.hidden_size * e * (par.ep - 1) // par.ep
    else:
        per_layer = 2 * tokens * arch.hidden_size * e * (par.tp * par.ep - 1)
    return per_layer * moe_layers * microbatches * 3  # policy forward, its backward, reference forward
