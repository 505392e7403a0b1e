"""tools/launch/spin.sbatch under a real Slurm 22.05 (slurmctld + slurmd + munged on this host, started by
tools/slurm/cluster.sh): a tiny run to completion, preemption by the job's signal → checkpoint → requeue → the
same weights as an uninterrupted run, scancel mid-run → resumable, a bad override → one failure, no requeue loop,
and two "nodes" (two slurmd on one host) for the multi-node and SPIN_ROLLOUT_NODES paths."""

import json
import os
import shutil
import socket
import sys
import time

import pytest

from tests.helpers import REPO, assert_same_hf_export
from tests.slurm_cluster import start_cluster, unavailable_reason

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.xdist_group("cluster"),
]  # Ray and Slurm daemons: one file at a time

SBATCH = REPO / "tools" / "launch" / "spin.sbatch"
# The header asks for 4 nodes × 8 GPUs × 64 CPUs; command-line options beat it, as on a real cluster. Real Slurm
# refuses `--gpus-per-node=8` where no GPU is configured ("Invalid generic resource (gres) specification").
CPU_JOB = ["--nodes=1", f"--cpus-per-task={min(2, os.cpu_count() or 1)}", "--gpus-per-node=0"]
TINY = ["experiment=tiny_cpu", "trainer.total_steps=4", "trainer.test_freq=0", "trainer.save_freq=0"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.down()


def _submit(cluster, submit_dir, overrides, *options, **env) -> int:
    (submit_dir / "logs").mkdir(parents=True, exist_ok=True)  # Slurm opens logs/%x-%j.out before the script
    env = {"PYTHON": sys.executable, "SPIN_REPO": REPO, "SPIN_NPROC_PER_NODE": 1, **env}
    return cluster.sbatch([*CPU_JOB, *options, SBATCH, *overrides], cwd=submit_dir, **env)


def _batch_log(submit_dir, job_id) -> str:
    path = submit_dir / "logs" / f"spin-{job_id}.out"
    return path.read_text() if path.exists() else ""


def _node_log(submit_dir, job_id, attempt: int, node: str = "node0") -> str:
    (path,) = (submit_dir / "logs" / f"spin-{job_id}").glob(f"{node}-*.attempt{attempt}.out")
    return path.read_text()


def _steps(run_dir) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for_step(cluster, job_id, run_dir, step: int, timeout_s: float = 240):
    deadline = time.monotonic() + timeout_s
    while not _steps(run_dir) or _steps(run_dir)[-1] < step:
        job = cluster.job(job_id)
        assert job.state in ("PENDING", "RUNNING"), job.text
        assert time.monotonic() < deadline, f"no step {step} in {run_dir} after {timeout_s} s"
        time.sleep(0.2)


# ----- one node: a run to completion, and the reference for the interrupted ones ----------------------------------
@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory, qwen_tokenizer_dir, gsm8k_dir):
    submit = tmp_path_factory.mktemp("uninterrupted")
    run_dir = submit / "run"
    start = time.monotonic()
    job_id = _submit(slurm, submit, [*TINY, f"trainer.output_dir={run_dir}"])
    job = slurm.wait(job_id, timeout_s=300)
    yield submit, run_dir, job_id, job, time.monotonic() - start
    shutil.rmtree(run_dir, ignore_errors=True)


def test_a_tiny_run_completes_with_its_logs_where_the_readme_says(uninterrupted):
    submit, run_dir, job_id, job, seconds = uninterrupted
    batch = _batch_log(submit, job_id)
    assert job.state == "COMPLETED" and job.exit_code == "0:0" and job.restarts == 0, job.text + batch
    # The header's other lines, parsed by Slurm itself: the job name (%x) and --output pattern.
    assert f"StdOut={submit}/logs/spin-{job_id}.out" in job.text
    assert f"job {job_id} (spin) attempt 0: 1 training node(s) × 1 process(es)" in batch
    assert "srun exited with status 0" in batch
    node = _node_log(submit, job_id, attempt=0)  # logs/spin-<id>/node%n-%N.attempt<k>.out, written by srun
    assert "done: metrics" in node and "trainer.resume=auto" not in batch  # the overrides are not echoed
    assert _steps(run_dir) == [1, 2, 3, 4]
    assert (run_dir / "checkpoints" / "step_0000004" / "COMPLETE").is_file()
    print(f"uninterrupted job: {seconds:.0f} s")


def test_the_jobs_signal_checkpoints_requeues_and_resumes_to_the_same_weights(slurm, uninterrupted, tmp_path):
    _, reference_dir, *_ = uninterrupted
    run_dir = tmp_path / "run"
    start = time.monotonic()
    job_id = _submit(slurm, tmp_path, [*TINY, f"trainer.output_dir={run_dir}"])
    _wait_for_step(slurm, job_id, run_dir, 1)
    # What --signal=B:USR1@300 does at the time-limit warning (and PreemptParameters=send_user_signal at
    # preemption): USR1 to the batch shell only.
    slurm.run("scancel", "--batch", "--signal=USR1", str(job_id))
    job = slurm.wait(
        job_id, states={"COMPLETED", "FAILED", "CANCELLED"}, timeout_s=300, until=lambda j: j.restarts
    )
    batch = _batch_log(tmp_path, job_id)
    assert job.state == "COMPLETED" and job.restarts == 1 and job.exit_code == "0:0", job.text + batch
    assert "got SIGUSR1: asking the trainer" in batch
    stopped = [line for line in batch.splitlines() if "run state after SIGUSR1: unfinished" in line]
    assert len(stopped) == 1, batch
    step = int(stopped[0].split("unfinished ")[1].split()[0])
    assert 1 <= step < 4
    assert f"requeueing job {job_id}" in batch
    assert f"job {job_id} (spin) attempt 1:" in batch  # the same job id, SLURM_RESTART_COUNT=1
    first = _node_log(tmp_path, job_id, attempt=0)
    assert f"spin-train: received SIGUSR1: stopped after step {step} with a checkpoint" in first
    assert "done: metrics" in _node_log(tmp_path, job_id, attempt=1)
    assert _steps(run_dir) == [1, 2, 3, 4]  # no step lost or repeated
    assert_same_hf_export(run_dir, reference_dir)
    print(f"preempted at step {step}, requeued and finished: {time.monotonic() - start:.0f} s")


def _wait_for_log(path, text: str, timeout_s: float = 90) -> str:
    deadline = time.monotonic() + timeout_s
    while text not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, f"no {text!r} in {path} after {timeout_s} s"
        time.sleep(0.2)
    return path.read_text()


def test_scancel_mid_run_checkpoints_stays_cancelled_and_a_new_job_finishes(slurm, uninterrupted, tmp_path):
    _, reference_dir, *_ = uninterrupted
    run_dir = tmp_path / "run"
    start = time.monotonic()
    job_id = _submit(slurm, tmp_path, [*TINY, f"trainer.output_dir={run_dir}"])
    _wait_for_step(slurm, job_id, run_dir, 1)
    slurm.run("scancel", str(job_id))
    # Slurm sends TERM to the batch shell, srun and the tasks, and gives them KillWait (30 s) before SIGKILL:
    # the trainer finishes its step and checkpoints. The batch shell must not requeue: slurmctld would accept
    # `scontrol requeue` for the cancelled job and run it again.
    batch = _wait_for_log(tmp_path / "logs" / f"spin-{job_id}.out", "not requeueing after SIGTERM")
    job = slurm.wait(job_id, states={"CANCELLED", "COMPLETED", "FAILED", "PENDING"}, timeout_s=60)
    assert job.state == "CANCELLED" and job.restarts == 0, job.text + batch
    stopped = [line for line in batch.splitlines() if "run state after SIGTERM: unfinished" in line]
    assert len(stopped) == 1, batch
    step = int(stopped[0].split("unfinished ")[1].split()[0])
    assert 1 <= step < 4 and _steps(run_dir)[-1] == step
    first = _node_log(tmp_path, job_id, attempt=0)
    assert f"spin-train: received SIGTERM: stopped after step {step} with a checkpoint" in first

    rerun = _submit(slurm, tmp_path, [*TINY, f"trainer.output_dir={run_dir}"])  # resume=auto is appended
    job = slurm.wait(rerun, timeout_s=300)
    assert job.state == "COMPLETED" and job.restarts == 0, job.text + _batch_log(tmp_path, rerun)
    assert "done: metrics" in _node_log(tmp_path, rerun, attempt=0)
    assert _steps(run_dir) == [1, 2, 3, 4]
    assert_same_hf_export(run_dir, reference_dir)
    print(f"scancel after step {step}, new job finished: {time.monotonic() - start:.0f} s")


def test_a_bad_override_fails_once_with_its_error_line_in_the_job_log_and_no_requeue(slurm, tmp_path):
    start = time.monotonic()
    overrides = ["experiment=tiny_cpu", "trainer.total_steps=many", f"trainer.output_dir={tmp_path}/run"]
    job_id = _submit(slurm, tmp_path, overrides)
    job = slurm.wait(job_id, timeout_s=120)
    seconds = time.monotonic() - start
    batch = _batch_log(tmp_path, job_id)
    # torchrun turns the trainer's exit code 2 into its own 1 (ChildFailedError); srun and the job take that.
    assert job.state == "FAILED" and job.restarts == 0 and job.exit_code == "1:0", job.text + batch
    node = _node_log(tmp_path, job_id, attempt=0)
    (error,) = [line for line in node.splitlines() if line.startswith("spin-train: error:")]
    assert "trainer.total_steps" in error and "'many'" in error
    # ... followed there by torchrun's 30-line ChildFailedError report; the batch log repeats the one line.
    assert f"logs/spin-{job_id}/node0-{slurm.nodes[0]}.attempt0.out:{error}" in batch.splitlines()
    time.sleep(12)  # past the requeue delay (cred_expire=10): still failed, never restarted
    job = slurm.job(job_id)
    assert job.state == "FAILED" and job.restarts == 0, job.text
    print(f"failed in {seconds:.0f} s")


FAKE_SLEEPER = """#!/usr/bin/env bash
# Stands in for torchrun on the first attempt: runs until a signal, records it; later attempts finish at once.
if [[ $1 == -m && $2 == torch.distributed.run ]]; then
    [[ ${SLURM_RESTART_COUNT:-0} -eq 0 ]] || { echo "attempt $SLURM_RESTART_COUNT ran" >> "$FAKE_DIR/train.calls"; exit 0; }
    trap 'echo "USR1 after $SECONDS s" >> "$FAKE_DIR/train.calls"; exit 1' USR1
    trap 'echo "TERM after $SECONDS s" >> "$FAKE_DIR/train.calls"; exit 1' TERM
    for _ in $(seq 1200); do sleep 0.1; done
    exit 3
fi
exec "$REAL_PYTHON" "$@"
"""


def test_the_time_limit_warning_reaches_the_training_step_and_requeues(slurm, tmp_path):
    (tmp_path / "python").write_text(FAKE_SLEEPER)
    (tmp_path / "python").chmod(0o755)
    fake = dict(PYTHON=tmp_path / "python", REAL_PYTHON=sys.executable, FAKE_DIR=tmp_path)
    # The header's --signal=B:USR1@300 with a 1-minute limit would fire at once: 55 s before the end instead.
    # slurmctld checks time limits about every 30 s, so the warning comes 5-35 s into the job.
    start = time.monotonic()
    job_id = _submit(slurm, tmp_path, ["experiment=tiny_cpu", f"trainer.output_dir={tmp_path}/run"],
                     "--time=1", "--signal=B:USR1@55", **fake)  # fmt: skip
    job = slurm.wait(job_id, states={"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout_s=120)
    batch = _batch_log(tmp_path, job_id)
    assert job.state == "COMPLETED" and job.restarts == 1, job.text + batch
    calls = (tmp_path / "train.calls").read_text().splitlines()
    assert len(calls) == 2 and calls[0].startswith("USR1 after ") and calls[1] == "attempt 1 ran", calls
    assert "got SIGUSR1" in batch and "run state after SIGUSR1: unfinished 0 4" in batch
    print(f"time-limit warning: {calls[0]}; job done after {time.monotonic() - start:.0f} s")


def test_the_checkout_is_found_from_the_submit_directory_not_the_spool_copy(slurm, tmp_path):
    (tmp_path / "logs").mkdir()
    job_id = slurm.sbatch([*CPU_JOB, SBATCH, "experiment=tiny_cpu"], cwd=tmp_path, PYTHON=sys.executable)
    job = slurm.wait(job_id, timeout_s=60)
    batch = _batch_log(tmp_path, job_id)
    assert job.state == "FAILED" and job.restarts == 0, job.text
    assert batch.strip() == (
        f"spin.sbatch: error: no torchrun.sh in {tmp_path}/tools/launch: submit from the repository root "
        "or set SPIN_REPO=/path/to/checkout"
    )


# ----- two nodes: two slurmd on this host (Debian's build runs them side by side) ---------------------------------
TWO_NODES = ("n0", "n1")
FAKE_TORCHRUN = """#!/usr/bin/env bash
# Stands in for `python -m torch.distributed.run` (the trainer) and records where Slurm ran it; the rest
# (run_state.py) goes to the real interpreter.
if [[ $1 == -m && $2 == torch.distributed.run ]]; then
    echo "$SLURMD_NODENAME node_id=$SLURM_NODEID step=$SLURM_STEP_ID $*" >> "$FAKE_DIR/train.calls"
    sleep "${FAKE_TRAIN_S:-3}"
    exit 0
fi
exec "$REAL_PYTHON" "$@"
"""
FAKE_RAY = """#!/usr/bin/env bash
echo "$SLURMD_NODENAME $*" >> "$FAKE_DIR/ray.calls"
"""


@pytest.fixture(scope="module")
def slurm2(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = start_cluster(tmp_path_factory.mktemp("slurm2"), TWO_NODES)
    yield cluster
    cluster.down()


def _fakes(tmp_path) -> dict:
    for name, text in (("python", FAKE_TORCHRUN), ("ray", FAKE_RAY)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    return dict(
        PYTHON=tmp_path / "python", RAY=tmp_path / "ray", REAL_PYTHON=sys.executable, FAKE_DIR=tmp_path
    )


def test_rollout_nodes_get_the_ray_step_and_training_the_first_node(slurm2, tmp_path):
    job_id = _submit(
        slurm2, tmp_path, ["experiment=tiny_cpu"], "--nodes=2", "--cpus-per-task=1", SPIN_ROLLOUT_NODES=1,
        **_fakes(tmp_path),
    )  # fmt: skip
    job = slurm2.wait(job_id, timeout_s=60)
    batch = _batch_log(tmp_path, job_id)
    assert job.state == "COMPLETED", job.text + batch
    (train,) = (tmp_path / "train.calls").read_text().splitlines()
    # One training task, on the first node. (Which of the two background sruns gets step id 0 is a race: the Ray
    # step is started first, but a loaded machine has let the training srun register before it.)
    assert train.startswith("n0 node_id=0 step="), train
    assert "rollout.sglang.ray_address=n1:6379" in train and "--standalone" in train
    # --gpus-per-node=0: SLURM_GPUS_PER_NODE=0 reaches the Ray nodes. After training, the Ray step is stopped
    # with USR1, which srun forwards, so each node's ray_node.sh runs `ray stop` (a TERM to srun would SIGKILL it).
    assert sorted((tmp_path / "ray.calls").read_text().splitlines()) == [
        "n0 start --address=n1:6379 --num-gpus=0 --num-cpus=0 --disable-usage-stats",
        "n0 stop --force",
        "n1 start --head --port=6379 --num-gpus=0 --include-dashboard=false --disable-usage-stats",
        "n1 stop --force",
    ], batch
    assert "Killed" not in batch and "forcing job termination" not in batch, batch


def test_two_nodes_run_one_torchrun_each_with_the_rendezvous_on_the_first(slurm2, tmp_path):
    job_id = _submit(
        slurm2, tmp_path, ["experiment=tiny_cpu"], "--nodes=2", "--cpus-per-task=1", **_fakes(tmp_path)
    )
    job = slurm2.wait(job_id, timeout_s=60)
    assert job.state == "COMPLETED", job.text + _batch_log(tmp_path, job_id)
    port = 20000 + job_id % 10000
    calls = sorted((tmp_path / "train.calls").read_text().splitlines())
    rendezvous = (
        f"--nnodes 2 --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint n0:{port} --rdzv_id {job_id}"
    )
    assert [call.split(" -m spin_megatron.train")[0] for call in calls] == [
        f"n0 node_id=0 step=0 -m torch.distributed.run {rendezvous} --rdzv_conf is_host=1",
        f"n1 node_id=1 step=0 -m torch.distributed.run {rendezvous} --rdzv_conf is_host=0",
    ]
    assert all(
        call.endswith("-m spin_megatron.train experiment=tiny_cpu trainer.resume=auto") for call in calls
    )
    logs = sorted(p.name for p in (tmp_path / "logs" / f"spin-{job_id}").iterdir())
    host = socket.gethostname().split(".")[0]  # srun's %N is the host name, not Slurm's node name
    assert logs == [f"node0-{host}.attempt0.out", f"node1-{host}.attempt0.out"]  # %n: one file per node


def test_a_two_node_run_rendezvouses_through_srun_and_finishes(
    slurm2, tmp_path, qwen_tokenizer_dir, gsm8k_dir
):
    run_dir = tmp_path / "run"
    start = time.monotonic()
    overrides = ["experiment=tiny_cpu", "parallel.tp=2", "trainer.total_steps=2", "trainer.test_freq=0"]
    # The node names (n0, n1) do not resolve here: the rendezvous host is given as an address.
    job_id = _submit(
        slurm2, tmp_path, [*overrides, f"trainer.output_dir={run_dir}"], "--nodes=2", "--cpus-per-task=1",
        SPIN_MASTER_ADDR="127.0.0.1",
    )  # fmt: skip
    job = slurm2.wait(job_id, timeout_s=300)
    assert job.state == "COMPLETED", job.text + _batch_log(tmp_path, job_id)
    assert _steps(run_dir) == [1, 2]
    assert "done: metrics" in _node_log(tmp_path, job_id, 0, "node0") + _node_log(
        tmp_path, job_id, 0, "node1"
    )
    print(f"two-node TP=2 job: {time.monotonic() - start:.0f} s")
