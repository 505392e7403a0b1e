"""The interfaces every reward-model backend implements.

A *conversation* is a list of chat messages (``{"role": ..., "content": ...}``) that ends with the assistant's
response: the prompt as the policy saw it (system, user) plus the sampled answer, as text. Backends render it with
the reward model's own tokenizer and chat template (which may differ from the policy's), so they get text, not the
policy's token ids.
"""

from __future__ import annotations

import sys
from pathlib import Path
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


def load_chat_template(chat_template: str | None) -> str | None:
    """A Jinja template given as a string, or as the path of a file ending in ``.jinja``."""
    if chat_template is not None and chat_template.endswith(".jinja") and "\n" not in chat_template:
        return Path(chat_template).read_text()
    return chat_template


class TruncationCount:
    """Conversations cut to ``reward_model.max_length`` (both backends keep the last tokens); warned once."""

    def __init__(self, max_length: int):
        self.max_length, self.truncated, self._warned = max_length, 0, False

    def add(self, cut: int) -> None:
        self.truncated += cut
        if cut and not self._warned:
            self._warned = True
            print(
                f"reward model: {cut} conversation(s) longer than reward_model.max_length={self.max_length} tokens "
                "were cut to their last max_length tokens (raise it to score them whole)",
                file=sys.stderr,
                flush=True,
            )
