"""Start N local processes with the same environment ``torchrun`` gives its workers.

Used when a multi-process command (``spin-convert --tp 2``) is started plainly: each child sees RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT exactly as under ``torchrun --nproc_per_node N``, so
the code path is the same. If any child fails the others are terminated and its exit code is returned (without
torchrun's multi-screen traceback around a one-line user error).

The rendezvous store is hosted here, as torchrun's agent hosts it: bound to port 0 by the OS and handed to the
ranks (``TORCHELASTIC_USE_AGENT_STORE``), so no port is picked, released and raced for before the ranks bind it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

from torch.distributed import TCPStore


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (``docker --cpus``,
    Kubernetes limits). ``os.cpu_count()`` reports the host's cores under a quota, and torch would start that many
    threads in every rank; with a few ranks and servers on a 2-CPU quota the machine then spends its time switching.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(count, quota) if quota else count)


def _cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> int | None:
    """CPUs granted by the cgroup (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), rounded up; None when unlimited."""
    import math
    from pathlib import Path

    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            fields = (Path(root) / quota_file).read_text().split()
            if period_file is not None:
                fields.append((Path(root) / period_file).read_text().strip())
            quota, period = fields[0], fields[1]
            if quota in ("max", "-1"):
                return None
            return max(1, math.ceil(int(quota) / int(period)))
        except (OSError, ValueError, IndexError):
            continue  # this cgroup version's file is absent or unreadable here: try the other, else no quota
    return None


def spawn_local(
    nprocs: int, module: str, args: list[str], *, timeout_s: float | None = None, cwd: str | None = None
) -> int:
    """Run ``python -m module *args`` as ``nprocs`` ranks on this machine; return the first non-zero exit code."""
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(minutes=30))
    port = store.port  # kept open (and bound) by this process until the ranks are done
    procs = []
    for rank in range(nprocs):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nprocs),
            LOCAL_WORLD_SIZE=str(nprocs),
            GROUP_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            TORCHELASTIC_USE_AGENT_STORE="True",  # every rank is a client of the store above
            TORCHELASTIC_RESTART_COUNT="0",
        )
        env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // nprocs)))
        procs.append(subprocess.Popen([sys.executable, "-m", module, *args], env=env, cwd=cwd))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                _terminate(procs)
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                _terminate(procs)
                print(
                    f"error: {nprocs} local ranks of {module} did not finish within {timeout_s:.0f} s",
                    file=sys.stderr,
                )
                return 124
            time.sleep(0.05)
    except KeyboardInterrupt:
        _terminate(procs)
        raise


def _terminate(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
