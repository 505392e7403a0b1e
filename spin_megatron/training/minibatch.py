"""Optimizer mini-batches of a rollout batch (verl's ``ppo_mini_batch_size``), split by prompt.

The global rollout batch is cut into ``count`` contiguous mini-batches first and each mini-batch is then sharded
over the data-parallel replicas, so the k-th optimizer step trains on the same prompts at any DP size (layouts
give the same run), and every mini-batch holds exactly ``prompts_per_step / count`` prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

from spin_megatron.data import shard


def mini_batch_shares(batch: Sequence, dp_rank: int, dp_size: int, count: int) -> list[list]:
    """This replica's prompts of each mini-batch: ``shard(k-th contiguous part of batch, dp_rank, dp_size)``."""
    return [shard(shard(batch, k, count), dp_rank, dp_size) for k in range(count)]


def mini_batches(items: list, item_prompts: list, shares: list[list]) -> list[list]:
    """This replica's pairs (``items``, with the prompt id of each) grouped by the mini-batch their prompt belongs
    to (``shares``, from :func:`mini_batch_shares`). A prompt's pairs never straddle two mini-batches."""
    chunk_of = {ex.prompt_id: k for k, share in enumerate(shares) for ex in share}
    chunks = [[] for _ in shares]
    for item, prompt in zip(items, item_prompts, strict=True):
        chunks[chunk_of[prompt]].append(item)
    return chunks
