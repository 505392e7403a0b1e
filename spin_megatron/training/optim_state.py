"""Adam's state as before its first step, made explicit: to save an optimizer that has not stepped yet, and to
start a SPIN iteration with a fresh optimizer (``trainer.reset_optimizer_on_refresh``, as uclaml/SPIN does).

A fresh torch Adam has no state; its first step creates zero moments and ``step`` 0, then updates them. State
that exists with zero moments and ``step`` 0 gives that same first step bit for bit, so "fresh" can be written
down (and saved by Megatron, which cannot save an empty state) without changing the run.
"""

from __future__ import annotations

import torch

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def inner_optimizers(optimizer) -> list:
    """Megatron's optimizers inside a ChainedOptimizer (dense and expert parameters), or the optimizer itself."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


@torch.no_grad()
def materialize_fresh_state(optimizer) -> None:
    """Give every inner optimizer that has not stepped yet the state its first step starts from.

    Its own code creates the state (one step at lr 0 on zero gradients: no parameter moves, AdamW's decay factor
    is 1 - 0·wd), then :func:`reset_state` sets moments and ``step`` back to zero. An optimizer that has
    stepped keeps its state untouched."""
    for opt in inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None or inner.state:
            continue
        lrs = [group["lr"] for group in inner.param_groups]
        for group in inner.param_groups:
            group["lr"] = 0.0
        for p in (p for group in inner.param_groups for p in group["params"] if p.numel()):
            p.grad = torch.zeros_like(
                p
            )  # (Megatron fills these from main_grad at each step: nothing is lost)
        try:
            inner.step()
        finally:
            for group, lr in zip(inner.param_groups, lrs):
                group["lr"] = lr
            inner.zero_grad(set_to_none=True)
        reset_state(opt)


@torch.no_grad()
def reset_state(optimizer) -> None:
    """Moments and step counts to zero, in place: the next step is a first step (the weights are untouched)."""
    for opt in inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for state in inner.state.values():
            for key in (*MOMENTS, "step"):
                value = state.get(key)
                if torch.is_tensor(value):
                    value.zero_()
                elif key == "step" and value is not None:
                    state[key] = 0
        for group in inner.param_groups:  # optimizers that count steps per group (TE FusedAdam)
            if "step" in group:
                group["step"] = 0


def restart_schedule(scheduler) -> None:
    """Megatron's OptimizerParamScheduler back to its first step (warm-up again, then the decay)."""
    scheduler.num_steps = 0
    scheduler.step(0)
