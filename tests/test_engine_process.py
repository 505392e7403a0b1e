"""The hf engine in a process of its own (rollout.hf_process=separate): the same samples as in-process, errors
answered, a killed child named, nothing left behind."""

import functools
import os
import signal

import pytest
import torch

from spin_megatron.rollout import build_hf_engine
from spin_megatron.rollout.engine_process import EngineProcess, EngineProcessError
from spin_megatron.rollout.hf_engine import HFEngine
from spin_megatron.rollout.protocol import SamplingParams
from tests.sglang_double import pid_gone

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9], [10]]
PARAMS = SamplingParams(n=2, temperature=0.9, top_p=0.95, max_new_tokens=8, seed=7)


@pytest.fixture(scope="module")
def trained(tiny_qwen2):
    """The weights a sync would push: those of a saved tiny model (the engines start random)."""
    reference = HFEngine.from_pretrained(tiny_qwen2)
    return reference.model.config.to_dict(), list(reference.model.state_dict().items())


def _build(config: dict):
    return functools.partial(
        build_hf_engine,
        config,
        dtype=torch.float32,
        device="cpu",
        max_batch_size=4,
        seed=0,
        show_progress=False,
    )


@pytest.fixture
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # the child's count: CPU matmuls may round differently with other counts
    yield
    torch.set_num_threads(saved)


def test_samples_equal_the_in_process_engines_after_the_same_sync(trained, one_thread):
    config, weights = trained
    inline = _build(config)()
    inline.update_weights(weights)
    engine = EngineProcess(_build(config), threads=1)
    try:
        assert engine.pid != os.getpid()
        engine.update_weights(weights[:3])  # buckets: several calls, then finish
        engine.update_weights(weights[3:])
        engine.finish_weight_update()
        engine.sleep(release_weights=False)
        engine.wake()
        ours = engine.generate(PROMPTS, PARAMS, prompt_keys=["a", "b", "c"])
        assert ours == inline.generate(PROMPTS, PARAMS, prompt_keys=["a", "b", "c"])
        # an error in the child is answered (with its text), and the engine goes on
        with pytest.raises(EngineProcessError, match=r"update_weights: KeyError: .*no parameter 'nope'"):
            engine.update_weights([("nope", torch.zeros(1))])
        assert engine.generate(PROMPTS[:1], PARAMS) == inline.generate(PROMPTS[:1], PARAMS)
    finally:
        engine.shutdown()
    assert pid_gone(engine.pid)


def test_a_killed_engine_process_is_named_and_shutdown_still_works(trained):
    engine = EngineProcess(_build(trained[0]), threads=1)
    os.kill(engine.pid, signal.SIGKILL)
    with pytest.raises(
        EngineProcessError, match=rf"process \(pid {engine.pid}\) exited with code -9 \(killed\)"
    ):
        engine.generate(PROMPTS, PARAMS)
    engine.shutdown()
    assert pid_gone(engine.pid)


def test_a_build_that_fails_in_the_child_is_one_error(trained):
    config = {**trained[0], "model_type": "no_such_model"}
    with pytest.raises(EngineProcessError, match=r"failed to start: .*no_such_model"):
        EngineProcess(_build(config), threads=1)


def _spawned_children(pid: int) -> list[int]:
    """The multiprocessing-spawned children of ``pid`` (not its resource tracker)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
        except OSError:
            continue
        if int(stat[1]) == pid and b"spawn_main" in cmdline:
            found.append(int(entry))
    return found


@pytest.mark.e2e
def test_spin_train_with_a_separate_engine_survives_its_death_and_matches_in_process(tmp_path):
    """rollout.hf_process=separate, its engine process SIGKILLed after step 1: the supervisor builds a new one,
    the weights are re-synced, the generation retried with its seed — the run ends with the weights of an
    in-process run (one torch thread on each side)."""
    import json
    import subprocess
    import sys
    import time

    from tests.helpers import REPO, assert_same_hf_export

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [sys.executable, "-m", "spin_megatron.train", "experiment=tiny_cpu", "trainer.total_steps=3",
              "trainer.test_freq=0", "trainer.save_freq=0"]  # fmt: skip
    inline = subprocess.run(
        [*common, f"trainer.output_dir={tmp_path / 'inline'}"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert inline.returncode == 0, inline.stderr[-3000:]
    out = tmp_path / "separate"
    log = (tmp_path / "separate.log").open("w")
    trainer = subprocess.Popen(
        [*common, f"trainer.output_dir={out}", "rollout.hf_process=separate", "rollout.hf_threads=1"],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").is_file():
            assert trainer.poll() is None and time.monotonic() < deadline, (
                tmp_path / "separate.log"
            ).read_text()
            time.sleep(0.1)
        (child,) = _spawned_children(trainer.pid)
        os.kill(child, signal.SIGKILL)
        assert trainer.wait(timeout=300) == 0, (tmp_path / "separate.log").read_text()[-3000:]
    finally:
        if trainer.poll() is None:
            trainer.kill()
    text = (tmp_path / "separate.log").read_text()
    assert f"rollout engine process (pid {child}) exited with code -9 (killed)" in text, text[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and metrics[-1]["rollout/restarts"] == 1
    assert pid_gone(child) and _spawned_children(trainer.pid) == []
    assert_same_hf_export(out, tmp_path / "inline")
