"""`make demo`: a real SPIN run on CPU, about two minutes.

torchrun starts two processes (Megatron tensor parallelism TP=2 over gloo) training a tiny random-weight
Qwen2-shaped model with the real Qwen2.5 tokenizer on GSM8K prompts from ../shared/data, in SPIN mode (chosen =
the gold solution, rejected = the policy's own sample, reference refreshed every 4 steps), with the in-process
transformers rollout engine. Then it plots the curves and prints where everything is, plus the numbers that show
learning: held-out gold NLL falling, and rewards/accuracies rising within each SPIN iteration.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN_DIR = REPO / "runs" / "demo"


def main() -> int:
    if not (REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl").is_file():
        print(
            "demo: ../shared/data (GSM8K + Qwen2.5 tokenizer) not found beside the checkout", file=sys.stderr
        )
        return 2
    if RUN_DIR.exists():
        shutil.rmtree(RUN_DIR)  # the demo's own run folder: every demo starts fresh
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "spin_megatron.train",
        "experiment=demo_cpu",
        f"trainer.output_dir={RUN_DIR}",
    ]
    print(
        "$ torchrun --standalone --nproc_per_node 2 -m spin_megatron.train experiment=demo_cpu\n", flush=True
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }  # (torchrun's banner otherwise)
    if subprocess.run(cmd, cwd=REPO, env=env).returncode != 0:
        return 1
    plot = [sys.executable, "-m", "spin_megatron.plot", str(RUN_DIR)]
    subprocess.run(plot, cwd=REPO, check=True, stdout=subprocess.DEVNULL)  # (its paths: printed below)
    metrics = [json.loads(line) for line in (RUN_DIR / "metrics.jsonl").read_text().splitlines()]
    nll = [(m["step"], m["val/gold_nll"]) for m in metrics if "val/gold_nll" in m]
    print("\nheld-out gold NLL per token: " + ", ".join(f"step {s}: {v:.3f}" for s, v in nll))
    acc = [f"{m['rewards/accuracies']:.2f}" for m in metrics if "rewards/accuracies" in m]
    print(f"rewards/accuracies per step (reference refreshed every 4 steps): {' '.join(acc)}")
    print(
        f"\nmetrics:     {RUN_DIR / 'metrics.jsonl'}\noverview:    {RUN_DIR / 'plots' / 'overview.png'} "
        f"(every curve: {RUN_DIR / 'plots'})\n"
        f"checkpoints: {RUN_DIR / 'checkpoints'}\nHF export:   {RUN_DIR / 'hf'}"
    )
    return 0 if nll and nll[-1][1] < nll[0][1] else 1


if __name__ == "__main__":
    sys.exit(main())
