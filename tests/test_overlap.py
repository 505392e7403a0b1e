"""rollout.max_staleness=1: the next batch generated while this one trains (spin_megatron/overlap.py).

SPIN's opponent (samples from the reference) overlaps exactly: the same run as the synchronous loop. Sampling from
the policy, the samples are one version old (rollout/staleness), never more, and a run killed while a prefetched
batch is in flight resumes to the weights of an uninterrupted overlapped run."""

import json
import os
import signal
import subprocess
import sys

import pytest

from spin_megatron.errors import ConfigError
from spin_megatron.train import load_config
from tests.helpers import REPO, assert_same_hf_export

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


def _train(out, *overrides, faults=""):
    """Output to a file, not a pipe: a SIGKILLed trainer leaves helpers (megatron-core's checkpoint writers) holding
    inherited descriptors; they die with the session, after the trainer."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPIN_FAULTS": faults}
    cmd = [sys.executable, "-m", "spin_megatron.train", "experiment=tiny_cpu", "logging.progress_bar=false",
           f"trainer.output_dir={out}", *SEPARATE, *overrides]  # fmt: skip
    log = out.parent / f"{out.name}.log"
    with open(log, "a") as sink:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return code, log.read_text()


def _metrics(out) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.e2e
def test_spin_from_the_reference_overlaps_exactly(tmp_path):
    """tiny_cpu: SPIN, reference refreshed every 2 steps. Steps 2 and 4 are generated while 1 and 3 train
    (no refresh in between); every metric but the timings, and the final weights, equal the synchronous run's."""
    runs = {}
    for staleness in (0, 1):
        out = tmp_path / f"staleness{staleness}"
        code, text = _train(
            out, f"rollout.max_staleness={staleness}", "trainer.test_freq=2", "trainer.save_freq=0"
        )
        assert code == 0, text[-3000:]
        runs[staleness] = out
    sync, overlapped = _metrics(runs[0]), _metrics(runs[1])
    assert sorted(sync) == sorted(overlapped) == [0, 1, 2, 3, 4]
    for step, m in overlapped.items():
        differ = {k for k, v in m.items() if not k.startswith(("time/", "perf/")) and sync[step].get(k) != v}
        assert differ == set(), (step, differ)
    assert overlapped[2]["time/wait_rollout"] >= 0 and all(
        m.get("rollout/staleness", 0) == 0 for m in overlapped.values()
    )
    assert_same_hf_export(runs[0], runs[1])


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
