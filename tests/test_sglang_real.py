"""The project's SGLang engine against a REAL sglang 0.5.23 server on CPU (its own venv, .venv-sglang, built by
`make sglang-venv`; fp32, torch-native attention; tools/sglang_cpu stands in for the CPU kernel package's one
function this path calls). Launch and health, /generate with n samples and log-probs, full weight syncs in
both modes over the CPU transports (file_system-shared tensors, gloo) checked against transformers, the router
in front of two servers, and faults (server killed mid-generate and mid-sync, a payload that kills the server)
recovered by the supervisor. spin-train end to end against it: tests/test_sglang_train.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch

from spin_megatron.rollout.protocol import SamplingParams
from spin_megatron.rollout.sglang import protocol as proto
from spin_megatron.rollout.sglang.config import SGLangConfig
from spin_megatron.rollout.sglang.engine import SGLangEngine
from spin_megatron.rollout.sglang.protocol import SGLangServerError
from spin_megatron.rollout.supervisor import EngineSupervisor, RolloutError
from tests.sglang_double import free_port
from tests.sglang_real_server import REPO, cpu_server_config, hf_logprobs, perturbed_state

pytestmark = [pytest.mark.sglang_real, pytest.mark.slow]
PROMPTS = [[9707, 11, 1879, 0], [3838, 374, 220, 17, 10, 17, 30], [785, 6722]]


@pytest.fixture(scope="module")
def fleet(sglang_python, tiny_qwen_vocab_model, tmp_path_factory):
    """Two launched servers behind sglang_router, for the module (the engine that launched them stays open)."""
    logs = tmp_path_factory.mktemp("sglang_logs")
    config = cpu_server_config(
        sglang_python,
        tiny_qwen_vocab_model,
        log_dir=logs,
        num_engines=2,
        use_router=True,
        router_port=free_port(),
    )
    with SGLangEngine(config) as engine:
        yield engine


@pytest.fixture(scope="module")
def server(fleet):
    """The first server of the fleet, attached to directly (generation without the router)."""
    with SGLangEngine(SGLangConfig(urls=(fleet.urls[0],), request_timeout_s=120)) as engine:
        yield engine


def test_launch_generates_n_samples_with_the_trainers_logprobs(server, tiny_qwen_vocab_model):
    start = time.monotonic()
    samples = server.generate(
        PROMPTS, SamplingParams(n=2, temperature=1.0, top_k=5, max_new_tokens=6, seed=1)
    )
    assert [(s.prompt_id, s.sample_index) for s in samples] == [(p, j) for p in range(3) for j in range(2)]
    for sample in samples:
        assert sample.finish_reason in ("stop", "length") and 1 <= len(sample.response_ids) <= 6
        assert len(sample.logprobs) == len(sample.response_ids)
    # The server runs with SGLANG_RETURN_ORIGINAL_LOGPROB=1: the log-probs of sampled tokens are the model's
    # own (temperature 1, before top-k renormalisation), which is what the trainer recomputes.
    for sample in samples:
        ours = hf_logprobs(tiny_qwen_vocab_model, None, sample.prompt_ids, sample.response_ids)
        assert max(abs(a - b) for a, b in zip(ours, sample.logprobs)) < 1e-4
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    assert [s.response_ids for s in server.generate(PROMPTS, greedy)] == [
        s.response_ids for s in server.generate(PROMPTS, greedy)
    ]
    assert time.monotonic() - start < 120


def _sync(engine, state: dict[str, torch.Tensor], bucket_tensors: int = 6) -> None:
    named = list(state.items())
    for first in range(0, len(named), bucket_tensors):
        engine.update_weights(named[first : first + bucket_tensors])
    engine.finish_weight_update()


def _greedy_gap(engine, model_dir, state) -> float:
    """max |server − transformers| log-prob over greedy continuations of every prompt, with ``state`` loaded."""
    samples = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=8))
    gaps = []
    for sample in samples:
        ours = hf_logprobs(model_dir, state, sample.prompt_ids, sample.response_ids)
        gaps.append(max(abs(a - b) for a, b in zip(ours, sample.logprobs)))
    return max(gaps)


def _torch_shm_files() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("torch_")}


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_weight_sync_then_the_server_scores_like_the_new_weights(server, tiny_qwen_vocab_model, mode):
    attached = SGLangConfig(urls=tuple(server.urls), sync_mode=mode, request_timeout_s=120)
    with SGLangEngine(attached) as engine:
        assert engine.sync_mode == mode
        shm_before = _torch_shm_files()
        for seed in (1, 2):  # two syncs: the second must work as the first, and leave nothing behind
            state = perturbed_state(tiny_qwen_vocab_model, seed=seed)
            _sync(engine, state)
            assert _greedy_gap(engine, tiny_qwen_vocab_model, state) < 1e-4
            assert not engine._in_session
        if mode == "colocated":
            assert engine._weights._retained == []  # the last bucket's buffers are released after the sync
            assert _torch_shm_files() <= shm_before  # no shared-memory file of ours outlives its sync
        else:
            assert engine._weights._group is not None and engine._weights.backend == "gloo"
    # back to the model's own weights for the other tests of this module
    with SGLangEngine(SGLangConfig(urls=tuple(server.urls), sync_mode="colocated")) as restore:
        _sync(restore, perturbed_state(tiny_qwen_vocab_model, seed=None))


def test_an_update_outside_a_session_is_refused_by_the_real_server(server):
    """What 0.5.23 does without the session (and why the engine opens one): HTTP 400, nothing loaded."""
    body = {"names": ["lm_head.weight"], "dtypes": ["float32"], "shapes": [[1, 1]], "group_name": "nope"}
    response = requests.post(server.urls[0] + "/update_weights_from_distributed", json=body, timeout=60)
    assert response.status_code == 400
    assert "must run between begin_weight_update() and end_weight_update()" in response.json()["message"]


def test_router_in_front_of_two_real_servers_and_a_sync_into_both(fleet, tiny_qwen_vocab_model):
    assert fleet._fleet.generate_urls == [fleet._fleet.router_url] and len(fleet.urls) == 2
    assert (
        fleet.sync_mode == "disaggregated"
    )  # launched on CPU, no memory saver: one gloo group of 1 + 2 ranks
    state = perturbed_state(tiny_qwen_vocab_model, seed=3)
    _sync(fleet, state)
    assert _greedy_gap(fleet, tiny_qwen_vocab_model, state) < 1e-4  # answered through the router
    for url in fleet.urls:  # and by each server on its own
        with SGLangEngine(SGLangConfig(urls=(url,))) as direct:
            assert _greedy_gap(direct, tiny_qwen_vocab_model, state) < 1e-4
    _sync(fleet, perturbed_state(tiny_qwen_vocab_model, seed=None))  # back to the checkpoint's weights
    assert "sglang_router" in (fleet.log_dir / "sglang_router.log").read_text()


def _restore(url: str, model_dir) -> None:
    """The checkpoint's own weights back in the server, for the other tests of this module."""
    with SGLangEngine(SGLangConfig(urls=(url,), sync_mode="colocated")) as restore:
        _sync(restore, perturbed_state(model_dir, seed=None))


def _disaggregated(server) -> SGLangConfig:
    # request_timeout_s: a group that cannot form (the pre-fix behaviour) fails in 30 s, not 120
    return SGLangConfig(urls=tuple(server.urls), sync_mode="disaggregated", request_timeout_s=30)


def test_a_sync_that_fails_mid_way_then_a_good_one(server, tiny_qwen_vocab_model):
    """Issue 22, item 5: the server refuses a bucket after receiving it (its loader checks shapes); the engine
    tears the group down on both sides, and the next sync forms a new one (before: the server kept the group's
    name and refused every later /init_weights_update_group)."""
    state = perturbed_state(tiny_qwen_vocab_model, seed=5)
    try:
        with SGLangEngine(_disaggregated(server)) as engine:
            engine.update_weights(list(state.items())[:4])
            with pytest.raises(
                SGLangServerError,
                match=r"update_weights_from_distributed answered HTTP 400: .*Attempted to load",
            ):
                engine.update_weights([("model.norm.weight", torch.zeros(3))])
            _sync(engine, state)
            assert _greedy_gap(engine, tiny_qwen_vocab_model, state) < 1e-4
    finally:
        _restore(server.urls[0], tiny_qwen_vocab_model)


def test_a_trainer_killed_mid_sync_then_a_new_one_attached_to_the_same_server(server, tiny_qwen_vocab_model):
    """Issue 22, item 5: SIGKILL between two broadcasts leaves the server with an open session and a group whose
    peer is dead; a new trainer (a resumed run) attached to the same server syncs fully."""
    code = f"from tests.sglang_real_server import *; sync_then_die_mid_bucket({server.urls[0]!r}, {str(tiny_qwen_vocab_model)!r})"
    killed = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state = perturbed_state(tiny_qwen_vocab_model, seed=8)
    try:
        started = time.monotonic()
        with SGLangEngine(_disaggregated(server)) as engine:
            _sync(engine, state)
            assert _greedy_gap(engine, tiny_qwen_vocab_model, state) < 1e-4
        assert time.monotonic() - started < 30
    finally:
        _restore(server.urls[0], tiny_qwen_vocab_model)


def test_shutdown_after_the_trainers_teardown_is_quiet_and_drops_the_servers_group(
    server, tiny_qwen_vocab_model, tmp_path, capfd
):
    """Issue 22, item 8: a failed run's teardown destroys every process group (``destroy_parallel``), ours too;
    the engine's shutdown, at exit, then raised ``ValueError: Invalid process group specified``."""
    import torch.distributed as dist

    from spin_megatron.parallel import destroy_parallel

    destroy_parallel()  # what an earlier in-process test on this xdist worker left (init_parallel(1, 1))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        engine = SGLangEngine(_disaggregated(server))
        _sync(
            engine, perturbed_state(tiny_qwen_vocab_model, seed=None)
        )  # its own weights: nothing to restore
        name = engine._weights.server_group
    finally:
        dist.destroy_process_group()
    capfd.readouterr()
    engine.shutdown()
    assert capfd.readouterr().err == ""
    # the attached server was told to drop the group: it no longer has it
    response = requests.post(
        server.urls[0] + "/destroy_weights_update_group", json={"group_name": name}, timeout=60
    )
    assert response.status_code == 400 and "does not exist" in response.json()["message"]


def test_the_memory_saver_state_is_read_from_the_real_servers_weight_version(server):
    """Issue 22, item 7: what an earlier trainer released is kept in the server's weight version
    (/update_weight_version, /model_info: both run on CPU; the release itself needs CUDA). A new engine
    attached to the server reads it and refuses to generate until woken."""
    url = server.urls[0]
    base = requests.get(url + "/model_info", timeout=60).json()["weight_version"]
    stamp = proto.update_weight_version_payload(proto.memory_stamp(base, ["kv_cache"]))
    assert requests.post(url + "/update_weight_version", json=stamp, timeout=60).status_code == 200
    try:
        with SGLangEngine(SGLangConfig(urls=(url,), enable_memory_saver=True)) as engine:
            assert engine._memory.asleep() == {url: ["kv_cache"]}
            with pytest.raises(RuntimeError, match=r"asleep .*call wake\(\) before generate"):
                engine.generate(PROMPTS, SamplingParams(max_new_tokens=2))
    finally:
        restore = proto.update_weight_version_payload(base)
        assert requests.post(url + "/update_weight_version", json=restore, timeout=60).status_code == 200
    assert requests.get(url + "/model_info", timeout=60).json()["weight_version"] == base


def _kill_server(engine) -> None:
    for process in engine._fleet.processes.values():
        os.killpg(process.pid, signal.SIGKILL)


def test_supervisor_recovers_from_a_server_killed_mid_generate_mid_sync_and_by_a_bad_payload(
    sglang_python, tiny_qwen_vocab_model, tmp_path
):
    config = cpu_server_config(sglang_python, tiny_qwen_vocab_model, log_dir=tmp_path, sync_mode="colocated")
    supervisor = EngineSupervisor(lambda: SGLangEngine(config), timeout_s=120, vocab_size=151936)
    state = perturbed_state(tiny_qwen_vocab_model, seed=4)
    try:
        # 1. killed while generating: a clear RolloutError, then a new server that serves the synced weights
        long = SamplingParams(n=4, temperature=1.0, max_new_tokens=500, seed=0)  # > 1 s on this CPU
        threading.Timer(1.0, _kill_server, args=(supervisor.engine,)).start()
        with pytest.raises(RolloutError, match="connection failed or dropped"):
            supervisor.generate(PROMPTS, long)
        supervisor.restart()
        _sync(supervisor, state)
        assert supervisor.take_sync_error() is None
        assert _greedy_gap(supervisor.engine, tiny_qwen_vocab_model, state) < 1e-4
        # 2. killed between two buckets of a sync: recorded, the rest drained, a restart and a full sync
        named = list(state.items())
        supervisor.update_weights(named[:4])
        _kill_server(supervisor.engine)
        supervisor.update_weights(named[4:])
        supervisor.finish_weight_update()
        assert "connection" in supervisor.take_sync_error()
        supervisor.restart()
        _sync(supervisor, state)
        assert supervisor.take_sync_error() is None
        # 3. a payload the server cannot take: CPU tensors passed as file descriptors (torch's default, which
        # the engine avoids) are rejected and the server dies on them
        torch.multiprocessing.set_sharing_strategy("file_descriptor")
        _sync(supervisor, state)
        error = supervisor.take_sync_error()
        assert error is not None and "/update_weights_from_tensor" in error
        supervisor.restart()  # the new engine shares CPU tensors through files again
        assert torch.multiprocessing.get_sharing_strategy() == "file_system"
        _sync(supervisor, state)
        assert supervisor.take_sync_error() is None and supervisor.restarts == 3
        assert _greedy_gap(supervisor.engine, tiny_qwen_vocab_model, state) < 1e-4
    finally:
        torch.multiprocessing.set_sharing_strategy("file_system")
        supervisor.shutdown()
