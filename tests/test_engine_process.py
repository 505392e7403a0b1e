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


def test_weights_go_through_shared_memory_that_grows_and_leaves_no_file(trained, one_thread):
    """A bucket larger than the staging buffer gets a new one; every file is unlinked once mapped, also when the
    child refuses the bucket; the weights are those sent (the same samples as in-process)."""
    config, weights = trained
    shm = os.path.isdir("/dev/shm")
    before = set(os.listdir("/dev/shm")) if shm else set()
    inline = _build(config)()
    inline.update_weights(weights)
    engine = EngineProcess(_build(config), threads=1)
    try:
        small = min(weights, key=lambda w: w[1].numel())
        engine.update_weights([small])  # a small buffer first
        first = engine._staging.buffer.numel()
        engine.update_weights(weights)  # larger: a new buffer
        assert engine._staging.buffer.numel() > first
        with pytest.raises(EngineProcessError, match="no parameter 'nope'"):
            engine.update_weights([("nope", torch.zeros(3))])
        engine.update_weights(weights[:2])  # a new buffer after the error, weights still arrive
        engine.finish_weight_update()
        assert engine.generate(PROMPTS, PARAMS) == inline.generate(PROMPTS, PARAMS)
        left = set(os.listdir("/dev/shm")) - before if shm else set()
        assert not [f for f in left if f.startswith("spin-weights-")]
    finally:
        engine.shutdown()
