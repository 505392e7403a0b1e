"""Does a configuration fit its GPUs, and if not, the cheapest change that does: the memory check shared by
``spin-train`` (at start, on GPU) and ``spin-plan``. Below both entry points, so neither imports the other."""

from __future__ import annotations

from dataclasses import replace

from spin_megatron.config import Config
from spin_megatron.errors import ConfigError, UserError
from spin_megatron.models.arch import ModelArch
from spin_megatron.planning.counting import GB
from spin_megatron.planning.memory import MemoryPlan, estimate
from spin_megatron.planning.workload import pair_tokens


def check_fits(plan: MemoryPlan, cfg: Config) -> None:
    """Raise ConfigError naming the shortfall and the cheapest change that fits, unless ``plan`` fits."""
    if plan.fits:
        return
    message = "does not fit: " + "; ".join(plan.problems())
    fix = cheapest_fix(plan, cfg)
    if fix is None:
        raise ConfigError(message + "; no change tried fits (bigger GPUs, or fewer tokens per pair)")
    changes, fixed = fix
    raise ConfigError(f"{message}; cheapest fix: {changes} (→ {fixed.peak / GB:.1f} GB)")


def check_training_memory(cfg: Config, arch: ModelArch, world_size: int) -> None:
    """The trainer's check at start: a no-op on CPU or with ``cluster.check_at_start=false``; on GPU the plan
    for the device's real memory, raising :class:`ConfigError` when it does not fit."""
    import torch

    if not cfg.cluster.check_at_start or not torch.cuda.is_available():
        return
    from spin_megatron.models.builder import default_use_te, parse_dtype

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    # the layer spec the policy will be built with: TE's fused layers, or the local spec without TE
    kernels = planner_kernels(default_use_te(parse_dtype(cfg.model.dtype)))
    check_fits(estimate(cfg, arch, world_size=world_size, kernels=kernels, gpu_bytes=total), cfg)


def planner_kernels(use_te: bool) -> str:
    """The planner's kernel set on a GPU: TE's fused layers, or Megatron's local spec when TE is absent."""
    return "gpu" if use_te else "gpu_local"


def largest_fitting_micro_batch(
    cfg: Config, arch: ModelArch, *, gpu_bytes: int, kernels: str, world_size: int = 1
) -> tuple[int, MemoryPlan] | None:
    """The largest ``trainer.micro_batch_tokens`` — ``cfg``'s, halved until the plan fits ``gpu_bytes`` (e.g. the
    free memory ``torch.cuda.mem_get_info`` reports), never below one pair — with its plan; None if none fits."""
    budget = cfg.trainer.micro_batch_tokens
    while budget >= pair_tokens(cfg):
        changed = _with(cfg, [("trainer.micro_batch_tokens", budget)])
        plan = estimate(changed, arch, world_size=world_size, kernels=kernels, gpu_bytes=gpu_bytes)
        if plan.fits:
            return budget, plan
        budget //= 2
    return None


def _with(cfg: Config, changes) -> Config:
    """``cfg`` with ``changes`` (``(dotted key, value)`` pairs) applied, validated again."""
    for key, value in changes:
        *path, name = key.split(".")
        sections = [cfg]
        for part in path:
            sections.append(getattr(sections[-1], part))
        updated = replace(sections[-1], **{name: value})
        for part, parent in zip(reversed(path), reversed(sections[:-1])):
            updated = replace(parent, **{part: updated})
        cfg = updated
    return cfg


def _shortfall(plan: MemoryPlan) -> float:
    """How far from fitting (0 when it fits): bytes over budget, KV cache missing, GPUs missing."""
    over = max(0, plan.peak - plan.usable_bytes)
    if plan.engine == "sglang":
        over += max(0, plan.kv_min_tokens * plan.kv_bytes_per_token - max(0, plan.sglang_kv))
        over += max(0, plan.sglang_gpus_needed - plan.sglang_gpus_available) * plan.gpu_bytes
    return over


def _options(plan: MemoryPlan, cfg: Config) -> list[list[tuple]]:
    """Changes in order of cost, in groups; an option is a tuple of ``(key, value)``; cheaper options first."""
    arch, c, sglang, world = plan.arch, cfg.cluster, cfg.rollout.sglang, plan.world_size
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    groups = []
    if plan.engine == "sglang" and c.placement == "colocated" and not sglang.enable_memory_saver:
        groups.append([(("rollout.sglang.enable_memory_saver", True),)])
    if plan.engine == "sglang":
        fewer = [t for t in arch.valid_tp_sizes() if t > sglang.tp_size and t <= c.gpus_per_node]
        engines = [
            max(1, min(sglang.num_engines, plan.sglang_gpus_available // (plan.dp * t))) for t in fewer
        ]
        groups.append(
            [
                (("rollout.sglang.tp_size", t), ("rollout.sglang.num_engines", n))
                for t, n in zip(fewer, engines)
            ]
        )
    if not cfg.optim.use_distributed_optimizer and plan.dp > 1:
        groups.append([(("optim.use_distributed_optimizer", True),)])
    if arch.moe is not None:  # more expert parallelism: the experts' weights and optimizer state ÷ EP
        ep = cfg.parallel.ep
        groups.append([(("parallel.ep", x),) for x in arch.valid_ep_sizes() if x > ep and x <= world])
    par = cfg.parallel
    if tp > 1 and not par.sequence_parallel_enabled:  # free: the same TP traffic, activations ÷ TP
        groups.append([(("parallel.sequence_parallel", True),)])
    if par.recompute_granularity != "full":  # the MLP's activations only (its forward again), then all
        mlp = (("parallel.recompute", "selective"), ("parallel.recompute_modules", ["mlp"]))
        selective = [] if "mlp" in par.selective_modules else [mlp]
        unset = (("parallel.recompute_modules", None),) if par.recompute_modules is not None else ()
        groups.append(selective + [(*unset, ("parallel.recompute", "full"))])
    budgets, budget = [], cfg.trainer.micro_batch_tokens // 2
    while budget >= pair_tokens(cfg) // 2 and budget > 0:  # below one pair a smaller budget changes nothing
        budgets.append((("trainer.micro_batch_tokens", budget),))
        budget //= 2
    groups.append(budgets)
    tps = [t for t in arch.valid_tp_sizes() if t > tp and world % (t * pp) == 0 and t <= c.gpus_per_node]
    groups.append([(("parallel.tp", t),) for t in tps])
    groups.append([(("parallel.pp", q),) for q in arch.valid_pp_sizes() if q > pp and world % (tp * q) == 0])
    groups.append([(("cluster.nodes", c.nodes + extra),) for extra in range(1, 4 * c.nodes + 1)])
    return [g for g in groups if g]


def _text(changes) -> str:
    def value(v) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if v is None:
            return "null"
        return f"[{','.join(map(str, v))}]" if isinstance(v, list) else str(v)

    return " ".join(f"{k}={value(v)}" for k, v in changes)


def _evaluate(plan: MemoryPlan, cfg: Config, changes) -> tuple[Config, MemoryPlan] | None:
    """``cfg`` with ``changes`` and its plan (None when the change does not apply to this model or cluster)."""
    world = plan.world_size  # extra machines train (disaggregated: the rollout GPUs stay as they are)
    for key, value in changes:
        if key == "cluster.nodes":
            world += (value - cfg.cluster.nodes) * cfg.cluster.gpus_per_node
    try:
        changed = _with(cfg, changes)
        return changed, estimate(
            changed, plan.arch, world_size=world, kernels=plan.kernels, gpu_bytes=plan.gpu_bytes
        )
    except UserError:
        return None


def _best_fraction(base: tuple[Config, MemoryPlan] | None):
    """SGLang's ``mem_fraction_static`` re-chosen for ``base``: the largest that fits (the biggest KV cache), else
    the one closest to fitting. Returns ``(fraction change or (), config, plan)``, or None for ``base=None``."""
    if base is None:
        return None
    best = ((), *base)
    if base[1].engine != "sglang" or base[1].fits:
        return best
    for fraction in (round(0.95 - 0.05 * i, 2) for i in range(19)):
        tried = _evaluate(base[1], base[0], [("rollout.sglang.mem_fraction_static", fraction)])
        if tried is not None and (tried[1].fits or _shortfall(tried[1]) < _shortfall(best[2])):
            best = ((("rollout.sglang.mem_fraction_static", fraction),), *tried)
            if tried[1].fits:
                break
    return best


def _apply_all(state, options, *, most: bool = False):
    """``state`` = (config, plan) with each option applied (``most``: per group, its last option that applies);
    returns ``(changes, config, plan)`` or None when an option does not apply."""
    changes = ()
    for option in options:
        for candidate in reversed(option) if most else (option,):
            tried = _evaluate(state[1], state[0], candidate)
            if tried is not None:
                state, changes = tried, changes + candidate
                break
        else:
            if not most:
                return None
    return changes, *state


def cheapest_fix(plan: MemoryPlan, cfg: Config) -> tuple[str, MemoryPlan] | None:
    """The first single option, in order of cost, that fits (SGLang's memory fraction re-chosen for each); else the
    cheapest combination: from the most expensive group down, each group takes its cheapest option (or none)
    that still fits when every cheaper group takes its strongest one. Returns ``(overrides, plan)`` or None."""
    groups = _options(plan, cfg)
    for group in [[()], *groups]:  # () first: only SGLang's memory fraction changes
        for option in group:
            result = _best_fraction(_evaluate(plan, cfg, option))
            if result is not None and result[2].fits:
                return _text(option + result[0]), result[2]
    chosen = [()] * len(groups)
    for i in reversed(range(len(groups))):
        for option in ((), *groups[i]):
            fixed = _apply_all((cfg, plan), [*chosen[i + 1 :], option])
            if fixed is not None:
                cheaper = _apply_all(fixed[1:], groups[:i], most=True)
                result = _best_fraction(cheaper[1:])
                if result[2].fits:
                    chosen[i] = option
                    break
        else:
            return None
    final = _best_fraction(_apply_all((cfg, plan), chosen)[1:])
    changes = tuple(change for option in chosen for change in option) + final[0]
    return _text(changes), final[2]
