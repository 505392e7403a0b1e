"""Weight sync into the hf engine: in-process vs in a process of its own (``rollout.hf_process=separate``).

The weights of the tiny Qwen2 preset with the real Qwen2.5 vocabulary (151,936 × 128 tied embedding, 2 layers:
~20 M parameters, ~80 MB in fp32), pushed as one bucket, as ``sync_weights`` does with the default bucket size:

    in-process      HFEngine.update_weights (a copy into the model's parameters: the floor)
    separate        EngineProcess.update_weights: copy into the shared staging buffer, names over the pipe, the
                    child copies from its mapping into the model
    by value        the earlier transport, rebuilt here as the baseline: ``torch.save`` bytes through a pipe,
                    ``torch.load`` and copy in the child

Median of ``--repeats`` after one warm-up each, alternating, one process per engine, one thread each.

    .venv/bin/python -m bench.engine_sync [--repeats 7]
"""

from __future__ import annotations

import argparse
import functools
import io
import multiprocessing as mp
import statistics
import time

import torch

from spin_megatron.rollout import build_hf_engine
from spin_megatron.rollout.engine_process import EngineProcess

CONFIG = {
    "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 128, "intermediate_size": 384,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
    "max_position_embeddings": 512,
}  # fmt: skip


def _build():
    return build_hf_engine(
        CONFIG, dtype=torch.float32, device="cpu", max_batch_size=4, seed=0, show_progress=False
    )


def _by_value_child(conn) -> None:
    torch.set_num_threads(1)
    engine = _build()
    conn.send("ready")
    while (blob := conn.recv()) is not None:
        engine.update_weights(torch.load(io.BytesIO(blob), weights_only=True))
        conn.send("ok")


class ByValue:
    def __init__(self):
        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_by_value_child, args=(child,), daemon=True)
        self.process.start()
        assert self.conn.recv() == "ready"

    def update_weights(self, named) -> None:
        buffer = io.BytesIO()
        torch.save([(name, tensor.detach()) for name, tensor in named], buffer)
        self.conn.send(buffer.getvalue())
        assert self.conn.recv() == "ok"

    def shutdown(self) -> None:
        self.conn.send(None)
        self.process.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    weights = [(n, torch.randn_like(p)) for n, p in _build().model.named_parameters()]
    nbytes = sum(t.numel() * t.element_size() for _, t in weights)
    engines = {
        "in-process": _build(),
        "separate": EngineProcess(functools.partial(_build), threads=1),
        "by value": ByValue(),
    }
    times = {name: [] for name in engines}
    try:
        for repeat in range(args.repeats + 1):
            for name, engine in engines.items():
                start = time.perf_counter()
                engine.update_weights(weights)
                if repeat:
                    times[name].append(time.perf_counter() - start)
    finally:
        for engine in engines.values():
            engine.shutdown()
    base = statistics.median(times["in-process"])
    print(f"one bucket of {len(weights)} tensors, {nbytes / 1e6:.0f} MB (fp32); median of {args.repeats}")
    print("engine | s per sync | vs in-process")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name} | {median:.3f} | {median / base:.2f}×")


if __name__ == "__main__":
    main()
