"""Reliability of spin-train on the tiny CPU preset: killed anywhere (SIGKILL during generation, the update, a
checkpoint write) and resumed → bit-identical to an uninterrupted run; SIGTERM → checkpoint and exit 0; NaN
gradients → skipped, counted, halt after K; a dying / hanging / garbage-returning engine → restarted with the
weights re-synced, or the run saves and stops with a clear error."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.helpers import REPO, run_in_session

pytestmark = pytest.mark.e2e
BASE = ["experiment=tiny_cpu", "logging.progress_bar=false", "trainer.test_freq=0"]


def _cmd(out, *overrides):
    return [
        sys.executable,
        "-m",
        "spin_megatron.train",
        *BASE,
        f"trainer.output_dir={out}",
        *map(str, overrides),
    ]


def _run(out, *overrides, faults="", engine_faults=""):
    env = {**os.environ, "SPIN_FAULTS": faults, "SPIN_TEST_ENGINE_FAULTS": engine_faults}
    out.mkdir(parents=True, exist_ok=True)
    return run_in_session(_cmd(out, *overrides), out.parent / out.name, env=env)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _hf_weights(out):
    tensors = {}
    for path in sorted((out / "hf").glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _policy_weights(checkpoint, tmp_path):
    target = tmp_path / f"{checkpoint.parent.parent.name}_{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint / "dist", target)
    state = torch.load(target, weights_only=False)
    return {
        k: v
        for k, v in state.items()
        if k.startswith(("embedding.", "decoder.", "output_layer.")) and isinstance(v, torch.Tensor)
    }


def _checkpoints(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path):
    reference, faulty = tmp_path / "reference", tmp_path / "faulty"
    common = ["trainer.total_steps=6", "trainer.save_freq=2"]
    assert _run(reference, *common).returncode == 0

    for fault, complete_before, partial in [
        ("kill:generate:3", ["step_0000002"], None),
        ("kill:checkpoint:4", ["step_0000002"], ".step_0000004.partial"),  # dies mid-write: never picked up
        ("kill:update:3", ["step_0000002"], None),
        (
            "kill:sync:6",
            ["step_0000002", "step_0000004"],
            None,
        ),  # spin syncs the opponent at refreshes (2, 4, 6)
    ]:
        result = _run(faulty, *common, faults=fault)
        assert result.returncode == -signal.SIGKILL, (fault, result.stderr[-2000:])
        complete = [n for n in _checkpoints(faulty) if not n.startswith(".")]
        assert complete == complete_before, fault
        if partial:
            assert partial in _checkpoints(faulty)
    result = _run(faulty, *common)
    assert result.returncode == 0, result.stderr[-3000:]

    a, b = _hf_weights(reference), _hf_weights(faulty)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    steps = [m["step"] for m in _metrics(faulty)]
    assert steps == [1, 2, 3, 4, 5, 6]  # every step logged exactly once across the five processes
    assert [m["loss"] for m in _metrics(faulty)] == [m["loss"] for m in _metrics(reference)]
    assert _checkpoints(faulty) == ["step_0000004", "step_0000006"]  # keep_last_n=2, partial folders gone


def test_sigterm_finishes_the_step_checkpoints_and_exits_zero(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _cmd(out, "trainer.total_steps=200", "trainer.save_freq=0"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, "the run did not reach step 1"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert f"received SIGTERM: stopped after step {last}" in stdout
    assert _checkpoints(out) == [f"step_{last:07d}"]
    result = _run(out, f"trainer.total_steps={last + 1}", "trainer.save_freq=0")  # resume=auto continues
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["step"] for m in _metrics(out)] == list(range(1, last + 2))


def test_nan_gradients_skip_the_step_and_repeated_nans_halt_with_a_checkpoint(tmp_path):
    out = tmp_path / "nan"
    result = _run(
        out, "trainer.total_steps=3", "trainer.save_freq=1", "trainer.keep_last_n=0", faults="nan:2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = {m["step"]: m for m in _metrics(out)}
    assert metrics[1]["train/skipped_steps"] == 0 and metrics[2]["train/skipped_steps"] == 1
    assert metrics[2]["grad_norm"] is None and metrics[3]["train/skipped_steps"] == 1  # NaN logged as null
    step1 = _policy_weights(out / "checkpoints" / "step_0000001", tmp_path)
    step2 = _policy_weights(out / "checkpoints" / "step_0000002", tmp_path)
    assert step1 and all(torch.equal(step1[k], step2[k]) for k in step1)  # the poisoned step changed nothing

    out = tmp_path / "nans"
    result = _run(
        out,
        "trainer.total_steps=6",
        "trainer.save_freq=1",
        "trainer.keep_last_n=0",
        "trainer.max_consecutive_skips=2",
        faults="nan:2,nan:3,nan:4",
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("spin-train: error: 2 consecutive optimizer steps had NaN/Inf gradients and were skipped")
    )
    assert _checkpoints(out)[-1] == "step_0000003"
    good = _policy_weights(out / "checkpoints" / "step_0000001", tmp_path)
    halted = _policy_weights(out / "checkpoints" / "step_0000003", tmp_path)
    assert all(torch.equal(good[k], halted[k]) for k in good)


def test_engine_that_dies_hangs_and_returns_garbage_is_restarted(tmp_path):
    reference, faulty = tmp_path / "reference", tmp_path / "faulty"
    common = ["trainer.total_steps=2", "trainer.save_freq=0", "trainer.export_hf=true"]
    assert _run(reference, *common).returncode == 0
    result = _run(
        faulty,
        *common,
        "rollout.engine=tests.faulty_engine:make",
        "rollout.timeout_s=5",
        "rollout.max_restarts=3",
        engine_faults="die@2,hang@3,malformed@4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for expected in (
        "injected engine death",
        "did not finish within rollout.timeout_s=5 s",
        "token ids outside",
    ):
        assert expected in result.stderr
    assert _metrics(faulty)[-1]["rollout/restarts"] == 3
    a, b = _hf_weights(reference), _hf_weights(faulty)  # retried with the same seed: the same samples
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_engine_failing_past_its_restarts_saves_and_stops(tmp_path):
    out = tmp_path / "dead"
    result = _run(
        out,
        "trainer.total_steps=4",
        "trainer.save_freq=0",
        "rollout.engine=tests.faulty_engine:make",
        "rollout.max_restarts=1",
        engine_faults="die@2,die@3",
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "spin-train: error: rollout failed after 1 engine restart(s) (engine failed: "
        "RuntimeError: injected engine death); saved step 1"
    )
    assert _checkpoints(out) == ["step_0000001"]
    resumed = _run(out, "trainer.total_steps=2", "trainer.save_freq=0")  # the batch of step 2 is retried
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["step"] for m in _metrics(out)] == [1, 2]


def test_validation_failing_past_its_restarts_logs_saves_and_stops(tmp_path):
    """Validation generation gets the same restarts as training; past them the step is kept (logged, saved)."""
    out = tmp_path / "val_dead"
    # generate calls: 1 = validation before step 1, 2 and 3 = steps 1 and 2, 4 = validation after step 2 (dies),
    # 5 = its retry after the restart (dies too)
    faulty = ["trainer.test_freq=2", "rollout.engine=tests.faulty_engine:make", "rollout.max_restarts=1"]
    result = _run(out, "trainer.total_steps=4", "trainer.save_freq=0", *faulty, engine_faults="die@4,die@5")
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "spin-train: error: validation generation failed on 1 replica(s): engine failed: RuntimeError: injected "
        "engine death (after 1 engine restart(s)); saved step 2 in "
    ), last
    assert "restarting the engine (1/1)" in result.stderr
    assert _checkpoints(out) == ["step_0000002"]
    assert [m["step"] for m in _metrics(out)] == [0, 1, 2] and "val/accuracy" not in _metrics(out)[-1]
    resumed = _run(out, "trainer.total_steps=3", "trainer.save_freq=0")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["step"] for m in _metrics(out)] == [0, 1, 2, 3]


@pytest.mark.dist
def test_one_replicas_engine_failing_restarts_it_while_every_replica_joins_the_resync(tmp_path):
    """Qwen3-MoE at EP2 over 2 data-parallel replicas (one rank each): the weight export gathers experts across
    the replicas, so when replica 1's engine dies, the re-sync after its restart is everyone's — the retry is
    agreed over the world (before: replica 0 went on while replica 1 waited in the export, and the run hung)."""
    out = tmp_path / "moe"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "spin_megatron.train", *BASE, f"trainer.output_dir={out}", "model.tiny.architecture=qwen3_moe",
           "parallel.ep=2", "trainer.total_steps=2", "trainer.save_freq=0", "trainer.export_hf=false",
           "rollout.engine=tests.faulty_engine:make", "rollout.max_restarts=1"]  # fmt: skip
    env = {**os.environ, "SPIN_TEST_ENGINE_FAULTS": "die@2@1", "OMP_NUM_THREADS": "1"}
    result = run_in_session(cmd, tmp_path / "moe_run", env=env, timeout_s=420)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "injected engine death" in result.stderr
    assert [m["rollout/restarts"] for m in _metrics(out)] == [0.0, 1.0]
