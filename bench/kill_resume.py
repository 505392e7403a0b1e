"""Kill/resume trials: SIGKILL a tiny CPU run at random moments, resume with trainer.resume=auto until it finishes,
and compare the final policy with an uninterrupted run (must be bit-identical). Prints one line per trial.

    python bench/kill_resume.py [--trials 3] [--steps 8] [--min-s 3] [--max-s SECONDS] [--seed 0]

The deterministic per-phase version (generation, update, sync, checkpoint write) runs in CI:
tests/test_fault_tolerance.py. This script adds kills at arbitrary times.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def _command(out: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "spin_megatron.train",
        "experiment=tiny_cpu",
        "logging.progress_bar=false",
        "trainer.test_freq=0",
        f"trainer.total_steps={steps}",
        "trainer.save_freq=2",
        f"trainer.output_dir={out}",
    ]


def _start(out: Path, steps: int) -> subprocess.Popen:
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.log", "a")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(_command(out, steps), cwd=REPO, stdout=log, stderr=log, start_new_session=True)


def _weights(out: Path) -> dict:
    tensors = {}
    for path in sorted((out / "hf").glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _steps_done(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def trial(out: Path, steps: int, rng: random.Random, lo: float, hi: float) -> tuple[int, list[str]]:
    kills, notes = 0, []
    while True:
        proc = _start(out, steps)
        delay = rng.uniform(lo, hi)
        try:
            code = proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            partial = (
                any(p.name.startswith(".") for p in (out / "checkpoints").glob("*"))
                if (out / "checkpoints").is_dir()
                else False
            )
            notes.append(f"{delay:.1f}s@{_steps_done(out)}steps" + ("(mid-checkpoint)" if partial else ""))
            continue
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # helper processes left behind by earlier kills
        except ProcessLookupError:
            pass
        if code != 0:
            tail = (out.parent / f"{out.name}.log").read_text()[-3000:]
            raise SystemExit(f"run exited with {code} after {kills} kills [{', '.join(notes)}]:\n{tail}")
        return kills, notes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--min-s", type=float, default=3.0)
    parser.add_argument("--max-s", type=float, default=0.0, help="0: the uninterrupted run's duration")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        reference = Path(tmp) / "reference"
        start = time.time()
        assert subprocess.run(_command(reference, args.steps), cwd=REPO, capture_output=True).returncode == 0
        expected = _weights(reference)
        duration = time.time() - start
        print(f"uninterrupted run: {args.steps} steps in {duration:.0f} s")
        # kills uniformly up to a whole run's length: each restart still has a fair chance to make progress
        max_s = args.max_s or duration
        total = 0
        for i in range(args.trials):
            out = Path(tmp) / f"trial{i}"
            kills, notes = trial(out, args.steps, rng, args.min_s, max_s)
            got = _weights(out)
            same = sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
            total += kills
            print(f"trial {i}: {kills} SIGKILLs [{', '.join(notes)}] → final policy bit-identical: {same}")
            if not same:
                return 1
        print(f"{args.trials} trials, {total} kills, all bit-identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
