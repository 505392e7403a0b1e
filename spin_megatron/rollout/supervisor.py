"""Keeping the rollout engine honest: a timeout on generation, validation of what comes back, and restarts.

:class:`EngineSupervisor` wraps an engine on the replica's engine rank. ``generate`` runs in a worker thread and
must finish within ``timeout_s``; an exception, a timeout or a malformed answer raises :class:`RolloutError`.
``restart`` shuts the engine down (its processes too, for SGLang) and builds a new one from the factory; the
trainer then re-syncs the weights and retries, a bounded number of times.

A restart whose new engine cannot be built (a Ray cluster that lost the node a server needs, a server that does not
come up) is recorded, not raised: the supervisor is then *down* until the next restart. Generating on a down engine
fails like any engine failure (so the caller's bounded restarts, and past them the save-and-stop, apply); weight
syncs and sleep/wake are skipped, since there are no weights to update, and every restart that brings an engine back
is followed by a full re-sync by its caller (``generate_scored``'s ``resync``, the trainer's ``_sync`` loop).

A weight sync that fails part-way is recorded, not raised: the other ranks of the model-parallel group keep
streaming buckets to the engine rank, which must keep receiving them (and drop them) to stay in step. The
trainer reads :meth:`EngineSupervisor.take_sync_error` after the sync, on every rank, and restarts and syncs
again; the engine closed its update session when the failure happened.
"""

from __future__ import annotations

import math
import sys
import threading
from collections import Counter
from collections.abc import Callable, Hashable

from spin_megatron.rollout.protocol import SamplingParams
from spin_megatron.types import Sample


class RolloutError(RuntimeError):
    """The engine died, hung, or answered something that is not a valid set of samples."""


def check_samples(samples: list[Sample], keys: list[Hashable], n: int, vocab_size: int) -> None:
    """Raise RolloutError unless ``samples`` are exactly ``n`` well-formed samples for each of ``keys``."""
    if not isinstance(samples, list) or not all(isinstance(s, Sample) for s in samples):
        raise RolloutError(f"engine returned {type(samples).__name__}, not a list of Sample")
    got = Counter(s.prompt_id for s in samples)
    expected = Counter(
        {key: n * count for key, count in Counter(keys).items()}
    )  # per position: a key twice, 2n
    if got != expected:
        wrong = [
            f"{got.get(key, 0)} for prompt {key!r} (expected {want})"
            for key, want in expected.items()
            if got.get(key, 0) != want
        ]
        wrong += [
            f"{count} for prompt {key!r}, which was not asked"
            for key, count in got.items()
            if key not in expected
        ]
        more = f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise RolloutError(
            f"engine returned {len(samples)} samples for {len(keys)} prompts × n={n}: "
            + "; ".join(wrong[:3])
            + more
        )
    indices = Counter((s.prompt_id, s.sample_index) for s in samples)
    repeated = [key for key, count in indices.items() if count > expected[key[0]] // n]
    if repeated:
        key, index = repeated[0]
        raise RolloutError(f"engine returned sample_index {index} of prompt {key!r} more than once")
    for s in samples:
        where = f"prompt {s.prompt_id!r} sample {s.sample_index}"
        if s.finish_reason not in ("stop", "length"):
            raise RolloutError(f"{where}: finish_reason {s.finish_reason!r}")
        if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in s.response_ids):
            raise RolloutError(f"{where}: token ids outside [0, {vocab_size})")
        if s.logprobs is not None and (
            len(s.logprobs) != len(s.response_ids)
            or not all(isinstance(x, float) and math.isfinite(x) for x in s.logprobs)
        ):
            raise RolloutError(
                f"{where}: {len(s.logprobs)} log-probs for {len(s.response_ids)} tokens or non-finite"
            )


class EngineSupervisor:
    """A RolloutEngine that delegates to ``factory()``'s engine and can replace it."""

    def __init__(self, factory: Callable[[], object], *, timeout_s: float, vocab_size: int):
        self.factory = factory
        self.timeout_s = timeout_s
        self.vocab_size = vocab_size
        self.restarts = 0
        self.engine = factory()  # at start-up a failure is raised: there is nothing to fall back on
        self._sync_error: str | None = None
        self.down: str | None = None  # why the last restart could not build an engine (None: an engine is up)

    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, prompt_keys: list[Hashable] | None = None
    ) -> list[Sample]:
        keys = list(range(len(prompt_ids))) if prompt_keys is None else list(prompt_keys)
        if self.down is not None:
            raise RolloutError(f"no engine: restart {self.restarts} failed ({self.down})")
        box: dict = {}

        def work():
            try:
                box["samples"] = self.engine.generate(prompt_ids, params, prompt_keys=keys)
            except BaseException as exc:  # handed to the caller's thread below, never dropped
                box["error"] = exc

        worker = threading.Thread(target=work, name="rollout-generate", daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            raise RolloutError(f"generation did not finish within rollout.timeout_s={self.timeout_s:g} s")
        if "error" in box:
            error = box["error"]
            raise RolloutError(f"engine failed: {type(error).__name__}: {error}") from error
        check_samples(box["samples"], keys, params.n, self.vocab_size)
        return box["samples"]

    def restart(self) -> None:
        if self.down is None:
            try:
                self.engine.shutdown()
            except Exception as exc:  # a dead engine may fail to shut down; it is replaced either way
                print(
                    f"rollout: shutting down the failed engine raised {type(exc).__name__}: {exc}",
                    file=sys.stderr,
                )
        self.restarts += 1
        self._sync_error = None
        try:
            self.engine = self.factory()
        except Exception as exc:
            self.engine, self.down = None, f"{type(exc).__name__}: {exc}"
            print(f"rollout: restart {self.restarts} failed: {self.down}", file=sys.stderr, flush=True)
        else:
            self.down = None

    def update_weights(self, named_tensors) -> None:
        if self._sync_error is not None or self.down is not None:
            return  # this sync already failed: its remaining buckets are received and dropped
        try:
            self.engine.update_weights(named_tensors)
        except Exception as exc:
            self._sync_error = f"{type(exc).__name__}: {exc}"

    def finish_weight_update(self) -> None:
        if self._sync_error is not None or self.down is not None:
            return
        try:
            self.engine.finish_weight_update()
        except Exception as exc:
            self._sync_error = f"{type(exc).__name__}: {exc}"

    def take_sync_error(self) -> str | None:
        """The failure of the last sync (None if it succeeded), forgotten once read."""
        error, self._sync_error = self._sync_error, None
        return error

    def sleep(self, *, release_weights: bool = True) -> None:
        if self.down is None:
            self.engine.sleep(release_weights=release_weights)

    def wake(self) -> None:
        if self.down is None:
            self.engine.wake()

    def shutdown(self) -> None:
        if self.down is None:
            self.engine.shutdown()
