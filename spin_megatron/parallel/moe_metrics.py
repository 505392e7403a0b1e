"""The MoE load-balancing (auxiliary) loss of a training step, for logging apart from the DPO loss.

Megatron's routers add the loss to the gradient themselves (``moe_aux_loss_coeff`` × the switch-transformer
load-balancing loss of each micro-batch) and record its unscaled value per layer in a process-global tracker;
this reads the tracker after a step, sums it over the pipeline stages, and clears it. With the aux loss off
(coefficient 0, the DPO default) Megatron does not compute it and nothing is logged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from spin_megatron.parallel.state import ParallelGroups

TRACKER_NAME = "load_balancing_loss"


def aux_loss_enabled(model) -> bool:
    config = getattr(model, "config", None)
    return bool(config is not None and config.num_moe_experts and config.moe_aux_loss_coeff > 0)


def load_balancing_sums(model, groups: ParallelGroups, num_microbatches: int) -> tuple[float, float]:
    """``(Σ over MoE layers and micro-batches of the loss, number of those terms)`` of this replica's step (on
    every rank). Collective over the pipeline group when the aux loss is on; (0, 0) otherwise."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    config = model.config
    if not aux_loss_enabled(model):
        return 0.0, 0.0
    tracker = get_moe_layer_wise_logging_tracker()
    entry = tracker.get(TRACKER_NAME)
    values = (
        entry["values"].detach().clone()
        if entry is not None
        else torch.zeros(config.num_layers, device=groups.device)
    )
    if entry is not None:
        entry["values"].zero_()
        group = entry.get("reduce_group")
        if group is not None and not entry.get("reduce_group_has_dp", False):
            # sequence parallelism: each TP rank's routers saw its share of the tokens (the tracker's reduce
            # group, Megatron's reduce_aux_losses_tracker_across_ranks sums over it too)
            dist.all_reduce(values, group=group)
    if groups.pp_size > 1:
        dist.all_reduce(values, group=groups.pp)  # each stage holds its own layers' values
    moe_layers = sum(config.moe_layer_freq) if isinstance(config.moe_layer_freq, list) else config.num_layers
    return float(values.sum()), float(moe_layers * num_microbatches)
