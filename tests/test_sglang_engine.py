"""SGLang engine on CPU: the pure parts (command lines, payloads, parsing, buckets, config) and the HTTP
protocol against a test double speaking SGLang's wire format. The double stands in for the server in protocol
tests only (tests/gpu/test_sglang_gpu.py runs the real one). Run as a script, this file is the double as a
server process (crash and launch tests)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from spin_megatron.errors import ConfigError
from spin_megatron.rollout.sglang import config as cfg
from spin_megatron.rollout.sglang import protocol as proto
from spin_megatron.rollout.protocol import SamplingParams
from spin_megatron.rollout.sglang.buckets import pack_flat_buckets, unpack_flat_bucket
from spin_megatron.rollout.sglang.config import SGLangConfig
from spin_megatron.rollout.sglang.engine import SGLangEngine, _with_policy_checkpoint, build_sglang_engine
from spin_megatron.rollout.sglang.protocol import SGLangServerError, parse_generate_response
from spin_megatron.rollout.sglang.server import _die_with_parent

PARAMS = SamplingParams(n=3, temperature=0.8, max_new_tokens=3, seed=7)


# ===== the double: SGLang's HTTP wire format, deterministic fake generations ===============================
def fake_generation(payload: dict) -> dict:
    """The double's answer to one /generate: tokens depend on the prompt and the sampling seed only."""
    ids, sampling = payload["input_ids"], payload["sampling_params"]
    seed, limit = sampling.get("sampling_seed", 0), sampling["max_new_tokens"]
    length = min(limit, 1 + (sum(ids) + seed) % 4)
    tokens = [(ids[-1] + seed + 7 * k) % 1000 for k in range(length)]
    finish = (
        {"type": "length", "length": length} if length == limit else {"type": "stop", "matched": tokens[-1]}
    )
    logprobs = [[-0.25 * (k + 1), token, None] for k, token in enumerate(tokens)]
    meta = {"id": "r", "finish_reason": finish, "prompt_tokens": len(ids), "output_token_logprobs": logprobs}
    return {"output_ids": tokens, "meta_info": meta}


def expected_output(prompt: list[int], position: int, index: int) -> proto.GenerateOutput:
    payload = proto.generate_payload(prompt, PARAMS, seed=proto.sample_seed(PARAMS.seed, position, index))
    return parse_generate_response(fake_generation(payload))[0]


class DoubleState:
    """What one double server answers (``mode``: ok | never_healthy | error_500 | malformed |
    crash_on_generate) and what it saw: every POST, and the most /generate requests it held at once."""

    def __init__(self, mode: str = "ok", delay_s: float = 0.0, flush_busy: int = 0):
        self.mode, self.delay_s, self.flush_busy = mode, delay_s, flush_busy
        self.lock, self.inflight, self.max_inflight = threading.Lock(), 0, 0
        self.calls: list[tuple[str, object]] = []  # (path, JSON body)

    def handle_post(self, path: str, body) -> tuple[int, str]:
        with self.lock:
            self.calls.append((path, body))
            self.flush_busy -= path == "/flush_cache"
        if path == "/flush_cache":  # SGLang answers 400 while requests are still running
            return (400, "running requests") if self.flush_busy >= 0 else (200, "Cache flushed.\n")
        if path != "/generate":
            return (200, "null") if path.endswith("_memory_occupation") else (404, '{"detail": "Not Found"}')
        with self.lock:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        time.sleep(self.delay_s)
        with self.lock:
            self.inflight -= 1
        if self.mode == "crash_on_generate":
            os._exit(17)  # the server process dies while holding the request
        if self.mode == "error_500":
            return 500, json.dumps({"error": {"message": "CUDA out of memory while decoding"}})
        return 200, json.dumps({"output_ids": [1, 2]} if self.mode == "malformed" else fake_generation(body))


class DoubleHandler(BaseHTTPRequestHandler):
    state: DoubleState

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, status: int, text: str):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(text.encode())))
        self.end_headers()
        self.wfile.write(text.encode())

    def do_GET(self):
        self._reply(200 if self.path == "/health" and self.state.mode != "never_healthy" else 503, "")

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._reply(*self.state.handle_post(self.path, json.loads(raw) if raw else None))


def double_server(state: DoubleState, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), type("Handler", (DoubleHandler,), {"state": state}))


@pytest.fixture
def double():
    """``double(mode=..., delay_s=..., flush_busy=..., state_class=...) -> (url, state)``: in-thread."""
    servers = []

    def start(state_class=None, **kwargs):
        servers.append(server := double_server(state := (state_class or DoubleState)(**kwargs)))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}", state

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def free_port(span: int = 1) -> int:
    """A port p such that p..p+span-1 are free right now."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if all(_bindable(port + offset) for offset in range(span)):
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as sock:  # nobody listens there
        return port <= 65535 and sock.connect_ex(("127.0.0.1", port)) != 0


def pid_gone(pid: int, wait_s: float = 5.0) -> bool:
    """No such process, or a zombie waiting for its reaper (it holds no resources)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status")
        if not status.exists() or "\nState:\tZ" in status.read_text():
            return True
        time.sleep(0.05)
    return False


# ===== pure parts ==========================================================================================
def test_server_command_lines_for_colocated_and_disaggregated_fleets():
    base = SGLangConfig(model_path="/m", random_seed=3, extra_server_args=("--attention-backend", "triton"))
    cmd = " ".join(proto.build_server_command(base, 0, colocated=False)[1:])
    assert cmd.startswith(
        "-m sglang.launch_server --model-path /m --tp-size 1 --host 127.0.0.1 --port 30000 "
    )
    assert "--mem-fraction-static 0.8 --dtype auto --skip-tokenizer-init --random-seed 3" in cmd
    assert cmd.endswith("--attention-backend triton") and "--base-gpu-id" not in cmd
    assert "--enable-memory-saver" not in cmd and "--enable-deterministic-inference" not in cmd
    assert proto.build_server_env(base, 0, {"A": "1"}, colocated=False) == {
        "A": "1",
        "CUDA_VISIBLE_DEVICES": "0",
    }
    # colocated: every server sees all the fleet's GPUs (for CUDA IPC) and picks its own with --base-gpu-id
    coloc = SGLangConfig(model_path="/m", num_engines=2, tp_size=2, enable_memory_saver=True)
    cmd = " ".join(proto.build_server_command(coloc, 1, colocated=True))
    assert "--port 30001 " in cmd and "--base-gpu-id 2 --enable-memory-saver" in cmd
    assert proto.build_server_env(coloc, 1, {}, colocated=True)["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    # disaggregated: each server fenced to its own GPUs
    disagg = SGLangConfig(model_path="/m", num_engines=2, tp_size=2, gpu_ids=(4, 5, 6, 7), use_router=True)
    assert cfg.engine_gpu_groups(disagg) == [(4, 5), (6, 7)]
    assert proto.build_server_env(disagg, 1, {}, colocated=False)["CUDA_VISIBLE_DEVICES"] == "6,7"
    router = " ".join(proto.build_router_command(disagg, cfg.engine_urls(disagg))[1:])
    urls = "http://127.0.0.1:30000 http://127.0.0.1:30001"
    assert router == f"-m sglang_router.launch_router --worker-urls {urls} --host 127.0.0.1 --port 31000 " \
        "--policy round_robin"  # fmt: skip


def test_request_payloads_for_every_endpoint():
    params = SamplingParams(temperature=0.5, top_p=0.9, top_k=20, max_new_tokens=16, stop_token_ids=(2, 3))
    assert proto.generate_payload([5, 6], params, seed=42) == {
        "input_ids": [5, 6], "return_logprob": True, "logprob_start_len": -1, "stream": False,
        "sampling_params": {"n": 1, "temperature": 0.5, "top_p": 0.9, "top_k": 20, "max_new_tokens": 16,
                            "stop_token_ids": [2, 3], "sampling_seed": 42},
    }  # fmt: skip
    unseeded = proto.generate_payload([1], SamplingParams(), seed=None)["sampling_params"]
    assert "sampling_seed" not in unseeded and "stop_token_ids" not in unseeded
    assert proto.update_weights_from_tensor_payload(["blob", "blob"]) == {
        "serialized_named_tensors": ["blob", "blob"], "load_format": "flattened_bucket", "flush_cache": False
    }  # fmt: skip
    group = proto.init_weights_update_group_payload(
        master_address="h", master_port=2955, rank_offset=3, world_size=5
    )
    assert group == {"master_address": "h", "master_port": 2955, "rank_offset": 3, "world_size": 5,
                     "group_name": proto.WEIGHT_UPDATE_GROUP, "backend": "nccl"}  # fmt: skip
    named = [("a.weight", torch.zeros(2, 3, dtype=torch.bfloat16)), ("b.bias", torch.zeros(4))]
    assert proto.update_weights_from_distributed_payload(named) == {
        "names": ["a.weight", "b.bias"], "dtypes": ["bfloat16", "float32"], "shapes": [[2, 3], [4]],
        "group_name": proto.WEIGHT_UPDATE_GROUP, "flush_cache": False,
    }  # fmt: skip
    assert proto.destroy_weights_update_group_payload() == {"group_name": proto.WEIGHT_UPDATE_GROUP}
    assert proto.memory_payload(["kv_cache", "weights"]) == {"tags": ["kv_cache", "weights"]}
    assert proto.engine_rank_offsets(num_engines=2, tp_size=4) == ([1, 5], 9)  # the trainer is rank 0
    seeds = {proto.sample_seed(7, i, j) for i in range(50) for j in range(8)}  # per-sample sampling seeds
    assert (
        len(seeds) == 400 and all(0 <= s < 2**31 for s in seeds) and proto.sample_seed(8, 0, 0) not in seeds
    )


def test_parse_generate_responses():
    stop = fake_generation(proto.generate_payload([1, 2], SamplingParams(max_new_tokens=50), seed=None))
    (out,) = parse_generate_response(stop)
    assert out.finish_reason == "stop" and out.logprobs == [
        -0.25 * (k + 1) for k in range(len(out.output_ids))
    ]
    length = {"output_ids": [4, 5], "meta_info": {"finish_reason": "length"}}  # bare string, no log-probs
    assert parse_generate_response(length)[0] == proto.GenerateOutput([4, 5], "length", None, None)
    old = {
        "text": "hi",
        "meta_info": {"finish_reason": {"type": "stop"}, "output_token_logprobs": [[-1.0, 9]]},
    }
    assert parse_generate_response(old)[0] == proto.GenerateOutput([9], "stop", [-1.0], "hi")
    batch = [fake_generation(proto.generate_payload([i], PARAMS, seed=i)) for i in range(3)]
    assert len(parse_generate_response(batch)) == 3  # n > 1 (or batched input) answers with a list


def _meta(**meta) -> dict:
    return {"meta_info": {"finish_reason": "stop", **meta}}


@pytest.mark.parametrize("body, message", [
    ({"output_ids": [1]}, "no meta_info"),
    ([], "empty list"),
    ({"output_ids": [1], **_meta(finish_reason=None)}, "not stop/length/abort"),
    ({"output_ids": [1], **_meta(finish_reason={"type": "abort", "message": "OOM"})}, "aborted the request"),
    (_meta(), "neither output_ids nor output_token_logprobs"),
    ({"output_ids": [1, 2], **_meta(output_token_logprobs=[[-1.0, 1]])}, "disagree"),
    ({"output_ids": "12", **_meta()}, "not a list of ints"),
    (_meta(output_token_logprobs=[["x", 1]]), "is not [logprob, token_id"),
])  # fmt: skip
def test_malformed_generate_responses_raise_clear_errors(body, message):
    with pytest.raises(SGLangServerError, match="malformed|aborted") as info:
        parse_generate_response(body)
    assert message in str(info.value)


def test_weight_endpoint_success_check():
    endpoint, url = "/update_weights_from_tensor", "http://h:1"
    proto.check_success_response(endpoint, url, {"success": True, "message": "ok"})
    with pytest.raises(SGLangServerError, match=rf"{url}{endpoint} failed: shape mismatch"):
        proto.check_success_response(endpoint, url, {"success": False, "message": "shape mismatch"})
    with pytest.raises(SGLangServerError, match="malformed"):
        proto.check_success_response(endpoint, url, None)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).contiguous().view(torch.uint8)


def test_flat_bucket_round_trip_is_bit_exact_for_mixed_dtypes_and_shapes():
    gen = torch.Generator().manual_seed(0)
    special = torch.tensor([float("nan"), -0.0, float("inf"), 1e-40])  # NaN, signed zero, inf, a denormal
    named = [
        ("w.bf16", torch.randn(3, 5, generator=gen).to(torch.bfloat16)),
        ("w.f32", torch.cat([torch.randn(6, generator=gen), special])),
        ("w.transposed", torch.randn(4, 3, generator=gen).t()),  # non-contiguous
        ("w.scalar", torch.tensor(2.5)),
        ("w.f16", torch.randn(2, 2, 2, generator=gen).half()),
        ("w.empty", torch.zeros(0, 7)),
        ("ids", torch.arange(5, dtype=torch.int64)),
        ("mask", torch.tensor([True, False, True])),
        ("w.bf16.second", torch.randn(7, generator=gen).to(torch.bfloat16)),
    ]
    buckets = pack_flat_buckets(named)
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.int64, torch.bool]
    assert [b.flat.dtype for b in buckets] == dtypes  # one flat tensor per dtype, first-appearance order
    assert [e.name for e in buckets[0].entries] == ["w.bf16", "w.bf16.second"]
    for bucket in buckets:  # entries back to back, in element offsets
        assert bucket.flat.dim() == 1 and bucket.entries[-1].end_idx == bucket.flat.numel()
        assert all(a.end_idx == b.start_idx for a, b in zip(bucket.entries, bucket.entries[1:]))
    restored = dict(pair for bucket in buckets for pair in unpack_flat_bucket(bucket))
    assert set(restored) == {name for name, _ in named}
    for name, tensor in named:
        got = restored[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert torch.equal(_bits(got), _bits(tensor))
    with pytest.raises(ValueError, match="appears twice"):
        pack_flat_buckets([("a", torch.zeros(1)), ("a", torch.ones(1))])


@pytest.mark.parametrize("kwargs, key, allowed", [
    (dict(mem_fraction_static=1.5), "mem_fraction_static", "(0, 1)"),
    (dict(sync_mode="ipc"), "sync_mode", "'auto', 'colocated', 'disaggregated'"),
    (dict(router_policy="best"), "router_policy", "'round_robin'"),
    (dict(dtype="fp8"), "dtype", "'bfloat16'"),
    (dict(num_engines=0), "num_engines", "≥ 1"),
    (dict(max_inflight_requests=0), "max_inflight_requests", "≥ 1"),
    (dict(num_engines=2, gpu_ids=(0, 1, 2)), "gpu_ids", "num_engines × tp_size = 2"),
    (dict(base_port=70000), "base_port", "[1, 65535]"),
    (dict(use_router=True, num_engines=2, router_port=30001), "router_port", "must differ"),
    (dict(health_timeout_s=0), "health_timeout_s", "> 0"),
    (dict(urls=("localhost:30000",)), "urls", "http://"),
])  # fmt: skip
def test_config_validation_names_the_key_and_allowed_values(kwargs, key, allowed):
    with pytest.raises(ConfigError) as info:
        SGLangConfig(**{"model_path": "/m", **kwargs})
    assert f"rollout.sglang.{key}" in str(info.value) and allowed in str(info.value)


def test_launching_needs_a_model_path():
    with pytest.raises(ConfigError, match=r"rollout.sglang.model_path is required .* rollout.sglang.urls"):
        SGLangEngine(SGLangConfig())


def test_sync_mode_resolution():
    def mode(trainer_gpus=None, **kwargs):
        return cfg.resolve_sync_mode(SGLangConfig(**{"model_path": "/m", **kwargs}), trainer_gpus)

    assert mode(enable_memory_saver=True) == "colocated"
    assert mode([0]) == "colocated"  # a launched server on the trainer's GPU 0
    assert mode([0], gpu_ids=(1,)) == "disaggregated"
    assert mode([0], urls=("http://h:1",)) == "disaggregated"  # attached: their GPUs are unknown
    assert mode(sync_mode="disaggregated", enable_memory_saver=True) == "disaggregated"


def test_trainer_factory_splits_servers_over_replicas_and_starts_without_an_hf_checkpoint(double, tmp_path):
    urls = [double()[0] for _ in range(4)]
    cfg = argparse.Namespace(rollout=argparse.Namespace(sglang={"urls": urls}), trainer=None)
    with build_sglang_engine(cfg, None, argparse.Namespace(dp_rank=1, dp_size=2)) as engine:
        assert engine.urls == urls[2:]  # replica 1 of 2 takes the second half
    source = argparse.Namespace(hf_dir=None, arch=argparse.Namespace(hf_config={"model_type": "qwen2"}))
    config = _with_policy_checkpoint(SGLangConfig(extra_server_args=("--x",)), source, tmp_path)
    assert config.extra_server_args == ("--x", "--load-format", "dummy")  # the first weight sync fills them
    assert json.loads((Path(config.model_path) / "config.json").read_text()) == {"model_type": "qwen2"}


# ===== protocol tests against the double ===================================================================
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
        engine.update_weights([])  # an empty bucket sends nothing
        engine.finish_weight_update()  # a released KV cache was flushed by the release, has served nothing
        engine.wake()
        assert state.calls == [("/resume_memory_occupation", {"tags": ["weights", "kv_cache"]})]
    url, state = double()
    with SGLangEngine(SGLangConfig(urls=(url,))) as engine:
        engine.sleep()
        engine.wake()  # without the memory saver the servers keep their memory
    assert state.calls == []
    with pytest.raises(RuntimeError, match="shut down"):
        engine.generate([[1]], SamplingParams())


class FakeSerializer:  # SGLang's MultiprocessingSerializer: here the metadata only, as JSON
    @staticmethod
    def serialize(obj, output_str: bool) -> str:
        return json.dumps([[meta.name, str(meta.dtype)] for meta in obj["metadata"]])


@pytest.fixture
def fake_transport(monkeypatch):
    """CPU stand-ins for the GPU-only pieces of weight sync (SGLang's serializer, metadata class and group
    helper; CUDA; NCCL), recording what would have gone over the wire."""
    seen: dict[str, list] = {"groups": [], "broadcasts": [], "destroyed": []}
    for name in ("sglang.srt.utils", "sglang.srt.weight_sync.tensor_bucket"):
        monkeypatch.setitem(sys.modules, name, type(sys)(name))
    utils = sys.modules["sglang.srt.utils"]
    utils.MultiprocessingSerializer = FakeSerializer
    utils.init_custom_process_group = lambda **kw: seen["groups"].append(kw) or "group"
    sys.modules["sglang.srt.weight_sync.tensor_bucket"].FlattenedTensorMetadata = argparse.Namespace
    dist = torch.distributed
    monkeypatch.setattr(dist, "broadcast", lambda tensor, src, group: seen["broadcasts"].append(tensor.shape))
    monkeypatch.setattr(dist, "destroy_process_group", lambda group: seen["destroyed"].append(group))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: argparse.Namespace(synchronize=lambda: None))
    monkeypatch.setattr("spin_megatron.rollout.sglang.weights._to_current_gpu", lambda named: list(named))
    return seen


class WeightDouble(DoubleState):
    def handle_post(self, path: str, body) -> tuple[int, str]:
        if "weights" not in path:
            return super().handle_post(path, body)
        self.calls.append((path, body))
        return 200, json.dumps({"success": True, "message": "ok"})


def test_weight_sync_requests_colocated_and_disaggregated(double, fake_transport):
    (url_a, _), (url_b, state) = double(state_class=WeightDouble), double(state_class=WeightDouble)
    bf16, f32 = torch.bfloat16, torch.float32
    bucket = [
        ("a", torch.ones(3, 4, dtype=bf16)),
        ("b", torch.ones(5, dtype=f32)),
        ("c", torch.ones(2, dtype=bf16)),
    ]
    urls = (url_a, url_b)
    with SGLangEngine(
        SGLangConfig(urls=urls, tp_size=2, enable_memory_saver=True), trainer_gpu_ids=[]
    ) as engine:
        engine.sleep()
        state.calls.clear()
        engine.update_weights(bucket)  # resumes the weights first; one flattened bucket per dtype
        engine.finish_weight_update()
        engine.wake()

    def tensor_call(*names_dtypes):  # each TP rank gets its own copy of the serialized bucket
        blob = json.dumps([list(pair) for pair in names_dtypes])
        return "/update_weights_from_tensor", proto.update_weights_from_tensor_payload([blob, blob])

    assert state.calls == [
        ("/resume_memory_occupation", {"tags": ["weights"]}),
        tensor_call(("a", "torch.bfloat16"), ("c", "torch.bfloat16")),
        tensor_call(("b", "torch.float32")),
        ("/resume_memory_occupation", {"tags": ["kv_cache"]}),
    ]
    state.calls.clear()
    config = SGLangConfig(
        urls=urls, tp_size=2, weight_sync_master_port=29500, weight_sync_master_address="127.0.0.1"
    )
    with SGLangEngine(config, trainer_gpu_ids=[]) as engine:
        engine.update_weights(bucket)
        engine.update_weights(bucket[:1])
        engine.finish_weight_update()
    group = proto.init_weights_update_group_payload(  # server B's TP ranks are 3 and 4 of 1 + 2 × 2
        master_address="127.0.0.1", master_port=29500, rank_offset=3, world_size=5
    )
    assert state.calls == [
        ("/init_weights_update_group", group),
        ("/update_weights_from_distributed", proto.update_weights_from_distributed_payload(bucket)),
        ("/update_weights_from_distributed", proto.update_weights_from_distributed_payload(bucket[:1])),
        ("/flush_cache", None),
        ("/destroy_weights_update_group", {"group_name": proto.WEIGHT_UPDATE_GROUP}),
    ]  # fmt: skip
    assert [group["rank"] for group in fake_transport["groups"]] == [0]  # the trainer, rank 0 of 1 + 2 × 2
    assert fake_transport["broadcasts"] == [(3, 4), (5,), (2,), (3, 4)]  # in the order of the posted names
    assert fake_transport["destroyed"] == ["group"]


def test_server_killed_mid_request_is_a_clear_error():
    port = free_port()
    command = [sys.executable, __file__, "--port", str(port), "--double-mode", "crash_on_generate"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
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


# `python -m sglang.launch_server` and `python -m sglang_router.launch_router` resolve to these shims, which
# run this file's double
SHIM = f"""import runpy, sys
sys.argv = [{__file__!r}, "--spawn-child"] + sys.argv[1:]
runpy.run_path({__file__!r}, run_name="__main__")
"""
SHIMS = {"sglang/__init__.py": "", "sglang/launch_server.py": SHIM}
SHIMS |= {"sglang_router/__init__.py": "", "sglang_router/launch_router.py": SHIM}


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


# ===== run as a script: the double as a server process =====================================================
def serve_double(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--double-mode", default="ok")
    parser.add_argument("--spawn-child", action="store_true")
    args, _ = parser.parse_known_args(argv)  # the real servers' other flags (--model-path, ...) are ignored
    print(f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}", flush=True)
    if args.double_mode == "exit_on_start":
        print(
            "RuntimeError: not enough memory for the model weights (the double's scripted failure)",
            flush=True,
        )
        sys.exit(3)
    if args.spawn_child:  # like SGLang's scheduler process: must not outlive the server (nor its death)
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"], preexec_fn=_die_with_parent
        )
        print(f"child pid {child.pid}", flush=True)
    double_server(DoubleState(mode=args.double_mode), args.host, args.port).serve_forever()


if __name__ == "__main__":
    serve_double(sys.argv[1:])
