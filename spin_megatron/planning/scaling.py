"""What Megatron's scaling options buy for a planned run (``spin-plan`` prints these lines): sequence parallelism,
activation recomputation (selective or full) and the overlapped data-parallel communication, each measured by
planning the same run with the option switched (memory per GPU), plus the data-parallel traffic it hides."""

from __future__ import annotations

from spin_megatron.config import Config
from spin_megatron.planning.counting import _DTYPE_BYTES, GB, ddp_bucket_params
from spin_megatron.planning.fit import _with
from spin_megatron.planning.memory import MemoryPlan, estimate


def _peak_with(plan: MemoryPlan, cfg: Config, changes) -> float | None:
    """The training peak (GB) of ``cfg`` with ``changes``; None when that configuration is invalid."""
    from spin_megatron.errors import UserError

    try:
        changed = _with(cfg, changes)
        other = estimate(
            changed, plan.arch, world_size=plan.world_size, kernels=plan.kernels, gpu_bytes=plan.gpu_bytes
        )
    except UserError:
        return None
    return other.training_peak / GB


def _delta(plan: MemoryPlan, cfg: Config, changes) -> str:
    peak = _peak_with(plan, cfg, changes)
    return "n/a" if peak is None else f"{peak - plan.training_peak / GB:+.2f} GB"


def sequence_parallel_line(plan: MemoryPlan, cfg: Config) -> str:
    par = cfg.parallel
    if plan.tp == 1:
        return "sequence parallel: n/a at TP 1 (it splits the sequence over the tensor-parallel ranks)"
    state = "on" if par.sequence_parallel_enabled else "off"
    flipped = _delta(plan, cfg, [("parallel.sequence_parallel", not par.sequence_parallel_enabled)])
    return (
        f"sequence parallel: {state} (default at TP > 1) — norm/residual activations ÷ TP {plan.tp}; "
        f"turning it {'off' if state == 'on' else 'on'}: {flipped} per GPU, the same TP traffic "
        "(reduce-scatter + all-gather instead of all-reduce)"
    )


def recompute_line(plan: MemoryPlan, cfg: Config) -> str:
    par = cfg.parallel
    current = par.recompute_granularity or "none"
    if current == "selective":
        current += f" [{','.join(par.selective_modules)}]"
    reset = [("parallel.recompute_modules", None), ("parallel.activation_recompute", False)]
    options = {
        "none": [("parallel.recompute", "none")],
        "selective [core_attn]": [
            ("parallel.recompute", "selective"),
            ("parallel.recompute_modules", ["core_attn"]),
        ],
        "selective [mlp]": [("parallel.recompute", "selective"), ("parallel.recompute_modules", ["mlp"])],
        "full": [("parallel.recompute", "full")],
    }
    deltas = [
        f"{name} {_delta(plan, cfg, reset + changes)}" for name, changes in options.items() if name != current
    ]
    return (
        f"recompute: {current}; versus: {', '.join(deltas)} per GPU; recomputing costs about "
        f"+{_mlp_share(plan.arch) / 3:.0%} of the step's compute for mlp (its forward again in backward), +33% for "
        "full, little for core_attn (flash attention keeps little to recompute)"
    )


def _mlp_share(arch) -> float:
    """The MLP's share of a dense layer's forward FLOPs (weights only: 2 FLOPs per weight and token)."""
    h, q = arch.hidden_size, arch.num_attention_heads * arch.head_dim
    kv = arch.num_kv_heads * arch.head_dim
    mlp = 3 * h * arch.intermediate_size
    return mlp / (mlp + h * (q + 2 * kv) + q * h)


def dp_communication_bytes(cfg, num_params: int, dp: int) -> tuple[int, int]:
    """Bytes one GPU sends per optimizer step for ``num_params`` parameters over ``dp`` replicas: the gradient
    reduce-scatter (fp32, ``grad_reduce_in_fp32``; an all-reduce, twice as much, without the distributed
    optimizer) and the parameter all-gather (the parameter dtype; none without the distributed optimizer).
    ``parallel.overlap_grad_reduce`` / ``overlap_param_gather`` hide them behind the backward / next forward."""
    if dp == 1:
        return 0, 0
    share = num_params * (dp - 1) // dp
    if not cfg.optim.use_distributed_optimizer:
        return 2 * 4 * share, 0
    return 4 * share, _DTYPE_BYTES[cfg.model.dtype] * share


def overlap_line(plan: MemoryPlan, cfg: Config) -> str:
    from spin_megatron.parallel.ddp import overlap_settings

    cuda = plan.kernels != "cpu"
    distributed = cfg.optim.use_distributed_optimizer
    grad, param = overlap_settings(cfg.parallel, distributed_optimizer=distributed, cuda=cuda)
    reduce, gather = dp_communication_bytes(cfg, plan.stage.num_params, plan.dp)
    if plan.dp == 1:
        return "data-parallel communication: none at DP 1 (overlap options change nothing)"
    bucket = ddp_bucket_params(cfg, plan.dp, cuda=cuda)
    buckets = f"buckets of {bucket / 1e6:.0f} M parameters" if bucket else "one bucket"
    kind = "reduce-scatter" if distributed else "all-reduce"
    return (
        f"data-parallel communication per GPU and optimizer step: gradient {kind} {reduce / GB:.2f} GB "
        f"({'overlapped with the backward' if grad else 'exposed'}), parameter all-gather {gather / GB:.2f} GB "
        f"({'overlapped with the next forward' if param else 'exposed'}); {buckets}; no extra memory on GPU "
        "(in place in the grad/param buffers)"
    )


def scaling_lines(plan: MemoryPlan, cfg: Config) -> list[str]:
    return [sequence_parallel_line(plan, cfg), recompute_line(plan, cfg), overlap_line(plan, cfg)]
