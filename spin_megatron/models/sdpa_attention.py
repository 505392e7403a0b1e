"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

A drop-in for Megatron-Core's ``DotProductAttention`` (same constructor and forward signature) that runs on CPU
and GPU: Megatron's own local attention needs CUDA (its global memory buffer and RNG tracker). It is placed into
the local layer spec at ``self_attention.submodules.core_attention``.

Masks follow Megatron's convention: ``attention_mask`` is boolean with True = *masked out*, broadcastable to
``[b, heads, sq, sk]``; it is combined with the causal mask. Packed sequences (``packed_seq_params`` with
``qkv_format="thd"``) attend causally within each sequence given by ``cu_seqlens_q``.

Context parallelism (``context_parallel_size`` > 1, packed sequences only): each CP rank holds chunks r and
2·CP−1−r of every sequence (``parallel/context_parallel.py``); keys and values are all-gathered over the CP group
(backward: their gradients reduce-scattered back) and each local chunk attends causally by its global position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


class SDPACoreAttention(MegatronModule):
    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.cp_group = pg_collection.cp if config.context_parallel_size > 1 else None
        tp_size = pg_collection.tp.size() if pg_collection is not None else 1
        self.num_heads = config.num_attention_heads // tp_size
        self.num_query_groups = config.num_query_groups // tp_size
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention does not support attention_bias")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            if self.cp_group is not None:
                return self._packed_cp(query, key, value, packed_seq_params.cu_seqlens_q)
            return self._packed(query, key, value, packed_seq_params.cu_seqlens_q)
        if self.cp_group is not None:
            raise ValueError(
                "SDPACoreAttention splits only packed (THD) sequences over context-parallel ranks"
            )
        # Megatron layout [s, b, heads, d] -> SDPA layout [b, heads, s, d].
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        sq, sk = q.shape[2], k.shape[2]
        mask = None if attention_mask is None else (~attention_mask.bool()) & _causal_mask(sq, sk, q.device)
        out = self._sdpa(q, k, v, mask)
        # [b, heads, sq, d] -> [sq, b, heads*d]
        return out.permute(2, 0, 1, 3).reshape(sq, q.shape[0], self.num_heads * self.head_dim)

    def _sdpa(self, q, k, v, mask):
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=self.dropout_p if self.training else 0.0,
            scale=self.softmax_scale,
            enable_gqa=self.num_heads != self.num_query_groups,
        )

    def _packed(self, query, key, value, cu_seqlens):
        """Causal attention within each packed sequence, one SDPA call per sequence: the cost is the sum of
        the squared sequence lengths, not the square of the packed row (a block-diagonal mask would be)."""
        total = query.shape[0]
        bounds = [int(b) for b in cu_seqlens.tolist()]
        if bounds[-1] < total:  # trailing padding: its own segment, attending only to itself
            bounds.append(total)
        outs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end <= start:
                continue
            # [t, heads, d] -> [1, heads, t, d]
            q, k, v = (x[start:end].permute(1, 0, 2).unsqueeze(0) for x in (query, key, value))
            outs.append(self._sdpa(q, k, v, None).squeeze(0).permute(1, 0, 2))
        return torch.cat(outs).reshape(total, self.num_heads * self.head_dim)

    def _packed_cp(self, query, key, value, cu_seqlens):
        """This CP rank's chunks attending to the whole sequence: the padded global boundaries ``cu_seqlens``
        (each a multiple of 2·CP) locate every local chunk; two SDPA calls per sequence, one per chunk, each over
        the keys up to the chunk's end with the causal mask aligned to it."""
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        from spin_megatron.parallel.context_parallel import gathered_order

        cp_size, cp_rank = self.cp_group.size(), self.cp_group.rank()
        bounds = tuple(int(b) for b in cu_seqlens.tolist())
        if bounds[-1] != query.shape[0] * cp_size or any(
            (e - s) % (2 * cp_size) for s, e in zip(bounds, bounds[1:])
        ):
            raise ValueError(
                f"context parallelism needs every packed sequence padded to a multiple of 2·CP: {bounds}"
            )
        order = gathered_order(bounds, cp_size).to(query.device)
        key, value = (
            gather_from_sequence_parallel_region(x, True, group=self.cp_group)[order] for x in (key, value)
        )
        outs, local = [], 0
        for start, end in zip(bounds[:-1], bounds[1:]):
            chunk = (end - start) // (2 * cp_size)
            for index in (cp_rank, 2 * cp_size - 1 - cp_rank):
                stop = start + (index + 1) * chunk  # the chunk's last global position + 1
                q = query[local : local + chunk].permute(1, 0, 2).unsqueeze(0)
                k, v = (x[start:stop].permute(1, 0, 2).unsqueeze(0) for x in (key, value))
                mask = _causal_mask(chunk, stop - start, q.device)
                outs.append(self._sdpa(q, k, v, mask).squeeze(0).permute(1, 0, 2))
                local += chunk
        return torch.cat(outs).reshape(query.shape[0], self.num_heads * self.head_dim)


def _causal_mask(sq: int, sk: int, device) -> torch.Tensor:
    """True where query i may attend key j (keys aligned to the end, as in decoding with a cache)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)
