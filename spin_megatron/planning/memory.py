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

import math
from dataclasses import dataclass, field, replace

from spin_megatron.planning.counting import (
    _DTYPE_BYTES,
    GB,
    _kv,
    cp_rank_tokens,
    ddp_bucket_params,
    dispatch_bytes,
    full_model_params,
    in_flight_microbatches,
    layer_activation_elements,
    pipeline_bubble,
    reward_model_bytes,
    stage_layers,
    stage_param_split,
)
from spin_megatron.planning.workload import logprob_bytes, micro_batch_tokens, num_microbatches

SGLANG_RUNTIME_BYTES = 2 * GB  # SGLang outside its static pool: CUDA graphs, decode activations (assumed)
KERNELS = ("gpu", "gpu_local", "cpu")


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
