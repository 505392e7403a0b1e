"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

A drop-in for Megatron-Core's ``DotProductAttention`` (same constructor and forward signature) that runs on CPU
and GPU: Megatron's own local attention needs CUDA (its global memory buffer and RNG tracker). It is placed into
the local layer spec at ``self_attention.submodules.core_attention``.

Masks follow Megatron's convention: ``attention_mask`` is boolean with True = *masked out*, broadcastable to
``[b, heads, sq, sk]``; it is combined with the causal mask. Packed sequences (``packed_seq_params`` with
``qkv_format="thd"``) attend causally within each sequence given by ``cu_seqlens_q``.
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
        if config.context_parallel_size != 1:
            raise ValueError(
                "SDPACoreAttention does not implement context parallelism; use the TE layer spec"
            )
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
        packed = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if packed:
            # [t, heads, d] -> [1, t, heads, d]: one batch row, masked block-diagonally.
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
        # Megatron layout [s, b, heads, d] -> SDPA layout [b, heads, s, d].
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        sq, sk = q.shape[2], k.shape[2]
        mask = None
        if packed:
            mask = _packed_causal_mask(packed_seq_params.cu_seqlens_q, sq, q.device)
        elif attention_mask is not None:
            mask = (~attention_mask.bool()) & _causal_mask(sq, sk, q.device)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=self.dropout_p if self.training else 0.0,
            scale=self.softmax_scale,
            enable_gqa=self.num_heads != self.num_query_groups,
        )
        # [b, heads, sq, d] -> [sq, b, heads*d]
        out = out.permute(2, 0, 1, 3).reshape(sq, q.shape[0], self.num_heads * self.head_dim)
        if packed:
            out = out.squeeze(1)
        return out


def _causal_mask(sq: int, sk: int, device) -> torch.Tensor:
    """True where query i may attend key j (keys aligned to the end, as in decoding with a cache)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)


def _packed_causal_mask(cu_seqlens: torch.Tensor, total: int, device) -> torch.Tensor:
    """Block-diagonal causal mask [t, t] for sequences packed back to back (cu_seqlens = [0, l0, l0+l1, ...])."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device)
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    if segment.numel() < total:  # padding after the last sequence attends only to itself
        pad = torch.arange(len(lengths), len(lengths) + total - segment.numel(), device=device)
        segment = torch.cat([segment, pad])
    same = segment[:, None] == segment[None, :]
    return same & _causal_mask(total, total, device)
