"""Runs INSIDE .venv-sglang (sglang 0.5.23): reads the trainer's requests from a JSON file and checks them with
SGLang's own code, as its HTTP server would. Prints one JSON report on stdout.

- /generate bodies: the server's contract check (``entrypoints/api_contract.generate_contract_error``), then
  ``GenerateReqInput`` and its ``SamplingParams``;
- every other endpoint: pydantic validation of the endpoint's ``io_struct`` class (what FastAPI does), plus a
  check that every key we send is a field of that class (pydantic would ignore a misspelt one silently);
- /update_weights_from_tensor payloads: each TP rank's entry decoded alone, as ``tp_worker.deserialize_own_rank``
  does (SGLang's ``MultiprocessingSerializer`` and restricted unpickler), then rebuilt by SGLang's
  ``FlattenedTensorBucket``; the report lists, per rank, each weight's name, dtype, shape and a checksum.
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
    print(json.dumps(report))


if __name__ == "__main__":
    torch.multiprocessing.set_sharing_strategy("file_system")
    main(sys.argv[1])
