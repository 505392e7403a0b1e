"""Runs INSIDE .venv-sglang (sglang 0.5.23): posts the reward backend's /classify bodies to SGLang's own FastAPI
app and prints one JSON report on stdout.

Real SGLang code on the path: the ``/classify`` route of ``srt/entrypoints/http_server.py`` (FastAPI's pydantic
validation of ``EmbeddingReqInput``, its error handling, its JSON serialization of the answer),
``EmbeddingReqInput.normalize_batch_and_arguments`` (what ``TokenizerManager.generate_request`` runs first), the
reward heads' ``Pooler(PoolingType.LAST, normalize=False)`` over a packed batch followed by a one-label score
head (as ``models/llama_reward.py`` does), and the scheduler's ``_convert_embeddings`` (tensor → list). Stubbed:
the transformer itself (hidden states are a fixed function of token and position) and the tokenizer manager's
plumbing between the scheduler and the route, whose per-request dict ``{"embedding": ..., "meta_info": ...}``
(``TokenizerManager._handle_batch_output``) and list-for-a-batch are rebuilt here as it writes them.

Input: {"requests": [body, ...], "hidden_size": H}. Output per request: the HTTP status and body, the keys that
are not ``EmbeddingReqInput`` fields, the normalized batch, and the scores expected from an independent
per-sequence computation.
"""

import dataclasses
import json
import sys
from types import SimpleNamespace

import torch
from fastapi.testclient import TestClient
from sglang.srt.entrypoints import http_server
from sglang.srt.layers.pooler import Pooler, PoolingType
from sglang.srt.managers import io_struct
from sglang.srt.managers.scheduler_components.batch_result_processor import SchedulerBatchResultProcessor

FIELDS = {f.name for f in dataclasses.fields(io_struct.EmbeddingReqInput)}


def hidden(token: int, position: int, table: torch.Tensor) -> torch.Tensor:
    return table[token % table.shape[0]] + 0.01 * position


class StubTokenizerManager:
    """Stands in for TokenizerManager.generate_request: normalizes like it, runs the real pooler and conversion."""

    def __init__(self, hidden_size: int):
        generator = torch.Generator().manual_seed(0)
        self.table = torch.randn(97, hidden_size, generator=generator)
        self.score = torch.nn.Linear(hidden_size, 1, bias=False)
        with torch.no_grad():
            self.score.weight.copy_(torch.randn(1, hidden_size, generator=generator))
        self.pooler = Pooler(pooling_type=PoolingType.LAST, normalize=False)
        self.seen = []

    async def generate_request(self, obj, request=None):
        obj.normalize_batch_and_arguments()
        batch = [obj.input_ids] if obj.is_single else obj.input_ids
        self.seen.append({"batch_size": obj.batch_size, "is_single": obj.is_single, "input_ids": batch})
        packed = torch.stack([hidden(t, p, self.table) for ids in batch for p, t in enumerate(ids)])
        forward_batch = SimpleNamespace(
            extend_seq_lens=torch.tensor([len(ids) for ids in batch]), dimensions=None
        )
        with torch.no_grad():
            scores = self.score(
                self.pooler(packed, forward_batch).embeddings
            )  # LlamaForSequenceClassification
        embeddings = SchedulerBatchResultProcessor._convert_embeddings(
            None, result=SimpleNamespace(embeddings=scores)
        )
        outputs = [
            {"embedding": embedding, "meta_info": {"id": f"r{i}", "finish_reason": {"type": "length", "length": 0},
                                                   "prompt_tokens": len(ids), "cached_tokens": 0}}
            for i, (embedding, ids) in enumerate(zip(embeddings, batch))
        ]  # fmt: skip
        yield outputs[0] if obj.is_single else outputs

    @torch.no_grad()
    def expected(self, body):
        ids_list = body["input_ids"] if isinstance(body["input_ids"][0], list) else [body["input_ids"]]
        return [float(self.score(hidden(ids[-1], len(ids) - 1, self.table))[0]) for ids in ids_list]


def main(path):
    spec = json.load(open(path))
    manager = StubTokenizerManager(spec["hidden_size"])
    http_server.set_global_state(SimpleNamespace(tokenizer_manager=manager))
    client = TestClient(http_server.app)
    report = []
    for body in spec["requests"]:
        before = len(manager.seen)
        response = client.post("/classify", json=body)
        entry = {
            "status": response.status_code,
            "body": response.text,
            "unknown_keys": sorted(set(body) - FIELDS),
            "normalized": manager.seen[before] if len(manager.seen) > before else None,
        }
        if response.status_code == 200:
            entry["expected"] = manager.expected(body)
        report.append(entry)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
