"""Small collectives the trainer needs beyond Megatron's: object broadcast inside a group, and summing named
metrics over the whole job (each rank contributes its share, or zeros)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from spin_megatron.parallel.state import ParallelGroups


def broadcast_object(obj, src: int, group) -> object:
    """``obj`` from global rank ``src`` to every rank of ``group`` (which contains ``src``)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def sum_over_world(
    values: dict[str, float], keys: tuple[str, ...], groups: ParallelGroups, contribute: bool
) -> dict[str, float]:
    """Sum ``values[k]`` over all ranks that ``contribute`` (the others add zeros). Same ``keys`` everywhere."""
    vector = torch.tensor(
        [float(values.get(k, 0.0)) if contribute else 0.0 for k in keys],
        dtype=torch.float64,
        device=groups.device,
    )
    dist.all_reduce(vector)
    return dict(zip(keys, vector.tolist()))


def max_over_world(value: float, groups: ParallelGroups) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=groups.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()
