"""Ray with two nodes, for real: a head and a worker started with `ray start` (through tools/launch/ray_node.sh) on
this host, each with 2 logical GPUs and 2 CPUs of its own; SGLang servers (the protocol double, joining the gloo
weight-update group) placed on them by ``rollout.sglang.launcher=ray``; the trainer as a Ray driver; and the worker
node killed mid-run. See tests/ray_two_nodes.py for what it takes to run two Ray nodes on one host. Beside them,
without Ray: what the supervisor does when a restart cannot build a fleet, and the placement check that refuses at
once what the alive nodes could never hold."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from spin_megatron.rollout.sglang.config import SGLangConfig
from spin_megatron.rollout.sglang.ray import RayClusterError
from spin_megatron.rollout.supervisor import EngineSupervisor, RolloutError
from spin_megatron.types import Sample
from tests.helpers import REPO
from tests.ray_two_nodes import TwoNodeCluster, ray_cli, server_base_port, write_shims
from tests.sglang_double import PARAMS, expected_output, pid_gone

pytestmark = pytest.mark.xdist_group("cluster")  # Ray and Slurm daemons: one file at a time

NEEDS_RAY = pytest.mark.skipif(
    ray_cli() is None, reason="Ray is not installed (pip install 'ray>=2.40'): no `ray` command"
)


# ----- without Ray: what the supervisor and the placement check do with a lost node ---------------------------
class _Engine:
    def __init__(self, log: list):
        self.log = log

    def generate(self, prompt_ids, params, prompt_keys=None):
        return [
            Sample(prompt_id=key, sample_index=i, prompt_ids=ids, response_ids=[1], finish_reason="stop")
            for key, ids in zip(prompt_keys, prompt_ids, strict=True)
            for i in range(params.n)
        ]

    def __getattr__(self, name):  # update_weights, finish_weight_update, sleep, wake, shutdown
        return lambda *args, **kwargs: self.log.append(name)


def test_a_restart_that_cannot_build_an_engine_leaves_the_supervisor_down_not_raising():
    log, builds = [], iter([None, "the Ray cluster cannot place the SGLang fleet", None])

    def factory():
        error = next(builds)
        if error:
            raise RayClusterError(error)
        return _Engine(log)

    supervisor = EngineSupervisor(factory, timeout_s=5, vocab_size=10)
    supervisor.restart()  # the new fleet cannot be placed: recorded, not raised
    assert supervisor.down == "RayClusterError: the Ray cluster cannot place the SGLang fleet"
    assert supervisor.restarts == 1 and log == ["shutdown"]
    with pytest.raises(RolloutError, match=r"no engine: restart 1 failed \(RayClusterError: the Ray cluster"):
        supervisor.generate([[1]], PARAMS)
    supervisor.update_weights([("w", None)])  # nothing to update: skipped; the next restart is re-synced
    supervisor.finish_weight_update()
    supervisor.sleep()
    supervisor.wake()
    assert supervisor.take_sync_error() is None and log == ["shutdown"]
    supervisor.restart()  # no engine to shut down; this one builds
    assert supervisor.down is None and supervisor.restarts == 2 and log == ["shutdown"]
    assert supervisor.generate([[1]], PARAMS)[0].response_ids == [1]


class _FakeRay:
    """``cluster_resources``/``nodes``/``wait`` of a cluster whose worker node is marked dead after ``dies_after``
    polls (Ray takes seconds to notice)."""

    def __init__(self, nodes: list[dict[str, float]], dies_after: int | None = None):
        self.resources, self.dies_after, self.polls = nodes, dies_after, 0

    def _alive(self) -> list[bool]:
        return [
            i == 0 or self.dies_after is None or self.polls < self.dies_after
            for i in range(len(self.resources))
        ]

    def nodes(self):
        return [
            {"Alive": alive, "Resources": r} for alive, r in zip(self._alive(), self.resources, strict=True)
        ]

    def cluster_resources(self):
        alive = [r for alive, r in zip(self._alive(), self.resources, strict=True) if alive]
        return {key: sum(r.get(key, 0.0) for r in alive) for key in ("GPU", "CPU")}

    def wait(self, refs, timeout):
        self.polls += 1
        return [], refs


def _fleet(**kwargs):
    from spin_megatron.rollout.sglang.ray import RayServerFleet

    config = SGLangConfig(model_path="m", launcher="ray", **kwargs)
    return RayServerFleet(config, colocated=False, client=None)


NODE = {"GPU": 2.0, "CPU": 2.0}


@pytest.mark.parametrize(
    "kwargs, nodes, message",
    [
        (
            {"num_engines": 2, "ray_placement_strategy": "STRICT_SPREAD"}, [NODE, {**NODE, "GPU": 0.0}],
            r"1 alive node\(s\) can hold a server \(1 GPU\(s\) \+ 1 CPU\(s\) per server\) but STRICT_SPREAD",
        ),
        (
            {"num_engines": 2, "tp_size": 2, "ray_placement_strategy": "STRICT_PACK"}, [NODE, NODE],
            r"no alive node can hold all 2 servers .*STRICT_PACK",
        ),
        ({"tp_size": 4}, [NODE, NODE], r"its alive nodes can hold only 0 of the 1 servers \(4 GPU"),
    ],
)  # fmt: skip
def test_a_fleet_the_alive_nodes_could_never_hold_is_refused_at_once(kwargs, nodes, message):
    with pytest.raises(
        RayClusterError, match=rf"cannot place the SGLang fleet: 2 alive node\(s\); {message}"
    ):
        _fleet(**kwargs)._check_capacity(
            _FakeRay(nodes), {"GPU": float(kwargs.get("tp_size", 1)), "CPU": 1.0}
        )
    _fleet(**kwargs)._check_capacity(_FakeRay([NODE] * 4), {"GPU": 1.0, "CPU": 1.0})  # fits: no error


def test_a_node_lost_while_the_group_is_pending_ends_the_wait_at_once(monkeypatch):
    """The group was created while Ray still listed the worker as alive; once it is marked dead, the wait stops
    (polled every PLACEMENT_POLL_S) instead of lasting health_timeout_s."""
    import spin_megatron.rollout.sglang.ray as ray_module

    fake = _FakeRay([NODE, NODE], dies_after=3)
    fake.is_initialized = lambda: True
    monkeypatch.setattr(ray_module, "connect_ray", lambda config: fake)
    stand_ins = {  # what _launch_servers imports from Ray (not needed installed)
        "ray": SimpleNamespace(), "ray.util": SimpleNamespace(),
        "ray.util.placement_group": SimpleNamespace(placement_group=_PendingGroup),
        "ray.util.scheduling_strategies": SimpleNamespace(PlacementGroupSchedulingStrategy=None),
    }  # fmt: skip
    for name, module in stand_ins.items():
        monkeypatch.setitem(sys.modules, name, module)
    fleet = _fleet(num_engines=2, ray_placement_strategy="STRICT_SPREAD", health_timeout_s=600)
    with pytest.raises(
        RayClusterError, match=r"\(a node was lost while Ray was placing the fleet\): 1 alive node"
    ):
        fleet._launch_servers()
    assert fake.polls == 3


class _PendingGroup:
    def __init__(self, bundles, strategy, name):
        self.bundles = bundles

    def ready(self):
        return "never ready"


# ----- two Ray nodes -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("ray2")
    two = TwoNodeCluster(base, write_shims(base / "shims"))
    try:
        yield two.up()
    finally:
        two.down()
    assert not two.head.pids() and not two.worker.pids()


def _node_ids(cluster_info: dict) -> dict[str, str]:
    """role → node id, from the custom resource each node was started with."""
    return {names[0].removeprefix("spin_node_"): node for node, names in cluster_info["nodes"].items()}


def _children(log_dir) -> list[int]:
    lines = [line for log in log_dir.glob("sglang_server_*.log") for line in log.read_text().splitlines()]
    return [int(line.split()[-1]) for line in lines if line.startswith("child pid")]


def _train(cluster, run_dir, *overrides, timeout_s: float = 300, wait: bool = True):
    command = [
        sys.executable, "-m", "spin_megatron.train", "experiment=tiny_cpu", "rollout.engine=sglang",
        "rollout.sglang.launcher=ray", f"rollout.sglang.ray_address={cluster.address}",
        "rollout.sglang.num_engines=2", "rollout.sglang.ray_placement_strategy=STRICT_SPREAD",
        f"rollout.sglang.base_port={server_base_port()}", f"rollout.sglang.log_dir={run_dir.parent / 'logs'}",
        "rollout.sglang.health_timeout_s=60", "rollout.sglang.request_timeout_s=60", "trainer.test_freq=0",
        f"trainer.output_dir={run_dir}", *overrides,
    ]  # fmt: skip
    if not wait:
        log = open(run_dir.parent / "train.log", "w")
        return subprocess.Popen(
            command, env=cluster.driver_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
    return subprocess.run(
        command, env=cluster.driver_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout_s
    )


def _steps(run_dir) -> list[int]:
    """Steps logged so far (a line being written is not counted)."""
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line)["step"] for line in text.splitlines(keepends=True) if line.endswith("\n")]


def _checkpoints(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


@NEEDS_RAY
@pytest.mark.e2e
def test_strict_spread_puts_one_server_on_each_node_generates_and_leaves_nothing_behind(cluster, tmp_path):
    logs = tmp_path / "logs"
    out = cluster.drive("fleet", base_port=server_base_port(), log_dir=str(logs))
    roles = _node_ids(out)
    assert sorted(roles) == ["head", "worker"] and roles["head"] != roles["worker"]
    # one bundle, one actor, one server on each node (both nodes have the same IP: told apart by node id)
    assert sorted(out["bundles"].values()) == sorted(roles.values())
    assert sorted(server["node_id"] for server in out["servers"]) == sorted(roles.values())
    assert [server["node_id"] for server in out["servers"]] == [out["bundles"][str(i)] for i in range(2)]
    assert len({server["url"] for server in out["servers"]}) == 2 and out["sync_mode"] == "disaggregated"
    assert all(server["gpus"] == "0" for server in out["servers"])  # each node's own first GPU
    assert out["in_use"] == 2
    assert out["samples"][3:] == [expected_output([3], 1, i).output_ids for i in range(3)]
    assert out["group_state"] == "REMOVED" and out["free_after"] == 4
    pids = [server["pid"] for server in out["servers"]] + _children(logs)
    assert len(pids) == 4 and all(pid_gone(pid, wait_s=20) for pid in pids)


@NEEDS_RAY
@pytest.mark.e2e
def test_a_lost_node_restarts_the_fleet_on_the_node_that_is_left(cluster, tmp_path):
    """SPREAD (best effort): the supervisor's restart after the worker died places both servers on the head."""
    logs = tmp_path / "logs"
    try:
        out = cluster.drive("restart_after_node_loss", base_port=server_base_port(), log_dir=str(logs))
    finally:
        cluster.worker.kill()
        cluster.worker.start()  # the next tests get both nodes back
    roles = _node_ids(out["before"])
    assert sorted(server["node_id"] for server in out["before"]["servers"]) == sorted(roles.values())
    # the server died with its node: its URL refuses connections, its actor is gone
    assert "connection failed" in out["failure"] and "is gone" in out["failure"]
    assert out["down"] is None  # (Ray may still list the worker as alive: it takes ~15-20 s to mark it dead)
    assert [server["node_id"] for server in out["after"]["servers"]] == [roles["head"]] * 2
    assert out["again"] == out["first"] == [s.output_ids for s in _expected([[1, 2], [3]])]
    failed, back = out["failed_after_s"], out["restarted_after_s"]
    print(f"generation failed {failed:.1f} s, fleet back {back:.1f} s after the kill")


def _expected(prompts):
    return [
        expected_output(prompt, position, i)
        for position, prompt in enumerate(prompts)
        for i in range(PARAMS.n)
    ]


@NEEDS_RAY
@pytest.mark.e2e
@pytest.mark.slow
def test_the_trainer_as_a_ray_driver_survives_losing_the_worker_node_and_resumes(cluster, tmp_path):
    """spin-train, a Ray driver of the two-node cluster, trains with one server on each node (STRICT_SPREAD);
    the worker node is killed mid-run. 2 servers cannot be placed STRICT_SPREAD on the 1 node left, so each restart
    fails (as soon as Ray marks the node dead, not after health_timeout_s) and past rollout.max_restarts the run
    saves the state before the step and stops with one line; with the worker node back, trainer.resume=auto
    finishes the run."""
    run = tmp_path / "run"
    common = ("trainer.total_steps=4", "trainer.save_freq=10", "rollout.max_restarts=1")
    process = _train(cluster, run, *common, wait=False)
    log = tmp_path / "train.log"
    try:
        deadline = time.monotonic() + 240
        while not _steps(run):  # a step trained on both nodes' servers
            assert process.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no step within 240 s"
            time.sleep(0.2)
        cluster.worker.kill()
        killed = time.monotonic()
        code = process.wait(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    stopped_after = time.monotonic() - killed
    text = log.read_text()
    assert code == 2, text[-4000:]
    errors = [line for line in text.splitlines() if line.startswith("spin-train: error")]
    assert len(errors) == 1 and "Traceback" not in text, text[-4000:]
    (error,) = errors
    saved = re.search(r"saved step (\d+) in (\S+); fix the engine and resume", error)
    assert saved and "rollout failed after 1 engine restart(s)" in error, error
    assert "STRICT_SPREAD puts each of the 2 servers on a node of its own" in error
    assert "rollout: restart 1 failed: RayClusterError" in text  # tried, and refused once Ray knew
    step = int(saved.group(1))
    assert _checkpoints(run) == [f"step_{step:07d}"] and 1 <= step < 4
    assert stopped_after < 90, f"the stop took {stopped_after:.0f} s after the kill"

    cluster.worker.start()
    result = _train(cluster, run, *common, "trainer.resume=auto")
    assert result.returncode == 0, result.stderr[-4000:]
    assert _steps(run) == [1, 2, 3, 4]  # each step once: the failed step was retried after the resume
    assert _checkpoints(run)[-1] == "step_0000004"
    assert len(list((tmp_path / "logs").glob("sglang_server_*.log"))) == 2
    print(f"stopped {stopped_after:.1f} s after the kill, at step {step}")
