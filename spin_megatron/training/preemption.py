"""SIGTERM / SIGUSR1 (Slurm preemption, ``scancel``, a time-limit warning): finish the step, checkpoint, exit 0.

The handler only records the signal; the trainer asks :meth:`PreemptionFlag.requested` after each step, which
agrees across all ranks (a signal may reach only some of them), so every rank stops after the same step.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from spin_megatron.parallel.state import ParallelGroups

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    def __init__(self):
        self.signal_name: str | None = None

    def install(self) -> PreemptionFlag:
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def requested(self, groups: ParallelGroups) -> bool:
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=groups.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signal_name is None:
            self.signal_name = "a signal on another rank"
        return bool(flag.item())
