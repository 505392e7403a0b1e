"""SPIN's opponent on CPU: ``algorithm.sample_from=reference`` (the paper: iteration t samples from p_θt, the
reference) against ``policy`` (samples from the current policy), same seed, same data, curves per step.

The task is synthetic so that a tiny random model learns visibly in minutes: a character tokenizer
(tests/synthetic_task.py), prompts "count 1 2 3", and a gold response of sevens ("7777 7777"), so SPIN's chosen is
a string of 7s and ``tests.synthetic_task:sevens`` (fraction of 7s in a sample) measures how close the samples
come to the gold. Printed per step: the mean sevens-score of the samples, the gold NLL on held-out prompts, the
DPO margin and accuracy, and which weights sampled.

    .venv/bin/python -m bench.sample_from [--steps 24] [--ref-update-freq 6] [--seed 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _prompts(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            numbers = " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(2, 4)))
            f.write(json.dumps({"question": f"count {numbers}", "answer": "7777 7777"}) + "\n")
    return path


def run(sample_from: str, out: Path, args) -> list[dict]:
    sys.path.insert(0, str(REPO))
    from transformers import AutoTokenizer

    from tests.synthetic_task import make_char_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_char_tokenizer(out / "tokenizer")
    vocab = len(AutoTokenizer.from_pretrained(tokenizer))
    train, val = _prompts(out / "train.jsonl", 64, 0), _prompts(out / "val.jsonl", 16, 1)
    run_dir = out / sample_from
    overrides = [
        "experiment=tiny_cpu", "logging.progress_bar=false", "algorithm.mode=spin",
        f"algorithm.sample_from={sample_from}", "algorithm.reward=tests.synthetic_task:sevens",
        f"model.tiny.vocab_size={vocab}", f"model.tokenizer_path={tokenizer}",
        f"data.train_files={train}", f"data.val_files={val}", "data.instruction=''", "data.val_max_prompts=16",
        "rollout.n=2", "algorithm.pairs_per_prompt=2", "rollout.max_new_tokens=10", "optim.lr=2e-3",
        f"trainer.total_steps={args.steps}", "trainer.prompts_per_step=8", "trainer.mini_batch_size=4",
        f"trainer.ref_update_freq={args.ref_update_freq}", f"trainer.test_freq={args.test_freq}",
        "trainer.save_freq=0", "trainer.export_hf=false", "trainer.resume=never", f"trainer.output_dir={run_dir}",
        f"trainer.seed={args.seed}", f"model.tiny.seed={args.seed}", f"data.seed={args.seed}",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "spin_megatron.train", *overrides], cwd=REPO, capture_output=True, text=True
    )
    if result.returncode:
        sys.exit(f"{sample_from} run failed:\n{result.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--ref-update-freq", type=int, default=6)
    parser.add_argument("--test-freq", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0, help="model, sampling and shuffling seed")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_sample_from")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"bench.sample_from: {args.out} is not empty; pass --out NEW_DIR or remove it")
    curves = {s: {m["step"]: m for m in run(s, args.out, args)} for s in ("reference", "policy")}
    keys = ("reward/score_mean", "rewards/margins", "rewards/accuracies", "objective/kl", "val/gold_nll")
    print("step | " + " | ".join(f"{k} ref / pol" for k in keys))
    for step in sorted(curves["reference"]):
        cells = []
        for key in keys:
            a, b = curves["reference"][step].get(key), curves["policy"][step].get(key)
            cells.append("—" if a is None else f"{a:.3f} / {b:.3f}")
        print(f"{step:4d} | " + " | ".join(cells))
    for name, c in curves.items():
        last = [c[s]["reward/score_mean"] for s in sorted(c) if s > 0][-args.ref_update_freq :]
        print(f"{name}: mean sevens-score over the last iteration {sum(last) / len(last):.3f}")


if __name__ == "__main__":
    main()
