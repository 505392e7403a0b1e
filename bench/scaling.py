"""Benchmark: Megatron's scaling features on CPU (default, ``--mode layouts``: bench/scaling_layouts.py — peak memory
and step time of sequence parallelism, overlapped DP communication, selective/full recompute, CP and VPP, each as a
ratio to its plain layout, with the planner's prediction beside each measured peak), or (``--mode cli``) step time
and tokens/s of the whole ``spin-train`` command vs tensor (TP) and data (DP) parallelism, and vs work.

``--mode cli``:

Each layout — TP1·DP1 (one process), TP2·DP1 and TP1·DP2 (two gloo processes) — runs the real command line,
``python -m spin_megatron.train experiment=tiny_cpu ...``, as local ranks (``spawn_local``, the environment
``torchrun`` gives its workers), for each global batch in ``--prompts`` (the work: tokens per step grow with it).
The tiny preset: a random Qwen2-shaped model (hidden 64, 2 layers) with the real Qwen2.5 tokenizer (151,936-row
output layer), GSM8K prompts, SPIN pairs (gold vs one sample of ``--max-new-tokens``). Every layout sees the same
global batches (the sampler is global, then split over DP replicas), so tokens per step match across layouts.

Read from ``metrics.jsonl``: ``train/tokens`` (prompt + response tokens of all pairs, global), ``time/generate``,
``time/ref``, ``time/update``, ``time/sync`` and ``perf/tokens_per_s`` (tokens / the sum of those phases); the
median over steps 2..N (step 1 is a warm-up). Start-up, the final checkpoint and the HF export are not in them.

On this 2-core machine the two ranks of a TP2 or DP2 layout share the same two cores that TP1·DP1 uses alone
(``OMP_NUM_THREADS`` = cores / ranks unless set), so no parallel speed-up can show here (a ratio above 1 means two
1-thread processes used the 2 cores better than one 2-thread process did): the point is that the plumbing runs at
every layout with the same work, and how the cost grows with tokens. About 9 runs × 25–65 s. Usage:
``python bench/scaling.py --mode cli [--prompts 2,4,8 --steps 3 --max-new-tokens 16]``;
``python bench/scaling.py [--steps 4 --pairs 8 --budget 1024 --repeats 3]`` (the layouts: 10 launches × 15–40 s
per repeat).
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
LAYOUTS = (("TP1·DP1", 1, 1), ("TP2·DP1", 2, 2), ("TP1·DP2", 1, 2))  # name, tp, world size
PHASES = ("generate", "ref", "update", "sync")


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("layouts", "cli"), default="layouts")
    p.add_argument(
        "--prompts", default="2,4,8", help="cli: global prompts per step, comma-separated (the work)"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="steps per run; step 1 is a warm-up (cli 3, layouts 4)"
    )
    p.add_argument("--pairs", type=int, default=8, help="layouts: pairs per step (global)")
    p.add_argument("--budget", type=int, default=1024, help="layouts: tokens per packed micro-batch")
    p.add_argument(
        "--repeats", type=int, default=3, help="layouts: runs of every layout (the fastest counts)"
    )
    p.add_argument("--only", default="", help="layouts: comma-separated names (with their plain layouts)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    args = p.parse_args()
    args.prompts = [int(x) for x in args.prompts.split(",")]
    args.steps = args.steps or (3 if args.mode == "cli" else 4)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    if args.steps < 2:
        p.error("--steps must be ≥ 2 (step 1 is a warm-up)")
    return args


def run_layout(tp: int, world: int, prompts: int, args, out_dir: Path) -> tuple[list[dict], float]:
    """One ``spin-train`` run; returns its metrics lines and its wall time (start-up and final save included)."""
    from spin_megatron.parallel.launch import spawn_local

    overrides = [
        "experiment=tiny_cpu",
        f"parallel.tp={tp}",
        f"trainer.prompts_per_step={prompts}",
        f"trainer.total_steps={args.steps}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        "trainer.test_freq=0",
        "trainer.save_freq=0",
        "trainer.export_hf=false",
        "trainer.ref_update_freq=0",
        f"trainer.output_dir={out_dir}",
        "logging.progress_bar=false",
    ]
    log = out_dir.with_suffix(".log")
    start = time.perf_counter()
    with open(log, "w") as handle:  # the ranks' console goes to a file; shown only if the run fails
        saved = os.dup(1), os.dup(2)
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            code = spawn_local(world, "spin_megatron.train", overrides, timeout_s=args.timeout, cwd=str(REPO))
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"TP{tp} world {world}, {prompts} prompts: exit {code}\n{log.read_text()[-3000:]}")
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], wall


def summarise(metrics: list[dict]) -> dict:
    timed = [m for m in metrics if m["step"] >= 2]
    row = {k: statistics.median(m[f"time/{k}"] for m in timed) for k in PHASES}
    row["step"] = sum(row[k] for k in PHASES)
    row["tokens"] = statistics.median(m["train/tokens"] for m in timed)
    row["tokens_per_s"] = statistics.median(m["perf/tokens_per_s"] for m in timed)
    row["pairs"] = statistics.median(m["pairs/kept"] for m in timed)
    row["tokens_by_step"] = [m["train/tokens"] for m in metrics]
    return row


def main() -> int:
    args = _parse()
    if args.mode == "layouts":
        if str(REPO) not in sys.path:  # `python bench/scaling.py`: bench/ imports as a package
            sys.path.insert(0, str(REPO))
        from bench import scaling_layouts

        return scaling_layouts.main(args)
    rows, walls = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for prompts in args.prompts:
            for name, tp, world in LAYOUTS:
                out = Path(tmp) / f"{name}-{prompts}".replace("·", "_")
                metrics, walls[name, prompts] = run_layout(tp, world, prompts, args, out)
                rows[name, prompts] = summarise(metrics)
    threads = os.environ.get("OMP_NUM_THREADS")
    print(
        f"spin-train experiment=tiny_cpu (hidden 64, 2 layers, Qwen2.5 vocabulary, GSM8K, SPIN, "
        f"{args.max_new_tokens} new tokens), CPU gloo, {os.cpu_count()} cores, threads per rank: "
        + (threads or "cores / ranks")
        + f"; median of steps 2..{args.steps}"
    )
    head = f"{'layout':<8} {'prompts':>7} {'tokens/step':>11} {'s/step':>7} "
    print(
        head + " ".join(f"{p:>8}" for p in PHASES) + f" {'tokens/s':>9} {'× TP1·DP1':>9} {'run wall s':>10}"
    )
    for prompts in args.prompts:
        base = rows[LAYOUTS[0][0], prompts]
        for name, _, _ in LAYOUTS:
            r = rows[name, prompts]
            print(
                f"{name:<8} {prompts:7d} {r['tokens']:11.0f} {r['step']:7.2f} "
                + " ".join(f"{r[p]:8.2f}" for p in PHASES)
                + f" {r['tokens_per_s']:9.0f} {r['tokens_per_s'] / base['tokens_per_s']:9.2f}"
                + f" {walls[name, prompts]:10.0f}"
            )
    same = all(
        len({tuple(rows[name, p]["tokens_by_step"]) for name, _, _ in LAYOUTS}) == 1 for p in args.prompts
    )
    print(f"tokens of every step identical across layouts at each batch size: {'yes' if same else 'NO'}")
    print(
        "2 CPU cores cannot show TP/DP speed-ups: a 2-rank layout runs its ranks on the same 2 cores that the "
        "1-rank layout uses (and pays gloo collectives on top); a '× TP1·DP1' above 1 only says that two "
        "1-thread processes use the cores better than one 2-thread process (and moves with the machine's other "
        "load). The rows show that the plumbing works at every layout and how step time grows with tokens; "
        "'run wall s' includes start-up and the final checkpoint."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
