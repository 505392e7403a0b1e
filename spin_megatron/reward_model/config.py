"""Configuration of the reward model (``reward_model.*``): who scores the samples and how its score makes pairs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from spin_megatron.errors import ConfigError
from spin_megatron.rollout.sglang.config import SERVER_DTYPES

_KEY = "reward_model.sglang"

BACKENDS = ("hf", "sglang", "judge")
COMBINES = ("model", "rule_then_model", "weighted")
DTYPES = ("float32", "bfloat16", "float16")


def _fail(key: str, requirement: str, value: object) -> ConfigError:
    return ConfigError(f"reward_model.{key} {requirement}; got {value!r}")


def _sglang_fail(name: str, requirement: str, value: object) -> ConfigError:
    return ConfigError(f"{_KEY}.{name} {requirement}; got {value!r}")


def _check_port(name: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise _sglang_fail(name, "must be a TCP port in [1, 65535]", port)


@dataclass(kw_only=True)
class RewardSGLangConfig:
    """``reward_model.sglang.*``: where the reward-model servers run (launched from ``reward_model.path``, or
    attached to by ``urls``) and how they are talked to."""

    urls: tuple[str, ...] = ()  # attach to these running reward servers (http://h:32000) instead of launching
    num_engines: int = 1  # servers to launch, each with a full model copy; micro-batches go round-robin
    tp_size: int = 1  # tensor-parallel GPUs per launched server
    gpu_ids: tuple[int, ...] = ()  # physical GPUs of launched servers, tp_size each, in order; () = 0..N-1
    host: str = "127.0.0.1"  # interface launched servers bind to
    base_port: int = 32000  # launched server i listens on base_port + i (rollout servers default to 30000)
    mem_fraction_static: float = 0.8  # fraction of GPU memory each server reserves (lower it to share a GPU)
    dtype: str = "auto"  # --dtype of launched servers: auto | bfloat16 | float16 | float32
    skip_tokenizer_init: bool = True  # token ids in: servers need no tokenizer (ours renders, tokenizes)
    random_seed: int = 0  # --random-seed of launched servers
    timeout_s: float = 300.0  # timeout of one /classify request (one micro-batch)
    health_timeout_s: float = 900.0  # how long a launched server may take to answer /health with 200
    max_inflight_requests: int = 8  # /classify requests in flight at once, over all servers
    log_dir: str = ""  # per-server log files ("" = a fresh temporary directory)
    extra_server_args: tuple[str, ...] = ()  # appended verbatim to every launch_server command line
    extra_server_env: dict[str, str] = field(default_factory=dict)  # added to launched servers' environment
    python_executable: str = ""  # interpreter that runs the servers ("" = the trainer's own)

    def __post_init__(self):
        for name in ("urls", "gpu_ids", "extra_server_args"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # Hydra hands lists over
        self.extra_server_env = {str(k): str(v) for k, v in dict(self.extra_server_env).items()}
        for name in ("num_engines", "tp_size", "max_inflight_requests"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _sglang_fail(name, "must be an integer ≥ 1", value)
        for name in ("timeout_s", "health_timeout_s"):
            if not getattr(self, name) > 0:
                raise _sglang_fail(name, "must be > 0 seconds", getattr(self, name))
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise _sglang_fail(
                "mem_fraction_static", "must be in the open interval (0, 1)", self.mem_fraction_static
            )
        if self.dtype not in SERVER_DTYPES:
            raise _sglang_fail("dtype", f"must be one of {', '.join(map(repr, SERVER_DTYPES))}", self.dtype)
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise _sglang_fail(
                    "urls", "must be full server addresses such as 'http://127.0.0.1:32000'", url
                )
        if self.urls and self.num_engines not in (1, len(self.urls)):
            raise _sglang_fail(
                "num_engines",
                f"must be 1 or len(urls)={len(self.urls)} when urls are given",
                self.num_engines,
            )
        _check_port("base_port", self.base_port)
        _check_port("base_port", self.base_port + self.num_engines - 1)
        if self.gpu_ids:
            if len(self.gpu_ids) != self.num_engines * self.tp_size:
                raise _sglang_fail(
                    "gpu_ids",
                    f"must list num_engines × tp_size = {self.num_engines * self.tp_size} GPUs (or be empty)",
                    self.gpu_ids,
                )
            if len(set(self.gpu_ids)) != len(self.gpu_ids) or min(self.gpu_ids) < 0:
                raise _sglang_fail("gpu_ids", "must be distinct non-negative GPU indices", self.gpu_ids)

    @property
    def launches_servers(self) -> bool:
        return not self.urls

    def server_urls(self) -> list[str]:
        """The given ``urls``, or ``http://host:base_port+i`` of the servers to launch."""
        if self.urls:
            return [url.rstrip("/") for url in self.urls]
        return [f"http://{self.host}:{self.base_port + i}" for i in range(self.num_engines)]


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
    sglang: RewardSGLangConfig = field(default_factory=RewardSGLangConfig)  # backend=sglang: the servers

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
