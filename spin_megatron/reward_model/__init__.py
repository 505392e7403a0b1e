"""Preference labels from a reward model (``reward_model.*``), alone or with the rule reward.

On the replica's engine rank, after the rule reward (``algorithm.reward``) has scored the samples,
:class:`RewardModelScoring` renders every (prompt, response) as a conversation, has the backend score them in
batches, and sets on each sample its ``model_reward``, its ``rule_reward`` and the ranking ``reward`` (and
``reward_tiebreak``) that pairing uses, as ``reward_model.combine`` says:

- ``model``: the model's score; the rule, when set, is only logged (and its agreement with the model);
- ``rule_then_model``: the rule's score; the model orders samples the rule ties (e.g. two correct answers);
- ``weighted``: ``rule_weight · rule + model_weight · model``.

Backends (``reward_model.backend``): ``hf`` (transformers in this process, :mod:`.hf`), ``sglang`` (SGLang
servers, :mod:`.sglang`) and ``judge`` (a pairwise judge plug-in, n = 2: its probability that the first answer is
better is the first's model score, one minus it the second's).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Hashable, Mapping, Sequence

from spin_megatron.errors import ConfigError
from spin_megatron.reward_model.base import Conversation, PairwiseJudge, RewardModelError, RewardScorer
from spin_megatron.reward_model.config import RewardModelConfig
from spin_megatron.types import Sample

__all__ = [
    "Conversation",
    "PairwiseJudge",
    "RewardModelConfig",
    "RewardModelError",
    "RewardModelScoring",
    "RewardScorer",
    "build_reward_model",
    "build_reward_scoring",
    "load_judge",
]


def judge_factory(cfg: RewardModelConfig):
    """The callable ``reward_model.judge`` ('package.module:factory') names (imported, not called)."""
    module, _, name = cfg.judge.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name, None)
    except ImportError as exc:
        raise ConfigError(f"reward_model.judge={cfg.judge}: cannot import {module!r} ({exc})") from None
    if not callable(factory):
        raise ConfigError(f"reward_model.judge={cfg.judge}: {module!r} has no factory {name!r}")
    return factory


def load_judge(cfg: RewardModelConfig) -> PairwiseJudge:
    """``reward_model.judge`` ('package.module:factory') called with the config."""
    judge = judge_factory(cfg)(cfg)
    if not callable(getattr(judge, "judge", None)):
        raise ConfigError(
            f"reward_model.judge={cfg.judge} returned {type(judge).__name__}, which has no judge(prompts, first, "
            "second) method"
        )
    return judge


def build_reward_model(cfg: RewardModelConfig, device: str) -> RewardScorer | PairwiseJudge:
    """The configured backend (``device``: the trainer's, used by the hf backend when ``device=auto``)."""
    if cfg.backend == "judge":
        return load_judge(cfg)
    if cfg.backend == "sglang":
        from spin_megatron.reward_model.sglang import build_sglang_reward_model

        return build_sglang_reward_model(cfg)
    from spin_megatron.reward_model.hf import HFRewardModel

    return HFRewardModel(
        cfg.path,
        tokenizer_path=cfg.tokenizer_path,
        chat_template=cfg.chat_template,
        max_length=cfg.max_length,
        micro_batch_size=cfg.micro_batch_size,
        dtype=cfg.dtype,
        device=device if cfg.device == "auto" else cfg.device,
    )


class RewardModelScoring:
    """Scores samples with the reward model and combines its score with the rule reward."""

    def __init__(
        self,
        cfg: RewardModelConfig,
        model: RewardScorer | PairwiseJudge,
        conversation: Callable[[Mapping], Conversation],
        *,
        has_rule: bool,
    ):
        self.cfg, self.model, self.conversation, self.has_rule = cfg, model, conversation, has_rule

    def apply(
        self,
        samples: Sequence[Sample],
        rows: Mapping[Hashable, Mapping],
        response_text: Callable[[Sample], str],
    ) -> None:
        """Set ``model_reward``, ``rule_reward``, ``reward`` and ``reward_tiebreak`` of every sample (the rule
        reward, if any, already in ``reward``)."""
        if not samples:
            return
        prompts = {pid: self.conversation(rows[pid]) for pid in {s.prompt_id for s in samples}}
        if self.cfg.backend == "judge":
            scores = self._judged(samples, prompts, response_text)
        else:
            conversations = [
                [*prompts[s.prompt_id], {"role": "assistant", "content": response_text(s)}] for s in samples
            ]
            scores = self.model.score(conversations)
        if len(scores) != len(samples):
            raise RewardModelError(
                f"the reward model returned {len(scores)} scores for {len(samples)} samples"
            )
        for sample, score in zip(samples, scores, strict=True):
            if not isinstance(score, (int, float)) or not math.isfinite(score):
                raise RewardModelError(
                    f"the reward model scored prompt {sample.prompt_id!r}, sample {sample.sample_index} "
                    f"{score!r}: not a finite number"
                )
            self._combine(sample, float(score))

    def _combine(self, sample: Sample, model: float) -> None:
        rule = sample.reward if self.has_rule else None
        sample.rule_reward, sample.model_reward = rule, model
        if self.cfg.combine == "rule_then_model":
            sample.reward, sample.reward_tiebreak = rule, model
        elif self.cfg.combine == "weighted":
            sample.reward = self.cfg.rule_weight * rule + self.cfg.model_weight * model
        else:
            sample.reward = model

    def _judged(self, samples, prompts, response_text) -> list[float]:
        """n = 2: the judge's P(first better) is the first sample's score, 1 − it the second's."""
        groups: dict[Hashable, list[Sample]] = {}
        for sample in samples:
            groups.setdefault(sample.prompt_id, []).append(sample)
        ids = list(groups)
        for pid in ids:
            groups[pid].sort(key=lambda s: s.sample_index)
            if len(groups[pid]) != 2:
                raise RewardModelError(
                    f"a pairwise judge compares two answers; prompt {pid!r} has {len(groups[pid])} "
                    "(set rollout.n=2)"
                )
        probs = self.model.judge(
            [prompts[pid] for pid in ids],
            [response_text(groups[pid][0]) for pid in ids],
            [response_text(groups[pid][1]) for pid in ids],
        )
        if len(probs) != len(ids):
            raise RewardModelError(f"the judge returned {len(probs)} answers for {len(ids)} prompts")
        by_sample = {}
        for pid, p in zip(ids, probs, strict=True):
            if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise RewardModelError(
                    f"the judge returned {p!r} for prompt {pid!r}: not a probability in [0, 1]"
                )
            first, second = groups[pid]
            by_sample[id(first)], by_sample[id(second)] = float(p), 1.0 - float(p)
        return [by_sample[id(s)] for s in samples]

    def shutdown(self) -> None:
        shutdown = getattr(self.model, "shutdown", None)
        if shutdown is not None:
            shutdown()


def build_reward_scoring(cfg, device: str) -> RewardModelScoring:
    """The trainer's reward-model scoring (``cfg``: the whole Config), on the replica's engine rank."""
    import functools

    from spin_megatron.data import prompt_conversation

    return RewardModelScoring(
        cfg.reward_model,
        build_reward_model(cfg.reward_model, device),
        functools.partial(prompt_conversation, cfg=cfg.data),
        has_rule=cfg.algorithm.rule_reward is not None,
    )


def preflight_reward_model(cfg) -> None:
    """Checks before any process group starts (``cfg``: the whole Config): the judge plug-in imports; the reward
    model's folder has a config with a scalar head; its tokenizer renders a conversation of this run's shape."""
    rm = cfg.reward_model
    if not rm.enabled:
        return
    if rm.backend == "judge":
        judge_factory(rm)
        return
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from spin_megatron.reward_model.hf import load_reward_tokenizer, render, scalar_head_error

    config_file = Path(rm.path) / "config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"reward_model.path={rm.path} has no config.json: point it at a Hugging Face reward model folder"
        )
    config = json.loads(config_file.read_text())
    labels = config.get("num_labels", len(config.get("id2label") or {}) or 1)
    why = scalar_head_error(SimpleNamespace(architectures=config.get("architectures"), num_labels=labels))
    if why:
        raise ConfigError(f"reward_model.path={rm.path} is not a scalar reward model: {why}")
    source = rm.tokenizer_path or rm.path
    try:
        tokenizer = load_reward_tokenizer(source, rm.chat_template)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"reward_model: cannot load the tokenizer of {source} ({exc})") from None
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"reward_model: the tokenizer of {source} has no chat template to render prompt + response: set "
            "reward_model.chat_template (a Jinja template or a .jinja file)"
        )
    system = [] if cfg.data.system_prompt is None else [{"role": "system", "content": cfg.data.system_prompt}]
    probe = [[*system, {"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]]
    try:
        (ids,), _ = render(tokenizer, probe, rm.max_length)
    except Exception as exc:  # a template error of any kind (jinja raises its own types)
        raise ConfigError(
            f"reward_model: the chat template of {source} cannot render a (system,) user, assistant conversation "
            f"({type(exc).__name__}: {exc}); set reward_model.chat_template"
        ) from None
    if not ids:
        raise ConfigError(f"reward_model: the chat template of {source} renders a conversation as no tokens")
    if rm.backend == "sglang" and rm.sglang.launches_servers:
        from spin_megatron.reward_model.sglang_checkpoint import missing_head_bias

        why = missing_head_bias(rm.path)
        if why:
            raise ConfigError(why)
