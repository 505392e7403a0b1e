"""Helpers for multi-process (gloo) tests: run a module as N local ranks, exactly as torchrun would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from spin_megatron.parallel.launch import spawn_local

REPO = Path(__file__).resolve().parents[1]


def run_ranks(nprocs: int, module: str, *args: str, timeout_s: float = 300) -> int:
    return spawn_local(nprocs, module, [str(a) for a in args], timeout_s=timeout_s, cwd=str(REPO))


def run_cli(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m spin_megatron.convert ARGS`` in a fresh process, capturing output."""
    return subprocess.run(
        [sys.executable, "-m", "spin_megatron.convert", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=str(REPO),
    )
