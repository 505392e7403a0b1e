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

from spin_megatron.errors import ConfigError, UserError
from spin_megatron.ports import port_free
from spin_megatron.rollout.sglang.config import SGLangConfig
from spin_megatron.rollout.sglang.protocol import SGLangServerError, build_server_command, build_server_env
from spin_megatron.rollout.sglang.server import HttpClient, ManagedProcess, ServerFleet

CONNECT_RETRY_S = 2.0
PLACEMENT_POLL_S = 1.0  # while a placement group is pending, how often the cluster is checked for lost nodes
ACTOR_CALL_TIMEOUT_S = 60.0
PORT_SEARCH_SPAN = 2000


class RayClusterError(SGLangServerError, UserError):
    """The Ray cluster cannot take the fleet: nobody answers, or its (alive) nodes could never hold it.

    A :class:`UserError`, so a trainer that cannot start its fleet says so in one line; a supervisor restarting a
    fleet treats it like any failed restart."""


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


def follow_token_auth() -> bool:
    """Use Ray's token authentication when a token is there and ``RAY_AUTH_MODE`` is unset; True if it is on.

    ``ray start --head`` switches token authentication on by itself when it finds a token
    (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``, which any local ``ray.init()``
    writes), but ``ray.init`` with an explicit address does not, and the head then refuses the driver after
    about 20 s ("InvalidAuthToken", surfacing as a ConnectionError). The trainer makes the head's choice with
    Ray's own rule (``tools/launch/ray_node.sh`` does the same for joining nodes); a ``RAY_AUTH_MODE`` set by the
    user always wins. Setting the variable alone is not enough once Ray is imported (its config is cached),
    hence Ray's helper, which refreshes it (Ray 2.5x; older Rays have no token authentication).
    """
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


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
                raise RayClusterError(
                    f"no Ray cluster answers at {endpoint[0]}:{endpoint[1]} (rollout.sglang.ray_address="
                    f"{config.ray_address!r}) within {config.health_timeout_s:g} s ({exc}); {fix}"
                ) from exc
            time.sleep(CONNECT_RETRY_S)
    token = follow_token_auth() if endpoint is not None else os.environ.get("RAY_AUTH_MODE") == "token"
    try:
        ray.init(address=config.ray_address or None, namespace=config.ray_namespace, log_to_driver=False)
    except ConnectionError as exc:
        auth = (
            f"; Ray token authentication is {'on' if token else 'off'} here (RAY_AUTH_MODE="
            f"{os.environ.get('RAY_AUTH_MODE', '')!r}): the head and every node must agree"
        )
        raise RayClusterError(
            f"could not connect to the Ray cluster (rollout.sglang.ray_address={config.ray_address!r}): "
            f"{str(exc).splitlines()[0]}{auth}; {fix}"
        ) from exc
    return ray


def free_port(host: str, start: int) -> int:
    """The first port ≥ ``start`` this node can bind on ``host`` (below the ephemeral range by default)."""
    for port in range(start, min(start + PORT_SEARCH_SPAN, 65536)):
        if port_free(host, port):
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
        # what a locally launched server gets, except CUDA_VISIBLE_DEVICES: Ray set it to this actor's GPUs
        env = build_server_env(single, 0, os.environ, colocated=False, fence_gpus=False)
        log = self.log_dir / f"sglang_server_{self.index}.log"
        self.process = ManagedProcess(
            f"SGLang server {self.index} on {host}", command, env, log, die_with_parent=True
        )
        self.url = f"http://{host}:{port}"
        return {
            "url": self.url,
            "node_ip": host,
            "node_id": ray.get_runtime_context().get_node_id(),  # nodes of one host share the IP
            "gpus": env.get("CUDA_VISIBLE_DEVICES", ""),
            "pid": self.process.pid,
            "log": str(log),
        }

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.exit_code()

    def describe(self) -> str:
        return "not started" if self.process is None else self.process.describe()

    def summary(self) -> str:
        return "not started" if self.process is None else self.process.summary()

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

    def summary(self) -> str:
        try:
            return f"{self.name}: {self._call('summary')} on {self.info['node_ip']}"
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
        self.servers: list[dict[str, Any]] = []  # each actor's url, node_ip, node_id, gpus, pid, log

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
        ready_ref, deadline = self.placement_group.ready(), time.monotonic() + config.health_timeout_s
        while not ray.wait([ready_ref], timeout=min(PLACEMENT_POLL_S, config.health_timeout_s))[0]:
            # A node lost while waiting (or lost just before, and only now marked dead by Ray) can make the
            # group unplaceable for good: say so now rather than after health_timeout_s.
            self._check_capacity(ray, bundle, waiting=True)
            if time.monotonic() >= deadline:
                raise SGLangServerError(
                    f"Ray could not place {config.num_engines} SGLang server(s) × {config.tp_size} GPU(s) "
                    f"({config.ray_placement_strategy}) within {config.health_timeout_s:g} s; free now: "
                    f"{_gpus_cpus(ray.available_resources())} of {_gpus_cpus(ray.cluster_resources())}. Free "
                    "GPUs (another job holds them), lower rollout.sglang.num_engines/tp_size, or use "
                    "strategy=SPREAD/PACK"
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

    def _check_capacity(self, ray, bundle: dict[str, float], *, waiting: bool = False) -> None:
        """Refuse at once what the cluster's alive nodes could never hold (waiting could not help): too few
        GPUs/CPUs in all, no node big enough for one server, or too few nodes for the placement strategy."""
        config, count = self.config, self.config.num_engines
        total = ray.cluster_resources()
        knob = {"GPU": "tp_size", "CPU": "ray_cpus_per_engine"}
        for resource, per_server in bundle.items():
            need, have = per_server * count, total.get(resource, 0.0)
            if have < need:
                raise RayClusterError(
                    f"the Ray cluster has {have:g} {resource}(s) in all but rollout.sglang.num_engines="
                    f"{count} × {knob[resource]}={per_server:g} need {need:g}: add Ray nodes or lower them"
                )
        # how many servers each alive node could hold if it were idle
        fits = [_servers_that_fit(node["Resources"], bundle) for node in ray.nodes() if node.get("Alive")]
        strategy = config.ray_placement_strategy
        holds = {
            "STRICT_SPREAD": sum(k >= 1 for k in fits),
            "STRICT_PACK": max(fits, default=0),
        }.get(strategy, sum(fits))
        if holds >= count:
            return
        per_server = f"{config.tp_size} GPU(s) + {config.ray_cpus_per_engine:g} CPU(s) per server"
        if strategy == "STRICT_SPREAD":
            what = (
                f"{holds} alive node(s) can hold a server ({per_server}) but STRICT_SPREAD puts each of the "
                f"{count} servers on a node of its own: add or restart Ray nodes, lower rollout.sglang.num_engines, "
                "or use ray_placement_strategy=SPREAD"
            )
        elif strategy == "STRICT_PACK":
            what = (
                f"no alive node can hold all {count} servers ({per_server}, STRICT_PACK: one node): lower "
                "rollout.sglang.num_engines or use ray_placement_strategy=PACK"
            )
        else:
            what = (
                f"its alive nodes can hold only {holds} of the {count} servers ({per_server}; a server's GPUs "
                "are on one node): add Ray nodes or lower rollout.sglang.num_engines/tp_size"
            )
        alive = f"{len(fits)} alive node(s)"
        when = " (a node was lost while Ray was placing the fleet)" if waiting else ""
        raise RayClusterError(f"the Ray cluster cannot place the SGLang fleet{when}: {alive}; {what}")

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


def _servers_that_fit(resources: dict[str, float], bundle: dict[str, float]) -> int:
    """How many bundles a node with these total resources holds."""
    return int(min(resources.get(name, 0.0) // amount for name, amount in bundle.items() if amount > 0))


def _gpus_cpus(resources: dict[str, float]) -> str:
    return f"{resources.get('GPU', 0.0):g} GPU / {resources.get('CPU', 0.0):g} CPU"
