"""Two real Ray nodes on this host, for the tests: a head and a worker, each started with the real `ray start`
through ``tools/launch/ray_node.sh`` (what ``spin.sbatch`` runs on every node), each with resources of its own.

What it takes to run two Ray nodes on one host (Ray 2.60, read off ``ray/scripts/scripts.py`` and
``ray/_private/authentication/``):

- Ray does not refuse a second raylet on a host: every node gets its own ``--temp-dir`` (sessions, sockets,
  logs; "can be specified per node") and the ports that have fixed defaults are set apart: the head's GCS
  (``--port``, a free one), its dashboard (``--dashboard-port``: even with ``--include-dashboard=false`` a minimal
  dashboard process binds 8265) and every node's dashboard agent (``--dashboard-agent-listen-port=0``; its
  default 52365 would collide). Both nodes report the same IP, so nodes are told apart by node id and by a
  custom resource (``spin_node_head`` / ``spin_node_worker``).
- The temp dirs are short folders under /tmp, not under pytest's tmp_path: Ray puts Unix sockets at
  ``<temp-dir>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store`` (≈ 70 characters below the temp dir),
  and a socket path may not exceed 107 bytes. They are removed at teardown.
- Token authentication: ``ray start --head`` switches it on by itself when a token exists (``~/.ray/auth_token``
  — any earlier local ``ray.init()`` writes one — ``RAY_AUTH_TOKEN_PATH`` or ``RAY_AUTH_TOKEN``), while a
  joining ``ray start --address`` and a driver's ``ray.init(address=...)`` do not: both were refused
  ("InvalidAuthToken"; the driver only after ≈ 20 s, as a ConnectionError). ``ray_node.sh`` and the trainer's
  ``connect_ray`` now make the head's choice explicit. The cluster here uses a token of its own
  (``RAY_AUTH_TOKEN_PATH``, ``RAY_AUTH_MODE`` unset), so that path is exercised whatever ``~/.ray`` holds.
- Teardown does not use ``ray stop``: it kills every Ray process on the host, other users' clusters included.
  Each node runs in a session of its own (``ray_node.sh`` started with ``setsid``; Ray's daemons keep its process
  group); a node is killed with its process group, and whatever carries its temp dir on its command line (and
  their children) is swept after that.

The servers are the SGLang protocol double (``tests/sglang_double.py``) behind ``python -m
sglang.launch_server`` (shims on the raylets' PYTHONPATH), extended here to join the trainer's gloo
weight-update group as a real server does (``/init_weights_update_group``, then one broadcast per tensor of each
``/update_weights_from_distributed``), so that a trainer run can sync weights into Ray-placed servers.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spin_megatron.ports import pick_free_port
from tests.helpers import REPO

RAY_NODE_SH = REPO / "tools" / "launch" / "ray_node.sh"
GPUS_PER_NODE = 2  # logical GPUs: Ray only counts them
CPUS_PER_NODE = 2  # logical too
OBJECT_STORE_BYTES = 80 * 2**20  # Ray's minimum is 75 MiB; the default (30 % of RAM) is pointless here
START_TIMEOUT_S = 90.0
ROLES = ("head", "worker")


def ray_cli() -> Path | None:
    """The `ray` command of this interpreter's environment (None: Ray is not installed)."""
    import importlib.util

    path = Path(sys.executable).with_name("ray")
    return path if importlib.util.find_spec("ray") is not None and path.exists() else None


def free_port() -> int:
    return pick_free_port("0.0.0.0")


def server_base_port(span: int = 4) -> int:
    """A base port for the servers with ``span`` free ports, between Ray's worker ports (10002-19999 by default)
    and Linux's ephemeral range (from 32768): a port the OS hands out for outgoing connections (Ray opens many)
    was taken again between the probe and the server's bind ("Address already in use")."""
    return pick_free_port("0.0.0.0", span=span)


def _pid_gone(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" in status.read_text()  # a zombie holds nothing
    except OSError:
        return True


def processes_with(marker: str) -> list[int]:
    """Live processes (not zombies) whose command line contains ``marker``, and all their descendants."""
    import psutil

    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid not in me and marker in " ".join(proc.info["cmdline"] or []):
                for p in [proc, *proc.children(recursive=True)]:
                    found.setdefault(p.pid, p)
        except psutil.Error:
            continue
    return sorted(pid for pid in found if pid not in me and not _pid_gone(pid))


class RayNode:
    """One `ray start` node: ``tools/launch/ray_node.sh`` holding it in a session of its own."""

    def __init__(self, cluster: TwoNodeCluster, index: int):
        self.cluster, self.index, self.role = cluster, index, ROLES[index]
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"sr{self.role[0]}", dir="/tmp"))
        self.log = cluster.base / f"ray-node{index}-{self.role}.out"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        args = [
            f"--temp-dir={self.temp_dir}", f"--num-cpus={CPUS_PER_NODE}",
            f"--resources={json.dumps({f'spin_node_{self.role}': 1}, separators=(',', ':'))}",
            f"--object-store-memory={OBJECT_STORE_BYTES}", "--dashboard-agent-listen-port=0",
        ]  # fmt: skip
        if self.role == "head":
            args.append(f"--dashboard-port={free_port()}")
        env = dict(
            self.cluster.env, SLURM_NODEID=str(self.index), RAY_START_ARGS=" ".join(args),
            RAY_NUM_GPUS=str(GPUS_PER_NODE), RAY_JOIN_RETRY_S="1", RAY_JOIN_TIMEOUT_S=str(int(START_TIMEOUT_S)),
        )  # fmt: skip
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                ["bash", str(RAY_NODE_SH)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                start_new_session=True,
            )  # fmt: skip
        self._wait_started()

    def _wait_started(self) -> None:
        """`ray start` returns once the node's raylet has registered: ray_node.sh then only holds it."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = self.log.read_text()
            if text.count("Ray runtime started") > self.cluster.starts[self.index]:
                self.cluster.starts[self.index] += 1
                return
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"ray_node.sh ({self.role}) exited {self.process.returncode}:\n{text[-3000:]}"
                )
            time.sleep(0.2)
        raise RuntimeError(f"the Ray {self.role} did not start within {START_TIMEOUT_S:g} s:\n{text[-3000:]}")

    def pids(self) -> list[int]:
        return processes_with(str(self.temp_dir))

    def kill(self) -> None:
        """The node dies at once, as a lost machine would (see :func:`kill_node`)."""
        if self.process is not None:
            kill_node(self.process.pid, str(self.temp_dir))
            self.process.wait(timeout=10)


def kill_node(session: int, temp_dir: str) -> None:
    """SIGKILL a node at once, as a lost machine: its session (ray_node.sh and Ray's daemons, which keep its
    process group), whatever names its temp dir on its command line, and all their descendants (the raylet's
    workers, which rename themselves ``ray::...``, and the servers they started) — collected before any dies,
    since an orphan is no longer anyone's descendant. Repeated until none is left."""
    import psutil

    deadline = time.monotonic() + 15
    while True:
        pids = set(processes_with(temp_dir))
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == session:
                    pids |= {proc.pid, *(child.pid for child in proc.children(recursive=True))}
            except (OSError, psutil.Error):
                continue
        pids = {pid for pid in pids if not _pid_gone(pid)}
        if not pids:
            return
        assert time.monotonic() < deadline, f"Ray node processes survived SIGKILL: {sorted(pids)}"
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


class TwoNodeCluster:
    """A Ray head (node 0) and a worker (node 1) on this host. ``env``: what drivers (the trainer, this test
    process via :meth:`driver_env`) need to find the cluster and the shims."""

    def __init__(self, base: Path, shims: Path):
        self.base, self.shims = base, shims
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        token = base / "ray_auth_token"
        token.write_text(secrets.token_hex(32))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SLURM_", "SPIN_"))}
        env.update(
            RAY=str(ray_cli()), RAY_HEAD_ADDR="127.0.0.1", RAY_PORT=str(self.port), SPIN_ROLLOUT_FIRST_NODE="0",
            RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
            PYTHONPATH=os.pathsep.join(filter(None, [str(shims), str(REPO), os.environ.get("PYTHONPATH")])),
        )  # fmt: skip
        self.env = env
        self.starts = [0, 0]
        self.nodes = [RayNode(self, 0), RayNode(self, 1)]

    @property
    def head(self) -> RayNode:
        return self.nodes[0]

    @property
    def worker(self) -> RayNode:
        return self.nodes[1]

    def up(self) -> TwoNodeCluster:
        for node in self.nodes:
            node.start()
        return self

    def driver_env(self) -> dict[str, str]:
        """The environment of a driver process (the trainer): the cluster's token, no stray RAY_ADDRESS."""
        return {k: v for k, v in self.env.items() if k not in ("RAY", "RAY_HEAD_ADDR", "RAY_PORT")}

    def drive(self, scenario: str, timeout_s: float = 180, **kwargs) -> dict:
        """Run a driver scenario (below) in a fresh process: the test process itself never joins this cluster
        (``ray.init`` would leave its token, auth mode and connection behind for the tests that follow)."""
        args = dict(
            kwargs, address=self.address, nodes=[[n.process.pid, str(n.temp_dir)] for n in self.nodes]
        )
        result = subprocess.run(
            [sys.executable, __file__, "--driver", scenario, json.dumps(args)], env=self.driver_env(),
            capture_output=True, text=True, timeout=timeout_s, cwd=REPO,
        )  # fmt: skip
        lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
        assert result.returncode == 0 and lines, (
            f"driver {scenario} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
        return json.loads(lines[-1][len("RESULT ") :])

    def down(self) -> None:
        for node in reversed(self.nodes):
            try:
                node.kill()
            finally:
                shutil.rmtree(node.temp_dir, ignore_errors=True)


# ----- the double, joining the weight-update group -----------------------------------------------------------
def serve_double_with_group(argv: list[str]) -> None:
    """``python -m sglang.launch_server ...`` on a Ray node: the protocol double, plus the gloo group."""
    import argparse

    import torch
    import torch.distributed as dist

    from spin_megatron.rollout.sglang.server import _die_with_parent
    from spin_megatron.rollout.sglang.weights import new_weight_update_group
    from tests.sglang_double import DoubleState, double_server

    class GroupDouble(DoubleState):
        group = None

        def handle_post(self, path: str, body):
            if path == "/init_weights_update_group":  # blocks in the rendezvous until the trainer joins
                self.group = new_weight_update_group(
                    backend=body["backend"], master_address=body["master_address"],
                    master_port=body["master_port"], world_size=body["world_size"], rank=body["rank_offset"],
                    timeout_s=60, group_name=body["group_name"],
                )  # fmt: skip
            elif path == "/update_weights_from_distributed":  # the trainer broadcasts after posting
                for dtype, shape in zip(body["dtypes"], body["shapes"], strict=True):
                    dist.broadcast(torch.empty(shape, dtype=getattr(torch, dtype)), src=0, group=self.group)
            elif path == "/destroy_weights_update_group" and self.group is not None:
                dist.destroy_process_group(self.group)
                self.group = None
            return super().handle_post(path, body)

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--tp-size", type=int, default=1)
    args, _ = parser.parse_known_args(argv)
    assert args.tp_size == 1, "the double joins the group as one rank: use tp_size=1"
    print(f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}", flush=True)
    # like SGLang's scheduler process: it must not outlive the server (nor the server's death with its node)
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], preexec_fn=_die_with_parent
    )
    print(f"child pid {child.pid}", flush=True)
    double_server(GroupDouble(), args.host, args.port).serve_forever()


# ----- drivers: what a trainer's engine rank does, in a process of its own ----------------------------------
def _engine_config(args: dict, **kwargs):
    from spin_megatron.rollout.sglang.config import SGLangConfig

    return SGLangConfig(
        model_path="fake-model", launcher="ray", ray_address=args["address"], num_engines=2,
        base_port=args["base_port"], log_dir=args["log_dir"], health_timeout_s=60, request_timeout_s=60, **kwargs,
    )  # fmt: skip


def _placement(ray, fleet) -> dict:
    from ray.util import placement_group_table

    return {
        "servers": fleet.servers,
        "bundles": placement_group_table(fleet.placement_group)["bundles_to_node_id"],
        "nodes": {
            node["NodeID"]: sorted(k for k in node["Resources"] if k.startswith("spin_node_"))
            for node in ray.nodes()
            if node["Alive"]
        },
    }


def drive_fleet(args: dict) -> dict:
    """A STRICT_SPREAD fleet of 2 servers: where it landed, what it generated, then shut down."""
    import ray
    from ray.util import placement_group_table

    from spin_megatron.rollout.sglang.engine import SGLangEngine
    from tests.sglang_double import PARAMS

    config = _engine_config(args, ray_placement_strategy="STRICT_SPREAD")
    with SGLangEngine(config, trainer_gpu_ids=[0]) as engine:
        out = _placement(ray, engine._fleet) | {"sync_mode": engine.sync_mode}
        out["samples"] = [s.response_ids for s in engine.generate([[1, 2], [3]], PARAMS)]
        group = engine._fleet.placement_group
        out["in_use"] = ray.cluster_resources()["GPU"] - ray.available_resources().get("GPU", 0.0)
    out["group_state"] = placement_group_table(group)["state"]
    deadline = time.monotonic() + 20
    while ray.available_resources().get("GPU", 0.0) < ray.cluster_resources()["GPU"]:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    out["free_after"] = ray.available_resources().get("GPU", 0.0)
    return out


def drive_restart_after_node_loss(args: dict) -> dict:
    """A SPREAD fleet under the trainer's supervisor; the worker node is killed; the restart places the whole
    fleet on the head (SPREAD is best effort) and generation goes on."""
    import ray

    from spin_megatron.rollout.sglang.engine import SGLangEngine
    from spin_megatron.rollout.supervisor import EngineSupervisor, RolloutError
    from tests.sglang_double import PARAMS

    config = _engine_config(args, ray_placement_strategy="SPREAD")
    supervisor = EngineSupervisor(
        lambda: SGLangEngine(config, trainer_gpu_ids=[0]), timeout_s=60, vocab_size=1000
    )
    try:
        before = _placement(ray, supervisor.engine._fleet)
        first = [s.response_ids for s in supervisor.generate([[1, 2], [3]], PARAMS)]
        killed = time.monotonic()
        kill_node(*args["nodes"][1])
        try:
            supervisor.generate([[1, 2], [3]], PARAMS)
            failure = ""
        except RolloutError as exc:
            failure = str(exc)
        failed_after = time.monotonic() - killed
        supervisor.restart()
        restarted_after = time.monotonic() - killed
        after = _placement(ray, supervisor.engine._fleet) if supervisor.down is None else {}
        again = [s.response_ids for s in supervisor.generate([[1, 2], [3]], PARAMS)]
    finally:
        supervisor.shutdown()
    return {
        "before": before, "after": after, "first": first, "again": again, "failure": failure,
        "down": supervisor.down, "failed_after_s": failed_after, "restarted_after_s": restarted_after,
    }  # fmt: skip


DRIVERS = {"fleet": drive_fleet, "restart_after_node_loss": drive_restart_after_node_loss}


SHIM = f"""import runpy, sys
sys.path.insert(0, {str(REPO)!r})
sys.argv = [{__file__!r}, "--serve-double"] + sys.argv[1:]
runpy.run_path({__file__!r}, run_name="__main__")
"""
SHIMS = {"sglang/__init__.py": "", "sglang/launch_server.py": SHIM}


def write_shims(folder: Path) -> Path:
    for name, text in SHIMS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve-double"]:
        serve_double_with_group(sys.argv[2:])
    elif sys.argv[1:2] == ["--driver"]:
        sys.path.insert(0, str(REPO))
        print("RESULT " + json.dumps(DRIVERS[sys.argv[2]](json.loads(sys.argv[3]))), flush=True)
