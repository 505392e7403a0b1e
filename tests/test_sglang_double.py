"""SGLang engine against the protocol double (tests/sglang_double.py): what the real CPU server cannot show
in the suite (scripted HTTP errors, malformed answers, crashes, the memory saver) and the exact request
sequence of each lifecycle. The double answers as SGLang 0.5.23 does where the trainer depends on it
(sessions, idle check on release, released weights lost)."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time

import pytest
import torch

from spin_megatron.rollout.protocol import SamplingParams
from spin_megatron.rollout.sglang import protocol as proto
from spin_megatron.rollout.sglang import server as server_module
from spin_megatron.rollout.sglang import weights as weights_module
from spin_megatron.rollout.sglang.config import SGLangConfig
from spin_megatron.rollout.sglang.engine import SGLangEngine
from spin_megatron.rollout.sglang.protocol import SGLangServerError
from spin_megatron.rollout.supervisor import EngineSupervisor
from tests.sglang_double import PARAMS, SHIMS, expected_output, free_port, pid_gone

DOUBLE_SCRIPT = str(__import__("tests.sglang_double", fromlist=["x"]).__file__)


def test_generate_end_to_end_across_two_attached_servers(double):
    (url_a, state_a), (url_b, _) = double(), double()
    prompts, keys = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]], ["p0", "p1", "p2", "p3"]
    with SGLangEngine(SGLangConfig(urls=(url_a, url_b), max_inflight_requests=4)) as engine:
        assert engine.sync_mode == "disaggregated" and engine.urls == [url_a, url_b]
        samples = engine.generate(prompts, PARAMS, prompt_keys=keys)
        again = engine.generate(prompts, PARAMS, prompt_keys=keys)
    assert [(s.prompt_id, s.sample_index) for s in samples] == [(k, j) for k in keys for j in range(3)]
    for sample in samples:
        position = keys.index(sample.prompt_id)
        expected = expected_output(prompts[position], position, sample.sample_index)
        assert sample.prompt_ids == prompts[position] and sample.response_ids == expected.output_ids
        assert sample.logprobs == expected.logprobs and sample.finish_reason == expected.finish_reason
    assert [s.response_ids for s in again] == [s.response_ids for s in samples]  # same seed, same samples
    on_a = [body for path, body in state_a.calls if path == "/generate"]
    assert len({body["sampling_params"]["sampling_seed"] for body in on_a}) == 6  # a seed per sample, twice
    # prompts alternate between the servers; the samples of a prompt stay on one server (shared prefix cache)
    assert sorted(body["input_ids"] for body in on_a) == sorted([prompts[0]] * 6 + [prompts[2]] * 6)


def test_in_flight_requests_are_bounded(double):
    url, state = double(delay_s=0.05)
    with SGLangEngine(SGLangConfig(urls=(url,), max_inflight_requests=3)) as engine:
        samples = engine.generate([[i + 1] for i in range(6)], SamplingParams(n=2, max_new_tokens=2))
    assert len(samples) == 12 and 2 <= state.max_inflight <= 3


def test_health_timeout_is_a_clear_error_within_the_timeout(double):
    url, _ = double(mode="never_healthy")
    start = time.monotonic()
    pattern = r"did not become healthy within 1 s \(last: HTTP 503"
    with pytest.raises(SGLangServerError, match=pattern) as info:
        SGLangEngine(SGLangConfig(urls=(url,), health_timeout_s=1.0))
    assert time.monotonic() - start < 3.0 and "rollout.sglang.health_timeout_s" in str(info.value)


ERRORS = {"error_500": r"/generate answered HTTP 500: .*CUDA out of memory", "malformed": r"malformed .*meta"}


@pytest.mark.parametrize("mode, pattern", ERRORS.items())
def test_server_errors_during_generation_are_clear(double, mode, pattern):
    url, _ = double(mode=mode)
    with SGLangEngine(SGLangConfig(urls=(url,))) as engine, pytest.raises(SGLangServerError, match=pattern):
        engine.generate([[1, 2]], SamplingParams(n=2, max_new_tokens=4))


def test_sleep_wake_and_cache_flush_protocol(double):
    url, state = double(flush_busy=2)
    with SGLangEngine(SGLangConfig(urls=(url,), enable_memory_saver=True)) as engine:
        assert engine.sync_mode == "colocated"
        engine.finish_weight_update()  # retried while the server reports running requests (HTTP 400)
        assert [path for path, _ in state.calls] == ["/flush_cache"] * 3
        state.calls.clear()
        engine.sleep()
        engine.sleep()  # already asleep: nothing more to release
        with pytest.raises(RuntimeError, match=r"call wake\(\) before generate"):
            engine.generate([[1]], SamplingParams())
        release = ("/release_memory_occupation", {"tags": ["kv_cache", "weights"]})
        assert state.calls == [("/flush_cache", None), release]
        state.calls.clear()
        engine.update_weights([])  # an empty bucket sends nothing (and opens no session)
        engine.wake()
        assert state.calls == [("/resume_memory_occupation", {"tags": ["weights", "kv_cache"]})]
    url, state = double()
    with SGLangEngine(SGLangConfig(urls=(url,))) as engine:
        engine.sleep()
        engine.wake()  # without the memory saver the servers keep their memory
    assert state.calls == []
    with pytest.raises(RuntimeError, match="shut down"):
        engine.generate([[1]], SamplingParams())


BF16, F32 = torch.bfloat16, torch.float32
BUCKET = [
    ("a", torch.ones(3, 4, dtype=BF16)),
    ("b", torch.ones(5, dtype=F32)),
    ("c", torch.ones(2, dtype=BF16)),
]


@pytest.fixture
def count_serializations(monkeypatch):
    """Counts the colocated payloads serialized (each must be for one consumer rank only)."""
    calls = []
    real = weights_module.serialize_for_one_consumer

    def counting(obj):
        calls.append(obj)
        return real(obj)

    monkeypatch.setattr(weights_module, "serialize_for_one_consumer", counting)
    return calls


def test_colocated_sync_opens_a_session_and_serializes_one_payload_per_server_rank(
    double, count_serializations
):
    (url_a, state_a), (url_b, state) = double(), double()
    config = SGLangConfig(urls=(url_a, url_b), tp_size=2, enable_memory_saver=True)
    with SGLangEngine(config, trainer_gpu_ids=[]) as engine:
        assert engine.sync_mode == "colocated"
        engine.sleep()  # a sync follows: KV cache and weights released
        state.calls.clear()
        engine.update_weights(BUCKET)  # resumes the weights, opens the session; one flat tensor per dtype
        engine.update_weights(BUCKET[1:2])
        engine.finish_weight_update()  # closes the session; the released KV cache needs no flush
        engine.wake()
    tensor_posts = [body for path, body in state.calls if path == "/update_weights_from_tensor"]
    assert state.paths() == [
        "/resume_memory_occupation", "/begin_weight_update", *["/update_weights_from_tensor"] * 3,
        "/end_weight_update", "/resume_memory_occupation",
    ]  # fmt: skip
    assert [call[1] for call in state.calls if "memory" in call[0]] == [
        {"tags": ["weights"]},
        {"tags": ["kv_cache"]},
    ]
    assert all(len(body["serialized_named_tensors"]) == 2 and body["load_format"] == "flattened_bucket"
               for body in tensor_posts)  # fmt: skip
    # 3 flat buckets × 2 servers × 2 TP ranks: every consumer rank decodes a payload serialized for it alone
    assert len(count_serializations) == 12
    assert not state.session_open and not state_a.session_open and not state.weights_lost


def test_sleep_before_a_step_without_sync_keeps_the_weights(double):
    url, state = double()
    with SGLangEngine(SGLangConfig(urls=(url,), enable_memory_saver=True)) as engine:
        engine.sleep(release_weights=False)  # rollout.sync_every > 1: no sync will reload them
        engine.wake()
        assert engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))
        assert [body for path, body in state.calls if "memory" in path] == [{"tags": ["kv_cache"]}] * 2
        # what the trainer avoids: released weights resumed without a sync are lost (SGLang keeps no copy)
        engine.sleep()
        engine.wake()
        with pytest.raises(SGLangServerError, match="never reloaded"):
            engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))


def test_memory_saver_state_is_tracked_per_server(double):
    """A release that fails on one server: the other's release is remembered, and only it is resumed (issue 22,
    item 7). Resuming a region a server does not hold released kills it (SGLang's KeyError, see the double)."""
    (url_a, state_a), (url_b, state_b) = double(), double(mode="busy_on_release")
    with SGLangEngine(SGLangConfig(urls=(url_a, url_b), enable_memory_saver=True)) as engine:
        with pytest.raises(SGLangServerError, match=rf"{url_b}/release_memory_occupation answered HTTP 500"):
            engine.sleep()
        assert state_a.released == {"kv_cache", "weights"} and not state_b.released
        with pytest.raises(RuntimeError, match=rf"asleep .*{url_a}.*call wake\(\) before generate"):
            engine.generate([[1]], SamplingParams())
        engine.update_weights(BUCKET)  # resumes the weights of server A only
        engine.finish_weight_update()
        engine.wake()
        assert engine.generate([[1, 2]], SamplingParams(n=2, max_new_tokens=2))
    assert not state_a.dead and not state_b.dead and not state_a.released
    assert [body for path, body in state_b.calls if "memory" in path] == [{"tags": ["kv_cache", "weights"]}]


def test_a_new_engine_finds_what_an_earlier_one_left_released(double):
    """The state is kept on the servers (their weight version): a supervisor restart or a resumed trainer
    attached to the same servers neither generates on released memory nor leaves it released."""
    url, state = double()
    config = SGLangConfig(urls=(url,), enable_memory_saver=True)
    with SGLangEngine(config) as first:
        first.sleep(
            release_weights=False
        )  # and then the trainer dies (or the supervisor replaces the engine)
    assert state.weight_version == "default+spin_megatron.released=kv_cache"
    with SGLangEngine(config) as second:
        with pytest.raises(RuntimeError, match=r"asleep .*kv_cache.*call wake\(\) before generate"):
            second.generate([[1]], SamplingParams())
        second.wake()
        assert second.generate([[1]], SamplingParams(max_new_tokens=2))
    assert state.weight_version == "default" and state.versions[-1] == "default" and not state.dead


def test_a_server_restarted_under_the_engine_is_not_resumed(double):
    """An attached server restarted while released starts with nothing released (and its own weight version):
    the engine reads that before resuming, so it never resumes a region the new server does not hold released."""
    (url_a, state_a), (url_b, state_b) = double(), double()
    with SGLangEngine(SGLangConfig(urls=(url_a, url_b), enable_memory_saver=True)) as engine:
        engine.sleep()
        state_a.released, state_a.weight_version = set(), "default"  # server A restarted (fresh, awake)
        engine.update_weights(BUCKET)
        engine.finish_weight_update()
        engine.wake()
        assert engine.generate([[1, 2], [3]], SamplingParams(max_new_tokens=2))
    assert not state_a.dead and not state_b.dead
    assert not [path for path, _ in state_a.calls if path == "/resume_memory_occupation"]
    assert [body for path, body in state_b.calls if path == "/resume_memory_occupation"] == [
        {"tags": ["weights"]},
        {"tags": ["kv_cache"]},
    ]


def test_colocated_buckets_are_served_from_each_consumers_device(double, monkeypatch):
    """Each (server, TP rank) gets a payload made from a copy of the bucket on its own device (issue 22, item 6:
    SGLang's flattened-bucket loader does not move an IPC tensor, so a server reading another GPU's buffer would
    copy across GPUs). On CPU the 'meta' device stands in for a second GPU."""
    (url_a, _), (url_b, _) = double(), double()
    seen = []
    monkeypatch.setattr(
        weights_module, "serialize_for_one_consumer", lambda obj: seen.append(obj["flattened_tensor"].device)
    )
    with SGLangEngine(SGLangConfig(urls=(url_a, url_b), sync_mode="colocated")) as engine:
        engine._weights.devices = [[torch.device("cpu")], [torch.device("meta")]]
        engine.update_weights(BUCKET)  # two dtypes: two flat buckets, each to both servers
        engine.finish_weight_update()
    assert [d.type for d in seen] == ["cpu", "meta", "cpu", "meta"]


@pytest.mark.parametrize(
    "groups, servers, tp, visible, expected",
    [
        ([(0,), (1,)], 2, 1, "", ["cuda:0", "cuda:1"]),  # each server's own GPU
        (
            [(4, 5)],
            1,
            2,
            "4,5,6",
            ["cuda:0", "cuda:1"],
        ),  # physical ids through CUDA_VISIBLE_DEVICES, per TP rank
        ([(0,), (3,)], 2, 1, "0,1", ["cuda:0", "cuda:0"]),  # a GPU this process cannot see: the engine rank's
        (None, 2, 1, "", ["cuda:0", "cuda:0"]),  # attached servers: GPUs unknown
    ],
)
def test_consumer_devices(monkeypatch, groups, servers, tp, visible, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    devices = weights_module.consumer_devices(groups, servers, tp, torch.device("cuda", 0))
    assert [str(d) for server in devices for d in server] == expected
    cpu = torch.device("cpu")
    assert weights_module.consumer_devices(groups, servers, tp, cpu) == [[cpu] * tp] * servers


@pytest.fixture
def fake_group(monkeypatch):
    """The double cannot join a process group: the trainer's end of it is recorded instead."""
    seen = {"groups": [], "broadcasts": [], "destroyed": []}
    monkeypatch.setattr(
        weights_module, "new_weight_update_group", lambda **kw: seen["groups"].append(kw) or "g"
    )
    monkeypatch.setattr(
        torch.distributed, "broadcast", lambda t, src, group: seen["broadcasts"].append(t.shape)
    )
    monkeypatch.setattr(weights_module, "_destroy_local", lambda group: seen["destroyed"].append(group))
    return seen


def test_a_taken_weight_sync_port_is_named_before_any_server_is_asked_to_join(double, fake_group):
    url, state = double()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = SGLangConfig(urls=(url,), weight_sync_master_port=taken.getsockname()[1])
        with SGLangEngine(config, trainer_gpu_ids=[]) as engine:
            with pytest.raises(SGLangServerError, match=r"cannot host the weight-update rendezvous on 127.0.0.1:"
                               r"\d+ .*weight_sync_master_port=0 \(a free port\)"):  # fmt: skip
                engine.update_weights(BUCKET)
    assert not [path for path, _ in state.calls if path == "/init_weights_update_group"]
    assert fake_group["groups"] == []


def test_disaggregated_sync_requests_inside_a_session(double, fake_group):
    (url_a, _), (url_b, state) = double(), double()
    config = SGLangConfig(urls=(url_a, url_b), tp_size=2)  # weight_sync_master_port=0: the OS picks one
    with SGLangEngine(config, trainer_gpu_ids=[]) as engine:
        engine.update_weights(BUCKET)
        engine.update_weights(BUCKET[:1])
        engine.finish_weight_update()
    (trainer_end,) = fake_group["groups"]
    # The servers are told the port of a store that is already bound (nothing to race for).
    port = trainer_end["store"].port
    assert port > 0 and trainer_end["master_port"] == port
    name = trainer_end["group_name"]  # a name of its own for every group formed (see the failure tests)
    assert name.startswith(proto.WEIGHT_UPDATE_GROUP + "_") and name != proto.new_weight_update_group_name()
    group = proto.init_weights_update_group_payload(  # server B's TP ranks are 3 and 4 of 1 + 2 × 2
        master_address="127.0.0.1", master_port=port, rank_offset=3, world_size=5, backend="gloo",
        group_name=name,
    )  # fmt: skip
    update = proto.update_weights_from_distributed_payload
    assert state.calls == [
        ("/begin_weight_update", {"selector": "all"}),
        ("/init_weights_update_group", group),
        ("/update_weights_from_distributed", update(BUCKET, group_name=name)),
        ("/update_weights_from_distributed", update(BUCKET[:1], group_name=name)),
        ("/end_weight_update", {}),
        ("/flush_cache", None),
        ("/destroy_weights_update_group", {"group_name": name}),
    ]  # fmt: skip
    assert [g["rank"] for g in fake_group["groups"]] == [0] and fake_group["groups"][0]["backend"] == "gloo"
    assert fake_group["broadcasts"] == [(3, 4), (5,), (2,), (3, 4)]  # in the order of the posted names
    assert fake_group["destroyed"] == ["g"]


def test_servers_without_session_endpoints_are_updated_without_a_session(double, capsys):
    url, state = double(mode="no_sessions")
    with SGLangEngine(SGLangConfig(urls=(url,), sync_mode="colocated")) as engine:
        for _ in range(2):
            engine.update_weights(BUCKET)
            engine.finish_weight_update()
    assert state.paths().count("/begin_weight_update") == 1  # asked once, then remembered
    assert "/end_weight_update" not in state.paths() and state.updates == 4
    assert capsys.readouterr().err.count("SGLang < 0.5.23") == 1


def test_a_failed_update_closes_the_session_and_the_next_sync_starts_clean(double):
    url, state = double(fail_update_at=2)
    with SGLangEngine(SGLangConfig(urls=(url,), sync_mode="colocated")) as engine:
        engine.update_weights(BUCKET[:1])
        with pytest.raises(SGLangServerError, match=r"update_weights_from_tensor .*shape mismatch"):
            engine.update_weights(BUCKET[1:2])
        assert state.paths()[-1] == "/end_weight_update" and not state.session_open
        engine.update_weights(BUCKET)  # a new sync: a new session
        engine.finish_weight_update()
    assert state.paths().count("/begin_weight_update") == 2 and not state.session_open


def test_a_session_left_open_by_a_dead_trainer_is_closed_and_reopened(double):
    url, state = double()
    state.session_open = True  # an earlier trainer died inside a sync
    with SGLangEngine(SGLangConfig(urls=(url,), sync_mode="colocated")) as engine:
        engine.update_weights(BUCKET)
        engine.finish_weight_update()
    assert state.paths()[:3] == ["/begin_weight_update", "/end_weight_update", "/begin_weight_update"]
    assert state.updates == 2 and not state.session_open


def test_supervisor_records_a_failed_sync_drains_its_buckets_and_restarts_clean(double):
    url, state = double(fail_update_at=1)
    supervisor = EngineSupervisor(
        lambda: SGLangEngine(SGLangConfig(urls=(url,), sync_mode="colocated")), timeout_s=30, vocab_size=1000
    )
    supervisor.update_weights(BUCKET)  # refused by the server: recorded, not raised
    supervisor.update_weights(BUCKET)  # the rest of this sync's buckets are received and dropped
    supervisor.finish_weight_update()
    error = supervisor.take_sync_error()
    assert "shape mismatch" in error and supervisor.take_sync_error() is None
    assert state.updates == 1 and not state.session_open  # nothing after the failure; session closed
    supervisor.restart()
    supervisor.update_weights(BUCKET)
    supervisor.finish_weight_update()
    assert supervisor.take_sync_error() is None and state.updates == 3 and supervisor.restarts == 1
    supervisor.shutdown()


def test_a_failed_sync_removes_the_servers_group_and_the_next_one_forms_a_new_one(double, fake_group):
    """Issue 22, item 5: after a failure the servers are told to destroy the group (it may exist on their side
    whatever ours saw), and the next sync forms one under a new name (a server that missed the destroy, or a
    crashed trainer's, keeps the old name: torch refuses a second group of the same name)."""
    url, state = double(fail_update_at=1)
    with SGLangEngine(SGLangConfig(urls=(url,)), trainer_gpu_ids=[]) as engine:
        with pytest.raises(SGLangServerError, match="shape mismatch"):
            engine.update_weights(BUCKET)
        engine.update_weights(BUCKET)
        engine.finish_weight_update()
    first, second = [body["group_name"] for path, body in state.calls if path == "/init_weights_update_group"]
    assert first != second
    destroyed = [body["group_name"] for path, body in state.calls if path == "/destroy_weights_update_group"]
    assert destroyed == [
        first,
        second,
    ]  # after the failure, then at shutdown (an attached server outlives us)
    assert state.paths().index("/destroy_weights_update_group") < state.paths().index("/end_weight_update")
    assert len(fake_group["destroyed"]) == 2 and not state.session_open


def test_server_killed_mid_request_is_a_clear_error():
    port = free_port()
    command = [sys.executable, DOUBLE_SCRIPT, "--port", str(port), "--double-mode", "crash_on_generate"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # an attached server must be listening already (a refused connection fails the start in seconds)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        with SGLangEngine(SGLangConfig(urls=(f"http://127.0.0.1:{port}",), health_timeout_s=60)) as engine:
            with pytest.raises(SGLangServerError, match=r"/generate: connection failed or dropped .*crashed"):
                engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))
        assert process.wait(timeout=10) == 17
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="needs an env without SGLang")
def test_a_server_that_dies_while_starting_reports_its_log_tail(tmp_path):
    config = SGLangConfig(model_path="/m", base_port=free_port(), log_dir=str(tmp_path), health_timeout_s=60)
    died = r"(?s)died before becoming healthy: SGLang server 0 \(pid \d+\) exited with code 1.*No module"
    with pytest.raises(SGLangServerError, match=died):
        SGLangEngine(config, trainer_gpu_ids=[])


def test_a_launch_onto_a_port_where_a_stale_server_answers_is_refused(double, tmp_path, monkeypatch):
    """The stale server would pass the health check in place of the one being launched."""
    url, state = double()
    monkeypatch.setattr(server_module, "PORT_RELEASE_WAIT_S", 0.3)
    port = int(url.rsplit(":", 1)[1])
    config = SGLangConfig(model_path="/m", base_port=port - 1, num_engines=2, log_dir=str(tmp_path))
    taken = rf"SGLang server 1: port {port} on 127.0.0.1 is in use .*set rollout.sglang.base_port to the first of 2"
    with pytest.raises(SGLangServerError, match=taken):
        SGLangEngine(config, trainer_gpu_ids=[])
    assert not list(tmp_path.iterdir()) and state.calls == []  # nothing launched, the stale server not used


def test_launched_fleet_with_router_generates_and_leaves_no_process_behind(tmp_path, monkeypatch):
    for name, text in SHIMS.items():
        (tmp_path / "shims" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "shims" / name).write_text(text)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "shims"))
    port, router_port = free_port(span=2), free_port()
    config = SGLangConfig(
        model_path="fake-model", num_engines=2, gpu_ids=(3, 5), base_port=port, use_router=True,
        router_port=router_port, log_dir=str(tmp_path / "logs"), health_timeout_s=60,
    )  # fmt: skip
    with SGLangEngine(config, trainer_gpu_ids=[0]) as engine:
        assert engine.sync_mode == "disaggregated"
        assert engine._fleet.generate_urls == [f"http://127.0.0.1:{router_port}"]  # generation via the router
        samples = engine.generate([[1, 2], [3]], PARAMS)
        pids = [process.pid for process in engine._fleet.processes.values()]
    assert samples[4].response_ids == expected_output([3], 1, 1).output_ids
    logs = {path.name: path.read_text() for path in (tmp_path / "logs").iterdir()}
    launch = f"-m sglang.launch_server --model-path fake-model --tp-size 1 --host 127.0.0.1 --port {port + 1}"
    assert launch in logs["sglang_server_1.log"] and "CUDA_VISIBLE_DEVICES=5" in logs["sglang_server_1.log"]
    assert f"--worker-urls http://127.0.0.1:{port} http://127.0.0.1:{port + 1}" in logs["sglang_router.log"]
    lines = [line for text in logs.values() for line in text.splitlines()]
    children = [int(line.split()[-1]) for line in lines if line.startswith("child pid")]
    assert len(pids) == 3 and len(children) == 3
    assert all(pid_gone(pid) for pid in pids + children)  # the servers' own children die with them


def test_spin_train_with_a_taken_server_port_fails_in_one_line(capsys, tmp_path, monkeypatch):
    from spin_megatron.train import main

    monkeypatch.setattr(server_module, "PORT_RELEASE_WAIT_S", 0.3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        capsys.readouterr()
        code = main(
            ["experiment=tiny_cpu", f"trainer.output_dir={tmp_path / 'run'}", "rollout.engine=sglang",
             f"rollout.sglang.base_port={port}", "rollout.sglang.enable_memory_saver=false"]
        )  # fmt: skip
    err = capsys.readouterr().err.strip()
    (line,) = [line for line in err.splitlines() if "error" in line]  # (above it: the initial model's writer)
    assert code == 2 and line == err.splitlines()[-1], err
    assert line.startswith(f"spin-train: error: SGLang server 0: port {port} on 127.0.0.1 is in use"), err


def test_spin_train_with_a_server_that_dies_while_starting_fails_in_one_line(capsys, tmp_path):
    """Issue 22, item 8: one line naming the server's log file and its last line, no traceback."""
    from spin_megatron.train import main

    python = tmp_path / "python"  # an interpreter that is there, but whose server dies at once
    python.write_text(
        "#!/bin/sh\necho 'RuntimeError: not enough memory for the weights (scripted)'\nexit 3\n"
    )
    python.chmod(0o755)
    capsys.readouterr()
    code = main(
        ["experiment=tiny_cpu", f"trainer.output_dir={tmp_path / 'run'}", "rollout.engine=sglang",
         f"rollout.sglang.python_executable={python}", f"rollout.sglang.base_port={free_port()}",
         f"rollout.sglang.log_dir={tmp_path / 'logs'}"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err, err
    line = err.splitlines()[-1]
    assert line.startswith("spin-train: error: SGLang server at http://127.0.0.1:"), err
    assert "died before becoming healthy: SGLang server 0 (pid " in line and "exited with code 3" in line
    assert (
        f"its log: {tmp_path / 'logs' / 'sglang_server_0.log'} (last line: RuntimeError: not enough" in line
    )


def test_spin_train_attached_to_a_url_where_nothing_listens_fails_within_seconds(capsys, tmp_path):
    """Connection refused is not a server that is still loading: one line naming the URL, in seconds (it was
    health_timeout_s, 900 s by default, then a traceback)."""
    from spin_megatron.train import main

    url = f"http://127.0.0.1:{free_port()}"
    capsys.readouterr()
    started = time.monotonic()
    code = main(
        ["experiment=tiny_cpu", f"trainer.output_dir={tmp_path / 'run'}", "rollout.engine=sglang",
         f"rollout.sglang.urls=[{url}]", "rollout.sglang.health_timeout_s=60"]
    )  # fmt: skip
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1] == (
        f"spin-train: error: SGLang server at {url} refuses connections (nothing listens there): start it first, "
        "or fix rollout.sglang.urls"
    )
    assert elapsed < 40, elapsed  # the run's own start-up included (model, data); the wait itself is 5 s
