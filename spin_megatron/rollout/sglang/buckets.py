"""Flattened weight buckets in the layout of SGLang's ``load_format="flattened_bucket"``.

SGLang (``python/sglang/srt/weight_sync/tensor_bucket.py``, 0.5.x) rebuilds a bucket from ONE 1-D tensor plus,
per weight, ``name, shape, dtype, start_idx, end_idx, numel`` — offsets in ELEMENTS of that tensor, which it
slices and reshapes (recent versions reinterpret with ``.view(dtype)``, older ones cast with ``.to(dtype)``).
A bucket therefore holds a single dtype: :func:`pack_flat_buckets` splits a mixed bucket into one flat tensor
per dtype, each of which becomes its own request. Packing and unpacking are pure torch and bit-exact.
(spin_megatron.parallel.weight_sync packs bytes instead; SGLang's loader needs elements.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlatEntry:
    """Where one weight lives in its flat tensor (field names are SGLang's ``FlattenedTensorMetadata``)."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


@dataclass(frozen=True)
class FlatBucket:
    flat: torch.Tensor  # 1-D, dtype of every entry
    entries: tuple[FlatEntry, ...]

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()


def pack_flat_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[FlatBucket]:
    """One :class:`FlatBucket` per dtype, in order of first appearance; tensor order kept inside each."""
    groups: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    seen: set[str] = set()
    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"weight {name!r} appears twice in one bucket; each HF name must be sent once")
        seen.add(name)
        groups.setdefault(tensor.dtype, []).append((name, tensor))
    return [_pack_one_dtype(group) for group in groups.values()]


def _pack_one_dtype(named: list[tuple[str, torch.Tensor]]) -> FlatBucket:
    devices = {tensor.device for _, tensor in named}
    if len(devices) > 1:
        raise ValueError(f"a weight bucket must live on one device, got {sorted(map(str, devices))}")
    entries, parts, offset = [], [], 0
    for name, tensor in named:
        numel = tensor.numel()
        entries.append(FlatEntry(name, tensor.shape, tensor.dtype, offset, offset + numel, numel))
        parts.append(tensor.detach().reshape(-1))
        offset += numel
    return FlatBucket(torch.cat(parts), tuple(entries))


def unpack_flat_bucket(bucket: FlatBucket) -> list[tuple[str, torch.Tensor]]:
    """Views of ``bucket.flat`` with the original names and shapes (what SGLang's reconstruction does)."""
    return [(e.name, bucket.flat[e.start_idx : e.end_idx].view(e.shape)) for e in bucket.entries]


def to_sglang_bucket(bucket: FlatBucket) -> dict:
    """The object SGLang's ``flattened_bucket`` loader unpickles, built with SGLang's own metadata class so
    that its restricted unpickler (SGLang and torch types only) accepts it. Imported lazily: SGLang is
    GPU-only."""
    try:
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata
    except ImportError:  # releases before tensor_bucket.py defined it in the model runner module
        from sglang.srt.model_executor.model_runner import FlattenedTensorMetadata
    metadata = [
        FlattenedTensorMetadata(
            name=e.name, shape=e.shape, dtype=e.dtype, start_idx=e.start_idx, end_idx=e.end_idx, numel=e.numel
        )
        for e in bucket.entries
    ]
    return {"flattened_tensor": bucket.flat, "metadata": metadata}
