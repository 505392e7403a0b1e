"""Streaming export of a Megatron model as HF-named full tensors.

Every rank of a model-parallel group calls :func:`export_hf_weights` with the same model layout. TP shards are
all-gathered inside the TP group one parameter at a time; each pipeline stage exports its own layers, so no rank
ever holds more than one full parameter beyond its own shards. The mapping (``models.mapping``) turns the
gathered shards into HF tensors; the converter and the rollout weight sync both consume this generator.

Routed experts (MoE) are split over the expert-parallel ranks of a stage, each expert's weights over its
expert-TP ranks: an expert's shards are gathered inside the expert-TP group, then the same local expert slot of
every EP rank is all-gathered, so every rank yields every expert under its global HF name (one expert slot × EP at
a time).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from spin_megatron.models.chunks import chunks_of
from spin_megatron.models.mapping import WeightMapping
from spin_megatron.models.weights import stage_parameters, unwrap
from spin_megatron.parallel.state import ParallelGroups


def gather_tp_shards(tensor: torch.Tensor, groups: ParallelGroups) -> list[torch.Tensor]:
    """All TP ranks' shards of ``tensor`` in TP-rank order (the tensor itself when TP=1)."""
    return _all_gather(tensor, groups.tp, groups.tp_size)


def _all_gather(tensor: torch.Tensor, group, size: int) -> list[torch.Tensor]:
    if size == 1:
        return [tensor]
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor, group=group)
    return parts


def _export_expert(name: str, param, mapping: WeightMapping, groups: ParallelGroups):
    """Every EP rank's expert in this local slot, as full HF tensors (collective over the EP and ETP groups)."""
    shards = _all_gather(param.detach(), groups.etp, groups.etp_size)
    for hf_name, tensor in mapping.to_hf(name, shards):
        peers = mapping.ep_peers(hf_name, groups.ep_size)
        yield from zip(peers, _all_gather(tensor, groups.ep, groups.ep_size))


@torch.no_grad()
def export_hf_weights(
    model: torch.nn.Module, mapping: WeightMapping, groups: ParallelGroups, *, chunk: int | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` for every weight held by this rank's pipeline stage (``chunk``: only
    that model chunk's, with interleaving).

    Collective over the TP group (MoE: also the EP and expert-TP groups): all their ranks must iterate to the end.
    With tied embeddings the shared matrix is exported once, by the first stage.
    """
    source = model if chunk is None else chunks_of(unwrap(model))[chunk]
    for name, param in stage_parameters(source):
        if name == "output_layer.weight" and mapping.arch.tie_word_embeddings:
            continue  # the last stage's copy of the tied embedding
        if mapping.is_expert(name):
            yield from _export_expert(name, param, mapping, groups)
            continue
        # Megatron's own `tensor_model_parallel` attribute is unset when weights are not initialised; the
        # mapping knows which parameters are split.
        shards = gather_tp_shards(param.detach(), groups) if mapping.is_tp_sharded(name) else [param.detach()]
        yield from mapping.to_hf(name, shards)
