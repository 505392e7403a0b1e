"""Per-GPU memory of a SPIN run, estimated from the configuration and the model shape (pure; no torch).

Everything is bytes per GPU; ``GB`` in messages is 2^30 bytes. Notation: h hidden size, q = heads·head_dim,
kv = kv_heads·head_dim, f MLP width, L layers, V the padded vocabulary, t = TP, p = PP, d = DP, T the tokens of
one packed micro-batch, e the bytes of the parameter dtype (2 bf16, 4 fp32), P the parameters of one TP×PP shard.

Training GPU (the worst pipeline stage is reported; the first holds the embedding, the last the final norm, the
output layer — also a copy of a tied embedding when p > 1 — and the log-prob buffers):

* actor parameters ``e·P``; gradients ``4·P`` (Megatron's DDP grad buffer, ``grad_reduce_in_fp32=True``, never
  sharded: the distributed optimizer reduce-scatters in place);
* optimizer: fp32 main parameters ``4·P`` (only when e ≠ 4: fp32 parameters are their own main copy) and Adam's
  exp_avg + exp_avg_sq ``8·P``, both divided by d with ``optim.use_distributed_optimizer``. The main copy exists
  from the start, the Adam moments from the first optimizer step (after the rollout engine started);
* reference model ``e·P`` (frozen copy with the policy's layout, no gradients or optimizer state);
* activations of one micro-batch, per layer and token, in units of e (measured with saved-tensor hooks on
  Megatron-Core 0.16; no sequence parallelism, dropout 0, ``bias_activation_fusion=False``):
  ``4h + (3q + 3kv + 5f)/t + 4·head_dim`` on GPU (TE spec: two LayerNormLinear keep input and normalised input
  (4h); rotated q and k, the QKV output kept alive by v, flash attention's output (3q+3kv); fc1's 2f output, SiLU,
  the gate term and their product (5f); RoPE cos/sin) — the ``5·a·s/h`` attention-score term of Korthikanti et
  al. disappears with flash attention. On CPU (local spec, torch RMSNorm, SDPA per packed sequence) add 2h and
  T/t (SDPA's CPU kernels; measured ÷ t). With full recomputation a layer keeps only its input ``h`` and one
  layer's activations are rebuilt at a time. Selective recomputation (``parallel.recompute_modules``): ``mlp``
  drops 5f/t, ``moe`` an MoE layer's MLP term, ``core_attn`` the softmax statistics and (our SDPA module, whose
  output is a reshaped copy) q/t (measured on CPU: −(q + heads)/t). Sequence parallelism (default at t > 1)
  divides the residual-stream terms — 4h, the local spec's 2h, the final norm's — by t (measured on CPU at TP2,
  h = 256: −769 of 4564 elements per token = (4h + 2h)·(1 − 1/t)); backward gathers a layer's input again
  (a ``T·h·e`` transient). A stage of L/p layers holds ``min(p − stage, M)`` micro-batches in
  flight under 1F1B (M = micro-batches per step on a data-parallel rank); interleaved (v = ``parallel.vpp`` model
  chunks of L/(p·v) layers per stage, M padded to a multiple of p) ``min(2·(p − stage − 1) + (v − 1)·p + 1, v·M)``
  chunk forwards: stage 0 holds ``1 + (p − 1)/(p·v)`` times 1F1B's activations, and the pipeline bubble
  ``(p − 1)/(v·M + p − 1)`` of the step shrinks about v-fold;
* log-prob buffers on the last stage, ``V/t`` columns: the trainer's chunked path keeps the logits ``[T, V/t]``
  (e) for backward and writes their gradient (e) next to them, plus three fp32 ``[chunk, V/t]`` buffers (the
  chunk, and the probabilities and surprisal of the per-token metrics: entropy, top-1, mean logit);
  the naive fp32 ``log_softmax`` would hold ``T·V/t·(e + 12)`` (logits, fp32 copy, saved log-softmax, its
  gradient); the fused head (``logprob.fused_head_logprobs``) the same three fp32 chunk buffers, an fp32 weight
  gradient and an fp32
  ``[T, h]`` gradient;
* transients: the output layer's weight gradient ``e·V/t·h`` and its input gradient while the logits gradient is
  alive (last stage), one layer's backward working set ``(2f/t + h)·T·e``; without a fused Adam (CPU), the
  per-tensor torch AdamW step allocates two fp32 copies of the largest parameter, and gloo's all-gather of the
  distributed optimizer's parameter bucket a flat input and output copy (2·e·P, or 2·e·``ddp_bucket_size`` when
  the DP communication is overlapped bucket by bucket; NCCL gathers in place).
  Training peak = parameters + gradients + optimizer + reference + max(activations + log-prob buffers +
  transients, optimizer-step transients).

Data-parallel traffic per GPU and optimizer step: the gradient reduce-scatter ``4·P·(d − 1)/d`` bytes (fp32;
an all-reduce, twice that, without the distributed optimizer) and the parameter all-gather ``e·P·(d − 1)/d``;
``parallel.overlap_grad_reduce`` / ``overlap_param_gather`` (default on GPU) hide them behind the backward and the
next forward, bucket by bucket, in place in the grad/param buffers (no extra GPU memory).

Context parallel (c = ``parallel.cp``; d = world/(t·p·c)): a GPU runs 2 of the 2·c chunks of every sequence of a
micro-batch, ``T/c`` tokens (sequences padded to multiples of 2·c), through its layers and the log-prob buffers, and
its attention keeps the other CP ranks' keys and values for backward, ``2·kv/t·T·(c − 1)/c`` elements per layer
(our all-gather; TE's p2p ring keeps the chunks it received). The distributed optimizer shards over d·c ranks.

Mixture of experts (Qwen3-MoE, EP = ``parallel.ep``, ETP = ``parallel.etp``, E experts of width I, top-k): a rank
holds E/EP experts of each MoE layer, split ETP ways, and the replicated router ``E·h``; the distributed optimizer
shards the experts' state over their own data-parallel group (``t·d / (EP·ETP)`` ranks), the rest over d. An MoE
layer's MLP keeps, per token, ``k·(h + 6·I/ETP + 6) + 1.25·E`` elements (the k dispatched copies, each expert's
SwiGLU, the router's scores: measured with saved-tensor hooks on CPU, alltoall dispatcher). The token dispatch
sends, per MoE layer and micro-batch, ``2·k·T·h·e·(EP−1)/EP`` bytes (alltoall: out and back) or
``2·T·h·e·(t·EP−1)`` (allgather), in the policy's forward and backward and the reference's forward.

Rollout, colocated (SGLang on the training GPUs): SGLang keeps ``(1 − f)·GPU`` free when it starts (f =
``mem_fraction_static``), i.e. its weights (``2·N/s`` bytes: bf16, N parameters, s = its tp_size) plus KV cache use
``f·GPU − trainer memory at its start``; KV per token ``2·L·ceil(kv_heads/s)·head_dim·2``. While it generates the
GPU holds ``max(f·GPU, trainer + weights) + Adam moments + SGLang's working memory outside its pool``. With
``enable_memory_saver`` it releases weights and KV cache during training; without, they stay during training.
Disaggregated: the engines have GPUs of their own (pool ``f·GPU``). The KV cache must hold at least one prompt's
``n`` samples at full length. The ``hf`` engine keeps a full model copy and its KV cache on the replica's first GPU.

Weight sync per step: every HF tensor in the parameter dtype (unpadded vocabulary) to each engine, every
``sync_every`` steps (the opponent: every reference refresh), in buckets of ``sync_bucket_mb``; a sync holds the largest gathered tensor, a bucket and
its flattened copy.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

GB = 1 << 30
SGLANG_RUNTIME_BYTES = 2 * GB  # SGLang outside its static pool: CUDA graphs, decode activations (assumed)
KERNELS = ("gpu", "gpu_local", "cpu")
_DTYPE_BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one GPU of pipeline stage ``stage`` (training) and of the rollout engine sharing it."""

    stage: int
    num_params: int
    params: int
    grads: int
    optimizer_main: int  # fp32 main parameters (bf16 models), there from the start
    optimizer_moments: int  # Adam exp_avg + exp_avg_sq, created by the first optimizer step
    reference: int
    activations: int
    logprob: int
    transient: int
    step_temp: int
    rollout_resident: int  # hf engine weights + KV cache, or SGLang without memory saver during training
    reward_model: int = 0  # reward_model.backend=hf: its weights + one scoring micro-batch, beside the engine

    @property
    def resident_at_launch(self) -> int:
        return self.params + self.grads + self.optimizer_main + self.reference

    @property
    def training_peak(self) -> int:
        static = self.resident_at_launch + self.optimizer_moments + self.rollout_resident + self.reward_model
        return static + max(self.activations + self.logprob + self.transient, self.step_temp)


@dataclass(frozen=True)
class MemoryPlan:
    """The estimate for one configuration; byte counts per GPU, ``stage`` the worst pipeline stage."""

    world_size: int
    tp: int
    pp: int
    dp: int
    kernels: str
    gpu_bytes: int
    usable_bytes: int
    micro_batch_tokens: int  # T: padded length of one packed micro-batch
    num_microbatches: int  # per data-parallel rank and step
    in_flight: int  # micro-batches whose activations the worst stage holds (interleaved: chunk forwards)
    layers_per_stage: int
    stage: StageMemory
    logprob_paths: dict[str, int]  # the same buffers for naive / chunked / fused log-probs
    engine: str  # sglang | hf | none
    placement: str
    sglang_weights: int = 0
    sglang_kv: int = 0  # negative: SGLang would not start
    sglang_runtime: int = 0
    kv_bytes_per_token: int = 0
    kv_min_tokens: int = 0
    sglang_gpus_needed: int = 0
    sglang_gpus_available: int = 0
    generation_peak: int = 0  # on the GPU that shares training and SGLang (colocated) or on a rollout GPU
    sync_peak: int = 0
    sync_bytes_per_engine: int = 0
    sync_engines: int = 0
    sync_every: int = 1
    sync_buckets: int = 0
    full_model_params: int = 0
    dispatch_bytes_per_step: int = 0  # MoE token dispatch sent by one GPU per optimizer step (EP > 1)
    vpp: int = 1  # model chunks per pipeline stage (interleaved 1F1B)
    cp: int = 1  # context parallel: each micro-batch's row split over cp GPUs (activations ÷ cp)
    notes: list[str] = field(default_factory=list)
    arch: object = field(default=None, repr=False, compare=False)

    @property
    def training_peak(self) -> int:
        return self.stage.training_peak

    @property
    def layers_in_flight_unit(self) -> int:
        """Layers one in-flight micro-batch's activations span on the worst stage: a stage, or a model chunk."""
        return self.layers_per_stage // self.vpp

    @property
    def bubble(self) -> float:
        """The pipeline's idle fraction of a training step (0 without pipeline parallelism)."""
        return pipeline_bubble(self.pp, self.vpp, self.num_microbatches)

    @property
    def sync_bytes_per_step(self) -> float:
        return self.sync_bytes_per_engine * self.sync_engines / self.sync_every if self.sync_every else 0.0

    @property
    def kv_tokens(self) -> int:
        return max(0, self.sglang_kv) // self.kv_bytes_per_token if self.kv_bytes_per_token else 0

    def phases(self) -> dict[str, int]:
        """Peak bytes per phase on the most loaded GPU."""
        out = {"training": self.training_peak}
        if self.generation_peak:
            out["generation"] = self.generation_peak
        if self.sync_peak:
            out["weight sync"] = self.sync_peak
        return out

    @property
    def peak(self) -> int:
        return max(self.phases().values())

    def problems(self) -> list[str]:
        """What does not fit, as sentences (empty when the plan fits)."""
        out = []
        for phase, need in self.phases().items():
            if need > self.usable_bytes:
                out.append(
                    f"the {phase} phase needs {need / GB:.1f} GB per GPU > {self.usable_bytes / GB:.1f} GB "
                    "available"
                )
        if self.engine == "sglang" and self.sglang_gpus_needed > self.sglang_gpus_available:
            where = "training GPUs" if self.placement == "colocated" else "cluster.rollout_gpus"
            out.append(
                f"the SGLang engines need {self.sglang_gpus_needed} GPUs (DP × num_engines × tp_size) > "
                f"{self.sglang_gpus_available} {where}"
            )
        if self.engine == "sglang" and self.kv_tokens < self.kv_min_tokens:
            out.append(
                f"SGLang's KV cache would get {max(0, self.sglang_kv) / GB:.1f} GB, less than the "
                f"{self.kv_min_tokens * self.kv_bytes_per_token / GB:.2f} GB one prompt's "
                f"{self.kv_min_tokens} tokens need"
            )
        return out

    @property
    def fits(self) -> bool:
        return not self.problems()


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


# ------------------------------------------------------------------------------------------------ workload
def pair_tokens(cfg) -> int:
    """Tokens of the longest possible pair (prompt + response, twice); pairs are never split."""
    d, r = cfg.data, cfg.rollout
    if cfg.algorithm.mode == "spin":
        return 2 * d.max_prompt_tokens + d.max_gold_tokens + r.max_new_tokens
    return 2 * (d.max_prompt_tokens + r.max_new_tokens)


def micro_batch_tokens(cfg) -> int:
    """Padded length of a full micro-batch (``packing.pack_items``: ≥ 1 padding token, a multiple of 8)."""
    budget = max(cfg.trainer.micro_batch_tokens, pair_tokens(cfg))
    return math.ceil((budget + 1) / 8) * 8


def num_microbatches(cfg, dp: int) -> int:
    """Micro-batches of one data-parallel rank when every pair has the longest length."""
    pairs_per_prompt = cfg.algorithm.pairs_per_prompt if cfg.algorithm.mode == "spin" else 1
    if pairs_per_prompt == "all":  # one pair per sample
        pairs_per_prompt = cfg.rollout.n
    pairs = math.ceil(cfg.trainer.prompts_per_step / dp) * pairs_per_prompt
    per_batch = max(1, cfg.trainer.micro_batch_tokens // pair_tokens(cfg))
    return max(1, math.ceil(pairs / per_batch))


def logprob_bytes(
    tokens: int, columns: int, hidden: int, chunk: int, e: int, *, stats: bool = True
) -> dict[str, int]:
    """Extra memory of the log-prob computation on ``[tokens, columns]`` logits, per path (module docstring).
    ``stats``: the per-token metrics are computed too (the training pass does; bench/logprob.py does not)."""
    chunk = min(chunk, tokens)
    buffers = 4 * chunk * columns * (3 if stats else 1)
    return {
        "naive": tokens * columns * (e + 12),
        "chunked": 2 * tokens * columns * e + buffers,
        "fused": buffers + 4 * columns * hidden + 4 * tokens * hidden,
    }


# ------------------------------------------------------------------------------------------------ estimate
def _stage(
    cfg, arch, kernels: str, dp: int, stage: int, tokens: int, in_flight: int, engine: int
) -> StageMemory:
    par, e = cfg.parallel, _DTYPE_BYTES[cfg.model.dtype]
    tp, pp, ep, etp = par.tp, par.pp, par.ep, par.etp or par.tp
    padded, h = arch.padded_vocab_size(tp), arch.hidden_size
    n_dense, n_expert = stage_param_split(arch, tp, pp, stage, padded, ep, etp, par.vpp)
    n = n_dense + n_expert
    distributed = cfg.optim.use_distributed_optimizer
    shards = dp * par.cp if distributed else 1  # Megatron's distributed optimizer shards over DP × CP
    row, tokens = tokens, cp_rank_tokens(tokens, par.cp)  # context parallel: this GPU's share of the row
    expert_shards = tp * dp // (ep * etp) if distributed else 1  # the experts' data-parallel group
    recompute = par.recompute_granularity == "full"
    features = dict(sequence_parallel=par.sequence_parallel_enabled, selective=tuple(par.selective_modules))
    dense_layers, moe_layers = stage_layers(arch, pp, stage, par.vpp)
    activations = dense_layers * layer_activation_elements(arch, tp, tokens, kernels, recompute, **features)
    if moe_layers:
        activations += moe_layers * layer_activation_elements(
            arch, tp, tokens, kernels, recompute, moe=True, etp=etp, **features
        )
    if par.cp > 1 and not recompute:  # attention keeps the other CP ranks' keys and values for backward
        activations += (dense_layers + moe_layers) * 2 * _kv(arch) // tp * (row - tokens)
    # in flight: micro-batches through the stage, or (interleaved) forwards of a chunk, 1/vpp of its layers
    activations = activations * in_flight // par.vpp
    if recompute:  # the layer being recomputed holds its full activations
        activations += layer_activation_elements(
            arch, tp, tokens, kernels, False, moe=moe_layers > 0, etp=etp, **features
        )
    columns, logprob = padded // tp, 0
    width = 2 * arch.intermediate_size // tp
    if moe_layers:
        width = max(width if dense_layers else 0, arch.moe.top_k * 2 * arch.moe.intermediate_size // etp)
    # one layer's backward working set (sequence parallelism: the layer input gathered again over TP)
    transient = (width + h + (h if features["sequence_parallel"] else 0)) * tokens * e
    if stage == pp - 1:
        final_norm = (2 if kernels == "gpu" else 3) * tokens * h
        activations += final_norm // tp if features["sequence_parallel"] else final_norm
        path = "fused" if cfg.trainer.logprob_impl == "fused_head" else "chunked"
        logprob = logprob_bytes(tokens, columns, h, cfg.trainer.logprob_chunk_tokens, e)[path]
        transient = max(transient, (columns * h + tokens * h) * e)  # output-layer weight and input gradients
    largest = max(  # the largest parameter tensor: the output layer, an MLP's or one expert's fc1
        columns * h,
        2 * arch.intermediate_size // tp * h if dense_layers else 0,
        2 * arch.moe.intermediate_size // etp * h if moe_layers else 0,
    )
    step_temp = 0  # GPU: fused Adam, NCCL all-gathers in place
    if kernels == "gpu_local":  # no TE/apex FusedAdam: torch's foreach AdamW (an fp32 copy of a moment)
        step_temp = 4 * n // shards
    if kernels == "cpu":  # torch's per-tensor AdamW; gloo's coalesced all-gather of the distributed optimizer
        # (bucket by bucket: the whole buffer, or one DDP bucket when the communication overlaps)
        gathered = min(n, ddp_bucket_params(cfg, dp, cuda=False) or n)
        step_temp = max(2 * 4 * largest, 2 * e * gathered if cfg.optim.use_distributed_optimizer else 0)
    return StageMemory(
        reward_model=reward_model_bytes(cfg),
        stage=stage,
        num_params=n,
        params=e * n,
        grads=4 * n,
        optimizer_main=0 if e == 4 else 4 * n_dense // shards + 4 * n_expert // expert_shards,
        optimizer_moments=8 * n_dense // shards + 8 * n_expert // expert_shards,
        reference=e * n,
        activations=activations * e,
        logprob=logprob,
        transient=transient,
        step_temp=step_temp,
        rollout_resident=engine,
    )


def estimate(cfg, arch, *, world_size: int, kernels: str = "gpu", gpu_bytes: int | None = None) -> MemoryPlan:
    """Per-GPU memory of ``cfg`` on ``world_size`` training GPUs (formulas: module docstring).

    ``kernels``: "gpu" (TE spec, flash attention, fused Adam), "gpu_local" (GPU without TE: local spec with torch
    RMSNorm, SDPA's flash attention, torch's foreach AdamW; not yet measured on a GPU) or "cpu" (local spec, SDPA
    with a dense mask, torch AdamW, gloo). ``gpu_bytes`` overrides ``cluster.gpu_memory_gb`` (the trainer passes
    the device's real size).
    """
    from spin_megatron.errors import ConfigError

    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    from spin_megatron.models.arch import check_expert_grid

    tp, pp, r, e = cfg.parallel.tp, cfg.parallel.pp, cfg.rollout, _DTYPE_BYTES[cfg.model.dtype]
    arch.check_parallel(tp, pp, ep=cfg.parallel.ep, etp=cfg.parallel.etp, vpp=cfg.parallel.vpp)
    cp = cfg.parallel.cp
    if world_size % (tp * pp * cp):
        raise ConfigError(
            f"{world_size} training GPUs do not split into parallel.tp × pp × cp = {tp * pp * cp}"
        )
    dp = world_size // (tp * pp * cp)
    check_expert_grid(tp, dp, cfg.parallel.ep, cfg.parallel.etp or tp)
    gpu = gpu_bytes if gpu_bytes is not None else int(cfg.cluster.gpu_memory_gb * GB)
    tokens, microbatches = micro_batch_tokens(cfg), num_microbatches(cfg, dp)
    engine = r.engine if r.engine in ("sglang", "hf") else "none"
    full, seq = full_model_params(arch), cfg.data.max_prompt_tokens + r.max_new_tokens
    hf_engine = 0
    if engine == "hf":  # a full model and its KV cache on the replica's first GPU
        hf_engine = full * e + r.max_batch_size * seq * 2 * arch.num_layers * _kv(arch) * e
    vpp = cfg.parallel.vpp
    stages = [
        _stage(cfg, arch, kernels, dp, s, tokens, in_flight_microbatches(pp, vpp, s, microbatches), hf_engine)
        for s in range(pp)
    ]
    worst = max(stages, key=lambda s: s.training_peak)
    columns = arch.padded_vocab_size(tp) // tp
    plan = MemoryPlan(
        world_size=world_size,
        tp=tp,
        pp=pp,
        dp=dp,
        kernels=kernels,
        gpu_bytes=gpu,
        usable_bytes=int(gpu * (1 - cfg.cluster.memory_headroom)),
        micro_batch_tokens=tokens,
        num_microbatches=microbatches,
        in_flight=in_flight_microbatches(pp, vpp, worst.stage, microbatches),
        layers_per_stage=arch.num_layers // pp,
        vpp=vpp,
        stage=worst,
        logprob_paths=logprob_bytes(
            cp_rank_tokens(tokens, cp), columns, arch.hidden_size, cfg.trainer.logprob_chunk_tokens, e
        ),
        cp=cp,
        engine=engine,
        placement=cfg.cluster.placement,
        sync_every=_sync_interval(cfg),
        full_model_params=full,
        dispatch_bytes_per_step=dispatch_bytes(cfg, arch, tokens, microbatches, dp),
        arch=arch,
    )
    if engine == "none":
        return plan
    engines = (len(r.sglang.urls) or dp * r.sglang.num_engines) if engine == "sglang" else dp
    sync_bytes = full * e
    plan = replace(
        plan,
        sync_bytes_per_engine=sync_bytes,
        sync_engines=engines,
        sync_buckets=math.ceil(sync_bytes / (r.sync_bucket_mb << 20)),
        kv_min_tokens=r.n * seq,
    )
    return (
        _with_sglang(plan, cfg, max(stages, key=lambda s: s.resident_at_launch))
        if engine == "sglang"
        else plan
    )


def _sync_interval(cfg) -> int:
    """Rollout steps between weight syncs: ``sync_every`` when the policy samples; the reference refresh interval
    when the opponent does (``ref_model_sync_steps`` converted to rollout steps; never refreshed: 0, no sync)."""
    if cfg.algorithm.sampler == "policy":
        return cfg.rollout.sync_every
    t = cfg.trainer
    if t.ref_update_freq:
        return t.ref_update_freq
    if t.ref_model_sync_steps:
        return max(1, t.ref_model_sync_steps // t.updates_per_rollout)
    return 0


def _with_sglang(plan: MemoryPlan, cfg, heaviest: StageMemory) -> MemoryPlan:
    """SGLang's terms (module docstring); ``heaviest``: the stage with the most memory when SGLang starts."""
    arch, s, colocated = plan.arch, cfg.rollout.sglang, cfg.cluster.placement == "colocated"
    weight_bytes = 4 if s.dtype == "float32" else 2  # auto: the HF checkpoint's dtype, bf16 for Qwen2.5/Llama
    weights = plan.full_model_params * weight_bytes // s.tp_size
    kv_token = 2 * arch.num_layers * math.ceil(arch.num_kv_heads / s.tp_size) * arch.head_dim * weight_bytes
    pool = int(s.mem_fraction_static * plan.gpu_bytes)
    trainer = heaviest.resident_at_launch + heaviest.rollout_resident if colocated else 0
    moments = heaviest.optimizer_moments if colocated else 0
    kv = pool - trainer - weights
    stage, sync = plan.stage, 0
    if colocated:
        largest = max(arch.vocab_size, 2 * arch.intermediate_size) * arch.hidden_size
        buffers = largest * _DTYPE_BYTES[cfg.model.dtype] + 2 * (cfg.rollout.sync_bucket_mb << 20)
        sync = trainer + moments + weights + buffers + (0 if s.enable_memory_saver else max(kv, 0))
        if not s.enable_memory_saver:  # weights and KV cache stay on the GPU while it trains
            stage = replace(stage, rollout_resident=stage.rollout_resident + weights + max(kv, 0))
        elif cfg.algorithm.sampler == "reference" or cfg.rollout.sync_every > 1:
            # the memory saver releases the weights only before a sync reloads them: on the other steps (the
            # opponent between refreshes, sync_every > 1) they stay on the GPU while it trains
            stage = replace(stage, rollout_resident=stage.rollout_resident + weights)
    notes = list(plan.notes)
    if s.sync_mode not in ("auto", plan.placement):
        notes.append(f"rollout.sglang.sync_mode={s.sync_mode} but cluster.placement={plan.placement}")
    return replace(
        plan,
        stage=stage,
        sglang_weights=weights,
        sglang_kv=kv,
        sglang_runtime=SGLANG_RUNTIME_BYTES,
        kv_bytes_per_token=kv_token,
        sglang_gpus_needed=(len(s.urls) or plan.dp * s.num_engines) * s.tp_size,
        sglang_gpus_available=plan.world_size if colocated else cfg.cluster.rollout_gpus,
        generation_peak=max(pool, trainer + weights) + moments + SGLANG_RUNTIME_BYTES,
        sync_peak=sync,
        notes=notes,
    )
