"""Benchmark: weight export (TP gather + HF mapping + buckets) vs a raw all_gather of the same bytes.

Two gloo ranks at TP=2 hold a Qwen2-shaped model (random weights, fp32). In the same processes and the same
run, alternating, we time:

* ``raw all_gather`` — one ``all_gather`` per parameter shard, same shapes and order: the communication floor;
* ``raw flat``        — a single ``all_gather`` of all shard bytes at once;
* ``export``          — ``export_hf_weights`` + bucketing (what the converter and weight sync do);
* ``sync → hf``       — ``sync_weights`` into an in-process transformers engine (export + copy into the model).

Ratios are against ``raw all_gather`` (target for export: ≤ 1.5×). Usage: ``python bench/weight_sync.py
[--layers 8 --hidden 512 --repeats 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bucket-mb", type=int, default=64)
    p.add_argument("--hf-dir", help=argparse.SUPPRESS)
    return p.parse_args()


def _timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def rank_main(args) -> None:
    from spin_megatron.models import build_gpt_model, load_arch
    from spin_megatron.models.mapping import mapping_for
    from spin_megatron.parallel import destroy_parallel, init_parallel
    from spin_megatron.parallel.weight_export import export_hf_weights
    from spin_megatron.parallel.weight_sync import engine_rank, iter_buckets, sync_weights
    from spin_megatron.rollout.hf_engine import HFEngine

    groups = init_parallel(2, 1)
    arch = load_arch(args.hf_dir)
    mapping = mapping_for(arch, arch.padded_vocab_size(2))
    model = build_gpt_model(arch, groups)
    shards = [p.detach() for _, p in model.named_parameters()]
    total = sum(s.numel() for s in shards)
    engine = HFEngine.from_pretrained(args.hf_dir) if groups.rank == engine_rank(groups) else None

    def raw_per_param():
        for s in shards:
            out = [torch.empty_like(s) for _ in range(2)]
            dist.all_gather(out, s, group=groups.tp)

    def raw_flat():
        flat = torch.cat([s.reshape(-1) for s in shards])
        out = [torch.empty_like(flat) for _ in range(2)]
        dist.all_gather(out, flat, group=groups.tp)

    def export():
        for _ in iter_buckets(export_hf_weights(model, mapping, groups), args.bucket_mb << 20):
            pass

    def sync():
        sync_weights(model, mapping, groups, engine, bucket_bytes=args.bucket_mb << 20)

    cases = {"raw all_gather": raw_per_param, "raw flat": raw_flat, "export": export, "sync → hf": sync}
    times = {k: [] for k in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(_timed(fn))
    if groups.rank == 0:
        base = statistics.median(times["raw all_gather"])
        gathered_mb = 2 * total * 4 / 2**20
        print(
            f"weight export, TP=2 gloo, {arch.num_layers} layers hidden {arch.hidden_size} vocab "
            f"{arch.vocab_size}: {gathered_mb:.0f} MiB of full tensors, median of {args.repeats}"
        )
        print(f"{'case':<16} {'seconds':>8} {'GiB/s':>7} {'× raw all_gather':>17}")
        for name, t in times.items():
            med = statistics.median(t)
            print(f"{name:<16} {med:8.3f} {gathered_mb / 1024 / med:7.2f} {med / base:17.2f}")
    destroy_parallel()


def main() -> int:
    args = _parse()
    if args.hf_dir:
        rank_main(args)
        return 0
    from spin_megatron.models.tiny import make_tiny_hf_model
    from spin_megatron.parallel.launch import spawn_local

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_tiny_hf_model(
            Path(tmp) / "hf",
            "qwen2",
            num_hidden_layers=args.layers,
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 11 // 4,
            num_attention_heads=8,
            num_key_value_heads=4,
            vocab_size=args.vocab,
        )
        argv = [a for a in sys.argv[1:]] + ["--hf-dir", str(hf_dir)]
        return spawn_local(2, "bench.weight_sync", argv, cwd=str(REPO))


if __name__ == "__main__":
    sys.exit(main())
