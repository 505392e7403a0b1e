"""Benchmark: peak memory and step time of Megatron's scaling features on CPU, each against its plain layout, with
the planner's prediction beside every measured peak (``python bench/scaling.py``; issue 24).

Each layout is one launch of its ranks (gloo, ``spawn_local``); every rank builds the policy (Megatron DDP, the
distributed optimizer) and the frozen reference of the same tiny Qwen2 (hidden 256, 8 layers, vocabulary 1,024:
the activations dominate), then runs ``--steps`` DPO updates on the same global pairs (reference pass, one
optimizer step), as the trainer does. Reported per layout: the peak RSS growth of its largest rank from before the
models are built (``/proc/self/status`` VmHWM, reset through ``clear_refs``; glibc's mmap threshold fixed so freed
activations go back to the system), what ``spin-plan``'s memory model predicts for it (``kernels="cpu"``), and the
median step time of steps 2..N. Ratios are to the plain layout of the same group (same ranks and threads):
TP2 for sequence parallelism, DP2 for the overlapped gradient reduce-scatter / parameter all-gather (several
buckets), TP1 for selective and full recompute and for context parallelism (CP2: two processes, so its time ratio
is against one), PP2 (plain 1F1B) for the interleaved pipeline.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.context_parallel import MODEL, status_bytes  # the same tiny Qwen2; the peak-RSS reader

REPO = Path(__file__).resolve().parents[1]
PROMPT, RESPONSE = 32, 96  # tokens: a pair is 256
OVERLAP = {"overlap_grad_reduce": True, "overlap_param_gather": True, "ddp_bucket_size": 400_000}
# name: (ranks, parallel-section fields, the group's plain layout)
LAYOUTS = {
    "TP2": (2, {"tp": 2, "sequence_parallel": False}, "TP2"),
    "TP2+SP": (2, {"tp": 2}, "TP2"),
    "DP2": (2, {}, "DP2"),
    "DP2+overlap": (2, OVERLAP, "DP2"),
    "TP1": (1, {}, "TP1"),
    "TP1 selective": (1, {"recompute": "selective", "recompute_modules": ["core_attn", "mlp"]}, "TP1"),
    "TP1 full": (1, {"recompute": "full"}, "TP1"),
    # one sequence split over 2 ranks of one replica, against one rank holding whole sequences
    "CP2": (2, {"cp": 2}, "TP1"),
    "PP2": (2, {"pp": 2}, "PP2"),
    "PP2×VPP2": (2, {"pp": 2, "vpp": 2}, "PP2"),  # two model chunks of 2 layers per stage
}


def _config(hf_dir: str, parallel: dict, budget: int, pairs: int):
    from spin_megatron.config import (
        AlgorithmConfig,
        Config,
        DataConfig,
        ModelConfig,
        ParallelConfig,
        RolloutConfig,
        TrainerConfig,
    )

    return Config(
        model=ModelConfig(hf_path=hf_dir),
        data=DataConfig(train_files=[], val_files=[], max_prompt_tokens=PROMPT, max_gold_tokens=RESPONSE),
        rollout=RolloutConfig(engine="replay", replay_path="unused", n=1, max_new_tokens=RESPONSE),
        algorithm=AlgorithmConfig(mode="spin"),
        parallel=ParallelConfig(**parallel),
        trainer=TrainerConfig(test_freq=0, micro_batch_tokens=budget, prompts_per_step=pairs),
    )


def worker(spec: str) -> None:
    """One rank: build, run the steps, write this rank's measurement to ``<out>.rank<r>.json``."""
    import gc

    import torch

    from spin_megatron.parallel import init_parallel
    from spin_megatron.parallel.dpo_step import compute_reference_logps, train_step
    from spin_megatron.parallel.packing import ScoredSequence, pack_items
    from spin_megatron.planning.memory import estimate
    from spin_megatron.training.policy import build_policy, build_reference, resolve_model_source
    from spin_megatron.training.updates import dpo_settings

    name, hf_dir, parallel, budget, pairs, steps, out = json.loads(spec)
    cfg = _config(hf_dir, parallel, budget, pairs)
    par = cfg.parallel
    groups = init_parallel(par.tp, par.pp, vpp=par.vpp, cp=par.cp)
    source = resolve_model_source(cfg, groups, groups.tp_size)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, MODEL["vocab_size"], (pairs, 2, PROMPT + RESPONSE), generator=gen).tolist()
    items = [[ScoredSequence(t[:PROMPT], t[PROMPT:]) for t in pair] for pair in tokens]
    mine = items[groups.dp_rank :: groups.dp_size]
    settings = dpo_settings(cfg, source.arch.vocab_size)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) from here
    base = status_bytes("VmRSS")
    policy = build_policy(cfg, source, groups)
    reference = build_reference(cfg, source, groups, policy)
    times = []
    for _ in range(steps):
        batches = pack_items(mine, token_budget=budget)
        start = time.perf_counter()
        compute_reference_logps(reference, groups, batches, settings)
        train_step(policy.model, policy.optimizer, groups, batches, settings,
                   global_pairs=pairs, global_chosen_tokens=pairs * RESPONSE)  # fmt: skip
        times.append(time.perf_counter() - start)
    plan = estimate(cfg, source.arch, world_size=groups.world_size, kernels="cpu")
    row = {
        "name": name,
        "rank": groups.rank,
        "peak": status_bytes("VmHWM") - base,
        "step_s": statistics.median(times[1:]),
    }
    row.update(predicted=plan.training_peak, activations=plan.stage.activations)
    Path(f"{out}.rank{groups.rank}.json").write_text(json.dumps(row))


def run(name: str, hf_dir: Path, args, log: Path) -> dict:
    """One launch of layout ``name``; its largest rank's peak and slowest rank's step time."""
    ranks, parallel, _ = LAYOUTS[name]
    spec = json.dumps([name, str(hf_dir), parallel, args.budget, args.pairs, args.steps, str(log)])
    code = (
        "import sys; from spin_megatron.parallel.launch import spawn_local; "
        f"sys.exit(spawn_local({ranks}, 'bench.scaling_layouts', ['--worker', {spec!r}]))"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    with open(log, "w") as out:
        done = subprocess.run(
            [sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env
        )
    if done.returncode != 0:
        raise RuntimeError(f"{name}: exit {done.returncode}\n{log.read_text()[-3000:]}")
    rows = [json.loads(Path(f"{log}.rank{rank}.json").read_text()) for rank in range(ranks)]
    return {
        "peak": max(r["peak"] for r in rows),
        "step_s": max(r["step_s"] for r in rows),
        "predicted": rows[0]["predicted"],
        "activations": rows[0]["activations"],
    }


def main(args) -> int:
    from spin_megatron.models.tiny import make_tiny_hf_model

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_tiny_hf_model(Path(tmp) / "model", "qwen2", seed=0, **MODEL)
        names = [n for n in LAYOUTS if not args.only or n in args.only]
        for _ in range(args.repeats):  # all layouts in turn, repeated: others' load hits them alike
            for name in names:
                row = run(name, hf_dir, args, Path(tmp) / f"{name.replace(' ', '_')}.log")
                rows.setdefault(name, []).append(row)
    # the fastest repeat's step time (the one least disturbed by the machine's other load); the median peak
    rows = {
        name: {**runs[0], "peak": statistics.median(r["peak"] for r in runs),
               "step_s": min(r["step_s"] for r in runs)}
        for name, runs in rows.items()
    }  # fmt: skip
    mib = 2**20
    print(
        f"tiny Qwen2 (hidden 256, 8 layers, vocabulary 1024), {args.pairs} pairs of {2 * (PROMPT + RESPONSE)} "
        f"tokens per step, micro-batches of ≤ {args.budget} tokens; CPU gloo, {os.cpu_count()} cores; peak RSS "
        f"growth of the largest rank; median step of 2..{args.steps} (reference pass + update), fastest of "
        f"{args.repeats} repeat(s)"
    )
    print(f"{'layout':<14} {'ranks':>5} {'peak MiB':>8} {'planned':>8} {'plan/meas':>9} {'× plain':>7} "
          f"{'act. planned':>12} {'s/step':>7} {'× plain':>7}")  # fmt: skip
    for name, (ranks, _, plain) in LAYOUTS.items():
        if name not in rows or plain not in rows:
            continue
        r, p = rows[name], rows[plain]
        print(
            f"{name:<14} {ranks:5d} {r['peak'] / mib:8.0f} {r['predicted'] / mib:8.0f} "
            f"{r['predicted'] / r['peak']:9.2f} {r['peak'] / p['peak']:7.2f} {r['activations'] / mib:12.0f} "
            f"{r['step_s']:7.2f} {r['step_s'] / p['step_s']:7.2f}"
        )
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
