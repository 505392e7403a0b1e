"""SGLang servers placed by Ray (``rollout.sglang.launcher=ray``) on a real local Ray cluster.

The cluster is Ray itself (``ray.init`` with 4 logical GPUs, so placement groups, bundles and the
``CUDA_VISIBLE_DEVICES`` Ray gives each actor are real); the servers are test_sglang_engine's double, started
through the same ``python -m sglang.launch_server`` command line a GPU node runs (shims on PYTHONPATH).
"""

from __future__ import annotations

import os
import time

import pytest

from spin_megatron.errors import ConfigError
from spin_megatron.rollout.sglang.config import SGLangConfig, resolve_sync_mode
from spin_megatron.rollout.sglang.engine import SGLangEngine
from spin_megatron.rollout.sglang.protocol import SGLangServerError
from tests.sglang_double import PARAMS, SHIMS, expected_output, free_port, pid_gone

pytestmark = pytest.mark.xdist_group("cluster")  # Ray and Slurm daemons: one file at a time

GPUS = 4


# ----- configuration (no Ray needed) -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"urls": ("http://h:1",)}, r"rollout.sglang.launcher launches servers, which attaching to `urls`"),
        ({"gpu_ids": (3,)}, r"rollout.sglang.gpu_ids must be empty with launcher=ray"),
        ({"sync_mode": "colocated"}, r"rollout.sglang.sync_mode cannot be colocated with launcher=ray"),
        ({"ray_placement_strategy": "TIGHT"}, r"ray_placement_strategy must be one of 'PACK', 'SPREAD'"),
        ({"ray_cpus_per_engine": 0}, r"rollout.sglang.ray_cpus_per_engine must be > 0"),
    ],
)
def test_ray_launcher_config_conflicts_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SGLangConfig(model_path="/m", launcher="ray", **kwargs)


def test_ray_placed_servers_sync_weights_over_nccl():
    assert resolve_sync_mode(SGLangConfig(model_path="/m", launcher="ray"), [0, 1]) == "disaggregated"
    with pytest.raises(ConfigError, match=r"launcher must be one of 'local', 'ray'"):
        SGLangConfig(launcher="slurm")


# ----- a real Ray cluster ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray cluster with 4 logical GPUs whose workers find the double behind `sglang.launch_server`."""
    ray = pytest.importorskip("ray")
    shims = tmp_path_factory.mktemp("shims")
    for name, text in SHIMS.items():
        (shims / name).parent.mkdir(parents=True, exist_ok=True)
        (shims / name).write_text(text)
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shims), saved]))  # the raylet inherits it
    try:
        ray.init(
            num_cpus=4, num_gpus=GPUS, include_dashboard=False, log_to_driver=False, namespace="spin_megatron",
            object_store_memory=80 * 2**20,
        )  # fmt: skip
        yield ray
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def ray_config(tmp_path, **kwargs) -> SGLangConfig:
    defaults = dict(
        model_path="fake-model", launcher="ray", base_port=free_port(span=4), log_dir=str(tmp_path / "logs"),
        health_timeout_s=60,
    )  # fmt: skip
    return SGLangConfig(**{**defaults, **kwargs})


def wait_all_gpus_free(ray, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("GPU", 0.0) == GPUS:
            return True
        time.sleep(0.2)
    return False


def test_ray_fleet_places_generates_and_leaves_nothing_behind(ray_cluster, tmp_path):
    config = ray_config(
        tmp_path,
        num_engines=2,
        tp_size=2,
        max_inflight_requests=4,
        extra_server_env={"SPIN_TEST_IFNAME": "ib0"},
    )
    with SGLangEngine(config, trainer_gpu_ids=[0]) as engine:
        fleet = engine._fleet
        assert engine.sync_mode == "disaggregated"  # auto: NCCL to Ray's GPUs, never CUDA IPC
        assert engine.urls == [server["url"] for server in fleet.servers]
        gpu_sets = [set(server["gpus"].split(",")) for server in fleet.servers]
        assert all(len(gpus) == 2 for gpus in gpu_sets) and not gpu_sets[0] & gpu_sets[1]  # a bundle each
        assert ray_cluster.available_resources().get("GPU", 0.0) == 0  # the placement group holds all 4
        samples = engine.generate([[1, 2], [3]], PARAMS)
        pids = [server["pid"] for server in fleet.servers]
        group = fleet.placement_group
    assert [s.response_ids for s in samples[3:]] == [expected_output([3], 1, i).output_ids for i in range(3)]
    logs = sorted((tmp_path / "logs").glob("sglang_server_*.log"))
    assert len(logs) == 2
    text = logs[1].read_text()
    assert "-m sglang.launch_server --model-path fake-model --tp-size 2 --host" in text
    (visible,) = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("CUDA_VISIBLE")]
    assert set(visible.split(",")) == gpu_sets[1]  # the server sees exactly its actor's GPUs
    # the environment a locally launched server gets (issue 22, item 4): the trainer's log-probs, extra_server_env
    env = [line for line in text.splitlines() if line.startswith("env ")]
    assert {"env SGLANG_RETURN_ORIGINAL_LOGPROB=1", "env SPIN_TEST_IFNAME=ib0"} <= set(env), env
    lines = [line for log in logs for line in log.read_text().splitlines()]
    children = [int(line.split()[-1]) for line in lines if line.startswith("child pid")]
    assert len(children) == 2 and all(pid_gone(pid) for pid in pids + children)
    from ray.util import placement_group_table

    assert placement_group_table(group)["state"] == "REMOVED"
    assert wait_all_gpus_free(ray_cluster)


def test_more_gpus_than_the_cluster_has_is_refused_at_once(ray_cluster, tmp_path):
    started = time.monotonic()
    with pytest.raises(
        SGLangServerError, match=r"has 4 GPU\(s\) in all but rollout.sglang.num_engines=3 × tp_size=2 need 6"
    ):
        SGLangEngine(ray_config(tmp_path, num_engines=3, tp_size=2))
    assert time.monotonic() - started < 30 and wait_all_gpus_free(ray_cluster)


def test_busy_gpus_time_out_with_what_is_free(ray_cluster, tmp_path):
    from ray.util.placement_group import placement_group, remove_placement_group

    other_job = placement_group([{"GPU": 1.0}] * 3)  # another job holds 3 of the 4 GPUs
    ray_cluster.get(other_job.ready(), timeout=30)
    try:
        with pytest.raises(
            SGLangServerError,
            match=r"(?s)could not place 1 SGLang server\(s\) × 2 GPU\(s\) \(PACK\) within 2 s; free now: 1 GPU",
        ):
            SGLangEngine(ray_config(tmp_path, tp_size=2, health_timeout_s=2))
    finally:
        remove_placement_group(other_job)
    assert wait_all_gpus_free(ray_cluster)


def test_a_server_dying_on_its_node_reports_its_remote_log(ray_cluster, tmp_path):
    config = ray_config(tmp_path, extra_server_args=("--double-mode", "exit_on_start"))
    died = r"(?s)died before becoming healthy: SGLang server 0 \(Ray actor on .*exited with code 3.*not enough memory"
    with pytest.raises(SGLangServerError, match=died):
        SGLangEngine(config)
    assert wait_all_gpus_free(ray_cluster)  # the failed start released its placement group


def test_a_killed_actor_takes_its_server_down(ray_cluster, tmp_path):
    with SGLangEngine(ray_config(tmp_path)) as engine:
        (server,) = engine._fleet.servers
        assert engine.generate([[5]], PARAMS)[0].response_ids == expected_output([5], 0, 0).output_ids
        ray_cluster.kill(engine._fleet.actors[0])  # e.g. its node was lost, or Ray killed the job's actors
        assert pid_gone(server["pid"], wait_s=20)  # PR_SET_PDEATHSIG: the server dies with its actor
        with pytest.raises(
            SGLangServerError,
            match=r"(?s)/generate: connection failed.*Ray actor of SGLang server 0 .* is gone",
        ):
            engine.generate([[5]], PARAMS)
    assert wait_all_gpus_free(ray_cluster)


# ----- connecting --------------------------------------------------------------------------------------------
def test_ray_addresses_that_name_a_gcs_endpoint(monkeypatch):
    from spin_megatron.rollout.sglang.ray import gcs_endpoint

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert gcs_endpoint("10.0.0.3:6379") == ("10.0.0.3", 6379)
    assert gcs_endpoint("auto") is None and gcs_endpoint("local") is None
    assert gcs_endpoint("ray://head:10001") is None  # Ray Client: ray.init deals with it
    monkeypatch.setenv("RAY_ADDRESS", "head-node:6380")
    assert gcs_endpoint("auto") == ("head-node", 6380)


def test_an_unreachable_ray_head_is_a_clear_error_within_the_timeout(monkeypatch):
    ray = pytest.importorskip("ray")
    from spin_megatron.rollout.sglang.ray import connect_ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # even beside the module's cluster
    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("ray.init must wait for the head"))
    config = SGLangConfig(
        model_path="m", launcher="ray", ray_address=f"127.0.0.1:{free_port()}", health_timeout_s=3
    )
    started = time.monotonic()
    with pytest.raises(
        SGLangServerError, match=r"no Ray cluster answers at 127.0.0.1:\d+ .* within 3 s .*ray start --head"
    ):
        connect_ray(config)
    assert time.monotonic() - started < 10
