"""``rollout.*``: the engine that samples (its SGLang section is ``rollout/sglang/config.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from spin_megatron.config.common import (
    _choice,
    _positive,
)
from spin_megatron.errors import ConfigError
from spin_megatron.rollout.sglang.config import SGLangConfig


@dataclass(kw_only=True)
class RolloutConfig:
    engine: str = "hf"  # hf (transformers in-process, CPU default) | sglang | replay | package.module:factory
    # samples per prompt; null: the mode's own (online 2: best vs worst; spin algorithm.pairs_per_prompt, 1: a
    # sample no pair uses would be generated for nothing)
    n: int | None = None
    temperature: float = 1.0  # sampling temperature (log-probs of samples are scored at it)
    top_p: float = 1.0  # nucleus sampling
    top_k: int = -1  # -1: off
    max_new_tokens: int = 256  # response length limit (finish_reason=length beyond)
    val_max_new_tokens: int | None = None  # greedy validation length (None: max_new_tokens)
    sync_every: int = (
        1  # algorithm.sample_from=policy: push policy weights into the engine every k rollout steps
    )
    sync_bucket_mb: int = 512  # weight-sync bucket size
    max_batch_size: int = 64  # hf engine: sequences decoded together
    hf_process: str = (
        "inline"  # hf engine: inline (in the trainer's process) | separate (a process of its own)
    )
    hf_threads: int = 0  # hf_process=separate: the engine process's torch threads (0: torch's default)
    dump_path: str | None = None  # write every step's samples to this jsonl
    replay_path: str | None = None  # engine=replay: serve samples from this dump
    timeout_s: float = 3600.0  # a generation call longer than this counts as a hung engine
    max_restarts: int = 2  # engine restarts (+ weight re-sync) per generation before the run saves and stops
    # 1: the next step's batch is generated while this step trains (one policy version old when sampling from the
    # policy; exact, staleness 0, when sampling from the reference); 0: generate, then train (spin_megatron/training/overlap.py)
    max_staleness: int = 0
    sglang: SGLangConfig = field(default_factory=SGLangConfig)  # engine=sglang: servers, sync mode, ...

    def __post_init__(self):
        if ":" not in self.engine:  # 'package.module:factory' plugs in a custom engine
            _choice("rollout.engine", self.engine, ("hf", "sglang", "replay"))
        _choice("rollout.hf_process", self.hf_process, ("inline", "separate"))
        _choice("rollout.max_staleness", self.max_staleness, (0, 1))
        _positive("rollout.hf_threads", self.hf_threads, zero_ok=True)
        _positive("rollout.timeout_s", self.timeout_s)
        _positive("rollout.max_restarts", self.max_restarts, zero_ok=True)
        if self.n is not None:
            _positive("rollout.n", self.n)
        _positive("rollout.temperature", self.temperature)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ConfigError(f"rollout.top_k must be -1 (off) or ≥ 1, got {self.top_k}")
        for key in ("max_new_tokens", "sync_every", "sync_bucket_mb", "max_batch_size"):
            _positive(f"rollout.{key}", getattr(self, key))
        if self.engine == "replay" and not self.replay_path:
            raise ConfigError(
                "rollout.engine=replay needs rollout.replay_path (a file written with rollout.dump_path)"
            )
