"""What every rollout engine speaks: sampling parameters in, :class:`Sample` records out."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

FinishReason = Literal["stop", "length"]


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


@dataclass(kw_only=True)
class Sample:
    """One generated response. Pairing groups samples by ``prompt_id``, never by position in a list."""

    prompt_id: Hashable  # stable id of the prompt (e.g. its dataset index)
    prompt_ids: list[int]
    response_ids: list[int]
    finish_reason: FinishReason  # "stop": ended with a stop/EOS token; "length": cut at max_new_tokens
    sample_index: int = 0  # 0..n-1 within its prompt
    logprobs: list[float] | None = None  # engine's per-token log-probs of response_ids, when it returns them
    response_text: str | None = None
    reward: float | None = None
    metadata: dict = field(default_factory=dict)  # e.g. the dataset row (gold answer) the reward needs

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


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
