"""Weight sync from Megatron TP/PP layouts into the hf engine, and the bucket machinery it uses."""

import json

import pytest
import torch

from spin_megatron.parallel.weight_sync import iter_buckets, pack_bucket, unpack_bucket
from tests.helpers import run_ranks


def test_pack_unpack_round_trip_mixed_dtypes():
    named = [
        ("a", torch.randn(3, 4)),
        ("b", torch.arange(5, dtype=torch.int64)),
        ("c", torch.randn(7, dtype=torch.float64).to(torch.bfloat16)),
        ("d", torch.randn(3, 2).t()),
    ]
    flat, metas = pack_bucket(named)
    assert flat.dtype == torch.uint8 and flat.numel() >= sum(t.numel() * t.element_size() for _, t in named)
    assert all(m.start % 16 == 0 for m in metas)
    for (name, original), (name2, restored) in zip(named, unpack_bucket(flat, metas)):
        assert name == name2 and restored.dtype == original.dtype and torch.equal(restored, original)


def test_buckets_respect_the_byte_bound():
    named = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 100, 1])]  # fp32: 4 bytes each
    buckets = list(iter_buckets(named, bucket_bytes=80))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4"], ["t5"]]
    assert all(sum(t.numel() * 4 for _, t in b) <= 80 or len(b) == 1 for b in buckets)
    with pytest.raises(ValueError, match="sync_bucket_mb"):
        list(iter_buckets(named, 0))


@pytest.mark.dist
@pytest.mark.parametrize("tp, pp", [(2, 2), (1, 2), (2, 1)])
def test_engine_equals_megatron_after_sync(tp, pp, tiny_qwen2, tmp_path):
    out = tmp_path / "sync.json"
    assert (
        run_ranks(
            tp * pp, "tests.workers.weight_sync", "--tp", tp, "--pp", pp, "--hf-dir", tiny_qwen2, "--out", out
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["rel_err_after"] <= 1e-5
    assert report["changed_by_sync"] > 1e-2  # the engine did hold different weights before
    assert report["stats"]["buckets"] > 3 and report["stats"]["max_bucket_bytes"] <= 96 << 10
    assert report["agreement"]["rollout/logp_diff"] <= 1e-5
