"""Packing preference pairs into padding-free micro-batches with a token budget.

A micro-batch is one row of back-to-back sequences ``[chosen₀, rejected₀, chosen₁, rejected₁, …]`` (chosen and
rejected of a pair always travel together), attended block-diagonally through ``PackedSeqParams(qkv_format="thd")``
with positions restarting per sequence. Pairs are never split; a micro-batch holds as many pairs as fit in
``token_budget`` tokens (a single pair longer than the budget gets a micro-batch of its own). Every row is padded
to the same length ``seq_length`` (the longest packed row, rounded up) because pipeline stages exchange
fixed-shape activations; the padding is one extra segment that attends only to itself and is never scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from spin_megatron.batching import IGNORE_INDEX


@dataclass(frozen=True)
class PairTokens:
    """The token ids of one pair, already decided by the pairing step."""

    prompt_ids: Sequence[int]
    chosen_ids: Sequence[int]
    rejected_ids: Sequence[int]

    @property
    def num_tokens(self) -> int:
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class PackedMicroBatch:
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    targets: torch.Tensor  # [1, T]: next token where it is a response token, else IGNORE_INDEX
    sequence_index: torch.Tensor  # [T]: which packed sequence a position's target belongs to (-1: none)
    cu_seqlens: torch.Tensor  # int32 [S + 2]: sequence boundaries, the padding segment last
    num_pairs: int
    response_lengths: torch.Tensor  # [2 * num_pairs] response tokens per sequence
    ref_logps: torch.Tensor | None = None  # [2 * num_pairs], filled on the last stage by the reference pass
    extras: dict = field(default_factory=dict)

    @property
    def num_sequences(self) -> int:
        return 2 * self.num_pairs

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

    def to(self, device) -> PackedMicroBatch:
        for name in (
            "input_ids",
            "position_ids",
            "targets",
            "sequence_index",
            "cu_seqlens",
            "response_lengths",
        ):
            setattr(self, name, getattr(self, name).to(device))
        return self


def group_pairs(pairs: Sequence[PairTokens], token_budget: int) -> list[list[int]]:
    """Indices of the pairs in each micro-batch: greedy in order, a new batch when the budget would overflow."""
    groups, current, used = [], [], 0
    for i, pair in enumerate(pairs):
        if current and used + pair.num_tokens > token_budget:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += pair.num_tokens
    if current:
        groups.append(current)
    return groups


def pack_pairs(
    pairs: Sequence[PairTokens], *, token_budget: int, pad_token_id: int = 0, align: int = 8
) -> list[PackedMicroBatch]:
    """Micro-batches for ``pairs``, all padded to a common length (a multiple of ``align``)."""
    groups = group_pairs(pairs, token_budget)
    longest = max((sum(pairs[i].num_tokens for i in g) for g in groups), default=0)
    seq_length = max(align, -(-(longest + 1) // align) * align)  # ≥ 1 padding token: the padding segment
    return [_pack([pairs[i] for i in g], seq_length, pad_token_id) for g in groups]


def _pack(pairs: Sequence[PairTokens], seq_length: int, pad_token_id: int) -> PackedMicroBatch:
    ids = torch.full((seq_length,), pad_token_id, dtype=torch.long)
    positions = torch.zeros(seq_length, dtype=torch.long)
    targets = torch.full((seq_length,), IGNORE_INDEX, dtype=torch.long)
    sequence_index = torch.full((seq_length,), -1, dtype=torch.long)
    bounds, lengths, offset = [0], [], 0
    for pair in pairs:
        for response in (pair.chosen_ids, pair.rejected_ids):
            seq = list(pair.prompt_ids) + list(response)
            end = offset + len(seq)
            ids[offset:end] = torch.tensor(seq)
            positions[offset:end] = torch.arange(len(seq))
            first = offset + len(pair.prompt_ids) - 1  # this position predicts the first response token
            targets[first : end - 1] = torch.tensor(list(response))
            sequence_index[first : end - 1] = len(lengths)
            lengths.append(len(response))
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
        num_pairs=len(pairs),
        response_lengths=torch.tensor(lengths, dtype=torch.float32),
    )


def sequence_sums(token_values: torch.Tensor, batch: PackedMicroBatch) -> torch.Tensor:
    """Sum per packed sequence ``[2·num_pairs]`` of per-position values ``[1, T]`` (unscored positions ignored)."""
    values = token_values.reshape(-1)
    scored = batch.sequence_index >= 0
    out = torch.zeros(batch.num_sequences, dtype=values.dtype, device=values.device)
    return out.index_add(0, batch.sequence_index[scored], values[scored])
