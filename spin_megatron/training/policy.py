"""Policy (trained: Megatron DDP + distributed optimizer + LR schedule) and reference (frozen copy) models.

Reference = a second, frozen ``GPTModel`` with the same layout, not a weight swap: it costs one extra copy of
the parameters (no gradients, no optimizer state — a fraction of the policy's ~16 bytes/param with Adam in
fp32), and in return the reference pass needs no copying of weights back and forth each step, and refreshing it
(``ref_update_freq``) is a plain parameter copy between identically sharded models.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from spin_megatron.config import TE_RECOMPUTE_MODULES, Config, default_tokenizer
from spin_megatron.errors import ConfigError
from spin_megatron.models.arch import ModelArch, load_arch
from spin_megatron.models.builder import build_gpt_model, default_use_te, expose_hidden_states, parse_dtype
from spin_megatron.models.chunks import as_model, chunks_of
from spin_megatron.models.hf_io import HFReader
from spin_megatron.models.mapping import mapping_for
from spin_megatron.models.mcore_io import (
    arch_from_meta,
    checkpoint_padded_vocab,
    load_model_shards,
    read_meta,
)
from spin_megatron.models.tiny import make_tiny_hf_model
from spin_megatron.models.weights import check_hf_checkpoint, load_hf_weights, unwrap
from spin_megatron.parallel.ddp import attach_sync_hooks, ddp_config, finish_param_gather
from spin_megatron.parallel.megatron_fixes import apply_megatron_fixes
from spin_megatron.parallel.state import ParallelGroups


@dataclass
class ModelSource:
    """Where the initial weights come from, resolved from the ``model`` config section."""

    arch: ModelArch
    padded_vocab_size: int
    hf_dir: Path | None = None  # load HF safetensors
    mcore_dir: Path | None = None  # load a spin-convert checkpoint
    tokenizer_dir: str | None = None


def resolve_model_source(cfg: Config, groups: ParallelGroups | None, tp_size: int) -> ModelSource:
    """Read the architecture (and create the tiny random model on rank 0 if asked to)."""
    model_cfg = cfg.model
    if model_cfg.tiny is not None:
        hf_dir = Path(cfg.trainer.output_dir) / "init_model"
        tiny = model_cfg.tiny
        if (groups is None or groups.rank == 0) and not hf_dir.is_dir():
            # written aside and renamed: a run killed while writing it leaves no half-written model behind
            staging = hf_dir.with_name(".init_model.partial")
            if staging.exists():
                shutil.rmtree(staging)
            make_tiny_hf_model(
                staging,
                tiny.architecture,
                seed=tiny.seed,
                hidden_size=tiny.hidden_size,
                intermediate_size=tiny.intermediate_size,
                num_hidden_layers=tiny.num_hidden_layers,
                num_attention_heads=tiny.num_attention_heads,
                num_key_value_heads=tiny.num_key_value_heads,
                vocab_size=tiny.vocab_size,
                tie_word_embeddings=tiny.tie_word_embeddings,
                max_position_embeddings=4096,
                **_tiny_moe_settings(tiny),
            )
            os.replace(staging, hf_dir)
        if groups is not None:
            dist.barrier()
        arch = load_arch(hf_dir)
        return ModelSource(
            arch,
            arch.padded_vocab_size(tp_size),
            hf_dir=hf_dir,
            tokenizer_dir=model_cfg.tokenizer_path or default_tokenizer(),
        )
    if model_cfg.mcore_ckpt is not None:
        meta = read_meta(model_cfg.mcore_ckpt)
        tokenizer = (
            model_cfg.tokenizer_path or model_cfg.hf_path or str(Path(model_cfg.mcore_ckpt) / "tokenizer")
        )
        return ModelSource(
            arch_from_meta(meta),
            checkpoint_padded_vocab(meta, tp_size),
            mcore_dir=Path(model_cfg.mcore_ckpt),
            tokenizer_dir=tokenizer,
        )
    arch = load_arch(model_cfg.hf_path)
    return ModelSource(
        arch,
        arch.padded_vocab_size(tp_size),
        hf_dir=Path(model_cfg.hf_path),
        tokenizer_dir=model_cfg.tokenizer_path or model_cfg.hf_path,
    )


def _tiny_moe_settings(tiny) -> dict:
    if tiny.architecture != "qwen3_moe":
        return {}
    return {
        "num_experts": tiny.num_experts,
        "num_experts_per_tok": tiny.num_experts_per_tok,
        "moe_intermediate_size": tiny.moe_intermediate_size,
    }


def moe_build_settings(cfg: Config, arch: ModelArch) -> dict:
    """The MoE options of the model build (nothing for a dense model): token dispatcher, aux-loss weight."""
    if arch.moe is None:
        return {}
    coeff = cfg.model.moe_aux_loss_coeff
    return {
        "moe_dispatcher": cfg.parallel.moe_token_dispatcher,
        "moe_aux_loss_coeff": arch.moe.router_aux_loss_coef if coeff is None else coeff,
    }


def check_moe_training_layout(cfg: Config, arch: ModelArch) -> None:
    """Megatron trains MoE layers at tensor-parallel size > 1 only with sequence parallelism (``moe_layer.py``
    raises otherwise: without it every TP rank would send the same tokens to the experts, which would count each
    token's expert gradient TP times); it is on by default at TP > 1."""
    par = cfg.parallel
    if arch.moe is not None and par.tp > 1 and not par.sequence_parallel_enabled:
        raise ConfigError(
            f"parallel.tp={par.tp} with a mixture-of-experts model ({arch.architecture}) needs sequence "
            "parallelism, which Megatron requires for MoE training at TP > 1: remove "
            "parallel.sequence_parallel=false (or use parallel.tp=1 and split the experts with parallel.ep)"
        )


def check_moe_engine(cfg: Config, arch: ModelArch) -> None:
    """SGLang 0.5.23 builds every Qwen3-MoE layer as an MoE layer (``stage_facts`` in its models/qwen3_moe.py
    ignores ``mlp_only_layers`` and ``decoder_sparse_step``): a checkpoint with dense layers would be served with
    the wrong weights (all layers are MoE in Qwen3-30B-A3B and Qwen3-235B-A22B)."""
    if cfg.rollout.engine == "sglang" and arch.moe is not None and not all(arch.moe.layer_pattern):
        dense = [i for i, moe in enumerate(arch.moe.layer_pattern) if not moe]
        raise ConfigError(
            f"rollout.engine=sglang cannot serve this Qwen3-MoE checkpoint: layers {dense} are dense "
            "(mlp_only_layers / decoder_sparse_step) and SGLang 0.5.23 builds every layer as MoE; use "
            "rollout.engine=hf"
        )


def _load_initial_weights(model, source: ModelSource, groups: ParallelGroups) -> None:
    if source.mcore_dir is not None:
        load_model_shards(model, source.mcore_dir)
        return
    reader = HFReader(source.hf_dir)
    mapping = mapping_for(source.arch, source.padded_vocab_size)
    check_hf_checkpoint(reader, mapping)
    load_hf_weights(model, reader, mapping, groups)


def _recompute_settings(cfg: Config) -> dict:
    """Megatron's activation recomputation (``parallel.recompute``): full — each layer keeps only its input and
    is recomputed in backward —, or selective — only ``parallel.recompute_modules`` are."""
    granularity = cfg.parallel.recompute_granularity
    if granularity == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    if granularity == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": cfg.parallel.selective_modules}
    return {}


def parallel_build_settings(cfg: Config) -> dict:
    """TransformerConfig fields of the parallel layout beyond the group sizes: sequence parallelism."""
    return {"sequence_parallel": cfg.parallel.sequence_parallel_enabled}


def check_recompute_modules(cfg: Config, use_te: bool | None = None) -> None:
    """Megatron recomputes ``layernorm`` and ``moe_act`` through TransformerEngine only (``layernorm``: TE's
    checkpoint and FP8 state in ``tensor_parallel/random.py``; ``moe_act``: grouped-GEMM experts). ``use_te``:
    whether the policy is built with TE's layers (default: as build_policy will)."""
    needs_te = [m for m in cfg.parallel.selective_modules if m in TE_RECOMPUTE_MODULES]
    if use_te is None:
        use_te = default_use_te(parse_dtype(cfg.model.dtype))
    if needs_te and not use_te:
        raise ConfigError(
            f"parallel.recompute_modules={needs_te} needs TransformerEngine on CUDA (Megatron recomputes them "
            "through TE), which this machine lacks: use core_attn, mlp or moe"
        )


def _build(source: ModelSource, groups: ParallelGroups, dtype: torch.dtype, fused_head: bool, **overrides):
    model = build_gpt_model(
        source.arch,
        groups,
        dtype=dtype,
        padded_vocab_size=source.padded_vocab_size,
        perform_initialization=False,
        calculate_per_token_loss=True,
        **overrides,
    )
    _load_initial_weights(model, source, groups)
    if fused_head:
        expose_hidden_states(model)
    return model


@dataclass
class Policy:
    model: torch.nn.Module  # DDP(Float16Module (bf16) (GPTModel)); with vpp a ModelChunks of them
    optimizer: object  # MegatronOptimizer
    scheduler: object  # OptimizerParamScheduler


def build_policy(cfg: Config, source: ModelSource, groups: ParallelGroups) -> Policy:
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import Float16Module

    apply_megatron_fixes()  # (the distributed optimizer's checkpoint with several DDP buckets)
    dtype = parse_dtype(cfg.model.dtype)
    model = _build(
        source, groups, dtype, cfg.trainer.logprob_impl == "fused_head",
        fused_swiglu=cfg.model.fused_swiglu, **_recompute_settings(cfg), **moe_build_settings(cfg, source.arch),
        **parallel_build_settings(cfg),
    )  # fmt: skip
    chunks = chunks_of(model)  # one, or the model chunks of an interleaved pipeline (vpp)
    config = chunks[0].config
    if dtype != torch.float32:
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    ddp = ddp_config(
        cfg.parallel,
        distributed_optimizer=cfg.optim.use_distributed_optimizer,
        cuda=torch.cuda.is_available(),
        dp_size=groups.dp_size,
    )
    # one DDP per model chunk, as Megatron's training: buckets for the first only (the later chunks' reductions
    # overlap with the pipeline's remaining compute anyway)
    chunks = [
        DistributedDataParallel(config, ddp, chunk, pg_collection=groups.pgs, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    attach_sync_hooks(config, chunks)  # no_sync, and with overlap the grad/param sync of each chunk
    config.finalize_model_grads_func = finalize_model_grads
    model = as_model(chunks)
    o = cfg.optim
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=dtype == torch.bfloat16,
            params_dtype=dtype,
            use_distributed_optimizer=o.use_distributed_optimizer,
        ),
        chunks,
        use_gloo_process_groups=False,
        pg_collection=groups.pgs,
    )
    t = cfg.trainer  # the schedule counts optimizer steps: over the run, or over one SPIN iteration
    steps = (t.ref_update_freq if t.reset_optimizer_on_refresh else t.total_steps) * t.updates_per_rollout
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.lr_warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_steps,
        lr_decay_steps=max(steps, o.lr_warmup_steps + 1),
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
    )
    return Policy(model=model, optimizer=optimizer, scheduler=scheduler)


def build_reference(cfg: Config, source: ModelSource, groups: ParallelGroups, policy: Policy):
    """A frozen model with the policy's layout, holding the policy's current weights."""
    model = build_gpt_model(
        source.arch,
        groups,
        dtype=parse_dtype(cfg.model.dtype),
        padded_vocab_size=source.padded_vocab_size,
        perform_initialization=False,
        fused_swiglu=cfg.model.fused_swiglu,
        **moe_build_settings(cfg, source.arch),
        **parallel_build_settings(cfg),
    )
    model.requires_grad_(False)
    model.eval()
    if cfg.trainer.logprob_impl == "fused_head":
        expose_hidden_states(model)
    refresh_reference(model, policy)
    return model


@torch.no_grad()
def refresh_reference(reference: torch.nn.Module, policy: Policy, alpha: float = 1.0) -> None:
    """reference ← α·policy + (1−α)·reference (identical sharding: parameter by parameter, chunk by chunk). α = 1: a
    copy (SPIN's new iteration); α < 1: TR-DPO's soft update."""
    finish_param_gather(policy.model)  # overlap_param_gather: the last step's all-gather may be pending
    pairs = list(zip(chunks_of(unwrap(policy.model)), chunks_of(reference), strict=True))
    for policy_chunk, reference_chunk in pairs:
        source = dict(unwrap(policy_chunk).named_parameters())
        target = dict(reference_chunk.named_parameters())
        if source.keys() != target.keys():
            raise ConfigError(f"reference and policy differ: {sorted(set(source) ^ set(target))[:5]}")
        for name, param in target.items():
            if alpha == 1.0:
                param.copy_(source[name])
            else:
                param.lerp_(source[name].to(param.dtype), alpha)
