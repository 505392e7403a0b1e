"""Loading conversations (``data.messages_key``): the first start (read, render, tokenize, cache) vs the next start
(the cache, memory-mapped) on synthetic UltraChat-shaped data.

The rows have UltraChat-200k's shape (``prompt``, ``prompt_id``, ``messages``) and roughly its size: 1 to 7 user /
assistant exchanges (mean about 3.9), user turns of 10 to 70 words, assistant turns of 60 to 400 words (about
1,100 words, ~1,400 Qwen2.5 tokens a conversation), words drawn from GSM8K's vocabulary (``../shared/data``) so
the tokenizer sees English. Both loads go through ``load_prompt_split`` with the Qwen2.5 tokenizer and
``data.*`` defaults (``max_prompt_tokens`` 512 with ``overlong_prompts`` from the command line), then touch every
example's token ids the way a run reads a batch of them.

    .venv/bin/python -m bench.data_load [--conversations 200000 --workers 0 --overlong drop --workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from spin_megatron.config import DataConfig, shared_data_dir
from spin_megatron.data import load_prompt_split, load_tokenizer


def _vocabulary() -> np.ndarray:
    text = (shared_data_dir() / "gsm8k" / "train.jsonl").read_text()
    words = sorted(set(re.findall(r"[A-Za-z]+[.,?!]?", text)))
    return np.array(words, dtype=object)


def write_conversations(path: Path, count: int, seed: int = 0) -> None:
    rng, words = np.random.default_rng(seed), _vocabulary()
    with path.open("w") as out:
        for _ in range(count):
            messages = []
            for _ in range(min(7, 1 + rng.poisson(2.9))):
                for role, low, high in (("user", 10, 70), ("assistant", 60, 400)):
                    text = " ".join(words[rng.integers(0, len(words), rng.integers(low, high))])
                    messages.append({"role": role, "content": text})
            prompt = messages[0]["content"]
            prompt_id = hashlib.sha256(prompt.encode()).hexdigest()
            out.write(json.dumps({"prompt": prompt, "prompt_id": prompt_id, "messages": messages}) + "\n")


def _load(cfg: DataConfig, tokenizer) -> tuple[float, object, int]:
    started = time.perf_counter()
    examples, stats = load_prompt_split(cfg, tokenizer, "train")
    batch = examples[:: max(1, len(examples) // 64)]  # what a step reads: token ids of its prompts
    tokens = sum(len(e.prompt_ids) + len(e.gold_ids) for e in batch)
    return time.perf_counter() - started, stats, tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conversations", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=0, help="data.tokenize_workers (0: one per core, ≤ 8)")
    parser.add_argument("--overlong", default="drop", choices=["drop", "left_truncate"])
    parser.add_argument("--workdir", type=Path, help="keep the generated file here (default: a temp dir)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="spin_data_load_"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / f"ultrachat_synthetic_{args.conversations}.jsonl"
    if not data.is_file():
        started = time.perf_counter()
        write_conversations(data, args.conversations)
        print(
            f"wrote {data} ({data.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - started:.0f} s"
        )
    cache = workdir / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    tokenizer = load_tokenizer(str(shared_data_dir() / "qwen2.5-tokenizer"))
    cfg = DataConfig(
        train_files=[str(data)], val_files=[], messages_key="messages", cache_dir=str(cache),
        tokenize_workers=args.workers, overlong_prompts=args.overlong,
    )  # fmt: skip
    first, stats, _ = _load(cfg, tokenizer)
    print(f"first start:  {first:7.1f} s  {stats.summary('train')}")
    again, cached, _ = _load(cfg, tokenizer)
    assert cached.cached and cached.kept == stats.kept
    print(f"cached start: {again:7.2f} s  {cached.summary('train')}")
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    print(f"ratio {first / again:.0f}x; cache {size / 2**20:.0f} MiB in {cache}")
    if args.workdir is None:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
