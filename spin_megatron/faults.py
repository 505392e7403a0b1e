"""Fault injection for tests: make a run die, poison a loss, at an exact point.

Set ``SPIN_FAULTS`` to a comma-separated list of

* ``kill:<phase>:<step>`` — SIGKILL this process when it reaches ``<phase>`` of step ``<step>``; phases:
  ``generate`` (after sampling), ``update`` (after forward/backward, before the optimizer step), ``sync``
  (before the weight sync), ``checkpoint`` (shards written, completeness marker not yet);
* ``nan:<step>`` — make the DPO loss NaN at step ``<step>``.

Without the variable every hook is a no-op; production runs never set it.
"""

from __future__ import annotations

import os
import signal
from functools import lru_cache

import torch

PHASES = ("generate", "update", "sync", "checkpoint")


@lru_cache(maxsize=1)
def _faults() -> tuple[tuple[str, ...], ...]:
    spec = os.environ.get("SPIN_FAULTS", "").strip()
    entries = tuple(tuple(part.split(":")) for part in spec.split(",") if part)
    for entry in entries:
        ok = (entry[0] == "kill" and len(entry) == 3 and entry[1] in PHASES and entry[2].isdigit()) or (
            entry[0] == "nan" and len(entry) == 2 and entry[1].isdigit()
        )
        if not ok:
            raise ValueError(
                f"SPIN_FAULTS entry {':'.join(entry)!r}: expected kill:<{'|'.join(PHASES)}>:<step> "
                "or nan:<step>"
            )
    return entries


def kill_point(phase: str, step: int) -> None:
    if ("kill", phase, str(step)) in _faults():
        print(f"[faults] SIGKILL at {phase} of step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def poison_loss(loss: torch.Tensor, step: int) -> torch.Tensor:
    return loss * float("nan") if ("nan", str(step)) in _faults() else loss
