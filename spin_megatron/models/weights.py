"""Moving weights between an HF checkpoint and one rank's Megatron model stage.

``stage_parameters`` names every parameter of a stage by its *global* Megatron name; ``check_hf_checkpoint``
validates a whole HF checkpoint by names and shapes (headers only) before anything is loaded, so every rank fails
the same way at the same point; ``load_hf_weights`` fills the stage's shards.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from spin_megatron.errors import CheckpointError
from spin_megatron.models.chunks import chunks_of
from spin_megatron.models.hf_io import HFReader
from spin_megatron.models.mapping import WeightMapping, canonical_name
from spin_megatron.parallel.state import ParallelGroups

_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LOCAL_EXPERT = re.compile(r"(\.mlp\.experts\.local_experts\.)(\d+)(\.)")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers (anything exposing ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def stage_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``(global canonical name, parameter)`` of this stage, in module order (chunk by chunk: layer order): layers
    by their global index, routed experts by their global expert index (Megatron's ``local_expert_indices``)."""
    for chunk in chunks_of(unwrap(model)):
        yield from _chunk_parameters(unwrap(chunk))


def _chunk_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    layers = model.decoder.layers
    for name, param in model.named_parameters():
        match = _LOCAL_LAYER.match(name)
        if match:
            layer = layers[int(match.group(1))]
            name = canonical_name(f"decoder.layers.{layer.layer_number - 1}.{match.group(2)}")
            expert = _LOCAL_EXPERT.search(name)
            if expert:
                global_expert = layer.mlp.local_expert_indices[int(expert.group(2))]
                name = f"{name[: expert.start(2)]}{global_expert}{name[expert.end(2) :]}"
        yield canonical_name(name), param


def check_hf_checkpoint(reader: HFReader, mapping: WeightMapping) -> None:
    """Raise CheckpointError naming missing, unexpected or wrongly shaped tensors (reads headers only)."""
    expected = mapping.expected_hf_names()
    present = set(reader.names())
    missing = [n for n in expected if n not in present]
    unexpected = sorted(n for n in present - set(expected) if not mapping.is_ignorable_hf(n))
    wrong = []
    for name in expected:
        if name in present and reader.shape(name) != mapping.hf_shape(name):
            wrong.append(f"{name} {reader.shape(name)} (expected {mapping.hf_shape(name)})")
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_head(missing)}")
    if wrong:
        problems.append(f"wrong shape: {_head(wrong)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_head(unexpected)}")
    if problems:
        raise CheckpointError(
            f"HF checkpoint {reader.dir} does not match its config.json ({mapping.arch.architecture}): "
            + "; ".join(problems)
        )


def _head(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", … (+{len(items) - n} more)" if len(items) > n else "")


@torch.no_grad()
def load_hf_weights(
    model: torch.nn.Module, reader: HFReader, mapping: WeightMapping, groups: ParallelGroups
) -> None:
    """Fill every parameter of this rank's stage with its TP shard of the HF weights (experts: this EP rank's
    experts, split over the expert-TP ranks)."""
    for name, param in stage_parameters(model):
        rank, size = (
            (groups.etp_rank, groups.etp_size)
            if mapping.is_expert(name)
            else (groups.tp_rank, groups.tp_size)
        )
        shard = mapping.to_mcore(name, reader, rank, size)
        if shard.shape != param.shape:
            raise CheckpointError(
                f"{name}: mapped shard {tuple(shard.shape)} != parameter {tuple(param.shape)}"
            )
        param.copy_(shard)
