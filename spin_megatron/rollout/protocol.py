"""What every rollout engine speaks: sampling parameters in, :class:`Sample` records out."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from spin_megatron.types import FinishReason, Sample  # re-exported: the engines' records live in types.py

__all__ = ["FinishReason", "RolloutEngine", "Sample", "SamplingParams"]


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Per-request sampling settings (SGLang's names where they exist)."""

    n: int = 1  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k filtering
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"rollout.n must be ≥ 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"rollout.temperature must be ≥ 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"rollout.top_k must be -1 (off) or ≥ 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens must be ≥ 1, got {self.max_new_tokens}")


class RolloutEngine(Protocol):
    """A generation backend. Weight sync calls ``update_weights`` once per bucket of HF-named full tensors, in
    order, then ``finish_weight_update`` once (e.g. SGLang flushes its prefix cache there)."""

    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, prompt_keys: list[Hashable] | None = None
    ) -> list[Sample]:
        """``params.n`` samples per prompt; ``prompt_keys[i]`` becomes ``Sample.prompt_id`` (default: i)."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def finish_weight_update(self) -> None: ...

    def sleep(self, *, release_weights: bool = True) -> None:
        """Colocated mode: free GPU memory before training: the KV cache, and the weights when
        ``release_weights`` (the trainer asks for it only when a weight sync follows, which reloads them)."""
        ...

    def wake(self) -> None: ...

    def shutdown(self) -> None: ...
