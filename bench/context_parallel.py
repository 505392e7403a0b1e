"""Benchmark: peak memory and DPO step time with context parallelism (``parallel.cp``) on CPU, beside the planner.

A tiny Qwen2 whose activations dominate (hidden 256, 8 layers, vocabulary 1024; 4 pairs of 256 tokens packed into
one 2048-token micro-batch — the regime CP is for) builds policy and reference, runs a reference pass and two DPO
steps at CP1 (one process) and CP2 (two gloo processes, each holding half of every sequence), as the trainer does
(``compute_reference_logps``, ``train_step``, Megatron DDP, distributed optimizer). Each rank reports its peak RSS
growth over the run (VmHWM after ``/proc/self/clear_refs``, glibc's mmap threshold fixed as in test_plan) and the
median step time of the two steps; the planner's ``estimate(kernels="cpu")`` stands beside each measured peak.

On this 2-core machine the two CP ranks share the cores the CP1 run has alone, so the step-time ratio says what the
all-gathers and the second process cost here, not a GPU speed-up. Usage: ``python -m bench.context_parallel``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False)  # fmt: skip
PAIRS, PROMPT_TOKENS, RESPONSE_TOKENS, BUDGET = 4, 32, 224, 2048  # one micro-batch of 4 pairs × 512 tokens


def status_bytes(key: str) -> int:
    import re

    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) << 10


def worker(hf_dir: str, cp: int, out: str) -> None:
    """One rank: policy + reference, a reference pass, two DPO steps; peak RSS growth, step times, the estimate."""
    import torch
    import torch.distributed as dist

    from spin_megatron.config import (
        AlgorithmConfig,
        Config,
        DataConfig,
        ModelConfig,
        ParallelConfig,
        RolloutConfig,
        TrainerConfig,
    )
    from spin_megatron.parallel import init_parallel
    from spin_megatron.parallel.context_parallel import local_part
    from spin_megatron.parallel.dpo_step import compute_reference_logps, train_step
    from spin_megatron.parallel.packing import ScoredSequence, pack_items
    from spin_megatron.planning.memory import estimate
    from spin_megatron.training.policy import build_policy, build_reference, resolve_model_source
    from spin_megatron.training.updates import dpo_settings

    groups = init_parallel(1, 1, cp=cp)
    cfg = Config(
        model=ModelConfig(hf_path=hf_dir),
        data=DataConfig(train_files=[], val_files=[], max_prompt_tokens=PROMPT_TOKENS,
                        max_gold_tokens=RESPONSE_TOKENS),
        rollout=RolloutConfig(engine="replay", replay_path="unused", n=1, max_new_tokens=RESPONSE_TOKENS),
        algorithm=AlgorithmConfig(mode="spin"),
        trainer=TrainerConfig(test_freq=0, micro_batch_tokens=BUDGET, prompts_per_step=PAIRS),
        parallel=ParallelConfig(cp=cp),
    )  # fmt: skip
    source = resolve_model_source(cfg, groups, 1)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, MODEL["vocab_size"], (PAIRS, 2, PROMPT_TOKENS + RESPONSE_TOKENS), generator=gen)
    items = [[ScoredSequence(t[:PROMPT_TOKENS], t[PROMPT_TOKENS:]) for t in pair] for pair in tokens.tolist()]
    batches = pack_items(items, token_budget=BUDGET)
    settings = dpo_settings(cfg, source.arch.vocab_size)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    base = status_bytes("VmRSS")
    policy = build_policy(cfg, source, groups)
    reference = build_reference(cfg, source, groups, policy)
    compute_reference_logps(reference, groups, batches, settings)
    times = []
    for _ in range(2):
        dist.barrier()
        start = time.perf_counter()
        train_step(policy.model, policy.optimizer, groups, batches, settings,
                   global_pairs=PAIRS, global_chosen_tokens=PAIRS * RESPONSE_TOKENS)  # fmt: skip
        times.append(time.perf_counter() - start)
    row = {
        "cp": cp,
        "rank": groups.rank,
        "measured": status_bytes("VmHWM") - base,
        "predicted": estimate(cfg, source.arch, world_size=cp, kernels="cpu").training_peak,
        "step_s": statistics.median(times),
        "tokens_per_rank": int(local_part(batches[0]).input_ids.shape[1]),
    }
    rows = [None] * groups.world_size
    dist.all_gather_object(rows, row)
    if groups.rank == 0:
        Path(out).write_text(json.dumps(rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=3, metavar=("HF_DIR", "CP", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2])
        return 0
    from spin_megatron.models.tiny import make_tiny_hf_model
    from spin_megatron.parallel.launch import spawn_local

    os.environ.update(MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_tiny_hf_model(Path(tmp) / "model", "qwen2", seed=0, **MODEL)
        rows = []
        for cp in (1, 2):
            out = Path(tmp) / f"cp{cp}.json"
            code = spawn_local(cp, "bench.context_parallel", ["--worker", str(hf_dir), str(cp), str(out)],
                               timeout_s=900, cwd=str(REPO))  # fmt: skip
            if code:
                print(f"CP{cp} run failed (exit {code})", file=sys.stderr)
                return code
            rows += json.loads(out.read_text())
    mib = 1 << 20
    print("layout  rank  tokens/rank  measured MiB  planner MiB  step s")
    for r in rows:
        print(f"CP{r['cp']}     {r['rank']}     {r['tokens_per_rank']:>6}      {r['measured'] / mib:>8.0f}"
              f"     {r['predicted'] / mib:>8.0f}   {r['step_s']:.2f}")  # fmt: skip
    plain = next(r for r in rows if r["cp"] == 1)
    for r in rows:
        if r["cp"] > 1:
            print(f"CP{r['cp']} rank {r['rank']} / CP1: peak {r['measured'] / plain['measured']:.2f}, "
                  f"step time {r['step_s'] / plain['step_s']:.2f}")  # fmt: skip
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
