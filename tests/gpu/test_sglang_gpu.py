"""GPU: a real SGLang server on a tiny random Qwen2 — greedy generation, weight sync in sessions (colocated
CUDA IPC and, with two GPUs, disaggregated NCCL; TP 2 with three), sleep/wake, GPU memory over 20 syncs, and
spin-train with the memory saver (validation after a training step, rollout/logp_diff bounded). After a sync
the server's greedy tokens must equal those of a transformers model holding the pushed weights. Needs SGLang
installed beside CUDA (not the case on the lent H200: see tools/gpu_check.py); CPU runs the same client code
against a real CPU server (tests/test_sglang_real.py)."""

import importlib.util
import os

import pytest
import torch

from spin_megatron.models.tiny import make_tiny_hf_model
from spin_megatron.ports import pick_free_port
from spin_megatron.rollout.protocol import SamplingParams
from spin_megatron.rollout.sglang.config import SGLangConfig
from spin_megatron.rollout.sglang.engine import SGLangEngine, current_trainer_gpus
from tests.helpers import missing

pytestmark = pytest.mark.gpu

# head_dim 64: every SGLang attention backend supports it; no EOS, so every sample runs to max_new_tokens
TINY = dict(
    hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=512, max_position_embeddings=1024, eos_token_id=None, bos_token_id=None,
)  # fmt: skip
PROMPTS = [[1, 2, 3, 4], [10, 20, 30], [7], [100, 200, 300, 400, 500]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)
MIN_GAP = 0.5  # a reference step whose top-2 logits are closer than this may legitimately differ in bf16


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    if importlib.util.find_spec("sglang") is None:
        missing("sglang", "SGLang is not installed (pip install 'spin-megatron[sglang]')")
    return make_tiny_hf_model(tmp_path_factory.mktemp("hf") / "qwen2", "qwen2", seed=3, **TINY)


def _config(hf_dir, tmp_path, **overrides) -> SGLangConfig:
    return SGLangConfig(
        model_path=str(hf_dir), dtype="bfloat16", mem_fraction_static=0.3, base_port=pick_free_port(),
        random_seed=0, log_dir=str(tmp_path / "logs"), health_timeout_s=600,
        extra_server_args=("--disable-cuda-graph",), **overrides,
    )  # fmt: skip


def perturbed_weights(hf_dir) -> dict[str, torch.Tensor]:
    """New bf16 weights: the checkpoint plus noise, with a sharpened head so that greedy decoding has margins
    large enough to survive the difference between SGLang's bf16 kernels and a float32 reference."""
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).state_dict()
    gen = torch.Generator().manual_seed(0)
    new = {name: t + 0.5 * t.std() * torch.randn(t.shape, generator=gen) for name, t in state.items()}
    new["lm_head.weight"] = new["lm_head.weight"] * 4
    return {name: t.to(torch.bfloat16) for name, t in new.items()}


@torch.no_grad()
def reference_greedy(hf_dir, weights, prompt):
    """transformers, float32 compute on the same (bf16-valued) weights: tokens and top-2 logit gaps."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.load_state_dict({name: t.float() for name, t in weights.items()})
    model = model.cuda().eval()
    ids, tokens, gaps = list(prompt), [], []
    for _ in range(GREEDY.max_new_tokens):
        logits = model(torch.tensor([ids], device="cuda")).logits[0, -1].float()
        top = logits.topk(2).values
        tokens.append(int(logits.argmax()))
        gaps.append(float(top[0] - top[1]))
        ids.append(tokens[-1])
    return tokens, gaps


def check_weight_sync(engine: SGLangEngine, hf_dir) -> None:
    before = engine.generate(PROMPTS, GREEDY)
    assert all(s.logprobs is not None and len(s.logprobs) == len(s.response_ids) == 8 for s in before)
    weights = perturbed_weights(hf_dir)
    items = [(name, tensor.cuda()) for name, tensor in weights.items()]
    engine.update_weights(items[: len(items) // 2])  # two buckets, in order
    engine.update_weights(items[len(items) // 2 :])
    engine.finish_weight_update()
    after = [s.response_ids for s in engine.generate(PROMPTS, GREEDY)]
    assert after != [s.response_ids for s in before]
    for prompt, got in zip(PROMPTS, after):
        expected, gaps = reference_greedy(hf_dir, weights, prompt)
        certain = next((step for step, gap in enumerate(gaps) if gap < MIN_GAP), len(gaps))
        assert certain >= 3, f"reference too close to a tie to compare (gaps {gaps})"
        assert got[:certain] == expected[:certain], (prompt, got, expected, gaps)


def test_colocated_weight_sync_over_cuda_ipc(hf_dir, tmp_path):
    trainer_gpus = current_trainer_gpus()
    config = _config(hf_dir, tmp_path, gpu_ids=tuple(trainer_gpus), sync_mode="colocated")
    with SGLangEngine(config) as engine:
        check_weight_sync(engine, hf_dir)


def test_sleep_sync_wake_cycle_with_the_memory_saver(hf_dir, tmp_path):
    if importlib.util.find_spec("torch_memory_saver") is None:
        pytest.skip("torch_memory_saver (SGLang's --enable-memory-saver backend) is not installed")
    config = _config(hf_dir, tmp_path, gpu_ids=tuple(current_trainer_gpus()), enable_memory_saver=True)
    with SGLangEngine(config) as engine:
        assert engine.sync_mode == "colocated"
        first = [s.response_ids for s in engine.generate(PROMPTS, GREEDY)]
        engine.sleep()
        engine.wake()
        assert [s.response_ids for s in engine.generate(PROMPTS, GREEDY)] == first
        engine.sleep()  # the RL step: sleep → (train) → sync → wake → generate
        weights = perturbed_weights(hf_dir)
        engine.update_weights([(name, tensor.cuda()) for name, tensor in weights.items()])
        engine.finish_weight_update()
        engine.wake()
        after = [s.response_ids for s in engine.generate(PROMPTS, GREEDY)]
    expected, gaps = reference_greedy(hf_dir, weights, PROMPTS[0])
    certain = next((step for step, gap in enumerate(gaps) if gap < MIN_GAP), len(gaps))
    assert after[0][:certain] == expected[:certain]


def test_a_new_engine_on_the_same_server_resumes_what_the_first_released(hf_dir, tmp_path):
    """Issue 22, item 7, with the real memory saver: the released KV cache is recorded on the server, so a second
    engine attached to it (a supervisor restart, a resumed trainer) resumes it, and the first one, whose own
    record is stale now, reads the server before resuming and resumes nothing (SGLang would raise KeyError)."""
    if importlib.util.find_spec("torch_memory_saver") is None:
        pytest.skip("torch_memory_saver (SGLang's --enable-memory-saver backend) is not installed")
    config = _config(hf_dir, tmp_path, gpu_ids=tuple(current_trainer_gpus()), enable_memory_saver=True)
    with SGLangEngine(config) as first:
        greedy = [s.response_ids for s in first.generate(PROMPTS, GREEDY)]
        first.sleep(release_weights=False)
        attached = SGLangConfig(urls=tuple(first.urls), enable_memory_saver=True)
        with SGLangEngine(attached, trainer_gpu_ids=current_trainer_gpus()) as second:
            assert second._memory.asleep() == {first.urls[0]: ["kv_cache"]}
            second.wake()
            assert [s.response_ids for s in second.generate(PROMPTS, GREEDY)] == greedy
        first.wake()
        assert [s.response_ids for s in first.generate(PROMPTS, GREEDY)] == greedy


def test_disaggregated_weight_sync_over_nccl(hf_dir, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs: one for the trainer, one for the server")
    torch.cuda.set_device(0)
    trainer_gpu, server_gpu = current_trainer_gpus()[0], _physical_gpu(1)
    config = _config(hf_dir, tmp_path, gpu_ids=(server_gpu,), sync_mode="disaggregated")
    with SGLangEngine(config, trainer_gpu_ids=[trainer_gpu]) as engine:
        check_weight_sync(engine, hf_dir)


def _physical_gpu(index: int) -> int:
    torch.cuda.set_device(index)
    try:
        return current_trainer_gpus()[0]
    finally:
        torch.cuda.set_device(0)


def test_ray_placed_server_weight_sync_over_nccl(hf_dir, tmp_path):
    """A one-node Ray cluster owning GPU 1 (the trainer keeps GPU 0): the actor launches the server there."""
    ray = pytest.importorskip("ray")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs: one for the trainer, one for the Ray-placed server")
    torch.cuda.set_device(0)
    server_gpu = _physical_gpu(1)
    # Ray numbers the GPUs of CUDA_VISIBLE_DEVICES as its raylet saw it: show it the server's GPU only (the
    # driver's CUDA context is already on GPU 0 and is not affected).
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = str(server_gpu)
    try:
        ray.init(num_gpus=1, include_dashboard=False, log_to_driver=False, namespace="spin_megatron")
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    try:
        config = _config(hf_dir, tmp_path, launcher="ray", ray_address="local")
        with SGLangEngine(config) as engine:
            assert engine.sync_mode == "disaggregated"
            assert engine._fleet.servers[0]["gpus"] == str(server_gpu)
            check_weight_sync(engine, hf_dir)
    finally:
        ray.shutdown()


def _gpu_used_bytes(device: int) -> int:
    free, total = torch.cuda.mem_get_info(device)  # device-wide: counts the servers' processes too
    return total - free


def test_colocated_fleet_repeated_syncs_in_sessions_do_not_grow_gpu_memory(hf_dir, tmp_path, monkeypatch):
    """The flagship layout where the GPUs allow (num_engines 2): 20 syncs, each in a session, each bucket
    serialized once per (server, TP rank). A payload shared between consumers would leave the trainer's
    buckets referenced forever: memory would grow by a model copy per sync."""
    engines = min(2, torch.cuda.device_count())
    torch.cuda.set_device(0)
    config = _config(
        hf_dir, tmp_path, num_engines=engines, gpu_ids=tuple(range(engines)), sync_mode="colocated"
    )
    weights = [(name, t.cuda()) for name, t in perturbed_weights(hf_dir).items()]
    from spin_megatron.rollout.sglang import weights as weights_module

    serialized = []  # the device of each payload's buffer
    real_serialize = weights_module.serialize_for_one_consumer
    monkeypatch.setattr(
        weights_module,
        "serialize_for_one_consumer",
        lambda obj: serialized.append(str(obj["flattened_tensor"].device)) or real_serialize(obj),
    )
    with SGLangEngine(config, trainer_gpu_ids=[0]) as engine:
        engine.update_weights(weights)  # warm-up: first sync allocates what every later one reuses
        engine.finish_weight_update()
        torch.cuda.synchronize()
        before = [_gpu_used_bytes(d) for d in range(engines)]
        for _ in range(20):
            engine.update_weights(weights[: len(weights) // 2])
            engine.update_weights(weights[len(weights) // 2 :])
            engine.finish_weight_update()
            assert not engine._in_session
        torch.cuda.synchronize()
        after = [_gpu_used_bytes(d) for d in range(engines)]
        model_bytes = sum(t.numel() * t.element_size() for _, t in weights)
        assert all(a - b < max(model_bytes, 64 << 20) for a, b in zip(after, before)), (before, after)
        # all bf16, so one flat bucket per push: one payload per server (tp_size 1) per push
        assert len(serialized) == engines * (1 + 2 * 20)
        # each server reads a buffer on its own GPU (issue 22, item 6; CUDA_VISIBLE_DEVICES unset: index = id)
        assert serialized[:engines] == [f"cuda:{gpu}" for gpu in range(engines)]


def test_colocated_tp2_is_refused_with_a_reason(hf_dir, tmp_path):
    from spin_megatron.errors import ConfigError

    config = _config(hf_dir, tmp_path, tp_size=2, sync_mode="colocated")
    with pytest.raises(ConfigError, match="tp_size=2 with colocated weight sync is not supported"):
        SGLangEngine(config, trainer_gpu_ids=[0])


def test_disaggregated_tp2_server_weight_sync_over_nccl(hf_dir, tmp_path):
    if torch.cuda.device_count() < 3:
        pytest.skip("needs three GPUs: the trainer's and two for a tp_size=2 server")
    torch.cuda.set_device(0)
    config = _config(hf_dir, tmp_path, tp_size=2, gpu_ids=(_physical_gpu(1), _physical_gpu(2)),
                     sync_mode="disaggregated")  # fmt: skip
    with SGLangEngine(config, trainer_gpu_ids=[current_trainer_gpus()[0]]) as engine:
        check_weight_sync(engine, hf_dir)


def test_spin_train_with_colocated_sglang_and_the_memory_saver(hf_dir, tmp_path):
    """The trainer's lifecycle on a real GPU server: sleep → update → sync (in a session) → wake, weights
    released only on syncing steps (sync_every 2), validation after every training step."""
    import json
    import subprocess
    import sys

    from tests.helpers import REPO

    if importlib.util.find_spec("torch_memory_saver") is None:
        pytest.skip("torch_memory_saver (SGLang's --enable-memory-saver backend) is not installed")
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "spin_megatron.train", "experiment=tiny_cpu", "rollout.engine=sglang",
         "rollout.sglang.enable_memory_saver=true", "rollout.sglang.mem_fraction_static=0.3",
         "algorithm.sample_from=policy", "rollout.sync_every=2", "trainer.total_steps=4", "trainer.test_freq=1", f"trainer.output_dir={out}",
         f"rollout.sglang.base_port={pick_free_port()}", "logging.progress_bar=false"],
        capture_output=True, text=True, cwd=REPO, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert all("val/accuracy" in metrics[step] for step in (1, 2, 3, 4))
    # fp32 policy, fp32 server: the server's log-probs of its samples match the trainer's after each sync
    assert all(metrics[step]["rollout/logp_diff"] < 1e-3 for step in (1, 3)), metrics
