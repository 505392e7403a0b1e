"""SGLang servers placed and tracked by Ray (``rollout.sglang.launcher=ray``): the disaggregated fleet.

The trainer (a torchrun rank, a Ray *driver*) reserves one placement-group bundle of ``tp_size`` GPUs per
server, so Ray either places the whole fleet or none of it, then starts one :class:`SGLangServerActor` in each
bundle. The actor launches ``python -m sglang.launch_server`` on its node, fenced to the GPUs Ray gave it
(Ray sets the actor's ``CUDA_VISIBLE_DEVICES``), on a free port of that node's address, and answers for the
process: is it alive, what did it log, stop it. From then on the fleet is addressed by URL like attached
servers: /generate, the NCCL weight-update group (the trainer is rank 0 of it, the servers join from their
nodes) and the router all work unchanged.

Lifetime: the actors belong to the trainer's Ray job. ``shutdown()`` stops each server's process group through
its actor, then kills the actors and removes the placement group. If the trainer dies first, Ray kills its
actors, and each server gets SIGKILL with its actor (``PR_SET_PDEATHSIG``); SGLang's scheduler processes
watch their parent the same way.

The Ray cluster is started outside the trainer (``ray start``; ``tools/launch/spin.sbatch`` does it with
``SPIN_ROLLOUT_NODES``). The trainer connects with ``ray_address`` (default ``auto``: ``RAY_ADDRESS``, else
the cluster of this node) and keeps retrying for ``health_timeout_s`` while the cluster is still starting.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from spin_megatron.errors import ConfigError
from spin_megatron.rollout.sglang.config import SGLangConfig
from spin_megatron.rollout.sglang.protocol import SGLangServerError, build_server_command
from spin_megatron.rollout.sglang.server import HttpClient, ManagedProcess, ServerFleet

CONNECT_RETRY_S = 2.0
ACTOR_CALL_TIMEOUT_S = 60.0
PORT_SEARCH_SPAN = 2000


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            "rollout.sglang.launcher=ray needs Ray on the trainer and on every Ray node: pip install "
            "'ray>=2.40' (or 'spin-megatron[ray]'); or use launcher=local / attach with rollout.sglang.urls"
        ) from exc
    return ray


def gcs_endpoint(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of an explicit ``host:port`` Ray address (``RAY_ADDRESS`` for ``auto``), else None."""
    if address in ("", "auto"):
        address = os.environ.get("RAY_ADDRESS", "")
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return None  # auto without RAY_ADDRESS (this node's cluster), local, or a ray:// client address
    return host, int(port)


def connect_ray(config: SGLangConfig):
    """``ray.init`` against ``config.ray_address`` (reused when this process is connected already).

    The head may still be starting (spin.sbatch starts Ray and the trainer at once): its GCS port is polled
    until it accepts connections or ``health_timeout_s`` passes, because ``ray.init`` against an address
    nobody answers blocks for minutes in Ray's own retries.
    """
    ray = import_ray()
    if ray.is_initialized():
        return ray
    endpoint = gcs_endpoint(config.ray_address)
    deadline = time.monotonic() + config.health_timeout_s
    fix = (
        "start one with `ray start --head` (or SPIN_ROLLOUT_NODES=k with tools/launch/spin.sbatch), or point "
        "rollout.sglang.ray_address (or RAY_ADDRESS) at its head"
    )
    while endpoint is not None:
        try:
            with socket.create_connection(endpoint, timeout=CONNECT_RETRY_S):
                break
        except OSError as exc:
            if time.monotonic() + CONNECT_RETRY_S > deadline:
                raise SGLangServerError(
                    f"no Ray cluster answers at {endpoint[0]}:{endpoint[1]} (rollout.sglang.ray_address="
                    f"{config.ray_address!r}) within {config.health_timeout_s:g} s ({exc}); {fix}"
                ) from exc
            time.sleep(CONNECT_RETRY_S)
    try:
        ray.init(address=config.ray_address or None, namespace=config.ray_namespace, log_to_driver=False)
    except ConnectionError as exc:
        raise SGLangServerError(
            f"could not connect to the Ray cluster (rollout.sglang.ray_address={config.ray_address!r}): "
            f"{str(exc).splitlines()[0]}; {fix}"
        ) from exc
    return ray


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str, start: int) -> int:
    """The first port ≥ ``start`` this node can bind on ``host`` (below the ephemeral range by default)."""
    for port in range(start, min(start + PORT_SEARCH_SPAN, 65536)):
        if _bindable(host, port):
            return port
    raise SGLangServerError(f"no free TCP port on {host} in [{start}, {start + PORT_SEARCH_SPAN})")


class SGLangServerActor:
    """One SGLang server on the node and GPUs Ray chose for this actor (wrapped by ``ray.remote`` at use)."""

    def __init__(self, config: SGLangConfig, index: int, log_dir: str):
        self.config, self.index = config, index
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="spin_sglang_logs_"))
        self.process: ManagedProcess | None = None
        self.url = ""

    def start(self) -> dict[str, Any]:
        """Launch the server (not waiting for it to load); where it answers and what it runs on."""
        import ray

        host = ray.util.get_node_ip_address()
        port = free_port(host, self.config.base_port + self.index)
        # Index 0 of a one-server config: this server's own host, port and (visible) GPUs.
        single = replace(self.config, host=host, base_port=port, num_engines=1, gpu_ids=())
        command = build_server_command(single, 0, colocated=False)
        env = dict(os.environ)  # Ray set CUDA_VISIBLE_DEVICES to this actor's GPUs
        log = self.log_dir / f"sglang_server_{self.index}.log"
        self.process = ManagedProcess(
            f"SGLang server {self.index} on {host}", command, env, log, die_with_parent=True
        )
        self.url = f"http://{host}:{port}"
        return {
            "url": self.url,
            "node_ip": host,
            "gpus": env.get("CUDA_VISIBLE_DEVICES", ""),
            "pid": self.process.pid,
            "log": str(log),
        }

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.exit_code()

    def describe(self) -> str:
        return "not started" if self.process is None else self.process.describe()

    def terminate(self, grace_s: float = 20.0) -> None:
        if self.process is not None:
            self.process.terminate(grace_s)


class ActorGone(SGLangServerError):
    """The Ray actor hosting a server has died (and, by ``PR_SET_PDEATHSIG``, the server with it)."""


class RemoteServerProcess:
    """The :class:`ManagedProcess` interface the fleet uses, for a server that lives in a Ray actor."""

    def __init__(self, ray, actor, info: dict[str, Any], index: int):
        self._ray, self.actor, self.info = ray, actor, info
        self.name = f"SGLang server {index} (Ray actor on {info['node_ip']}, GPUs {info['gpus'] or '?'})"
        self.pid = info["pid"]
        self._gone: str | None = None  # why the actor cannot be asked any more

    def _call(self, method: str, *args):
        """Ask the actor; :class:`ActorGone` once it has died, :class:`SGLangServerError` if it is only slow."""
        from ray.exceptions import GetTimeoutError, RayActorError

        if self._gone is not None:
            raise ActorGone(f"the Ray actor of {self.name} is gone ({self._gone})")
        try:
            return self._ray.get(getattr(self.actor, method).remote(*args), timeout=ACTOR_CALL_TIMEOUT_S)
        except RayActorError as exc:  # the actor (or its node) died
            self._gone = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            raise ActorGone(f"the Ray actor of {self.name} is gone ({self._gone})") from exc
        except GetTimeoutError as exc:
            raise SGLangServerError(
                f"the Ray actor of {self.name} did not answer {method}() within {ACTOR_CALL_TIMEOUT_S:g} s"
            ) from exc

    def exit_code(self) -> int | None:
        try:
            return self._call("exit_code")
        except ActorGone:
            return -1  # its actor died: PR_SET_PDEATHSIG took the server with it

    def describe(self) -> str:
        try:
            return f"{self.name}: {self._call('describe')}"
        except ActorGone as exc:
            return f"{exc}; its log was {self.info['log']} on {self.info['node_ip']}"

    def terminate(self, grace_s: float = 20.0) -> None:
        try:
            self._call("terminate", grace_s)
        except ActorGone:
            return  # nothing left to stop: the actor's death took the server down


class RayServerFleet(ServerFleet):
    """A :class:`ServerFleet` whose servers are Ray actors placed in one placement group."""

    def __init__(self, config: SGLangConfig, *, colocated: bool, client: HttpClient):
        super().__init__(config, colocated=colocated, client=client)
        self.urls = []  # known once the actors have picked their nodes and ports
        self.placement_group = None
        self.actors: list = []
        self.servers: list[dict[str, Any]] = []  # what each actor reported: url, node_ip, gpus, pid, log

    def _launch_servers(self) -> None:
        ray = connect_ray(self.config)
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        config = self.config
        bundle = {"GPU": float(config.tp_size), "CPU": float(config.ray_cpus_per_engine)}
        self._check_capacity(ray, bundle)
        name = f"spin-sglang-{uuid.uuid4().hex[:8]}"
        self.placement_group = placement_group(
            [dict(bundle) for _ in range(config.num_engines)], strategy=config.ray_placement_strategy,
            name=name,
        )  # fmt: skip
        ready, _ = ray.wait([self.placement_group.ready()], timeout=config.health_timeout_s)
        if not ready:
            raise SGLangServerError(
                f"Ray could not place {config.num_engines} SGLang server(s) × {config.tp_size} GPU(s) "
                f"({config.ray_placement_strategy}) within {config.health_timeout_s:g} s; free now: "
                f"{_gpus_cpus(ray.available_resources())} of {_gpus_cpus(ray.cluster_resources())}. Free GPUs "
                "(another job holds them), lower rollout.sglang.num_engines/tp_size, or use strategy=SPREAD/PACK"
            )
        actor_class = ray.remote(SGLangServerActor)
        log_dir = str(self.log_dir) if self.log_dir else ""
        for index in range(config.num_engines):
            strategy = PlacementGroupSchedulingStrategy(
                placement_group=self.placement_group, placement_group_bundle_index=index
            )
            self.actors.append(
                actor_class.options(
                    name=f"{name}-{index}", num_gpus=config.tp_size, num_cpus=config.ray_cpus_per_engine,
                    scheduling_strategy=strategy, max_restarts=0,
                ).remote(config, index, log_dir)
            )  # fmt: skip
        self.servers = ray.get([actor.start.remote() for actor in self.actors], timeout=ACTOR_CALL_TIMEOUT_S)
        self.urls = [info["url"] for info in self.servers]
        for index, (actor, info) in enumerate(zip(self.actors, self.servers, strict=True)):
            self.processes[info["url"]] = RemoteServerProcess(ray, actor, info, index)

    def _check_capacity(self, ray, bundle: dict[str, float]) -> None:
        """Refuse at once what the whole cluster could never hold (waiting could not help)."""
        total = ray.cluster_resources()
        knob = {"GPU": "tp_size", "CPU": "ray_cpus_per_engine"}
        for resource, per_server in bundle.items():
            need, have = per_server * self.config.num_engines, total.get(resource, 0.0)
            if have < need:
                raise SGLangServerError(
                    f"the Ray cluster has {have:g} {resource}(s) in all but rollout.sglang.num_engines="
                    f"{self.config.num_engines} × {knob[resource]}={per_server:g} need {need:g}: add Ray nodes "
                    "or lower them"
                )

    def shutdown(self) -> None:
        """Stop the router and each server's process group (via its actor), then the actors, then the group."""
        try:
            super().shutdown()
        finally:
            ray = import_ray()
            if ray.is_initialized():
                for actor in self.actors:
                    ray.kill(actor)  # a no-op for an actor that died already
                if self.placement_group is not None:
                    from ray.util.placement_group import remove_placement_group

                    remove_placement_group(self.placement_group)
            self.actors, self.placement_group, self.urls = [], None, []


def _gpus_cpus(resources: dict[str, float]) -> str:
    return f"{resources.get('GPU', 0.0):g} GPU / {resources.get('CPU', 0.0):g} CPU"
