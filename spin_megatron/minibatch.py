"""Optimizer mini-batches of a rollout batch (verl's ``ppo_mini_batch_size``), split by prompt."""

from __future__ import annotations

from spin_megatron.data import shard


def mini_batches(items: list, item_prompts: list, examples: list, count: int) -> list[list]:
    """Split this rank's pairs into ``count`` mini-batches by prompt: the k-th holds the pairs of the k-th
    contiguous share of ``examples`` (this rank's prompts, in rollout order), so the k-th global mini-batch is the
    union over data-parallel ranks of their k-th shares — ``mini_batch_size`` prompts when the ranks hold equal
    shares. A prompt's pairs never straddle two mini-batches."""
    chunk_of = {ex.prompt_id: k for k in range(count) for ex in shard(examples, k, count)}
    chunks = [[] for _ in range(count)]
    for item, prompt in zip(items, item_prompts, strict=True):
        chunks[chunk_of[prompt]].append(item)
    return chunks
