"""SGLang engine, the pure parts: command lines, environment, request payloads, response parsing, flat
buckets, configuration. Nothing here starts a process; tests/test_sglang_contract.py checks the same payloads
against SGLang's own request classes, tests/test_sglang_real.py against a real server."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from spin_megatron.errors import ConfigError
from spin_megatron.rollout.protocol import SamplingParams
from spin_megatron.rollout.sglang import config as cfg
from spin_megatron.rollout.sglang import protocol as proto
from spin_megatron.rollout.sglang.buckets import pack_flat_buckets, unpack_flat_bucket
from spin_megatron.rollout.sglang.config import SGLangConfig
from spin_megatron.rollout.sglang.engine import SGLangEngine
from spin_megatron.rollout.sglang.factory import _with_policy_checkpoint, build_sglang_engine
from spin_megatron.rollout.sglang.protocol import SGLangServerError, parse_generate_response
from tests.sglang_double import PARAMS, fake_generation


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
        "SGLANG_RETURN_ORIGINAL_LOGPROB": "1",  # log-probs before top-p/top-k, as the trainer computes them
    }
    cpu = SGLangConfig(model_path="/m", extra_server_env={"SGLANG_USE_CPU_ENGINE": 1})
    assert proto.build_server_env(cpu, 0, {}, colocated=False)["SGLANG_USE_CPU_ENGINE"] == "1"
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
    # the router's metrics exporter gets a port of its own (sglang_router's 29000 is one per host)
    assert proto.build_router_command(disagg, [], metrics_port=40123)[-2:] == ["--prometheus-port", "40123"]
    with pytest.raises(ConfigError, match="router_metrics_port must be a TCP port"):
        SGLangConfig(model_path="/m", router_metrics_port=70000)


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
    gloo = proto.init_weights_update_group_payload(
        master_address="h", master_port=1, rank_offset=1, world_size=2, backend="gloo"
    )
    assert gloo["backend"] == "gloo"
    assert proto.begin_weight_update_payload() == {"selector": "all"}
    assert proto.end_weight_update_payload() == {}
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
    sglang = {"urls": urls, "weight_sync_master_port": 29500}
    cfg = argparse.Namespace(rollout=argparse.Namespace(sglang=sglang), trainer=None)
    with build_sglang_engine(cfg, None, argparse.Namespace(dp_rank=1, dp_size=2)) as engine:
        assert engine.urls == urls[2:]  # replica 1 of 2 takes the second half
        assert engine._weights.master_port == 29501  # replicas on one node: a rendezvous port each
        assert engine._weights.master_address == "127.0.0.1"  # every server on this host's loopback
    source = argparse.Namespace(hf_dir=None, arch=argparse.Namespace(hf_config={"model_type": "qwen2"}))
    config = _with_policy_checkpoint(SGLangConfig(extra_server_args=("--x",)), source, tmp_path)
    assert config.extra_server_args == ("--x", "--load-format", "dummy")  # the first weight sync fills them
    assert json.loads((Path(config.model_path) / "config.json").read_text()) == {"model_type": "qwen2"}
