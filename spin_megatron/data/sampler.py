"""Handing out global batches of prompts, resumably, and this replica's share of a batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from spin_megatron.data.prompts import PromptExample
from spin_megatron.errors import ConfigError


def shard(batch: Sequence[Any], dp_rank: int, dp_size: int) -> list[Any]:
    """This data-parallel rank's contiguous slice of a global batch.

    Sizes differ by at most one: the first ``len(batch) % dp_size`` ranks get one item more (as
    ``numpy.array_split``), so every item lands on exactly one rank, in order.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
    base, extra = divmod(len(batch), dp_size)
    start = dp_rank * base + min(dp_rank, extra)
    return list(batch[start : start + base + (dp_rank < extra)])


class PromptSampler:
    """An endless, deterministic stream of prompts: epoch ``e`` is a permutation drawn with seed ``seed + e``
    (dataset order when ``shuffle`` is false), and ``state_dict()`` = (epoch, index) lets a resumed run continue
    with exactly the same prompts.

    A batch never holds a prompt twice: it is taken from one epoch only, and an epoch's last ``len % batch``
    prompts, too few for a batch, are skipped (verl's ``drop_last``; other prompts each epoch when shuffled). A
    batch that crossed into the next epoch would meet the same prompt twice whenever the two permutations
    overlap, and the engine check, pairing and the per-prompt metrics all key samples by prompt.
    """

    shard = staticmethod(shard)

    def __init__(self, examples: Sequence[PromptExample], *, shuffle: bool = True, seed: int = 1):
        if not examples:
            raise ValueError("PromptSampler needs at least one example")
        self.examples = list(examples)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.index = 0  # position inside the current epoch's order
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.examples))
        return np.random.default_rng(self.seed + epoch).permutation(len(self.examples))

    def next_batch(self, num_prompts: int) -> list[PromptExample]:
        if not 0 < num_prompts <= len(self.examples):
            raise ValueError(
                f"num_prompts must be in [1, {len(self.examples)}] (the prompts), got {num_prompts}"
            )
        if self.index + num_prompts > len(self._order):  # the epoch's rest is too short: the next epoch
            self.epoch += 1
            self.index = 0
            self._order = self._epoch_order(self.epoch)
        batch = [self.examples[i] for i in self._order[self.index : self.index + num_prompts]]
        self.index += num_prompts
        return batch

    def state_dict(self) -> dict[str, int | bool]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "num_examples": len(self.examples),
            "shuffle": self.shuffle,
            "seed": self.seed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("num_examples", "shuffle", "seed"):
            if state[key] != mine[key]:
                raise ConfigError(
                    f"the checkpoint's prompt sampler has {key}={state[key]!r} but this run has {mine[key]!r}; "
                    "resume with the same data.* settings (files, max_prompt_tokens, shuffle, seed)"
                )
        if not 0 <= state["index"] <= len(self.examples) or state["epoch"] < 0:
            raise ValueError(f"invalid sampler position {state['epoch']=}, {state['index']=}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_order(self.epoch)
