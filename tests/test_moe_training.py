"""Training a tiny Qwen3-MoE is one computation at every layout: two DPO optimizer steps (two mini-batches, the
distributed optimizer chained over dense and expert parameters) give the same loss and grad norm at EP1, EP2,
PP2×EP2 and TP2×EP2 with both token dispatchers; a checkpoint written at EP2 resumes bit-exactly (and at
PP2×EP2); the MoE load-balancing loss is logged apart from the DPO loss; Qwen3's replicated QK-norm weights get
the same gradient at TP2 as at TP1.

One launch of four gloo processes runs every layout (tests/workers/moe_step.py). TP2×EP2 (expert-TP 2 and 1) runs
where the trainer has sequence parallelism, which Megatron's MoE training needs at TP > 1.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from spin_megatron.config import ParallelConfig
from spin_megatron.models.tiny import make_tiny_hf_model
from tests.helpers import run_ranks

pytestmark = pytest.mark.dist

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=100, initializer_range=0.2)
EP1, EP2 = "1.1.1.0.alltoall.0", "1.1.2.0.alltoall.0"
PP2_EP2 = "1.2.2.0.allgather.0"
# TP2×EP2 (expert-TP 2 and 1): MoE training at TP > 1 needs sequence parallelism (issue 24), run once it exists
SEQUENCE_PARALLEL = hasattr(ParallelConfig, "sequence_parallel_enabled")
TP2_EP2 = ("2.1.2.0.alltoall.0", "2.1.2.1.allgather.0")
LAYOUTS = (EP1, EP2, "1.1.2.0.allgather.0", PP2_EP2) + (TP2_EP2 if SEQUENCE_PARALLEL else ())
AUX = ("1.1.1.0.alltoall.0.01", "1.1.2.0.allgather.0.01")  # moe_aux_loss_coeff 0.01, the same DP split
DENSE = ("1.1.1.0.alltoall.0@dense", "2.1.1.0.alltoall.0@dense")  # Qwen3 TP1 vs TP2
RTOL = 1e-5


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_training")
    policy = make_tiny_hf_model(root / "policy", "qwen3_moe", seed=11, head_dim=16, **TINY)
    reference = make_tiny_hf_model(root / "reference", "qwen3_moe", seed=12, head_dim=16, **TINY)
    dense = make_tiny_hf_model(root / "dense", "qwen3", seed=13, head_dim=16, **TINY)
    out = root / "report.pt"
    args = [
        "--hf-dir",
        policy,
        "--ref-dir",
        reference,
        "--dense-dir",
        dense,
        "--vocab-size",
        TINY["vocab_size"],
    ]
    args += ["--resume-layout", EP2, "--ckpt-dir", root / "ckpt", "--reshard-layout", PP2_EP2, "--out", out]
    for layout in LAYOUTS + AUX + DENSE:
        args += ["--layout", layout]
    assert run_ranks(4, "tests.workers.moe_step", *args, timeout_s=900) == 0
    report = torch.load(out, weights_only=False)
    shutil.rmtree(root, ignore_errors=True)
    return report


@pytest.mark.parametrize("layout", LAYOUTS[1:4] + TP2_EP2)
def test_two_dpo_steps_are_the_same_at_every_moe_layout(report, layout):
    if layout not in LAYOUTS:
        pytest.skip("MoE training at TP > 1 needs sequence parallelism (parallel.sequence_parallel)")
    expected, got = report[EP1]["steps"], report[layout]["steps"]
    for step in range(2):
        for key in ("loss", "grad_norm"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=RTOL), (layout, step, key)
    assert expected[1]["loss"] != pytest.approx(
        expected[0]["loss"], rel=1e-3
    )  # the first step changed weights


def test_resume_at_ep2_is_bit_exact_and_at_pp2_ep2_the_same_step(report):
    resume = report["resume"]
    assert resume["resumed"] == resume["straight"] and resume["same_weights"]
    # written at EP2 × DP4, read at PP2 × EP2 × DP2: experts and their optimizer state resharded
    for key in ("loss", "grad_norm"):
        assert report["reshard"][key] == pytest.approx(resume["straight"][key], rel=RTOL), key


def test_aux_loss_is_logged_apart_and_enters_the_gradient_only(report):
    off, on = report[EP1]["steps"][0], report[AUX[0]]["steps"][0]
    assert off["aux_terms"] == 0.0 and on["aux_terms"] == 4 * 2  # 4 replicas × 2 MoE layers × 1 micro-batch
    assert 0.5 < on["aux_sum"] / on["aux_terms"] < 4  # the switch loss is 1 when perfectly balanced
    assert on["loss"] == off["loss"]  # the logged DPO loss does not include it ...
    assert on["grad_norm"] != pytest.approx(off["grad_norm"], rel=1e-6)  # ... the gradient does
    # the same pairs per replica at EP1 and EP2: padding added to align the replicas stays out of the statistics
    ep2 = report[AUX[1]]["steps"]
    for step, expected in enumerate(report[AUX[0]]["steps"]):
        for key in ("aux_sum", "grad_norm", "loss"):
            assert ep2[step][key] == pytest.approx(expected[key], rel=RTOL), (step, key)


def test_qk_norm_gradients_are_summed_over_tensor_parallel_ranks(report):
    tp1, tp2 = (report[layout]["norm_grads"] for layout in DENSE)
    assert sorted(tp1) == sorted(tp2) and len(tp1) == 2 * TINY["num_hidden_layers"]
    for name, grad in tp1.items():
        assert torch.count_nonzero(grad) > 0
        assert torch.allclose(tp2[name], grad, rtol=1e-4, atol=1e-6 * grad.abs().max()), name


@pytest.mark.e2e
def test_spin_train_with_expert_parallelism_from_the_readme(tmp_path):
    """``torchrun --nproc_per_node 2 -m spin_megatron.train experiment=tiny_cpu model.tiny.architecture=qwen3_moe
    parallel.ep=2``: the hf engine (fused experts in memory) samples exactly what the trainer scores after every
    sync, the aux loss is logged apart, checkpoints of the chained optimizer are written, the export loads."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    overrides = ["experiment=tiny_cpu", "model.tiny.architecture=qwen3_moe", "parallel.ep=2"]
    overrides += ["trainer.total_steps=2", "trainer.test_freq=0", f"trainer.output_dir={out}"]
    overrides += ["model.moe_aux_loss_coeff=0.01", "parallel.moe_token_dispatcher=allgather"]
    assert run_ranks(2, "spin_megatron.train", *overrides, timeout_s=600) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        assert m["rollout/logp_diff"] <= 1e-5, m["rollout/logp_diff"]
        assert 0.5 < m["moe/load_balancing_loss"] < 4
    assert (out / "checkpoints" / "step_0000002" / "COMPLETE").is_file()
    exported = {}
    for path in (out / "hf").glob("*.safetensors"):
        exported.update(load_file(path))
    assert {f"model.layers.1.mlp.experts.{g}.down_proj.weight" for g in range(4)} <= set(exported)
    assert AutoModelForCausalLM.from_pretrained(out / "hf").config.num_experts == 4
