"""Token-balanced data-parallel splits (trainer.balance_dp, spin_megatron/parallel/balance.py)."""

import random

from spin_megatron.parallel.balance import balanced_partition


def test_largest_differencing_splits_evenly_and_keeps_every_item_once():
    rng = random.Random(0)
    for parts in (2, 3, 4, 8):
        sizes = [rng.randint(40, 2000) for _ in range(64)]  # response lengths of a rollout batch
        split = balanced_partition(sizes, parts)
        assert sorted(i for part in split for i in part) == list(range(64))
        sums = [sum(sizes[i] for i in part) for part in split]
        assert max(sums) / (sum(sizes) / parts) < 1.01, sums
        contiguous = [sum(sizes[k * 64 // parts : (k + 1) * 64 // parts]) for k in range(parts)]
        assert max(sums) < max(contiguous)  # better than the prompt-order shards
        assert split == balanced_partition(list(sizes), parts)  # the same on every rank


def test_partition_edge_cases():
    assert balanced_partition([5, 4, 3, 2, 1], 2) in ([[1, 2, 4], [0, 3]], [[0, 3], [1, 2, 4]])
    assert balanced_partition([], 3) == [[], [], []]
    assert balanced_partition([7], 3) == [[0], [], []]
    assert balanced_partition([3, 1], 1) == [[0, 1]]
