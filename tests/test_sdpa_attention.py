"""SDPACoreAttention against a plain softmax(QK^T)V reference in Megatron's tensor layout."""

import math
from types import SimpleNamespace

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from spin_megatron.models.sdpa_attention import SDPACoreAttention

HEADS, GROUPS, DIM = 4, 2, 8


def _module():
    config = SimpleNamespace(
        context_parallel_size=1,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        kv_channels=DIM,
        attention_dropout=0.0,
    )
    return SDPACoreAttention(config, layer_number=1, attn_mask_type=None, attention_type="self")


def _reference(q, k, v, allowed):
    """q [s,b,h,d], k/v [s,b,g,d]; allowed [b,1,s,s] bool (True = attend)."""
    k = k.repeat_interleave(HEADS // GROUPS, dim=2)
    v = v.repeat_interleave(HEADS // GROUPS, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(DIM)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v)
    return out.reshape(q.shape[0], q.shape[1], HEADS * DIM)


def _qkv(seq, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(seq, batch, HEADS, DIM, generator=gen),
        torch.randn(seq, batch, GROUPS, DIM, generator=gen),
        torch.randn(seq, batch, GROUPS, DIM, generator=gen),
    )


def test_causal_gqa_matches_reference():
    q, k, v = _qkv(7, 3)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()[None, None]
    torch.testing.assert_close(_module()(q, k, v, None), _reference(q, k, v, causal), atol=1e-6, rtol=1e-6)


def test_padding_mask_in_megatron_convention():
    q, k, v = _qkv(6, 2)
    pad = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    pad[1, ..., :2] = True  # second row: first two keys are left padding (True = masked out)
    allowed = ~pad & torch.ones(6, 6, dtype=torch.bool).tril()
    out = _module()(q, k, v, pad)
    # rows whose every key is masked are undefined; compare the rest
    torch.testing.assert_close(out[2:], _reference(q, k, v, allowed)[2:], atol=1e-6, rtol=1e-6)


def test_packed_sequences_equal_separate_sequences():
    lengths = [3, 5, 2]
    q, k, v = _qkv(sum(lengths), 1, seed=1)
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=5, max_seqlen_kv=5
    )
    packed = _module()(q.squeeze(1), k.squeeze(1), v.squeeze(1), None, packed_seq_params=params)
    separate = torch.cat(
        [_module()(q[a:b], k[a:b], v[a:b], None).squeeze(1) for a, b in zip(cu[:-1], cu[1:])]
    )
    torch.testing.assert_close(packed, separate, atol=1e-6, rtol=1e-6)
