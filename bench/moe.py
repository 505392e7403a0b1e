"""Benchmark: one DPO optimizer step of a small Qwen3-MoE on CPU at EP1 and EP2, with the alltoall and the
allgather token dispatcher (ratios to EP1).

Two gloo processes in every layout (data-parallel 2: at EP1 each holds every expert, at EP2 half of them), the
same global pairs split over the two replicas, timed with ``train_step`` as the trainer calls it (reference
forward, policy forward + backward, distributed optimizer step; no generation). The model: hidden 256, 4 layers,
16 experts of width 512, top-4, vocabulary 2048 (built randomly). On this 2-core machine the two ranks share the
cores, so what shows is the dispatch's overhead and the smaller expert work per rank, not a parallel speed-up.
The layouts run in turn ``--rounds`` times and the ratios are taken per round (the shared machine's load drifts).
Usage: ``python bench/moe.py [--steps 4 --rounds 3 --pairs 16 --tokens-per-pair 256]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = (("EP1", 1, "alltoall"), ("EP2 alltoall", 2, "alltoall"), ("EP2 allgather", 2, "allgather"))
MODEL = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, head_dim=32, vocab_size=2048, num_experts=16, num_experts_per_tok=4,
             moe_intermediate_size=512, initializer_range=0.05)  # fmt: skip


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per layout; the first is a warm-up")
    p.add_argument("--pairs", type=int, default=16, help="global pairs per step")
    p.add_argument("--tokens-per-pair", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3, help="the layouts in turn this many times (load drifts)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # rank mode: the model folder
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args()


def _config(hf_dir: str, ep: int, dispatcher: str):
    from spin_megatron.config import (
        AlgorithmConfig,
        Config,
        DataConfig,
        ModelConfig,
        OptimConfig,
        ParallelConfig,
        RolloutConfig,
        TrainerConfig,
    )

    return Config(
        model=ModelConfig(hf_path=hf_dir),
        data=DataConfig(train_files=[], val_files=[]),
        rollout=RolloutConfig(engine="replay", replay_path="unused", n=1),
        algorithm=AlgorithmConfig(mode="spin"),
        optim=OptimConfig(lr=1e-5),
        parallel=ParallelConfig(ep=ep, moe_token_dispatcher=dispatcher),
        trainer=TrainerConfig(test_freq=0, micro_batch_tokens=1024),
    )


def _pairs(args, vocab: int):
    import torch

    from spin_megatron.parallel.packing import ScoredSequence

    gen = torch.Generator().manual_seed(0)
    half = args.tokens_per_pair // 2
    tokens = torch.randint(1, vocab, (args.pairs, 2, half), generator=gen).tolist()
    return [[ScoredSequence(t[: half // 4], t[half // 4 :]) for t in pair] for pair in tokens]


def worker(args) -> None:
    import torch.distributed as dist

    from spin_megatron.parallel import destroy_parallel, init_parallel
    from spin_megatron.parallel.dpo_step import compute_reference_logps, train_step
    from spin_megatron.parallel.packing import pack_items
    from spin_megatron.training.policy import build_policy, build_reference, resolve_model_source
    from spin_megatron.training.updates import dpo_settings

    report = {name: [] for name, _, _ in LAYOUTS}
    for name, ep, dispatcher in [layout for _ in range(args.rounds) for layout in LAYOUTS]:
        cfg = _config(args.worker, ep, dispatcher)
        groups = init_parallel(1, 1, ep=ep)
        source = resolve_model_source(cfg, groups, 1)
        policy = build_policy(cfg, source, groups)
        reference = build_reference(cfg, source, groups, policy)
        settings = dpo_settings(cfg, source.arch.vocab_size)
        items = _pairs(args, source.arch.vocab_size)
        mine = items[groups.dp_rank :: groups.dp_size]
        chosen = sum(len(p[0].response_ids) for p in items)
        times = []
        for _ in range(args.steps):
            batches = pack_items(mine, token_budget=cfg.trainer.micro_batch_tokens)
            dist.barrier()
            start = time.perf_counter()
            compute_reference_logps(reference, groups, batches, settings)
            train_step(policy.model, policy.optimizer, groups, batches, settings,
                       global_pairs=len(items), global_chosen_tokens=chosen)  # fmt: skip
            dist.barrier()
            times.append(time.perf_counter() - start)
        report[name].append(statistics.median(times[1:]))
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(report))
    destroy_parallel()


def main() -> int:
    args = _parse()
    if args.worker:
        worker(args)
        return 0
    sys.path.insert(0, str(REPO))
    from spin_megatron.models.tiny import make_tiny_hf_model
    from spin_megatron.parallel.launch import spawn_local

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_tiny_hf_model(Path(tmp) / "moe", "qwen3_moe", seed=0, **MODEL)
        out = Path(tmp) / "report.json"
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        argv = [
            "--worker",
            str(hf_dir),
            "--out",
            str(out),
            "--steps",
            str(args.steps),
            "--pairs",
            str(args.pairs),
        ]
        argv += ["--tokens-per-pair", str(args.tokens_per_pair), "--rounds", str(args.rounds)]
        code = spawn_local(2, "bench.moe", argv, cwd=str(REPO))
        if code:
            return code
        report = json.loads(out.read_text())
    tokens = args.pairs * args.tokens_per_pair
    print(f"Qwen3-MoE {MODEL['num_experts']} experts top-{MODEL['num_experts_per_tok']}, {tokens} tokens per step, "
          f"2 gloo processes; per round the median of {args.steps - 1} steps (reference forward + DPO step), "
          f"{args.rounds} rounds: median s/step, median of the per-round ratios to EP1 [min, max]")  # fmt: skip
    for name, rounds in report.items():
        ratios = sorted(base / own for base, own in zip(report["EP1"], rounds))
        seconds = statistics.median(rounds)
        print(f"  {name:<14} {seconds:7.3f} s/step  {tokens / seconds:8.0f} tokens/s  "
              f"×{statistics.median(ratios):.2f} [{ratios[0]:.2f}, {ratios[-1]:.2f}] vs EP1")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
