"""Configuration of the SGLang rollout engine (``rollout.sglang.*``) and the pure decisions derived from it.

Written against SGLang ≥ 0.5 (HTTP server of ``python -m sglang.launch_server``) and ``sglang_router`` ≥ 0.1.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from spin_megatron.errors import ConfigError

SYNC_MODES = ("auto", "colocated", "disaggregated")
ROUTER_POLICIES = ("round_robin", "cache_aware", "random", "power_of_two")
SERVER_DTYPES = ("auto", "bfloat16", "float16", "float32")
LAUNCHERS = ("local", "ray")
RAY_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")

ResolvedSyncMode = Literal["colocated", "disaggregated"]

_KEY = "rollout.sglang"


def _fail(field: str, requirement: str, value: object) -> ConfigError:
    return ConfigError(f"{_KEY}.{field} {requirement}; got {value!r}")


def _check_port(field: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise _fail(field, "must be a TCP port in [1, 65535]", port)


@dataclass(kw_only=True)
class SGLangConfig:
    """How to start (or find) the SGLang servers and how to talk to them."""

    model_path: str = ""  # HF checkpoint the launched servers load (not needed with `urls`)
    num_engines: int = 1  # servers to launch; each holds a full model copy (data parallel)
    tp_size: int = 1  # tensor-parallel GPUs per server (must match attached servers too)
    gpu_ids: tuple[int, ...] = ()  # physical GPUs of launched servers, tp_size each, in order; () = 0..N-1
    host: str = "127.0.0.1"  # interface the launched servers (and router) bind to
    base_port: int = 30000  # server i listens on base_port + i
    mem_fraction_static: float = 0.8  # fraction of GPU memory SGLang reserves for weights + KV cache
    enable_memory_saver: bool = False  # colocated mode: lets sleep()/wake() release and resume GPU memory
    skip_tokenizer_init: bool = True  # token ids in and out; no tokenizer needed, no response text
    dtype: str = "auto"  # --dtype of the servers
    random_seed: int | None = None  # --random-seed of the servers (None: SGLang's default)
    enable_deterministic_inference: bool = False  # needed for SGLang to honour per-request sampling seeds
    urls: tuple[str, ...] = ()  # attach to these running servers instead of launching (e.g. http://h:30000)
    use_router: bool = False  # put `sglang_router` in front of the servers and send /generate through it
    router_port: int = 31000  # port of the router
    # the router's Prometheus metrics port; 0: a free one picked at launch (sglang_router's own default, 29000,
    # is fixed: a second router on the host would fail to start)
    router_metrics_port: int = 0
    router_policy: str = "round_robin"  # load-balancing policy of the router
    health_timeout_s: float = 900.0  # how long a server (or the router) may take to answer /health with 200
    request_timeout_s: float = 600.0  # timeout of one HTTP request (a generation, a weight bucket)
    max_inflight_requests: int = 64  # generation requests in flight at once, over all servers
    sync_mode: str = "auto"  # colocated (CUDA IPC) | disaggregated (NCCL) | auto (see resolve_sync_mode)
    # disaggregated: where the servers reach the trainer's end of the weight-update group. "": 127.0.0.1 for
    # servers on this host, the Ray node address under Ray, else this host's address on the route to the servers
    weight_sync_master_address: str = ""
    weight_sync_master_port: int = (
        0  # disaggregated: rendezvous port (0: a free one; replica r uses port + r)
    )
    log_dir: str = ""  # per-server log files go here ("" = a fresh temporary directory)
    extra_server_args: tuple[str, ...] = ()  # appended verbatim to every launch_server command line
    extra_server_env: dict[str, str] = field(default_factory=dict)  # added to launched servers' environment
    python_executable: str = ""  # interpreter that runs the servers ("" = the trainer's own)
    # Where launched servers run: `local` = processes on the trainer's node (GPUs from gpu_ids), `ray` = Ray
    # actors on a Ray cluster's GPUs (disaggregated: separate nodes), one placement-group bundle per server.
    launcher: str = "local"
    ray_address: str = (
        "auto"  # ray.init(address=...): auto (RAY_ADDRESS or the local node's cluster) | host:port
    )
    ray_namespace: str = "spin_megatron"  # Ray namespace of the server actors and placement groups
    ray_placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD over the bundles
    ray_cpus_per_engine: float = 1.0  # CPUs reserved with each server's tp_size GPUs

    def __post_init__(self):
        for name in ("urls", "gpu_ids", "extra_server_args"):
            # Hydra/OmegaConf hand lists over; the engine treats these as immutable tuples.
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(
            self, "extra_server_env", {str(k): str(v) for k, v in dict(self.extra_server_env).items()}
        )
        self._check_counts()
        self._check_ports()
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise _fail(
                "mem_fraction_static", "must be in the open interval (0, 1)", self.mem_fraction_static
            )
        for name in ("health_timeout_s", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise _fail(name, "must be > 0 seconds", getattr(self, name))
        choices = {"sync_mode": SYNC_MODES, "router_policy": ROUTER_POLICIES, "dtype": SERVER_DTYPES}
        choices |= {"launcher": LAUNCHERS, "ray_placement_strategy": RAY_STRATEGIES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise _fail(name, f"must be one of {', '.join(map(repr, allowed))}", getattr(self, name))
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise _fail("urls", "must be full server addresses such as 'http://127.0.0.1:30000'", url)
        if self.launcher == "ray":
            self._check_ray()

    def _check_ray(self) -> None:
        """Ray chooses the servers' nodes, GPUs and ports: the options that pin them locally conflict."""
        if self.urls:
            raise _fail("launcher", "launches servers, which attaching to `urls` does not: drop one", "ray")
        if self.gpu_ids:
            raise _fail(
                "gpu_ids", "must be empty with launcher=ray (Ray assigns each server its GPUs)", self.gpu_ids
            )
        if self.sync_mode == "colocated":
            raise _fail(
                "sync_mode",
                "cannot be colocated with launcher=ray: Ray places the servers on GPUs of their own; use "
                "disaggregated or auto (or launcher=local to share the trainer's GPUs)",
                self.sync_mode,
            )
        if not self.ray_cpus_per_engine > 0:
            raise _fail("ray_cpus_per_engine", "must be > 0", self.ray_cpus_per_engine)

    def _check_counts(self) -> None:
        for name in ("num_engines", "tp_size", "max_inflight_requests"):
            if getattr(self, name) < 1:
                raise _fail(name, "must be ≥ 1", getattr(self, name))
        if self.urls and self.num_engines not in (1, len(self.urls)):
            raise _fail(
                "num_engines",
                f"must be 1 or len(urls)={len(self.urls)} when urls are given",
                self.num_engines,
            )
        if self.gpu_ids:
            if len(self.gpu_ids) != self.num_engines * self.tp_size:
                raise _fail(
                    "gpu_ids",
                    f"must list num_engines × tp_size = {self.num_engines * self.tp_size} GPUs (or be empty)",
                    self.gpu_ids,
                )
            if len(set(self.gpu_ids)) != len(self.gpu_ids) or min(self.gpu_ids) < 0:
                raise _fail("gpu_ids", "must be distinct non-negative GPU indices", self.gpu_ids)

    def _check_ports(self) -> None:
        _check_port("base_port", self.base_port)
        _check_port("base_port", self.base_port + self.num_engines - 1)
        _check_port("router_port", self.router_port)
        if self.router_metrics_port:
            _check_port("router_metrics_port", self.router_metrics_port)
        if (
            not self.urls
            and self.use_router
            and self.base_port <= self.router_port < self.base_port + self.num_engines
        ):
            raise _fail(
                "router_port",
                f"must differ from the server ports starting at base_port={self.base_port}",
                self.router_port,
            )
        if self.weight_sync_master_port != 0:
            _check_port("weight_sync_master_port", self.weight_sync_master_port)

    def check_server_source(self) -> None:
        """Launching needs a checkpoint. Checked when the engine starts, not in ``__post_init__``, so that a
        default config can exist (an unused section, or before the trainer fills in ``model_path``)."""
        if not self.urls and not self.model_path:
            raise ConfigError(
                f"{_KEY}.model_path is required to launch SGLang servers (or give {_KEY}.urls to attach to "
                "running ones)"
            )

    def check_python(self) -> None:
        """The interpreter that launches local servers (and the router) exists: checked before any process group,
        so a typo is one line, not a traceback from a rank. (Ray runs it on its nodes: not checked here.)"""
        python = self.python_executable
        if python and self.launches_servers and self.launcher == "local" and shutil.which(python) is None:
            raise ConfigError(
                f"{_KEY}.python_executable={python!r} is not an executable file: point it at a Python with SGLang "
                "installed, or leave it empty to use this one"
            )

    @property
    def launches_servers(self) -> bool:
        return not self.urls

    @property
    def engine_count(self) -> int:
        return len(self.urls) if self.urls else self.num_engines


def engine_gpu_groups(config: SGLangConfig) -> list[tuple[int, ...]]:
    """Physical GPU ids of each launched server: ``tp_size`` consecutive ``gpu_ids`` (default 0..N-1)."""
    gpus = config.gpu_ids or tuple(range(config.num_engines * config.tp_size))
    return [gpus[i * config.tp_size : (i + 1) * config.tp_size] for i in range(config.num_engines)]


def engine_urls(config: SGLangConfig) -> list[str]:
    """Where the servers answer: the given ``urls``, or ``http://host:base_port+i`` for launched ones."""
    if config.urls:
        return [url.rstrip("/") for url in config.urls]
    return [f"http://{config.host}:{config.base_port + i}" for i in range(config.num_engines)]


def resolve_sync_mode(config: SGLangConfig, trainer_gpu_ids: Sequence[int] | None = None) -> ResolvedSyncMode:
    """``auto`` → disaggregated for Ray-placed servers; colocated when the servers release memory for training
    (memory saver) or when launched servers share a GPU with the trainer; otherwise disaggregated. With
    attached servers the GPUs are unknown, so only ``enable_memory_saver`` decides."""
    if config.sync_mode != "auto":
        return config.sync_mode  # type: ignore[return-value]
    if config.launcher == "ray":
        return "disaggregated"  # on Ray's GPUs, never the trainer's (checked in SGLangConfig)
    if config.enable_memory_saver:
        return "colocated"
    if config.launches_servers and trainer_gpu_ids is not None:
        engine_gpus = {gpu for group in engine_gpu_groups(config) for gpu in group}
        if engine_gpus & set(trainer_gpu_ids):
            return "colocated"
    return "disaggregated"
