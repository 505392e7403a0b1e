"""Rollout dump and replay: debug training without an engine.

``RolloutDump`` appends each step's samples (token ids, finish reasons, engine log-probs, rewards) to a jsonl
file; ``ReplayEngine`` serves them back step by step in place of a real engine, checking that the trainer asks
for the same prompts, so a training bug can be replayed deterministically without SGLang or a GPU.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterable
from pathlib import Path

import torch

from spin_megatron.errors import ConfigError, MissingPathError
from spin_megatron.rollout.protocol import SamplingParams
from spin_megatron.types import Sample

_FIELDS = (
    "prompt_id",
    "sample_index",
    "prompt_ids",
    "response_ids",
    "finish_reason",
    "logprobs",
    "reward",
    "response_text",
    "rule_reward",
    "model_reward",
    "reward_tiebreak",
)


class RolloutDump:
    """Append-only jsonl of samples, one line per sample, tagged with the training step."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, samples: Iterable[Sample]) -> None:
        with self.path.open("a") as f:
            for sample in samples:
                record = {"step": step, **{k: getattr(sample, k) for k in _FIELDS}}
                f.write(json.dumps(record) + "\n")


def read_dump(path: str | Path) -> dict[int, list[Sample]]:
    """Samples per step from a dump file (steps in file order)."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(
            f"rollout dump {path} not found: set rollout.replay_path to a file written with rollout.dump_path"
        )
    steps: dict[int, list[Sample]] = {}
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = record.pop("step")
                steps.setdefault(step, []).append(Sample(**record))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConfigError(f"{path}:{line_no}: not a rollout dump record ({exc})") from None
    return steps


class ReplayEngine:
    """A :class:`RolloutEngine` that returns recorded samples instead of generating.

    Each ``generate`` call consumes the next recorded step and returns the recorded samples of the prompts asked
    for (a data-parallel replica asks for its share of the step's prompts), so a dump written at one layout
    replays at any other. Validation generations are not recorded: replay runs with ``trainer.test_freq=0``.
    """

    def __init__(self, paths: str | Path | list[str | Path]):
        paths = [Path(p) for p in (paths if isinstance(paths, list) else [paths])]
        self.path = paths[0]
        merged: dict[int, list[Sample]] = {}
        for path in paths:
            for step, samples in read_dump(path).items():
                merged.setdefault(step, []).extend(samples)
        self._steps = sorted(merged.items())
        self._next = 0
        self.weight_updates = 0

    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, prompt_keys: list[Hashable] | None = None
    ) -> list[Sample]:
        if self._next >= len(self._steps):
            raise ConfigError(
                f"rollout dump {self.path} has only {len(self._steps)} steps; the run asked for more"
            )
        step, samples = self._steps[self._next]
        self._next += 1
        keys = list(range(len(prompt_ids))) if prompt_keys is None else list(prompt_keys)
        recorded = {s.prompt_id: s.prompt_ids for s in samples}
        if any(recorded.get(k) != list(p) for k, p in zip(keys, prompt_ids)):
            raise ConfigError(
                f"rollout dump {self.path} step {step}: the recorded prompts differ from the ones asked for "
                "(different data order or config); replay needs the same data.seed and batch settings"
            )
        wanted = set(keys)
        return [Sample(**{k: getattr(s, k) for k in _FIELDS}) for s in samples if s.prompt_id in wanted]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for _ in named_tensors:
            pass  # consume the stream: the exporting ranks must still complete their collectives
        self.weight_updates += 1

    def finish_weight_update(self) -> None:
        pass

    def sleep(self, *, release_weights: bool = True) -> None:
        pass

    def wake(self) -> None:
        pass

    def shutdown(self) -> None:
        pass
