"""tools/launch: the command lines torchrun.sh and spin.sbatch generate (dry runs in a fake Slurm environment), the
batch script's signal → checkpoint → requeue logic against fake `srun`/`scontrol`, and one real 2-process launch."""

import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO

LAUNCH = REPO / "tools" / "launch"
SBATCH, TORCHRUN = LAUNCH / "spin.sbatch", LAUNCH / "torchrun.sh"
JOB_ID = 123456
TRICKY = ["data.train_files=[a.jsonl,b.jsonl]", "data.instruction='Let us think'", "+x=it's [1, 2]"]
SCRUBBED = ("SLURM_", "SPIN_", "PET_", "TORCHELASTIC_")
SCRUBBED_NAMES = {"MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "RDZV_ID", "DRY_RUN"}


def _env(path_dirs=(), **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED) and k not in SCRUBBED_NAMES}
    env["PATH"] = os.pathsep.join([*map(str, path_dirs), "/usr/bin", "/bin"])
    env["PYTHON"] = sys.executable
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _slurm_env(path_dirs=(), **extra) -> dict:
    slurm = dict(
        SLURM_JOB_ID=JOB_ID,
        SLURM_JOB_NAME="spin",
        SLURM_JOB_NODELIST="node[001-004]",
        SLURM_NNODES=4,
        SLURM_NODEID=0,
        SLURM_GPUS_ON_NODE=8,
        SLURM_CPUS_PER_TASK=64,
        SLURM_SUBMIT_DIR=REPO,
    )
    return _env(path_dirs, **{**slurm, **extra})


def _run(script, args, env, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def _write_script(path, text: str):
    path.write_text("#!/usr/bin/env bash\n" + text)
    path.chmod(0o755)
    return path


def _torchrun_args(argv: list[str]) -> tuple[dict, list[str], list[str]]:
    """(environment assignments, torchrun arguments before `-m spin_megatron.train`), and the overrides."""
    assert argv[0] == "env"
    assignments = list(itertools.takewhile(re.compile(r"^[A-Z_][A-Z0-9_]*=").match, argv[1:]))
    env = dict(a.split("=", 1) for a in assignments)
    start = len(assignments) + 4  # env A=.. B=.. PYTHON -m torch.distributed.run ...
    assert argv[start - 2 : start] == ["-m", "torch.distributed.run"]
    module = argv.index("spin_megatron.train")
    assert argv[module - 1] == "-m"
    return env, argv[start : module - 1], argv[module + 1 :]


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# ----- spin.sbatch dry runs -------------------------------------------------------------------------------
def _sbatch_dry_run(tmp_path, overrides, path_dirs=(), **extra):
    result = _run(SBATCH, overrides, _slurm_env(path_dirs, DRY_RUN=1, **extra), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    srun = [shlex.split(line) for line in lines if line.startswith("srun ")]
    nodes = {}
    for line in lines:
        if line.startswith("node") and "): " in line:
            label, command = line.split("): ", 1)
            nodes[label] = shlex.split(command)
    return result.stdout, srun, nodes


def test_sbatch_dry_run_for_four_nodes_without_scontrol(tmp_path):
    scontrol = shutil.which("scontrol", path="/usr/bin:/bin")
    if (
        scontrol
        and subprocess.run(
            [scontrol, "show", "hostnames", "a[1-2]"], env=_env(), capture_output=True
        ).returncode
        == 0
    ):
        pytest.skip("a working scontrol is installed: the fallback node-list parser is not used")
    overrides = ["experiment=qwen2.5_3b_gsm8k", "model.hf_path=/ckpt/Qwen2.5-3B", *TRICKY]
    out, srun, nodes = _sbatch_dry_run(tmp_path, overrides)
    port = 20000 + JOB_ID % 10000
    assert "MASTER_ADDR=node001" in out and f"MASTER_PORT={port}" in out
    assert f"rendezvous node001:{port}" in out

    assert len(srun) == 1
    (srun,) = srun
    launcher = srun.index("bash")
    options = srun[1:launcher]
    for expected in (
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "--nodes=4",
        "--ntasks=4",
        "--cpus-per-task=64",
    ):
        assert expected in options
    assert f"--output=logs/spin-{JOB_ID}/node%n-%N.attempt0.out" in options
    assert srun[launcher + 1] == str(TORCHRUN)
    assert srun[launcher + 2 :] == [*overrides, "trainer.resume=auto"]  # verbatim, resume appended once

    assert list(nodes) == ["node0 (node001", "node1 (node002", "node2 (node003", "node3 (node004"]
    for rank, argv in enumerate(nodes.values()):
        env, args, passed = _torchrun_args(argv)
        assert "SIGUSR1" in env["PET_SIGNALS_TO_HANDLE"]
        assert _flag(args, "--nnodes") == "4" and _flag(args, "--nproc_per_node") == "8"
        assert _flag(args, "--rdzv_backend") == "c10d"
        assert _flag(args, "--rdzv_endpoint") == f"node001:{port}"
        assert _flag(args, "--rdzv_id") == str(JOB_ID)
        assert _flag(args, "--rdzv_conf") == f"is_host={int(rank == 0)}"
        assert "--standalone" not in args
        assert passed == [*overrides, "trainer.resume=auto"]
    assert not (tmp_path / "logs").exists()  # a dry run creates nothing


def test_sbatch_steps_past_a_rendezvous_port_taken_on_the_first_node(tmp_path):
    """The batch shell runs on the first node, where the store will listen: a taken default port is skipped."""
    port = 20000 + JOB_ID % 10000
    with socket.socket() as taken:
        try:
            taken.bind(("127.0.0.1", port))
        except OSError:
            pytest.skip(f"port {port} is in use on this machine already")
        taken.listen()
        out, _, nodes = _sbatch_dry_run(tmp_path, ["experiment=tiny_cpu"])
    assert f"rendezvous port {port} is taken on" in out and f"using {port + 1}" in out
    assert all(
        _flag(_torchrun_args(argv)[1], "--rdzv_endpoint").endswith(f":{port + 1}") for argv in nodes.values()
    )


def test_sbatch_uses_scontrol_hostnames_and_respects_overrides(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_script(
        bin_dir / "scontrol",
        '[[ "$1 $2 $3" == "show hostnames gpu[7-8]" ]] || exit 9\nprintf "gpu-a7\\ngpu-b8\\n"\n',
    )
    out, (srun,), nodes = _sbatch_dry_run(
        tmp_path,
        ["experiment=tiny_cpu", "trainer.resume=never"],
        [bin_dir],
        SLURM_JOB_NODELIST="gpu[7-8]",
        SLURM_NNODES=2,
        SLURM_GPUS_ON_NODE=4,
        SPIN_MASTER_PORT=31234,
        SPIN_LOG_DIR="/scratch/spin-logs",
    )
    assert srun[-2:] == ["experiment=tiny_cpu", "trainer.resume=never"]  # the user's resume is kept
    assert "--output=/scratch/spin-logs/node%n-%N.attempt0.out" in srun
    assert list(nodes) == ["node0 (gpu-a7", "node1 (gpu-b8"]
    _, args, _ = _torchrun_args(nodes["node0 (gpu-a7"])
    assert _flag(args, "--rdzv_endpoint") == "gpu-a7:31234"
    assert _flag(args, "--nnodes") == "2" and _flag(args, "--nproc_per_node") == "4"

    # A requeued attempt continues its own run whatever the first attempt was told.
    _, (srun,), _ = _sbatch_dry_run(
        tmp_path,
        ["experiment=tiny_cpu", "trainer.resume=never"],
        [bin_dir],
        SLURM_JOB_NODELIST="gpu[7-8]",
        SLURM_NNODES=2,
        SLURM_RESTART_COUNT=2,
    )
    assert srun[-3:] == ["experiment=tiny_cpu", "trainer.resume=never", "trainer.resume=auto"]
    assert f"--output=logs/spin-{JOB_ID}/node%n-%N.attempt2.out" in srun


def test_sbatch_dry_run_with_two_rollout_nodes_for_a_ray_cluster(tmp_path):
    out, (ray_srun, srun), nodes = _sbatch_dry_run(
        tmp_path, ["experiment=qwen2.5_3b_gsm8k", "rollout.sglang.num_engines=4"], SPIN_ROLLOUT_NODES=2
    )
    # The Ray step covers every node; training nodes join without GPUs (drivers), the last two are rollout.
    assert ray_srun[ray_srun.index("bash") + 1] == str(LAUNCH / "ray_node.sh")
    assert {"--nodes=4", "--ntasks=4", "--overlap"} <= set(ray_srun)
    assert f"--output=logs/spin-{JOB_ID}/ray-node%n-%N.attempt0.out" in ray_srun
    roles = dict(line.split(": ", 1) for line in out.splitlines() if line.startswith("ray node"))
    assert list(roles) == [f"ray node{i} (node00{i + 1})" for i in range(4)]
    head = "node003:6379"  # no such host here: its name stands in for the address
    assert roles["ray node0 (node001)"] == (
        f"training node (driver only): ray start --address={head} --num-gpus=0 --num-cpus=0 --disable-usage-stats"
    )
    assert roles["ray node2 (node003)"].startswith(
        "rollout node, Ray head: ray start --head --port=6379 --num-gpus=8"
    )
    assert roles["ray node3 (node004)"].startswith(f"rollout node: ray start --address={head} --num-gpus=8")
    # Training runs on the first two nodes only, beside the Ray step, with the Ray overrides before the user's.
    assert {"--nodes=2", "--ntasks=2", "--overlap", "--nodelist=node001,node002"} <= set(srun)
    assert list(nodes) == ["node0 (node001", "node1 (node002"]
    expected = [
        "rollout.engine=sglang", "rollout.sglang.launcher=ray", f"rollout.sglang.ray_address={head}",
        "rollout.sglang.sync_mode=auto", "rollout.sglang.enable_memory_saver=false",
        "rollout.sglang.mem_fraction_static=0.85",
        "cluster.nodes=4", "cluster.gpus_per_node=8", "cluster.placement=disaggregated", "cluster.rollout_gpus=16",
        "experiment=qwen2.5_3b_gsm8k", "rollout.sglang.num_engines=4", "trainer.resume=auto",
    ]  # fmt: skip
    assert srun[srun.index("bash") + 2 :] == expected
    for rank, argv in enumerate(nodes.values()):
        _, args, passed = _torchrun_args(argv)
        assert _flag(args, "--nnodes") == "2" and _flag(args, "--rdzv_conf") == f"is_host={int(rank == 0)}"
        assert passed == expected
    assert "rollout: Ray cluster on node003 node004 (head node003:6379)" in out


FAKE_RAY = """echo "$*" >> "$FAKE_DIR/ray.calls"
if [[ $1 == start && $* != *--head* ]]; then  # a worker: the head is up on the third try
    n=$(($(cat "$FAKE_DIR/tries" 2>/dev/null || echo 0) + 1)); echo $n > "$FAKE_DIR/tries"
    [[ $n -ge 3 ]] || { echo "ConnectionError: GCS at $RAY_HEAD_ADDR:$RAY_PORT not reachable" >&2; exit 1; }
fi
"""


def test_ray_node_retries_until_the_head_is_up_and_stops_ray_on_sigterm(tmp_path):
    fake = _write_script(tmp_path / "ray", FAKE_RAY)
    env = _env(
        RAY=fake, FAKE_DIR=tmp_path, RAY_HEAD_ADDR="10.0.0.3", RAY_PORT=6379, SPIN_ROLLOUT_FIRST_NODE=1,
        SLURM_NODEID=2, SLURM_GPUS_ON_NODE=4, RAY_JOIN_RETRY_S=0.1,
    )  # fmt: skip
    process = subprocess.Popen(
        ["bash", str(LAUNCH / "ray_node.sh")], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while _read(tmp_path / "tries").strip() != "3" and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert process.poll() is None  # joined: it holds the srun task
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
    calls = (tmp_path / "ray.calls").read_text().splitlines()
    worker = "start --address=10.0.0.3:6379 --num-gpus=4 --disable-usage-stats"
    assert calls == [worker] * 3 + ["stop --force"]

    env["SLURM_NODEID"] = "1"  # the head does not retry: its failure is the job's
    env["RAY"] = _write_script(tmp_path / "broken", "exit 1")
    result = subprocess.run(["bash", str(LAUNCH / "ray_node.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "ray_node.sh: error: '" in result.stderr and "--head" in result.stderr
    env.pop("RAY_HEAD_ADDR")
    result = subprocess.run(["bash", str(LAUNCH / "ray_node.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "RAY_HEAD_ADDR is not set" in result.stderr


@pytest.mark.parametrize(
    "env_change, message",
    [
        ({"SLURM_JOB_ID": None}, "not inside a Slurm job"),
        ({"SLURM_NNODES": 3}, "has 4 hosts but SLURM_NNODES=3"),
        (
            {"SPIN_ROLLOUT_NODES": 4},
            "SPIN_ROLLOUT_NODES must be in 0..3 (nodes left to the trainer: at least one)",
        ),
        ({"SPIN_ROLLOUT_NODES": "two"}, "SPIN_ROLLOUT_NODES must be in 0..3"),
    ],
)
def test_sbatch_refuses_an_inconsistent_environment(tmp_path, env_change, message):
    env = _slurm_env(DRY_RUN=1)
    for key, value in env_change.items():
        env.pop(key) if value is None else env.update({key: str(value)})
    result = _run(SBATCH, ["experiment=tiny_cpu"], env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("spin.sbatch: error:") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ----- torchrun.sh dry runs -------------------------------------------------------------------------------
def test_torchrun_single_node_dry_run(tmp_path):
    env = _env(CUDA_VISIBLE_DEVICES="")  # no GPU: two CPU ranks
    result = _run(TORCHRUN, ["--dry-run", "experiment=tiny_cpu", *TRICKY], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    tr_env, args, passed = _torchrun_args(shlex.split(line))
    assert args == ["--standalone", "--nnodes", "1", "--nproc_per_node", "2"]
    assert passed == ["experiment=tiny_cpu", *TRICKY]
    assert shlex.split(line)[len(tr_env) + 1] == sys.executable
    assert tr_env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "270"
    assert set(tr_env["PET_SIGNALS_TO_HANDLE"].split(",")) >= {"SIGTERM", "SIGUSR1"}

    for extra, nproc in (({"CUDA_VISIBLE_DEVICES": "0,1,2"}, "3"), ({"NPROC_PER_NODE": 5}, "5")):
        result = _run(TORCHRUN, ["a=b"], _env(DRY_RUN=1, **extra), cwd=tmp_path)
        assert _flag(_torchrun_args(shlex.split(result.stdout))[1], "--nproc_per_node") == nproc


def test_torchrun_multi_node_dry_run(tmp_path):
    env = _env(
        NNODES=2, NODE_RANK=1, MASTER_ADDR="10.1.2.3", MASTER_PORT=29400, NPROC_PER_NODE=8, RDZV_ID="q3b"
    )
    result = _run(TORCHRUN, ["--dry-run", *TRICKY], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    _, args, passed = _torchrun_args(shlex.split(result.stdout))
    assert args == [
        "--nnodes", "2", "--nproc_per_node", "8", "--rdzv_backend", "c10d", "--rdzv_endpoint", "10.1.2.3:29400",
        "--rdzv_id", "q3b", "--rdzv_conf", "is_host=0",
    ]  # fmt: skip
    assert passed == TRICKY
    result = _run(TORCHRUN, ["--dry-run"], {**env, "RDZV_JOIN_TIMEOUT": "120"}, cwd=tmp_path)
    assert _flag(_torchrun_args(shlex.split(result.stdout))[1], "--rdzv_conf") == "is_host=0,join_timeout=120"

    for change, message in (
        ({"MASTER_ADDR": ""}, "needs MASTER_ADDR"),
        ({"RDZV_JOIN_TIMEOUT": "10m"}, "RDZV_JOIN_TIMEOUT must be a number of seconds, got '10m'"),
        ({"NODE_RANK": 2}, "NODE_RANK must be in 0..1"),
        ({"NPROC_PER_NODE": "eight"}, "NPROC_PER_NODE must be a positive integer"),
    ):
        result = _run(
            TORCHRUN, ["--dry-run"], {**env, **{k: str(v) for k, v in change.items()}}, cwd=tmp_path
        )
        assert result.returncode == 2 and message in result.stderr, (change, result.stderr)


# ----- spin.sbatch signal handling with fake srun / scontrol ------------------------------------------------
FAKE_SRUN = """\
for sig in USR1 USR2 TERM INT HUP; do
    trap "echo $sig >> \\"\\$FAKE_DIR/srun.signals\\"; exit 0" $sig
done
printf '%s\\n' "$@" > "$FAKE_DIR/srun.args"
echo $$ > "$FAKE_DIR/srun.pid"  # last: once it exists, the traps are set
[[ -z ${FAKE_SRUN_EXIT:-} ]] || exit "$FAKE_SRUN_EXIT"
for _ in $(seq 600); do sleep 0.1; done
"""
FAKE_SCONTROL = """\
case $1 in
    show) printf 'node001\\nnode002\\n' ;;
    requeue) echo "requeue $2" >> "$FAKE_DIR/scontrol.log" ;;
    *) exit 9 ;;
esac
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_script(bin_dir / "srun", FAKE_SRUN)
    _write_script(bin_dir / "scontrol", FAKE_SCONTROL)
    return bin_dir


def _wait_for(path, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while not path.exists() or not path.read_text().strip():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text()


def _start_batch(tmp_path, bin_dir, overrides, **extra):
    env = _slurm_env(
        [bin_dir], FAKE_DIR=tmp_path, SLURM_JOB_NODELIST="node[001-002]", SLURM_NNODES=2, **extra
    )
    return subprocess.Popen(
        ["bash", str(SBATCH), *overrides],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _read(path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.mark.parametrize("batch_signal", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_is_forwarded_to_its_own_srun_only_and_usr1_requeues(tmp_path, fake_slurm, batch_signal):
    # Another job's srun, same name, same fake: it must not be touched.
    decoy_dir = tmp_path / "other_job"
    decoy_dir.mkdir()
    decoy = subprocess.Popen(
        ["bash", str(fake_slurm / "srun")], env={**os.environ, "FAKE_DIR": str(decoy_dir)}
    )
    run_dir = tmp_path / "run"
    batch = _start_batch(tmp_path, fake_slurm, ["experiment=tiny_cpu", f"trainer.output_dir={run_dir}"])
    try:
        srun_pid = int(_wait_for(tmp_path / "srun.pid"))
        _wait_for(decoy_dir / "srun.pid")
        batch.send_signal(batch_signal)
        out, _ = batch.communicate(timeout=60)
        assert batch.returncode == 0, out
        # srun turns a TERM into SIGKILL for its tasks, so the batch shell always forwards USR1.
        assert _read(tmp_path / "srun.signals") == "USR1\n", out
        # Only USR1 (the time-limit warning) requeues: TERM is scancel, the time limit or preemption, and a real
        # slurmctld would requeue a job being cancelled (tests/test_slurm_real.py).
        requeued = f"requeue {JOB_ID}\n" if batch_signal == signal.SIGUSR1 else ""
        assert _read(tmp_path / "scontrol.log") == requeued, out
        assert f"run state after SIG{batch_signal.name[3:]}: unfinished 0 4 {run_dir}" in out
        assert srun_pid != decoy.pid and decoy.poll() is None and _read(decoy_dir / "srun.signals") == ""
        args = (tmp_path / "srun.args").read_text().splitlines()
        assert args[-3:] == ["experiment=tiny_cpu", f"trainer.output_dir={run_dir}", "trainer.resume=auto"]
        assert (tmp_path / "logs" / f"spin-{JOB_ID}").is_dir()
    finally:
        for proc in (batch, decoy):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_finished_run_is_not_requeued_after_a_signal(tmp_path, fake_slurm):
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoints" / "step_0000004"  # tiny_cpu: total_steps=4
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 4}))
    (checkpoint / "COMPLETE").write_text("")
    batch = _start_batch(tmp_path, fake_slurm, ["experiment=tiny_cpu", f"trainer.output_dir={run_dir}"])
    try:
        _wait_for(tmp_path / "srun.pid")
        batch.send_signal(signal.SIGUSR1)
        out, _ = batch.communicate(timeout=60)
    finally:
        if batch.poll() is None:
            batch.kill()
            batch.wait()
    assert batch.returncode == 0, out
    assert _read(tmp_path / "srun.signals") == "USR1\n"
    assert "run state after SIGUSR1: finished 4 4" in out and not (tmp_path / "scontrol.log").exists()


def test_requeues_stop_at_the_limit(tmp_path, fake_slurm):
    batch = _start_batch(
        tmp_path, fake_slurm, ["experiment=tiny_cpu"], SLURM_RESTART_COUNT=3, SPIN_MAX_REQUEUES=3
    )
    try:
        _wait_for(tmp_path / "srun.pid")
        batch.send_signal(signal.SIGUSR1)
        out, _ = batch.communicate(timeout=60)
    finally:
        if batch.poll() is None:
            batch.kill()
            batch.wait()
    assert batch.returncode == 1 and "not requeueing" in out, out
    assert not (tmp_path / "scontrol.log").exists()


@pytest.mark.parametrize("srun_exit", [0, 3])
def test_without_a_signal_the_job_exits_with_sruns_status(tmp_path, fake_slurm, srun_exit):
    batch = _start_batch(tmp_path, fake_slurm, ["experiment=tiny_cpu"], FAKE_SRUN_EXIT=srun_exit)
    out, _ = batch.communicate(timeout=60)
    assert batch.returncode == srun_exit, out
    assert f"srun exited with status {srun_exit}" in out
    assert not (tmp_path / "scontrol.log").exists() and not (tmp_path / "srun.signals").exists()


def test_local_ranks_get_the_cpus_a_cgroup_quota_grants_not_the_hosts(tmp_path, monkeypatch):
    """A 2-CPU quota on a many-core host (``docker --cpus 2``): os.cpu_count() says the host's cores, and torch
    would start that many threads in each rank; the launcher's thread count follows the quota."""
    from spin_megatron.parallel import launch

    (tmp_path / "cpu.max").write_text("150000 100000\n")  # v2: 1.5 CPUs, rounded up
    assert launch._cgroup_cpu_quota(str(tmp_path)) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert launch._cgroup_cpu_quota(str(tmp_path)) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")  # v1: 4 CPUs
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert launch._cgroup_cpu_quota(str(tmp_path)) == 4
    assert launch._cgroup_cpu_quota(str(tmp_path / "absent")) is None
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(launch, "_cgroup_cpu_quota", lambda: 2)
    assert launch.usable_cpus() == 2
    monkeypatch.setattr(launch, "_cgroup_cpu_quota", lambda: None)
    assert launch.usable_cpus() == 64
