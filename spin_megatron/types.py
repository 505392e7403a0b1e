"""Data records shared by the engines and the pure maths: a rollout :class:`Sample` and its finish reason.

They live here, beside the dataset's ``PromptExample`` (data.py), so that ``pairs.py`` and ``rewards.py`` need
no engine module; ``spin_megatron.rollout.protocol`` re-exports them for the engines.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length"]


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
    reward: float | None = None  # the ranking score pairs are built on
    # with a reward model (reward_model.*): its score and the rule's (algorithm.reward), kept apart for logging;
    # ``reward_tiebreak`` ranks samples of equal ``reward`` (reward_model.combine=rule_then_model)
    rule_reward: float | None = None
    model_reward: float | None = None
    reward_tiebreak: float | None = None
    # scores of algorithm.reward_metrics by name: logged only, never used for pairing
    metric_rewards: dict[str, float] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)  # e.g. the dataset row (gold answer) the reward needs

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"
