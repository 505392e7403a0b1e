"""Reward-model scoring throughput on CPU: ours (``HFRewardModel``) vs plain transformers batched inference.

The same random-weight ``Qwen2ForSequenceClassification`` (``--hidden``, ``--layers``, the Qwen2.5 tokenizer and
vocabulary), the same conversations: GSM8K questions from ``../shared/data`` with responses of the lengths online
DPO produces (a GSM8K solution cut to a random length between 8 and ``--max-response-words`` words), the same
batch size. Two ways to score them:

    transformers   the plain recipe: ``apply_chat_template`` → ``tokenizer(padding=True)`` per batch of
                   ``--batch`` conversations in the order they come, ``model(**batch).logits[:, 0]``
    ours           ``HFRewardModel.score``: tokenized once, sorted by length, right-padded micro-batches of the
                   same size (each pads to its own longest), pad id chosen off the batch

Reported: conversation tokens (without padding) per second, padded tokens computed, and the ratio; the scores
of both are checked equal. Alternating repeats, medians, one thread each.

    .venv/bin/python -m bench.rm_scoring [--conversations 64 --batch 8 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from spin_megatron.config import shared_data_dir
from spin_megatron.reward_model.hf import HFRewardModel


def _conversations(n: int, max_words: int, seed: int = 0) -> list[list[dict]]:
    rows = [json.loads(line) for line in (shared_data_dir() / "gsm8k" / "train.jsonl").open()][: 4 * n]
    rng = random.Random(seed)
    out = []
    for row in rng.sample(rows, n):
        words = row["answer"].split()
        response = " ".join(words[: rng.randint(8, max(8, min(max_words, len(words))))])
        out.append([{"role": "user", "content": row["question"]}, {"role": "assistant", "content": response}])
    return out


def _make_model(out: Path, tokenizer_dir: Path, hidden: int, layers: int) -> Path:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), num_labels=1,
        pad_token_id=tokenizer.pad_token_id, architectures=["Qwen2ForSequenceClassification"],
    )  # fmt: skip
    Qwen2ForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _plain(model, tokenizer, conversations, batch: int) -> tuple[list[float], int]:
    scores, padded = [], 0
    with torch.inference_mode():
        for start in range(0, len(conversations), batch):
            texts = tokenizer.apply_chat_template(conversations[start : start + batch], tokenize=False)
            inputs = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
            padded += inputs["input_ids"].numel()
            scores += model(**inputs).logits[:, 0].float().tolist()
    return scores, padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-response-words", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    conversations = _conversations(args.conversations, args.max_response_words)
    with tempfile.TemporaryDirectory(prefix="bench_rm_") as tmp:
        path = _make_model(
            Path(tmp) / "rm", shared_data_dir() / "qwen2.5-tokenizer", args.hidden, args.layers
        )
        ours = HFRewardModel(str(path), micro_batch_size=args.batch)
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.padding_side = "right"
        plain = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
        texts = tokenizer.apply_chat_template(conversations, tokenize=False)
        real = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
        times = {"transformers": [], "ours": []}
        for repeat in range(args.repeats + 1):
            for name in times if repeat % 2 == 0 else reversed(times):
                start = time.perf_counter()
                if name == "ours":
                    got = ours.score(conversations)
                else:
                    expected, padded = _plain(plain, tokenizer, conversations, args.batch)
                if repeat:
                    times[name].append(time.perf_counter() - start)
    worst = max(abs(a - b) for a, b in zip(got, expected, strict=True))
    assert worst < 1e-3, f"the scores differ by up to {worst}"
    ours_padded = sum(
        len(chunk) * max(chunk)
        for chunk in _chunks(
            sorted(len(i) for i in tokenizer(texts, add_special_tokens=False)["input_ids"]), args.batch
        )
    )
    base = statistics.median(times["transformers"])
    print(f"{args.conversations} GSM8K conversations, {real} tokens (mean {real / args.conversations:.0f}); "
          f"Qwen2 RM hidden {args.hidden} × {args.layers} layers, batch {args.batch}, 1 thread; median of "
          f"{args.repeats}; scores agree to {worst:.1e}")  # fmt: skip
    print("scoring | s | tokens/s | padded tokens computed | vs transformers")
    for name, padded_tokens in (("transformers", padded), ("ours", ours_padded)):
        median = statistics.median(times[name])
        print(f"{name} | {median:.2f} | {real / median:,.0f} | {padded_tokens:,} | {base / median:.2f}×")


def _chunks(values: list[int], size: int):
    for start in range(0, len(values), size):
        yield values[start : start + size]


if __name__ == "__main__":
    main()
