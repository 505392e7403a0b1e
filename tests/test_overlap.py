"""rollout.max_staleness=1: the next batch generated while this one trains (spin_megatron/training/overlap.py).

SPIN's opponent (samples from the reference) overlaps exactly: the same run as the synchronous loop. Sampling from
the policy, the samples are one version old (rollout/staleness), never more, and a run killed while a prefetched
batch is in flight resumes to the weights of an uninterrupted overlapped run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spin_megatron.errors import ConfigError
from spin_megatron.train import load_config
from tests.helpers import REPO, assert_same_hf_export, run_in_session
from tests.sglang_double import pid_gone

SEPARATE = ["rollout.hf_process=separate", "rollout.hf_threads=1"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([], r"the in-process hf engine shares the trainer's threads: set rollout.hf_process=separate"),
        ([*SEPARATE, "algorithm.mode=online", "rollout.n=2", "rollout.sync_every=2"], r"it replaces rollout.sync_every"),
        ([*SEPARATE, "trainer.ref_update_freq=0", "trainer.ref_model_sync_steps=4"],
         r"trainer.ref_model_sync_steps refreshes the reference inside a step"),
        (["rollout.engine=sglang", "rollout.sglang.enable_memory_saver=true"],
         r"colocated SGLang shares the training GPUs and keeps the synchronous loop"),
    ],
)  # fmt: skip
def test_overlap_is_refused_where_it_cannot_overlap_or_bound_staleness(overrides, message):
    with pytest.raises(
        ConfigError, match=r"rollout.max_staleness=1 overlaps generation with training, but " + message
    ):
        load_config(["experiment=tiny_cpu", "rollout.max_staleness=1", *overrides])
    with pytest.raises(ConfigError, match=r"rollout.max_staleness=2 is not allowed; choose one of 0, 1"):
        load_config(["experiment=tiny_cpu", "rollout.max_staleness=2", *SEPARATE])


def _train(out, *overrides, faults="", engine=tuple(SEPARATE)):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPIN_FAULTS": faults}
    cmd = [sys.executable, "-m", "spin_megatron.train", "experiment=tiny_cpu", "logging.progress_bar=false",
           f"trainer.output_dir={out}", *engine, *overrides]  # fmt: skip
    result = run_in_session(cmd, out.parent / out.name, env=env, combined=True)
    return result.returncode, result.stdout


def _metrics(out) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


TINY = ["trainer.test_freq=2", "trainer.save_freq=0"]  # tiny_cpu: SPIN, reference refreshed every 2 steps


@pytest.fixture(scope="module")
def inline_sync(tmp_path_factory):
    """The reference run: the synchronous loop with the hf engine in the trainer's process (one thread)."""
    out = tmp_path_factory.mktemp("inline") / "run"
    code, text = _train(out, *TINY, engine=())
    assert code == 0, text[-3000:]
    yield out
    shutil.rmtree(out, ignore_errors=True)


def _same_run(out, reference):
    """Every metric but the timings, and the final weights."""
    ours, theirs = _metrics(out), _metrics(reference)
    assert sorted(ours) == sorted(theirs) == [0, 1, 2, 3, 4]
    for step, m in ours.items():
        differ = {
            k for k, v in m.items() if not k.startswith(("time/", "perf/")) and theirs[step].get(k) != v
        }
        assert differ <= {"rollout/restarts"}, (step, differ)
    assert_same_hf_export(out, reference)


@pytest.mark.e2e
def test_spin_from_the_reference_overlaps_exactly(inline_sync, tmp_path):
    """Steps 2 and 4 are generated (by the engine in its own process) while 1 and 3 train — no refresh in between;
    step 4's after validation at step 2 had put the policy in the engine. The run is the synchronous in-process
    one: the same metrics and weights. Its checkpoint of step 3 holds step 4's batch, sampled by reference
    version 1 (refreshed at step 2): a run resumed from it trains step 4 exactly so (staleness 0, not -1)."""
    out = tmp_path / "overlap"
    code, text = _train(out, "trainer.test_freq=2", "trainer.save_freq=3", "rollout.max_staleness=1")
    assert code == 0, text[-3000:]
    _same_run(out, inline_sync)
    overlapped = _metrics(out)
    assert "time/wait_rollout" in overlapped[1] and "time/wait_rollout" in overlapped[3]
    assert all(m.get("rollout/staleness", 0) == 0 for m in overlapped.values())
    resumed = tmp_path / "resumed"
    step3 = out / "checkpoints" / "step_0000003"
    code, text = _train(resumed, *TINY, "rollout.max_staleness=1", f"trainer.resume={step3}")
    assert code == 0, text[-3000:]
    theirs = _metrics(inline_sync)[4]
    (ours,) = _metrics(resumed).values()
    differ = {k for k, v in ours.items() if not k.startswith(("time/", "perf/")) and theirs.get(k) != v}
    assert ours["step"] == 4 and differ <= {"rollout/restarts"}, differ
    assert_same_hf_export(resumed, inline_sync)


def _spawned_children(pid: int) -> list[int]:
    """The multiprocessing-spawned children of ``pid`` (not its resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.e2e
def test_a_separate_engine_killed_mid_run_is_rebuilt_and_the_run_matches_in_process(inline_sync, tmp_path):
    """rollout.hf_process=separate, its engine process SIGKILLed after step 1: the supervisor builds a new one,
    the weights are re-synced, the generation retried with its seed — the in-process run, to the bit."""
    out = tmp_path / "separate"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "spin_megatron.train", "experiment=tiny_cpu", "logging.progress_bar=false",
           f"trainer.output_dir={out}", *SEPARATE, *TINY]  # fmt: skip
    log = tmp_path / "separate.log"
    with open(log, "w") as sink:
        trainer = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not (out / "metrics.jsonl").is_file() or len(_metrics(out)) < 2:  # step 0 (validation), 1
                assert trainer.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            (child,) = _spawned_children(trainer.pid)
            os.kill(child, signal.SIGKILL)
            assert trainer.wait(timeout=300) == 0, log.read_text()[-3000:]
        finally:
            if trainer.poll() is None:
                trainer.kill()
    assert f"rollout engine process (pid {child}) exited with code -9 (killed)" in log.read_text()
    assert _metrics(out)[4]["rollout/restarts"] == 1 and pid_gone(child)
    _same_run(out, inline_sync)


@pytest.mark.e2e
@pytest.mark.slow
def test_policy_samples_are_one_version_old_and_a_kill_mid_prefetch_resumes_exactly(tmp_path):
    """Online DPO on the synthetic task, sampling from the policy: step 1 is on-policy, later steps train on samples
    of the previous policy (staleness 1, never more). SIGKILLed in step 3's update — step 4's batch in flight —
    and resumed from step 2's checkpoint (which holds step 3's batch): the weights of an uninterrupted run."""
    from transformers import AutoTokenizer

    from tests.synthetic_task import make_char_tokenizer, make_prompt_file

    tokenizer = make_char_tokenizer(tmp_path / "tokenizer")
    prompts = make_prompt_file(tmp_path / "prompts.jsonl", n=32)
    task = [
        "algorithm.mode=online", "rollout.n=2", "algorithm.tie_policy=keep",
        "algorithm.reward=tests.synthetic_task:sevens",
        f"model.tiny.vocab_size={len(AutoTokenizer.from_pretrained(tokenizer))}", f"model.tokenizer_path={tokenizer}",
        f"data.train_files={prompts}", f"data.val_files={prompts}", "data.instruction=''",
        "rollout.max_new_tokens=8", "trainer.prompts_per_step=8", "trainer.mini_batch_size=4",
        "trainer.ref_update_freq=2", "trainer.test_freq=0", "trainer.save_freq=2", "rollout.max_staleness=1",
    ]  # fmt: skip
    code, text = _train(tmp_path / "full", *task)
    assert code == 0, text[-3000:]
    full = _metrics(tmp_path / "full")
    assert [full[s]["rollout/staleness"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert full[1]["rollout/logp_diff"] < 1e-4  # on-policy: the engine's log-probs are the trainer's
    assert full[3]["rollout/logp_diff"] is None  # not measured off-policy (the sampler is not the trainee)

    code, text = _train(tmp_path / "killed", *task, faults="kill:update:3")
    assert code == -signal.SIGKILL, text[-3000:]
    code, text = _train(tmp_path / "killed", *task, "trainer.resume=auto")
    assert code == 0, text[-3000:]
    resumed = _metrics(tmp_path / "killed")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step]["loss"] == full[step]["loss"] and resumed[step]["rollout/staleness"] == 1
    assert_same_hf_export(tmp_path / "killed", tmp_path / "full")
