"""Configuration of the reward model (``reward_model.*``): who scores the samples and how its score makes pairs."""

from __future__ import annotations

import math
from dataclasses import dataclass

from spin_megatron.errors import ConfigError

BACKENDS = ("hf", "sglang", "judge")
COMBINES = ("model", "rule_then_model", "weighted")
DTYPES = ("float32", "bfloat16", "float16")


def _fail(key: str, requirement: str, value: object) -> ConfigError:
    return ConfigError(f"reward_model.{key} {requirement}; got {value!r}")


@dataclass(kw_only=True)
class RewardModelConfig:
    """A reward model that scores (prompt, response) conversations (online mode). Off while ``path`` and
    ``judge`` are both unset: then the rule reward ``algorithm.reward`` alone decides chosen vs rejected."""

    # HF directory of an AutoModelForSequenceClassification-style reward model with a scalar head (num_labels=1),
    # e.g. Skywork/Skywork-Reward-V2-Llama-3.1-8B (a local copy: nothing is downloaded)
    path: str | None = None
    # hf: transformers on the replica's engine rank (CPU default) | sglang: served by SGLang servers
    # (reward_model.sglang.*) | judge: a pairwise judge plug-in (reward_model.judge; rollout.n=2)
    backend: str = "hf"
    tokenizer_path: str | None = (
        None  # the reward model's tokenizer (None: path); may differ from the policy's
    )
    # the Jinja chat template that renders prompt + response for the reward model: a template string or a file
    # ending in .jinja; None: the reward model tokenizer's own
    chat_template: str | None = None
    max_length: int = 4096  # reward-model tokens per conversation; longer ones keep their last max_length
    micro_batch_size: int = 8  # conversations per forward (sorted by length, so padding stays small)
    dtype: str = "float32"  # float32 | bfloat16 | float16 (hf backend; CPU needs float32 or bfloat16)
    device: str = "auto"  # hf backend: auto (the trainer's device) | cpu | cuda
    # how the model's score and the rule reward (algorithm.reward; none: off) make the ranking score:
    # model: the model's score alone (the rule, if any, is logged) | rule_then_model: the rule decides, the
    # model orders samples the rule ties | weighted: rule_weight·rule + model_weight·model
    combine: str = "model"
    rule_weight: float = 1.0
    model_weight: float = 1.0
    # near-ties: a prompt whose best and worst model scores differ by at most this is tied (algorithm.tie_policy
    # decides: drop or keep); applies to the combined score under combine=model|weighted
    margin: float = 0.0
    judge: str | None = None  # backend=judge: 'package.module:factory', factory(cfg) → a PairwiseJudge

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise _fail("backend", f"must be one of {', '.join(BACKENDS)}", self.backend)
        if self.combine not in COMBINES:
            raise _fail("combine", f"must be one of {', '.join(COMBINES)}", self.combine)
        if self.dtype not in DTYPES:
            raise _fail("dtype", f"must be one of {', '.join(DTYPES)}", self.dtype)
        if self.device not in ("auto", "cpu", "cuda"):
            raise _fail("device", "must be auto, cpu or cuda", self.device)
        for key in ("max_length", "micro_batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _fail(key, "must be an integer ≥ 1", value)
        for key in ("rule_weight", "model_weight", "margin"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise _fail(key, "must be a finite number ≥ 0", value)
        if self.backend == "judge":
            if not self.judge or ":" not in self.judge:
                raise _fail(
                    "judge", "must be 'package.module:factory' with reward_model.backend=judge", self.judge
                )
        elif self.backend != "hf" and self.path is None:
            raise _fail(
                "path",
                f"is needed by reward_model.backend={self.backend} (the model and its tokenizer)",
                None,
            )
        elif self.judge is not None:
            raise ConfigError(
                f"reward_model.judge={self.judge!r} is used by reward_model.backend=judge only; set the backend or "
                "remove the judge"
            )

    @property
    def enabled(self) -> bool:
        return self.path is not None or self.backend == "judge"
