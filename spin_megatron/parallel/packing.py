"""Packing sequences into padding-free micro-batches with a token budget.

A micro-batch is one row of back-to-back sequences attended block-diagonally through
``PackedSeqParams(qkv_format="thd")``, positions restarting per sequence. Items (a DPO pair = its chosen and
rejected sequence, in that order; or a single sequence for gold-NLL scoring) are never split across
micro-batches; a micro-batch holds as many items as fit in ``token_budget`` tokens (an item longer than the
budget gets a micro-batch of its own). Every row is padded to the same length, because pipeline stages exchange
fixed-shape activations; the padding is one extra segment that attends only to itself and is never scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from spin_megatron.parallel.batching import IGNORE_INDEX


@dataclass(frozen=True)
class ScoredSequence:
    """A prompt and a response whose tokens are scored; ``engine_logprobs`` when a rollout engine sampled it."""

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    engine_logprobs: Sequence[float] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class PackedMicroBatch:
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    targets: torch.Tensor  # [1, T]: next token where it is a response token, else IGNORE_INDEX
    sequence_index: torch.Tensor  # [T]: which packed sequence a position's target belongs to (-1: none)
    cu_seqlens: torch.Tensor  # int32 [S + 2]: sequence boundaries, the padding segment last
    response_lengths: torch.Tensor  # [S] scored tokens per sequence
    engine_logprobs: torch.Tensor  # [1, T]: the engine's log-prob of each target (NaN where unknown)
    num_items: int  # pairs (DPO) or sequences (NLL) packed here; 0 for a placeholder
    ref_logps: torch.Tensor | None = None  # [S], filled on the last stage by the reference pass
    extras: dict = field(default_factory=dict)

    @property
    def num_sequences(self) -> int:
        return int(self.response_lengths.numel())

    @property
    def num_pairs(self) -> int:
        return self.num_items

    def packed_seq_params(self):
        from megatron.core.packed_seq_params import PackedSeqParams

        max_len = int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())
        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens,
            cu_seqlens_kv=self.cu_seqlens,
            max_seqlen_q=max_len,
            max_seqlen_kv=max_len,
        )

    def padding_mask(self) -> torch.Tensor:
        """``[1, T]`` bool, True on the padding segment: MoE routers leave those tokens out of the
        load-balancing statistics (they are still routed; a placeholder's dummy sequence counts as tokens)."""
        mask = torch.zeros_like(self.input_ids, dtype=torch.bool)
        mask[:, int(self.cu_seqlens[-2]) :] = True
        return mask

    def to(self, device) -> PackedMicroBatch:
        for name in (
            "input_ids",
            "position_ids",
            "targets",
            "sequence_index",
            "cu_seqlens",
            "response_lengths",
            "engine_logprobs",
        ):
            setattr(self, name, getattr(self, name).to(device))
        return self


def group_items(sizes: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices of the items in each micro-batch: greedy in order, a new batch when the budget would overflow."""
    groups, current, used = [], [], 0
    for i, size in enumerate(sizes):
        if current and used + size > token_budget:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += size
    if current:
        groups.append(current)
    return groups


def pack_items(
    items: Sequence[Sequence[ScoredSequence]], *, token_budget: int, pad_token_id: int = 0, align: int = 8
) -> list[PackedMicroBatch]:
    """Micro-batches for ``items`` (each a list of sequences kept together), padded to a common length.

    With no items, one placeholder micro-batch (``num_items=0``, nothing scored) is returned: a rank without work
    must still run the schedule so that the data-parallel gradient reduction matches the other ranks.
    """
    if not items:
        placeholder = _pack([ScoredSequence([pad_token_id], [pad_token_id])], align, pad_token_id, 0)
        placeholder.response_lengths.zero_()
        placeholder.targets.fill_(IGNORE_INDEX)
        placeholder.sequence_index.fill_(-1)
        return [placeholder]
    sizes = [sum(s.num_tokens for s in item) for item in items]
    groups = group_items(sizes, token_budget)
    longest = max(sum(sizes[i] for i in g) for g in groups)
    seq_length = max(align, math.ceil((longest + 1) / align) * align)  # ≥ 1 padding token
    return [_pack([s for i in g for s in items[i]], seq_length, pad_token_id, len(g)) for g in groups]


def _pack(
    sequences: Sequence[ScoredSequence], seq_length: int, pad_token_id: int, num_items: int
) -> PackedMicroBatch:
    ids = torch.full((seq_length,), pad_token_id, dtype=torch.long)
    positions = torch.zeros(seq_length, dtype=torch.long)
    targets = torch.full((seq_length,), IGNORE_INDEX, dtype=torch.long)
    engine = torch.full((seq_length,), float("nan"))
    sequence_index = torch.full((seq_length,), -1, dtype=torch.long)
    bounds, lengths, offset = [0], [], 0
    for index, seq in enumerate(sequences):
        tokens = list(seq.prompt_ids) + list(seq.response_ids)
        end = offset + len(tokens)
        ids[offset:end] = torch.tensor(tokens)
        positions[offset:end] = torch.arange(len(tokens))
        first = offset + len(seq.prompt_ids) - 1  # this position predicts the first response token
        if seq.response_ids:
            targets[first : end - 1] = torch.tensor(list(seq.response_ids))
            sequence_index[first : end - 1] = index
            if seq.engine_logprobs is not None:
                engine[first : end - 1] = torch.tensor(list(seq.engine_logprobs), dtype=torch.float32)
        lengths.append(len(seq.response_ids))
        bounds.append(end)
        offset = end
    positions[offset:] = torch.arange(seq_length - offset)
    bounds.append(seq_length)
    return PackedMicroBatch(
        input_ids=ids[None],
        position_ids=positions[None],
        targets=targets[None],
        sequence_index=sequence_index,
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        response_lengths=torch.tensor(lengths, dtype=torch.float32),
        engine_logprobs=engine[None],
        num_items=num_items,
    )


def sequence_sums(token_values: torch.Tensor, batch: PackedMicroBatch) -> torch.Tensor:
    """Sum per packed sequence ``[S]`` of per-position values ``[1, T]`` (unscored positions ignored)."""
    values = token_values.reshape(-1)
    scored = batch.sequence_index >= 0
    out = torch.zeros(batch.num_sequences, dtype=values.dtype, device=values.device)
    return out.index_add(0, batch.sequence_index[scored], values[scored])


def align_micro_batches(batches: list[PackedMicroBatch], group) -> None:
    """Make every rank of ``group`` run the same number of micro-batches of the same length, in place.

    Needed when a collective spans data-parallel replicas inside the forward pass — the token dispatch of
    mixture-of-experts layers over the expert-parallel group: the replicas pack their own pairs, so their counts
    and lengths differ. Shorter micro-batches get a longer padding segment, missing ones are placeholders
    (nothing scored, no loss); padding tokens attend only to each other and are routed like any token, so the
    scored tokens' log-probs do not change.
    """
    import torch.distributed as dist

    device = batches[0].input_ids.device
    shape = torch.tensor([len(batches), batches[0].input_ids.shape[1]], dtype=torch.long, device=device)
    dist.all_reduce(shape, op=dist.ReduceOp.MAX, group=group)
    count, seq_length = (int(x) for x in shape.tolist())
    pad_token_id = int(batches[0].input_ids[0, -1])  # the last position is always padding
    while len(batches) < count:
        batches.append(pack_items([], token_budget=1, pad_token_id=pad_token_id)[0].to(device))
    for batch in batches:
        _pad_to(batch, seq_length)


def pad_micro_batch_count(batches: list[PackedMicroBatch], multiple: int) -> None:
    """Append placeholder micro-batches (nothing scored, no loss, the others' length) until their number is a
    multiple of ``multiple``, in place: the interleaved pipeline schedule runs micro-batches in groups of the
    pipeline size. A placeholder costs one micro-batch of compute and changes no loss or gradient."""
    missing = -len(batches) % multiple
    if not missing:
        return
    device, seq_length = batches[0].input_ids.device, batches[0].input_ids.shape[1]
    pad_token_id = int(batches[0].input_ids[0, -1])  # the last position is always padding
    for _ in range(missing):
        placeholder = pack_items([], token_budget=1, pad_token_id=pad_token_id)[0].to(device)
        _pad_to(placeholder, seq_length)
        batches.append(placeholder)


def pad_lengths_to_multiple(batches: list[PackedMicroBatch], multiple: int) -> None:
    """Extend each row's padding segment to a multiple of ``multiple`` positions, in place: sequence parallelism
    splits a row along the sequence over the TP ranks (``multiple`` = tp). Nothing scored changes."""
    for batch in batches:
        _pad_to(batch, -(-batch.input_ids.shape[1] // multiple) * multiple)


def _pad_to(batch: PackedMicroBatch, seq_length: int) -> None:
    """Extend the padding segment (always last, ≥ 1 token) to ``seq_length`` positions."""
    extra = seq_length - batch.input_ids.shape[1]
    if extra <= 0:
        return
    last_position = int(batch.position_ids[0, -1])

    def grow(tensor, value):
        return torch.cat([tensor, tensor.new_full((*tensor.shape[:-1], extra), value)], dim=-1)

    batch.input_ids = grow(batch.input_ids, int(batch.input_ids[0, -1]))
    batch.targets = grow(batch.targets, IGNORE_INDEX)
    batch.engine_logprobs = grow(batch.engine_logprobs, float("nan"))
    batch.sequence_index = grow(batch.sequence_index, -1)
    tail = torch.arange(last_position + 1, last_position + 1 + extra, device=batch.position_ids.device)
    batch.position_ids = torch.cat([batch.position_ids, tail[None]], dim=-1)
    batch.cu_seqlens = batch.cu_seqlens.clone()
    batch.cu_seqlens[-1] = seq_length
