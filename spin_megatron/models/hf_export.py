"""Writing a Megatron model (any TP/PP) as an HF folder, atomically: safetensors shards + index + config +
tokenizer files. Used by ``spin-convert mcore-to-hf`` and by the trainer's final export.

Each pipeline stage's TP-rank-0 writes its own shards (``model-ppNN-*.safetensors``) as the weights stream out of
:func:`export_hf_weights`; rank 0 writes the index. Output goes to a hidden staging folder next to ``out_dir``
that replaces it only when complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from spin_megatron.models.hf_io import HFShardWriter, copy_tokenizer_files, write_hf_config, write_index
from spin_megatron.models.mapping import WeightMapping
from spin_megatron.parallel.state import ParallelGroups
from spin_megatron.parallel.weight_export import export_hf_weights


def begin_output(out: Path) -> Path:
    """Collective: a fresh, empty staging folder for ``out``."""
    staging = out.parent / f".{out.name}.partial"
    if dist.get_rank() == 0:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    dist.barrier()
    return staging


def commit_output(staging: Path, out: Path) -> None:
    """Collective: rank 0 swaps the complete staging folder into place; the old output goes only afterwards."""
    dist.barrier()
    if dist.get_rank() == 0:
        old = out.parent / f".{out.name}.replaced"
        if out.exists():
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
        staging.rename(out)
        if old.exists():
            shutil.rmtree(old)
    dist.barrier()


def write_hf_checkpoint(
    model,
    mapping: WeightMapping,
    groups: ParallelGroups,
    out_dir: str | Path,
    *,
    hf_config: dict,
    dtype: torch.dtype,
    tokenizer_src: str | Path | None = None,
    max_shard_bytes: int = 5 << 30,
) -> Path:
    """Collective over all ranks (data-parallel replicas take part; only replica 0 writes)."""
    out = Path(out_dir)
    staging = begin_output(out)
    prefix = f"model-pp{groups.pp_rank:02d}" if groups.pp_size > 1 else "model"
    writer = HFShardWriter(staging, prefix=prefix, max_shard_bytes=max_shard_bytes)
    writes = groups.tp_rank == 0 and groups.dp_rank == 0 and groups.cp_rank == 0
    for name, tensor in export_hf_weights(model, mapping, groups):
        if writes:
            writer.add(name, tensor.to(dtype))
    writer.flush()
    maps = [None] * groups.world_size
    dist.all_gather_object(maps, (writer.weight_map, writer.total_bytes) if writes else ({}, 0))
    if groups.rank == 0:
        weight_map = {k: v for m, _ in maps for k, v in m.items()}
        write_index(staging, weight_map, sum(b for _, b in maps))
        write_hf_config(staging, hf_config, dtype)
        if tokenizer_src is not None and Path(tokenizer_src).is_dir():
            copy_tokenizer_files(tokenizer_src, staging)
    commit_output(staging, out)
    return out
