"""Rollout overlapped with training (``rollout.max_staleness=1``) against the synchronous loop, on CPU.

Part 1, step time. The tiny preset with the real Qwen2.5 vocabulary (``experiment=tiny_cpu``, SPIN on GSM8K
prompts), the ``hf`` engine in a process of its own (``rollout.hf_process=separate``, one torch thread) and the
trainer on one thread: two cores, one each, as disaggregated SGLang servers have GPUs of their own. The same work
per step in every run (SPIN pairs every prompt with its gold, so every step trains on ``prompts`` pairs; the random
model rarely samples its end-of-turn token, so responses run to ``max_new_tokens``). Four runs in one go:

    sync-policy      sample_from=policy,    max_staleness=0   (today's loop, sampling from the current policy)
    overlap-policy   sample_from=policy,    max_staleness=1   (the batch of step t+1 generated while t trains)
    sync-reference   sample_from=reference, max_staleness=0   (SPIN's opponent, the synchronous loop)
    overlap-reference sample_from=reference, max_staleness=1  (exact: the same samples as sync-reference)

Reported: the median step time after ``--warmup`` steps (sum of the step's timers: generate, ref, update, sync and
the wait for the prefetch), its parts, and the ratio to the synchronous run of the same sampler.

Part 2, learning (``--curves``): the synthetic task of ``bench/sample_from.py`` (online DPO would tie on a random
model's GSM8K answers): sample_from=policy, synchronous vs overlapped, ``--seeds`` seeds, the mean sevens-score
of the samples over the last ``--last`` steps.

    .venv/bin/python -m bench.overlap [--steps 10 --prompts 4 --max-new-tokens 24] [--curves --seeds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = {
    "sync-policy": ("policy", 0),
    "overlap-policy": ("policy", 1),
    "sync-reference": ("reference", 0),
    "overlap-reference": ("reference", 1),
}
TIMERS = ("time/generate", "time/ref", "time/update", "time/sync", "time/wait_rollout")


def _train(out: Path, overrides: list[str]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the trainer's core; the engine process has its own
    cmd = [sys.executable, "-m", "spin_megatron.train", "logging.progress_bar=false", "trainer.save_freq=0",
           "trainer.export_hf=false", "trainer.test_freq=0", "rollout.hf_process=separate", "rollout.hf_threads=1",
           f"trainer.output_dir={out}", *overrides]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"bench.overlap: run {out.name} failed:\n{result.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_times(args, root: Path) -> None:
    rows = {}
    for name, (sampler, staleness) in RUNS.items():
        metrics = _train(
            root / name,
            ["experiment=tiny_cpu", "algorithm.mode=spin", f"algorithm.sample_from={sampler}",
             f"rollout.max_staleness={staleness}", "rollout.n=1", f"rollout.max_new_tokens={args.max_new_tokens}",
             f"trainer.prompts_per_step={args.prompts}", f"trainer.mini_batch_size={args.prompts // 2}",
             f"trainer.total_steps={args.steps}", f"trainer.ref_update_freq={args.ref_update_freq}"],
        )  # fmt: skip
        timed = [m for m in metrics if m["step"] > args.warmup]
        rows[name] = {k: statistics.median(m.get(k, 0.0) for m in timed) for k in TIMERS}
        rows[name]["step"] = statistics.median(sum(m.get(k, 0.0) for k in TIMERS) for m in timed)
        rows[name]["staleness"] = max(m.get("rollout/staleness", 0.0) for m in timed)
    print(f"tiny_cpu (Qwen2.5 vocabulary), SPIN, {args.prompts} prompts × 1 sample × {args.max_new_tokens} new "
          f"tokens, ref refresh every {args.ref_update_freq} steps; median of steps {args.warmup + 1}..{args.steps}; "
          "engine in its own process, 1 thread each side")  # fmt: skip
    print("run | step s | generate | ref | update | sync | wait | staleness | vs sync")
    for name, row in rows.items():
        base = rows["sync-" + name.split("-", 1)[1]]["step"]
        parts = " | ".join(f"{row[k]:.2f}" for k in TIMERS)
        print(f"{name} | {row['step']:.2f} | {parts} | {row['staleness']:.0f} | {row['step'] / base:.2f}×")


def curves(args, root: Path) -> None:
    sys.path.insert(0, str(REPO))
    from bench.sample_from import _prompts
    from tests.synthetic_task import make_char_tokenizer

    tokenizer = make_char_tokenizer(root / "tokenizer")
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer))
    train = _prompts(root / "train.jsonl", 64, 0)
    finals, halfway = {0: [], 1: []}, {0: [], 1: []}
    for seed in range(args.seeds):
        for staleness in (0, 1):
            metrics = _train(
                root / f"curve_s{staleness}_seed{seed}",
                ["experiment=tiny_cpu", "algorithm.mode=online", "algorithm.sample_from=policy", "rollout.n=2",
                 "algorithm.tie_policy=keep", "algorithm.reward=tests.synthetic_task:sevens",
                 f"model.tiny.vocab_size={vocab}", f"model.tokenizer_path={tokenizer}", f"data.train_files={train}",
                 f"data.val_files={train}", "data.instruction=''", "rollout.max_new_tokens=10", f"optim.lr={args.lr}",
                 f"trainer.total_steps={args.curve_steps}", "trainer.prompts_per_step=8",
                 "trainer.mini_batch_size=4", "trainer.ref_update_freq=6", f"rollout.max_staleness={staleness}",
                 f"trainer.seed={seed}", f"model.tiny.seed={seed}", f"data.seed={seed}"],
            )  # fmt: skip
            scores = [m["reward/score_mean"] for m in metrics if m["step"] > args.curve_steps - args.last]
            finals[staleness].append(statistics.mean(scores))
            reached = [m["step"] for m in metrics if m["step"] >= 1 and m["reward/score_mean"] >= 0.5]
            halfway[staleness].append(reached[0] if reached else None)
            curve = " ".join(f"{m['reward/score_mean']:.2f}" for m in metrics if m["step"] >= 1)
            print(f"seed {seed} max_staleness={staleness}: score per step {curve}")
    for staleness, values in finals.items():
        spread = max(values) - min(values)
        print(f"max_staleness={staleness}: mean score over the last {args.last} steps {statistics.mean(values):.3f} "
              f"(seeds {', '.join(f'{v:.3f}' for v in values)}; spread {spread:.3f})")  # fmt: skip
        print(
            f"max_staleness={staleness}: first step with a mean score ≥ 0.5, per seed: {halfway[staleness]}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--ref-update-freq", type=int, default=5)
    parser.add_argument(
        "--curves", action="store_true", help="also the learning curves on the synthetic task"
    )
    parser.add_argument("--curve-steps", type=int, default=24)
    parser.add_argument("--last", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-3, help="the learning curves' learning rate")
    parser.add_argument("--curves-only", action="store_true", help="skip the step-time part")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_overlap_") as tmp:
        if not args.curves_only:
            step_times(args, Path(tmp))
        if args.curves or args.curves_only:
            curves(args, Path(tmp))


if __name__ == "__main__":
    main()
