"""Megatron's scaling features are one computation: two DPO optimizer steps of a tiny Qwen3 (QK-norm) give the same
loss and grad norm with sequence parallelism (fused head and logits paths), overlapped DDP communication (several
buckets) and selective or full recompute as at plain TP1 and TP2; a checkpoint written at TP2+SP and at DP2 with
both overlaps resumes bit for bit. One launch of two gloo processes runs every layout (tests/workers/scaling_step.py).

The trainer-level checks (spin-train at TP2+SP, DP2 with overlaps, selective recompute against TP1) are in
test_trainer_e2e's layout test; configuration mistakes in test_train_config.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from spin_megatron.models.tiny import make_tiny_hf_model
from tests.helpers import run_ranks
from tests.workers.scaling_step import LAYOUTS

pytestmark = pytest.mark.dist

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=128, initializer_range=0.2)
RESUMED = ("tp2_sp", "dp2_overlap")
RTOL = 1e-5


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaling")
    policy = make_tiny_hf_model(root / "policy", "qwen3", seed=21, head_dim=16, **TINY)
    reference = make_tiny_hf_model(root / "reference", "qwen3", seed=22, head_dim=16, **TINY)
    out = root / "report.pt"
    args = ["--hf-dir", policy, "--ref-dir", reference, "--vocab-size", TINY["vocab_size"]]
    args += ["--ckpt-dir", root / "ckpt", "--out", out]
    for name in LAYOUTS:
        args += ["--layout", name]
    for name in RESUMED:
        args += ["--resume", name]
    assert run_ranks(2, "tests.workers.scaling_step", *args, timeout_s=900) == 0
    report = torch.load(out, weights_only=False)
    shutil.rmtree(root, ignore_errors=True)
    return report


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "tp1"])
def test_two_dpo_steps_are_the_same_at_every_layout(report, layout):
    expected, got = report["tp1"]["steps"], report[layout]["steps"]
    for step in range(2):
        for key in ("loss", "grad_norm"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=RTOL), (layout, step, key)
    assert expected[1]["loss"] != pytest.approx(expected[0]["loss"], rel=1e-3)  # step 1 changed the weights


def test_the_layouts_really_use_the_features(report):
    built = {name: report[name]["built"] for name in LAYOUTS}
    assert [n for n, b in built.items() if b["sequence_parallel"]] == [
        "tp2_sp",
        "tp2_sp_logits",
        "tp2_sp_overlap",
    ]
    # the residual-stream norms (2 per layer and the final one) are all-reduced over TP; Qwen3's QK-norms are not
    assert built["tp2_sp"]["marked_norms"] == 2 * TINY["num_hidden_layers"] + 1
    assert built["tp2_no_sp"]["marked_norms"] == 0
    assert built["dp2_overlap"]["overlap"] == (True, True) and built["dp2_overlap"]["buckets"] > 2
    assert built["tp1"]["overlap"] == (False, False) and built["tp1"]["buckets"] == 1  # CPU default: off
    assert built["selective"]["recompute"] == ("selective", ["core_attn", "mlp"])
    assert built["full"]["recompute"][0] == "full"


@pytest.mark.parametrize("layout", RESUMED)
def test_resume_is_bit_exact(report, layout):
    resume = report[layout]["resume"]
    assert resume["resumed"] == resume["straight"] and resume["same_weights"], resume
