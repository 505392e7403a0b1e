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


def run_in_session(
    cmd: list[str], log_base: Path, *, env: dict | None = None, combined: bool = False, timeout_s: float = 600
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a session of its own with its output in files (``<log_base>.log`` appended to when
    ``combined``, else ``.stdout``/``.stderr`` written anew), then SIGKILL whatever is left of the session.

    Files, not pipes: a SIGKILLed trainer leaves helpers (megatron-core's checkpoint writers) holding inherited
    descriptors, and a pipe would keep the test waiting for them; they die with the session here."""
    import os
    import signal

    log_base = Path(log_base)
    paths = [
        log_base.with_name(log_base.name + (".log" if combined else suffix))
        for suffix in (".stdout", ".stderr")
    ]
    sinks = [open(paths[0], "a" if combined else "w")]  # noqa: SIM115 (closed below)
    sinks.append(sinks[0] if combined else open(paths[1], "w"))  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=sinks[0], stderr=subprocess.STDOUT if combined else sinks[1],
            start_new_session=True,
        )  # fmt: skip
        try:
            code = proc.wait(timeout=timeout_s)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # nothing of the session left
    finally:
        for sink in {id(s): s for s in sinks}.values():
            sink.close()
    out = paths[0].read_text()
    return subprocess.CompletedProcess(cmd, code, out, out if combined else paths[1].read_text())


def assert_same_hf_export(run_a: Path, run_b: Path) -> None:
    """The two runs' final HF exports (``<run>/hf/*.safetensors``) are bit-identical."""
    import torch
    from safetensors.torch import load_file

    def weights(run: Path) -> dict:
        out = {}
        for path in sorted((Path(run) / "hf").glob("*.safetensors")):
            out.update(load_file(path))
        assert out, f"no HF export in {Path(run) / 'hf'}"
        return out

    a, b = weights(run_a), weights(run_b)
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def missing(component: str, reason: str) -> None:
    """Skip a test whose optional component is absent, unless ``SPIN_REQUIRE_<COMPONENT>=1`` says it must be
    there (a GPU image that should carry TE or SGLang): then the absence is a failure, not a skip."""
    import os

    import pytest

    variable = f"SPIN_REQUIRE_{component.upper()}"
    if os.environ.get(variable) == "1":
        pytest.fail(f"{reason} (and {variable}=1 requires it)")
    pytest.skip(reason)
