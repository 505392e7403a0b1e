"""spin-train with rollout.engine=sglang, end to end: against a real sglang 0.5.23 server on CPU in both sync
modes (the trainer's log-probs equal the server's after every sync), and against the protocol double for the
lifecycle a CPU server cannot run (memory saver: validation after sleep(), rollout.sync_every > 1, a sync that
fails part-way and is redone after a restart)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO
from tests.sglang_double import free_port
from tests.sglang_real_server import STAND_IN

pytestmark = pytest.mark.e2e


def _train(*overrides, timeout_s: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spin_megatron.train", *map(str, overrides)],
        capture_output=True, text=True, cwd=REPO, timeout=timeout_s,
    )  # fmt: skip


def _metrics(run_dir) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
@pytest.mark.sglang_real
@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_spin_train_against_a_real_sglang_server(sglang_python, tmp_path, mode):
    run = tmp_path / "run"
    result = _train(
        "experiment=tiny_cpu_sglang", f"trainer.output_dir={run}", "trainer.total_steps=3",
        "trainer.test_freq=2", "trainer.save_freq=3", f"rollout.sglang.sync_mode={mode}",
        f"rollout.sglang.python_executable={sglang_python}", f"rollout.sglang.base_port={free_port()}",
        f"rollout.sglang.log_dir={tmp_path / 'logs'}", f"rollout.sglang.extra_server_env.PYTHONPATH={STAND_IN}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = _metrics(run)
    # the server's log-probs of its own samples equal the trainer's (Megatron) after every sync
    assert all(metrics[step]["rollout/logp_diff"] < 1e-4 for step in (1, 2, 3)), metrics
    assert "val/accuracy" in metrics[2] and "val/accuracy" in metrics[3]
    assert (run / "checkpoints" / "step_0000003").is_dir()
    log = (tmp_path / "logs" / "sglang_server_0.log").read_text()
    # spin samples from the opponent (the reference, refreshed at step 2): the initial sync, the refresh at step 2,
    # and the policy for the last validation (at step 2 the fresh reference IS the policy: no extra sync)
    assert log.count("POST /begin_weight_update") == log.count("POST /end_weight_update") == 3
    assert 'HTTP/1.1" 400' not in log


def test_memory_saver_lifecycle_and_a_sync_that_fails_part_way(double, tmp_path):
    """Colocated with the memory saver (the double: a real server needs CUDA for it), sync every 2 steps,
    validation after every step, and the 2nd weight update refused: the sync is redone after a restart."""
    url, state = double(fail_update_at=2)
    run = tmp_path / "run"
    result = _train(
        "experiment=tiny_cpu", "rollout.engine=sglang", f"rollout.sglang.urls=['{url}']",
        "rollout.sglang.enable_memory_saver=true", "algorithm.sample_from=policy", "rollout.sync_every=2",
        "rollout.sync_bucket_mb=8",
        "rollout.max_restarts=1", "trainer.total_steps=4", "trainer.test_freq=1", "trainer.save_freq=4",
        f"trainer.output_dir={run}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = _metrics(run)
    assert all("val/accuracy" in metrics[step] for step in (1, 2, 3, 4))  # validation found the servers awake
    assert metrics[4]["rollout/restarts"] == 1  # the failed sync restarted the engine once
    releases = [body["tags"] for path, body in state.calls if path == "/release_memory_occupation"]
    # steps 1 and 3 do not sync: only the KV cache is released (released weights would come back empty)
    assert releases == [["kv_cache"], ["kv_cache", "weights"], ["kv_cache"], ["kv_cache", "weights"]]
    paths = state.paths()
    failed = [i for i, (p, _) in enumerate(state.calls) if p.startswith("/update_weights")][1]
    assert paths[failed + 1] == "/end_weight_update"  # the session was closed right after the failure
    assert paths.count("/begin_weight_update") == paths.count("/end_weight_update") == 4  # 1 + redo + 2 steps
    assert not state.session_open and not state.released and not state.weights_lost
