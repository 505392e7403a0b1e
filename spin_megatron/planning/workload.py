"""The work of one optimizer step, from the configuration: tokens of a pair and of a micro-batch, micro-batches per
data-parallel rank, and the log-prob buffers of a micro-batch."""

from __future__ import annotations

import math


# ------------------------------------------------------------------------------------------------ workload
def pair_tokens(cfg) -> int:
    """Tokens of the longest possible pair (prompt + response, twice); pairs are never split."""
    d, r = cfg.data, cfg.rollout
    if cfg.algorithm.mode == "spin":
        return 2 * d.max_prompt_tokens + d.max_gold_tokens + r.max_new_tokens
    return 2 * (d.max_prompt_tokens + r.max_new_tokens)


def micro_batch_tokens(cfg) -> int:
    """Padded length of a full micro-batch (``packing.pack_items``: ≥ 1 padding token, a multiple of 8)."""
    budget = max(cfg.trainer.micro_batch_tokens, pair_tokens(cfg))
    return math.ceil((budget + 1) / 8) * 8


def num_microbatches(cfg, dp: int) -> int:
    """Micro-batches of one data-parallel rank when every pair has the longest length."""
    pairs_per_prompt = cfg.algorithm.pairs_per_prompt if cfg.algorithm.mode == "spin" else 1
    if pairs_per_prompt == "all":  # one pair per sample
        pairs_per_prompt = cfg.rollout.n
    pairs = math.ceil(cfg.trainer.prompts_per_step / dp) * pairs_per_prompt
    per_batch = max(1, cfg.trainer.micro_batch_tokens // pair_tokens(cfg))
    return max(1, math.ceil(pairs / per_batch))


def logprob_bytes(
    tokens: int, columns: int, hidden: int, chunk: int, e: int, *, stats: bool = True
) -> dict[str, int]:
    """Extra memory of the log-prob computation on ``[tokens, columns]`` logits, per path (module docstring).
    ``stats``: the per-token metrics are computed too (the training pass does; bench/logprob.py does not)."""
    chunk = min(chunk, tokens)
    buffers = 4 * chunk * columns * (3 if stats else 1)
    return {
        "naive": tokens * columns * (e + 12),
        "chunked": 2 * tokens * columns * e + buffers,
        "fused": buffers + 4 * columns * hidden + 4 * tokens * hidden,
    }
