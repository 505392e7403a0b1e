"""The interfaces every reward-model backend implements.

A *conversation* is a list of chat messages (``{"role": ..., "content": ...}``) that ends with the assistant's
response: the prompt as the policy saw it (system, user) plus the sampled answer, as text. Backends render it with
the reward model's own tokenizer and chat template (which may differ from the policy's), so they get text, not the
policy's token ids.
"""

from __future__ import annotations

from typing import Protocol

Conversation = list[dict[str, str]]


class RewardScorer(Protocol):
    """A scalar reward model: one float per conversation, higher is better."""

    def score(self, conversations: list[Conversation]) -> list[float]: ...

    def shutdown(self) -> None: ...


class PairwiseJudge(Protocol):
    """A pairwise judge (PairRM-style): for each prompt, the probability that ``first`` is the better answer."""

    def judge(self, prompts: list[Conversation], first: list[str], second: list[str]) -> list[float]: ...


class RewardModelError(RuntimeError):
    """The reward model could not score (a backend failure: a dead server, a malformed answer)."""
