"""Context parallelism (``parallel.cp``): each packed micro-batch split over the CP ranks of a replica.

The split is TransformerEngine's load-balanced THD layout (``tex.thd_get_partitioned_indices``): every segment of
the packed row (each sequence, then the padding segment) is padded at its end to a multiple of 2·CP tokens and cut
into 2·CP equal chunks; CP rank r holds chunks r and 2·CP−1−r of every segment. Under a causal mask an early chunk
attends to few keys and a late one to many, so every rank gets the same attention work. The tokens added at a
sequence's end are never scored and, being last, are attended by nothing real: log-probs do not change.

Positions stay global: the micro-batch carries the padded sequence boundaries (``cu_seqlens``), from which
Megatron's packed RoPE (``_apply_rotary_pos_emb_thd``) gives each local chunk its global positions, and the
attention (TE's with the CP group on GPU, :class:`SDPACoreAttention`'s all-gather of keys/values otherwise) masks
by global position.

The losses then see the full packed row: each rank's per-token values are gathered over CP into the original layout
(the backward hands each rank the gradient of its own tokens), so every DPO function computes on CP ranks exactly
what it computes at CP=1. Each CP rank evaluates the same loss; only CP rank 0 reports the pair count and the
metrics, so Megatron's division by the pair count summed over DP×CP, and the metric sums, are those of CP=1.
"""

from __future__ import annotations

import functools
import math

import torch

from spin_megatron.errors import ConfigError
from spin_megatron.parallel.batching import IGNORE_INDEX
from spin_megatron.parallel.packing import PackedMicroBatch

_LOCAL = "cp_local"  # a full micro-batch's extras key: this CP rank's part of it


def padded_bounds(bounds: list[int], multiple: int, length: int | None = None) -> list[int]:
    """Segment boundaries after padding every segment's length up to a multiple of ``multiple``; ``length``: the
    last segment (the padding) grows further to end the row there (a multiple of ``multiple`` ≥ the minimum)."""
    out = [0]
    for start, end in zip(bounds[:-1], bounds[1:]):
        out.append(out[-1] + math.ceil((end - start) / multiple) * multiple)
    if length is not None:
        assert length >= out[-1] and length % multiple == 0, (length, out[-1], multiple)
        out[-1] = length
    return out


def partition_indices(bounds: list[int], cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions of the padded row held by ``cp_rank``, in its local order: per segment chunk ``cp_rank`` then
    chunk ``2·cp_size−1−cp_rank`` (what TE's ``thd_get_partitioned_indices`` returns)."""
    return _partition(tuple(bounds), cp_size, cp_rank)


@functools.lru_cache(maxsize=256)
def _partition(bounds: tuple[int, ...], cp_size: int, cp_rank: int) -> torch.Tensor:
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        chunk = (end - start) // (2 * cp_size)
        for index in (cp_rank, 2 * cp_size - 1 - cp_rank):
            parts.append(torch.arange(start + index * chunk, start + (index + 1) * chunk))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def te_partition_indices(bounds: list[int], cp_size: int, cp_rank: int) -> torch.Tensor | None:
    """TE's own partition of the padded row (CUDA + TE only; None elsewhere). The GPU tests check that it equals
    :func:`partition_indices`, the layout TE's context-parallel attention expects its input in."""
    from spin_megatron.models.builder import te_available

    if not te_available():
        return None
    import transformer_engine_torch as tex

    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    return tex.thd_get_partitioned_indices(cu, bounds[-1], cp_size, cp_rank).long().cpu()


@functools.lru_cache(maxsize=256)
def gathered_order(bounds: tuple[int, ...], cp_size: int) -> torch.Tensor:
    """For each position of the padded row, where it lies in the concatenation of all CP ranks' local rows (an
    all-gather along the token dimension): indexing the gathered keys with it puts them back in global order."""
    order = torch.cat([_partition(bounds, cp_size, r) for r in range(cp_size)])
    return torch.argsort(order)


def row_length(batch: PackedMicroBatch, cp_size: int, row_multiple: int = 1) -> int:
    """The shortest padded row that splits ``batch`` over ``cp_size`` ranks, each local row a multiple of
    ``row_multiple`` tokens (sequence parallelism: of TP)."""
    bounds = [int(b) for b in batch.cu_seqlens.tolist()]
    step = 2 * cp_size * row_multiple
    return math.ceil(padded_bounds(bounds, 2 * cp_size)[-1] / step) * step


def split_micro_batch(batch: PackedMicroBatch, cp_size: int, cp_rank: int, length: int) -> PackedMicroBatch:
    """This CP rank's part of ``batch`` in a padded row of ``length`` tokens (a multiple of 2·cp_size). The part
    keeps the full micro-batch's counts (pairs, response lengths) and the padded global ``cu_seqlens``; its
    ``extras["cp_source"]`` says, for every CP rank's local position, which position of ``batch`` it holds
    (−1: a token added by the padding)."""
    bounds = [int(b) for b in batch.cu_seqlens.tolist()]
    padded = padded_bounds(bounds, 2 * cp_size, length)
    source = torch.full((length,), -1, dtype=torch.long)
    positions = torch.zeros(length, dtype=torch.long)
    for (start, end), new_start, new_end in zip(zip(bounds[:-1], bounds[1:]), padded[:-1], padded[1:]):
        source[new_start : new_start + end - start] = torch.arange(start, end)
        positions[new_start:new_end] = torch.arange(new_end - new_start)
    device = batch.input_ids.device
    everyone = torch.stack([partition_indices(padded, cp_size, r) for r in range(cp_size)])
    mine, source = everyone[cp_rank], source.to(device)
    held = source[mine.to(device)]
    known = held >= 0
    safe = held.clamp(min=0)

    def take(row: torch.Tensor, fill) -> torch.Tensor:
        return torch.where(known, row.reshape(-1)[safe], torch.full_like(row.reshape(-1)[safe], fill))

    pad_token = int(batch.input_ids[0, -1])  # the last position of a packed row is always padding
    return PackedMicroBatch(
        input_ids=take(batch.input_ids, pad_token)[None],
        position_ids=positions.to(device)[mine.to(device)][None],
        targets=take(batch.targets, IGNORE_INDEX)[None],
        sequence_index=take(batch.sequence_index, -1),
        cu_seqlens=torch.tensor(padded, dtype=torch.int32, device=batch.cu_seqlens.device),
        response_lengths=batch.response_lengths,
        engine_logprobs=take(batch.engine_logprobs, float("nan"))[None],
        num_items=batch.num_items,
        extras={"cp_source": source[everyone.to(device)], "cp_shape": (length, batch.input_ids.shape[1])},
    )


def split_for_cp(batches: list[PackedMicroBatch], cp_size: int, cp_rank: int, row_multiple: int = 1) -> int:
    """Attach this CP rank's part to every micro-batch (``local_part``), all in rows of one length (pipeline
    stages exchange fixed shapes); returns that padded full length (what Megatron's schedule calls seq_length)."""
    length = max(row_length(b, cp_size, row_multiple) for b in batches)
    for batch in batches:
        part = batch.extras.get(
            _LOCAL
        )  # split once per micro-batch (reference pass, update epochs), unless resized
        if part is None or part.extras["cp_shape"] != (length, batch.input_ids.shape[1]):
            batch.extras[_LOCAL] = split_micro_batch(batch, cp_size, cp_rank, length)
    return length


def local_part(batch: PackedMicroBatch) -> PackedMicroBatch:
    """The part of ``batch`` this rank runs the model on: its CP part, or the batch itself without CP."""
    return batch.extras.get(_LOCAL, batch)


def gather_tokens(values: torch.Tensor, part: PackedMicroBatch, group, full_shape) -> torch.Tensor:
    """Per-token values of this rank's part (``[1, T/CP]``) → the full micro-batch's layout (``full_shape``),
    zeros where nothing is held. Autograd: each rank gets the gradient of its own tokens back (every CP rank
    computes the same loss from the gathered values, so nothing is summed here)."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    flat = values.reshape(-1)
    if flat.requires_grad:
        gathered = gather_from_sequence_parallel_region(flat, False, group=group)
    else:
        gathered = _all_gather(flat, group)
    source = part.extras["cp_source"].reshape(-1)
    known = source >= 0
    full = torch.zeros(math.prod(full_shape), dtype=values.dtype, device=values.device)
    return full.index_put((source[known],), gathered[known]).view(full_shape)


def _all_gather(flat: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed as dist

    out = flat.new_empty(flat.numel() * group.size())
    dist.all_gather_into_tensor(out, flat.contiguous(), group=group)
    return out


def check_context_parallel(cfg, arch) -> None:
    """One-line refusals of ``parallel.cp`` layouts that cannot run, before any process group starts."""
    cp = cfg.parallel.cp
    if cp == 1:
        return
    if arch.moe is not None:
        raise ConfigError(
            f"parallel.cp={cp} with a mixture-of-experts model ({arch.architecture}): context parallelism is not "
            "wired through the expert layers here; use parallel.cp=1 (split experts with parallel.ep)"
        )
    longest = cfg.data.max_prompt_tokens + max(cfg.rollout.max_new_tokens, cfg.data.max_gold_tokens)
    if 2 * cp > longest:
        raise ConfigError(
            f"parallel.cp={cp} cuts every sequence into 2·cp = {2 * cp} chunks, but no sequence of this run can "
            f"have more than {longest} tokens (data.max_prompt_tokens + rollout.max_new_tokens or "
            f"data.max_gold_tokens): set parallel.cp ≤ {longest // 2}"
        )
    from spin_megatron.models.builder import default_use_te, parse_dtype

    dtype = parse_dtype(cfg.model.dtype)
    if dtype == torch.float32 and default_use_te(dtype):
        raise ConfigError(
            f"parallel.cp={cp} with model.dtype=fp32: TransformerEngine's context-parallel attention runs only "
            "with its flash/fused backends, which need 16-bit inputs; set model.dtype=bf16"
        )
