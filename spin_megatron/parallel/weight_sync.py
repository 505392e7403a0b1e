"""Weight sync: Megatron TP/PP shards → HF-named full tensors → rollout engine, in buckets of bounded bytes.

Per data-parallel replica, the engine lives on the model-parallel group's first rank (TP 0 of stage 0). Stages
(with interleaving: each stage's model chunks, in layer order) export one after another: inside a stage the TP ranks all-gather one parameter at a time
(:func:`export_hf_weights`), TP rank 0 packs the HF tensors into buckets of at most ``bucket_bytes`` (one tensor
larger than that travels alone) and either hands them to the engine (stage 0) or sends them point-to-point to
the engine rank (later stages), which receives them in order. No rank holds more than one bucket beyond its own
shards; the engine rank receives one bucket at a time.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from spin_megatron.models.chunks import chunks_of
from spin_megatron.models.mapping import WeightMapping
from spin_megatron.models.weights import unwrap
from spin_megatron.parallel.state import ParallelGroups
from spin_megatron.parallel.weight_export import export_hf_weights

_END = "end-of-stage"


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offsets into the flat bucket
    end: int


_ALIGN = 16  # bytes: every tensor starts aligned so that unpacking can view the bytes as its dtype


def pack_bucket(named: list[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, list[TensorMeta]]:
    """Concatenate tensors (any dtypes) into one flat uint8 buffer plus per-tensor metadata."""
    metas, parts, offset = [], [], 0
    for name, tensor in named:
        raw = tensor.detach().contiguous().view(-1).view(torch.uint8)
        metas.append(TensorMeta(name, tensor.dtype, tuple(tensor.shape), offset, offset + raw.numel()))
        parts.append(raw)
        offset += raw.numel()
        pad = -offset % _ALIGN
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8, device=raw.device))
            offset += pad
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8), metas


def unpack_bucket(flat: torch.Tensor, metas: list[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    """Views into ``flat`` with the original names, dtypes and shapes."""
    return [(m.name, flat[m.start : m.end].view(m.dtype).view(m.shape)) for m in metas]


def iter_buckets(
    named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a stream of tensors into lists of at most ``bucket_bytes`` (a bigger tensor forms its own bucket)."""
    if bucket_bytes <= 0:
        raise ValueError(f"rollout.sync_bucket_mb must be > 0, got {bucket_bytes} bytes")
    bucket, size = [], 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


@dataclass
class SyncStats:
    tensors: int = 0
    buckets: int = 0
    bytes: int = 0
    seconds: float = 0.0
    max_bucket_bytes: int = 0


def engine_rank(groups: ParallelGroups) -> int:
    """Global rank that hosts this replica's engine: TP rank 0 of pipeline stage 0 (and CP rank 0)."""
    if groups.cp_size > 1:  # the replica's lowest rank: Megatron orders ranks tp-cp-(ep)-dp-pp
        return min(dist.get_process_group_ranks(groups.replica))
    # This rank's PP group holds TP rank `tp_rank` of every stage; TP ranks are adjacent in Megatron's order.
    return dist.get_process_group_ranks(groups.pp)[0] - groups.tp_rank


def sync_weights(
    model: torch.nn.Module,
    mapping: WeightMapping,
    groups: ParallelGroups,
    engine=None,
    *,
    bucket_bytes: int = 512 << 20,
) -> SyncStats:
    """Stream this replica's weights into ``engine`` (given on the engine rank only, None elsewhere).

    Collective over the model-parallel group: every rank of it must call this (context parallel: CP ranks > 0
    return at once; their weights are CP rank 0's).
    """
    start = time.perf_counter()
    stats = SyncStats()
    # context parallel: CP rank 0 of the replica holds the same weights and exports them
    if groups.cp_rank > 0:
        return stats
    target = engine_rank(groups)
    is_engine_rank = groups.rank == target
    if is_engine_rank and engine is None:
        raise ValueError("sync_weights: this rank hosts the engine but no engine was given")
    chunks = len(chunks_of(unwrap(model)))
    for chunk in range(chunks):  # layer order: model chunk c of stage s is virtual stage c·pp + s
        for stage in range(groups.pp_size):
            if stage == groups.pp_rank:
                source = (model, None if chunks == 1 else chunk)
                _export_stage(source, mapping, groups, engine, target, bucket_bytes, stats)
            elif is_engine_rank:
                _receive_stage(engine, stats, src=dist.get_process_group_ranks(groups.pp)[stage])
    if is_engine_rank:
        engine.finish_weight_update()
    stats.seconds = time.perf_counter() - start
    return stats


def _export_stage(source, mapping, groups, engine, target, bucket_bytes, stats) -> None:
    model, chunk = source
    sender = groups.tp_rank == 0
    for bucket in iter_buckets(export_hf_weights(model, mapping, groups, chunk=chunk), bucket_bytes):
        if not sender:
            continue  # the other TP ranks only take part in the gathers inside export_hf_weights
        nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
        stats.tensors += len(bucket)
        stats.buckets += 1
        stats.bytes += nbytes
        stats.max_bucket_bytes = max(stats.max_bucket_bytes, nbytes)
        if groups.rank == target:
            engine.update_weights(bucket)
        else:
            flat, metas = pack_bucket(bucket)
            dist.send_object_list([metas, flat.numel()], dst=target)
            dist.send(flat, dst=target)
    if sender and groups.rank != target:
        dist.send_object_list([_END, 0], dst=target)


def _receive_stage(engine, stats: SyncStats, src: int) -> None:
    while True:
        header = [None, None]
        dist.recv_object_list(header, src=src)
        if header[0] == _END:
            return
        metas = header[0]
        flat = torch.empty(header[1], dtype=torch.uint8, device=_device())
        dist.recv(flat, src=src)
        engine.update_weights(unpack_bucket(flat, metas))
        stats.tensors += len(metas)
        stats.buckets += 1
        nbytes = sum(m.end - m.start for m in metas)
        stats.bytes += nbytes
        stats.max_bucket_bytes = max(stats.max_bucket_bytes, nbytes)


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
