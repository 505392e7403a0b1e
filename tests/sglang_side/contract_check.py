"""Runs INSIDE .venv-sglang (sglang 0.5.23): reads the trainer's requests from a JSON file and checks them with
SGLang's own code, as its HTTP server would. Prints one JSON report on stdout.

- /generate bodies: the server's contract check (``entrypoints/api_contract.generate_contract_error``), then
  ``GenerateReqInput`` and its ``SamplingParams``;
- every other endpoint: pydantic validation of the endpoint's ``io_struct`` class (what FastAPI does), plus a
  check that every key we send is a field of that class (pydantic would ignore a misspelt one silently);
- /update_weights_from_tensor payloads: each TP rank's entry decoded alone, as ``tp_worker.deserialize_own_rank``
  does (SGLang's ``MultiprocessingSerializer`` and restricted unpickler), then rebuilt by SGLang's
  ``FlattenedTensorBucket``; the report lists, per rank, each weight's name, dtype, shape and a checksum;
- lifecycle (optional ``lifecycle`` section): router command lines through sglang_router's own parser, server
  environments through SGLang's env registry (does /health generate?), and the memory saver's regions as the
  scheduler's ``SchedulerWeightUpdaterManager`` treats them (their names; resuming one that is not released).
"""

import json
import sys

import torch
from pydantic import TypeAdapter
from sglang.srt.entrypoints.api_contract import generate_contract_error
from sglang.srt.managers import io_struct
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.utils import MultiprocessingSerializer
from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata

CLASSES = {
    "/begin_weight_update": io_struct.BeginWeightUpdateReqInput,
    "/end_weight_update": io_struct.EndWeightUpdateReqInput,
    "/update_weights_from_tensor": io_struct.UpdateWeightsFromTensorReqInput,
    "/update_weights_from_distributed": io_struct.UpdateWeightsFromDistributedReqInput,
    "/init_weights_update_group": io_struct.InitWeightsUpdateGroupReqInput,
    "/destroy_weights_update_group": io_struct.DestroyWeightsUpdateGroupReqInput,
    "/release_memory_occupation": io_struct.ReleaseMemoryOccupationReqInput,
    "/resume_memory_occupation": io_struct.ResumeMemoryOccupationReqInput,
    "/update_weight_version": io_struct.UpdateWeightVersionReqInput,
}


def check_generate(body):
    error = generate_contract_error(body)
    if error is not None:
        return error
    request = io_struct.GenerateReqInput(**body)
    unknown = set(body["sampling_params"]) - set(SamplingParams.__struct_fields__)
    if unknown:
        return f"sampling_params keys SGLang does not know: {sorted(unknown)}"
    SamplingParams(**body["sampling_params"])
    return None if request.input_ids == body["input_ids"] else "input_ids changed"


def check_struct(endpoint, body):
    cls = CLASSES[endpoint]
    unknown = set(body) - set(cls.__struct_fields__)
    if unknown:
        return f"keys {sorted(unknown)} are not fields of {cls.__name__}"
    TypeAdapter(cls).validate_python(body)
    return None


def decode_tensor_payload(body, tp_size):
    per_rank = []
    for rank in range(tp_size):
        obj = MultiprocessingSerializer.deserialize(body["serialized_named_tensors"][rank])
        metadata = [
            FlattenedTensorMetadata(
                name=m.name,
                shape=m.shape,
                dtype=m.dtype,
                start_idx=m.start_idx,
                end_idx=m.end_idx,
                numel=m.numel,
            )
            for m in obj["metadata"]
        ]
        bucket = FlattenedTensorBucket(flattened_tensor=obj["flattened_tensor"], metadata=metadata)
        per_rank.append(
            [
                [name, str(t.dtype), list(t.shape), float(t.double().sum())]
                for name, t in bucket.reconstruct_tensors()
            ]
        )
    return per_rank


def router_args(argv):
    from sglang_router.launch_router import parse_router_args

    args = parse_router_args(argv)
    fields = ("worker_urls", "host", "port", "prometheus_port", "disable_health_check")
    return {**{name: getattr(args, name) for name in fields}, "policy": str(args.policy)}


def health_generates(env):
    """Whether SGLang's /health would run a generation under ``env`` (read as its HTTP server reads it)."""
    import os

    from sglang.srt.environ import envs

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        return envs.SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION.get()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def memory_regions():
    """The scheduler's own resume on a manager that holds ``kv_cache`` released (what a release leaves)."""
    from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE, GPU_MEMORY_TYPE_WEIGHTS
    from sglang.srt.managers.scheduler_components.weight_updater import SchedulerWeightUpdaterManager

    class Adapter:  # torch_memory_saver needs CUDA; only its calls are recorded
        calls = []

        def pause(self, tag):
            self.calls.append(("pause", tag))

        def resume(self, tag):
            self.calls.append(("resume", tag))

    manager = object.__new__(SchedulerWeightUpdaterManager)  # its __post_init__ needs SGLang's TP groups
    manager.offload_tags, manager.memory_saver_adapter, manager.scheduler = {"kv_cache"}, Adapter(), None
    outcomes = []
    for tags in (["kv_cache"], ["kv_cache"], ["weights"]):
        try:
            manager.resume_memory_occupation(io_struct.ResumeMemoryOccupationReqInput(tags=tags))
            outcomes.append("ok")
        except Exception as exc:
            outcomes.append(type(exc).__name__)
    return {
        "tags": [GPU_MEMORY_TYPE_KV_CACHE, GPU_MEMORY_TYPE_WEIGHTS],
        "resumes": outcomes,
        "adapter": Adapter.calls,
    }


def lifecycle_report(spec):
    return {
        "router": [router_args(argv) for argv in spec["router_argv"]],
        "health_generates": [health_generates(env) for env in spec["server_envs"]],
        "memory": memory_regions(),
    }


def main(path):
    requests = json.load(open(path))
    report = {"errors": [], "decoded": []}
    for endpoint, body in requests["requests"]:
        try:
            error = check_generate(body) if endpoint == "/generate" else check_struct(endpoint, body)
        except Exception as exc:  # reported to the test, which fails on it
            error = f"{type(exc).__name__}: {exc}"
        if error:
            report["errors"].append(f"{endpoint}: {error}")
    for body in requests["tensor_payloads"]:
        report["decoded"].append(decode_tensor_payload(body, requests["tp_size"]))
    if "lifecycle" in requests:
        report["lifecycle"] = lifecycle_report(requests["lifecycle"])
    print(json.dumps(report))


if __name__ == "__main__":
    torch.multiprocessing.set_sharing_strategy("file_system")
    main(sys.argv[1])
