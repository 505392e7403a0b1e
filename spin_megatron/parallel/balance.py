"""Token-balanced data-parallel mini-batches (``trainer.balance_dp``; verl's ``balance_batch``, slime's
``--balance-data``).

Prompts are sharded over the replicas before generation, when nobody knows how long the answers will be; a
replica that drew the long ones then trains while the others wait at the gradient all-reduce. After generation
every replica's pairs of a mini-batch are gathered over the data-parallel group and split again by tokens with
the largest differencing method (Karmarkar–Karp's k-way heuristic), the same split on every rank. The loss of an
optimizer step is the exact mean over the mini-batch's pairs wherever they are trained, so the gradient does not
change (up to the order of floating-point sums).
"""

from __future__ import annotations

import heapq
import itertools

import torch.distributed as dist


def balanced_partition(sizes: list[int], parts: int) -> list[list[int]]:
    """Indices of ``sizes`` split into ``parts`` lists with sums as equal as the largest differencing method
    makes them; deterministic (ties by index), each list in increasing index order, the heaviest list first."""
    if parts == 1:
        return [list(range(len(sizes)))]
    counter = itertools.count()
    heap = []  # (-(max - min), tie, subsets: [(sum, indices)] heaviest first)
    for index, size in enumerate(sizes):
        subsets = [(size, [index])] + [(0, []) for _ in range(parts - 1)]
        heapq.heappush(heap, (-size, next(counter), subsets))
    if not heap:
        return [[] for _ in range(parts)]
    while len(heap) > 1:  # merge the two most unbalanced: heaviest of one with the lightest of the other
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = [(sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, reversed(b))]
        merged.sort(key=lambda s: (-s[0], min(s[1], default=len(sizes))))
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), next(counter), merged))
    return [sorted(indices) for _, indices in heap[0][2]]


def item_tokens(item) -> int:
    """Tokens a pair (or a single scored sequence) puts through the model."""
    return sum(sequence.num_tokens for sequence in item)


def balance_over_replicas(chunks: list[list], groups) -> tuple[list[list], dict[str, float]]:
    """This replica's items of each mini-batch after a token-balanced split of the whole mini-batch over the
    data-parallel group (collective over ``groups.dp``). Also returns ``{"before": …, "after": …}``: the mean over
    mini-batches of the largest replica's tokens over the mean replica's (1.0: perfectly even)."""
    if groups.dp_size == 1:
        return chunks, {"before": 1.0, "after": 1.0}
    gathered = [None] * groups.dp_size
    dist.all_gather_object(gathered, chunks, group=groups.dp)
    mine, before, after = [], [], []
    for k in range(len(chunks)):
        items = [item for rank in gathered for item in rank[k]]
        sizes = [item_tokens(item) for item in items]
        parts = balanced_partition(sizes, groups.dp_size)
        before.append(_spread([sum(item_tokens(i) for i in rank[k]) for rank in gathered]))
        after.append(_spread([sum(sizes[i] for i in part) for part in parts]))
        mine.append([items[i] for i in parts[groups.dp_rank]])
    return mine, {"before": sum(before) / len(before), "after": sum(after) / len(after)}


def _spread(tokens: list[int]) -> float:
    mean = sum(tokens) / len(tokens)
    return max(tokens) / mean if mean else 1.0
