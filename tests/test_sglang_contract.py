"""The trainer's requests checked by SGLang 0.5.23's own code (tests/sglang_side/contract_check.py, run in
.venv-sglang): every endpoint's JSON through the server's request classes, and the colocated weight payloads
decoded rank by rank with SGLang's serializer, restricted unpickler and FlattenedTensorBucket; the router command
line through sglang_router's parser, the servers' environment through SGLang's env registry, the memory saver's
regions through the scheduler's own code. Covers what the CPU server cannot run (/release_memory_occupation,
/resume_memory_occupation need CUDA there); CUDA-IPC handles themselves are checked by tests/gpu/test_sglang_gpu.py."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from spin_megatron.rollout.protocol import SamplingParams
from spin_megatron.rollout.sglang import protocol as proto
from spin_megatron.rollout.sglang.buckets import pack_flat_buckets
from spin_megatron.rollout.sglang.config import SGLangConfig
from spin_megatron.rollout.sglang.weights import (
    flattened_bucket_object,
    serialize_for_one_consumer,
    use_file_system_sharing,
)
from tests.helpers import REPO

pytestmark = pytest.mark.sglang_real
CHECK = REPO / "tests" / "sglang_side" / "contract_check.py"
TP_SIZE = 2


def _weights() -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(8, 4, generator=generator)),
        ("model.norm.weight", torch.randn(4, generator=generator).to(torch.bfloat16)),
        ("lm_head.weight", torch.randn(16, 4, generator=generator)),
        ("model.layers.0.self_attn.q_proj.bias", torch.randn(8, generator=generator).half()),
    ]


def _requests() -> list[tuple[str, dict]]:
    named = _weights()
    sampled = SamplingParams(
        n=1, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=8, stop_token_ids=(2, 3)
    )
    return [
        ("/generate", proto.generate_payload([1, 2, 3], sampled, seed=proto.sample_seed(7, 0, 1))),
        ("/generate", proto.generate_payload([4], SamplingParams(temperature=0.0), seed=None)),
        ("/begin_weight_update", proto.begin_weight_update_payload()),
        ("/end_weight_update", proto.end_weight_update_payload()),
        ("/update_weights_from_distributed", proto.update_weights_from_distributed_payload(named)),
        ("/destroy_weights_update_group", proto.destroy_weights_update_group_payload()),
        ("/release_memory_occupation", proto.memory_payload(["kv_cache", "weights"])),
        ("/resume_memory_occupation", proto.memory_payload(["weights"])),
        ("/update_weight_version", proto.update_weight_version_payload(proto.memory_stamp("v1", ["kv_cache"]))),
        *[
            ("/init_weights_update_group", proto.init_weights_update_group_payload(
                master_address="10.0.0.1", master_port=29500, rank_offset=1, world_size=3, backend=backend))
            for backend in ("nccl", "gloo")
        ],
    ]  # fmt: skip


WORKERS = ["http://127.0.0.1:30000", "http://127.0.0.1:30001"]
SAVER = SGLangConfig(model_path="/m", enable_memory_saver=True, router_port=31001)
PLAIN = SGLangConfig(model_path="/m", router_port=31001)


def _lifecycle() -> dict:
    """The trainer's router command lines and server environments, with and without the memory saver."""
    return {
        "router_argv": [
            proto.build_router_command(c, WORKERS, metrics_port=29123)[3:] for c in (SAVER, PLAIN)
        ],
        "server_envs": [proto.build_server_env(c, 0, {}, colocated=True) for c in (SAVER, PLAIN)],
    }


@pytest.fixture(scope="module")
def contract(sglang_python, tmp_path_factory):
    """One run of the checker (importing SGLang takes ~20 s here): the requests, payloads and lifecycle."""
    use_file_system_sharing()
    buckets = pack_flat_buckets(_weights())  # kept alive (shared memory) until the other side has read them
    tensor_payloads = [
        proto.update_weights_from_tensor_payload(
            [serialize_for_one_consumer(flattened_bucket_object(b)) for _ in range(TP_SIZE)]
        )
        for b in buckets
    ]
    requests = _requests() + [("/update_weights_from_tensor", body) for body in tensor_payloads]
    path = tmp_path_factory.mktemp("contract") / "requests.json"
    path.write_text(json.dumps(
        {"requests": requests, "tensor_payloads": tensor_payloads, "tp_size": TP_SIZE, "lifecycle": _lifecycle()}
    ))  # fmt: skip
    result = subprocess.run(
        [str(sglang_python), str(CHECK), str(path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return buckets, json.loads(result.stdout.strip().splitlines()[-1])


def test_every_request_parses_with_sglangs_own_classes_and_payloads_decode_per_rank(contract):
    buckets, report = contract
    assert report["errors"] == []
    expected = [
        [[name, str(t.dtype), list(t.shape), float(t.double().sum())] for name, t in group]
        for group in ([(n, t) for n, t in _weights() if t.dtype == b.flat.dtype] for b in buckets)
    ]
    # every TP rank decodes its own entry to the exact tensors, bucket by bucket (one bucket per dtype)
    assert report["decoded"] == [[tensors] * TP_SIZE for tensors in expected]


def test_with_the_memory_saver_nothing_probes_a_server_by_generating(contract):
    """sglang-router 0.3.2 polls /health every 60 s, and 0.5.23's /health generates a token on an idle server:
    on released memory, or between the flush and the release (whose idle assertion it trips). With the memory
    saver the router runs no health checks and the servers' /health does not generate (issue 22, item 3)."""
    saver, plain = contract[1]["lifecycle"]["router"]
    assert saver["disable_health_check"] and not plain["disable_health_check"]
    for parsed in (saver, plain):  # the rest of the command line, as sglang_router reads it
        assert (
            parsed["worker_urls"] == WORKERS
            and parsed["port"] == 31001
            and parsed["prometheus_port"] == 29123
        )
        assert parsed["host"] == "127.0.0.1" and parsed["policy"].endswith("round_robin")
    assert contract[1]["lifecycle"]["health_generates"] == [False, True]


def test_resuming_a_region_that_is_not_released_fails_in_sglangs_scheduler(contract):
    """Why the engine tracks what each server released (item 7): the names are SGLang's, and its scheduler's
    resume of a region it does not hold released raises (the real server then SIGQUITs itself)."""
    memory = contract[1]["lifecycle"]["memory"]
    assert memory["tags"] == list(proto.MEMORY_TAGS)
    assert memory["resumes"] == ["ok", "KeyError", "KeyError"] and memory["adapter"] == [
        ["resume", "kv_cache"]
    ]


def test_the_contract_check_rejects_what_sglang_rejects(sglang_python, tmp_path):
    """The checker itself: a misspelt field and a wrong type are reported (it is not a test that cannot fail)."""
    bad = [
        ("/init_weights_update_group", {"master_address": "h", "master_port": "x", "rank_offset": 1, "world_size": 2}),
        ("/end_weight_update", {"flush": True}),
        ("/generate", {"input_ids": [1], "sampling_params": {"max_tokens": 3}}),
    ]  # fmt: skip
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"requests": bad, "tensor_payloads": [], "tp_size": 1}))
    result = subprocess.run(
        [str(sglang_python), str(CHECK), str(path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])["errors"]
    assert len(errors) == 3, errors
