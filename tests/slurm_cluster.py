"""A real one-host Slurm cluster for the tests: brought up and down by ``tools/slurm/cluster.sh`` (its own munged,
slurmctld and slurmd(s), config and state in a temp dir, non-default ports), plus helpers to submit and watch jobs."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from spin_megatron.ports import pick_free_port
from tests.helpers import REPO

CLUSTER_SH = REPO / "tools" / "slurm" / "cluster.sh"
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
# Variables of an outer Slurm job or launcher that must not leak into this cluster's jobs.
SCRUBBED = ("SLURM_", "SPIN_", "PET_", "TORCHELASTIC_", "SBATCH_", "SRUN_", "SALLOC_")
SCRUBBED_NAMES = {"MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "RDZV_ID", "DRY_RUN"}


def unavailable_reason() -> str | None:
    """Why a test cluster cannot start here (None: it can)."""
    missing = [name for name in NEEDED if shutil.which(name, path=SBIN_PATH) is None]
    if missing:
        return (
            f"real Slurm not installed ({', '.join(missing)} not found): `make slurm-packages` "
            "(as root: apt-get install slurm-wlm munge)"
        )
    if os.geteuid() != 0:
        return "real Slurm tests need root: the test cluster's daemons run as SlurmUser=root"
    return None


def _free_ports(count: int) -> list[int]:
    first = pick_free_port("0.0.0.0", span=count)  # below the ephemeral range: see spin_megatron/ports.py
    return list(range(first, first + count))


def _field(text: str, key: str) -> str:
    match = re.search(rf"(?:^|\s){key}=(\S*)", text)
    assert match, f"no {key}= in scontrol's answer:\n{text}"
    return match.group(1)


@dataclass
class Job:
    """`scontrol show job` of one job, the fields the tests read."""

    job_id: int
    text: str
    state: str = field(init=False)
    restarts: int = field(init=False)
    exit_code: str = field(init=False)
    reason: str = field(init=False)

    def __post_init__(self):
        self.state = _field(self.text, "JobState")
        self.restarts = int(_field(self.text, "Restarts"))
        self.exit_code = _field(self.text, "ExitCode")
        self.reason = _field(self.text, "Reason")


@dataclass
class SlurmCluster:
    root: Path
    nodes: list[str]

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self, **extra) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED) and k not in SCRUBBED_NAMES}
        env.update(SLURM_CONF=str(self.conf), PATH=SBIN_PATH)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(command, env=self.env(), capture_output=True, text=True, timeout=60)
        assert not check or result.returncode == 0, f"{command}: {result.stderr}"
        return result

    def sbatch(self, args: list[str], cwd: Path, **env) -> int:
        result = subprocess.run(
            ["sbatch", "--parsable", *map(str, args)],
            env=self.env(**env),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> Job:
        return Job(job_id, self.run("scontrol", "show", "job", str(job_id)).stdout)

    def wait(self, job_id: int, states=FINAL_STATES, timeout_s: float = 300, until=None) -> Job:
        """Poll until the job is in one of ``states`` (and ``until(job)`` holds, if given)."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if job.state in states and (until is None or until(job)):
                return job
            assert time.monotonic() < deadline, (
                f"job {job_id} not in {states} after {timeout_s} s:\n{job.text}"
            )
            time.sleep(0.5)

    def down(self) -> None:
        subprocess.run(["bash", str(CLUSTER_SH), "down", str(self.root)], env=self.env(), timeout=180)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*.log"))
        )


def start_cluster(root: Path, nodes: tuple[str, ...] = (), tries: int = 3) -> SlurmCluster:
    """Bring a cluster up under ``root`` (one node named after this host, or ``nodes``), on free ports; a port
    taken between choosing and binding it is retried with fresh ones."""
    for attempt in range(tries):
        ctld_port, *node_ports = _free_ports(1 + max(1, len(nodes)))
        env = {**os.environ, "PATH": SBIN_PATH, "SLURMCTLD_PORT": str(ctld_port)}
        env["SLURMD_PORTS"] = " ".join(map(str, node_ports))
        result = subprocess.run(
            ["bash", str(CLUSTER_SH), "up", str(root), *nodes],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if result.returncode == 0:
            return SlurmCluster(root, list(nodes) or [socket.gethostname().split(".")[0]])
        if "Address already in use" not in result.stderr or attempt == tries - 1:
            raise RuntimeError(f"tools/slurm/cluster.sh up failed:\n{result.stdout}\n{result.stderr}")
    raise AssertionError("unreachable")
