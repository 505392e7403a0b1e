"""Interleaved pipeline (``parallel.vpp``): two DPO optimizer steps at PP2×VPP2 equal plain PP2 and one stage
(DP2) in loss and grad norm; Megatron's default batched p2p exchange would not (it pairs the wrong tensors at
PP=2, NVIDIA/Megatron-LM#750); a checkpoint written with model chunks resumes bit for bit and loads at plain PP2
and at one stage. One launch of two gloo processes (tests/workers/interleaved_step.py).

The trainer-level checks (spin-train at PP2×VPP2 and PP4×VPP2 against PP1) are in test_trainer_e2e's layout
test; the model's logits and export with model chunks in test_dist_parity; configuration mistakes in
test_train_config."""

from __future__ import annotations

import shutil

import pytest
import torch

from spin_megatron.models.tiny import make_tiny_hf_model
from tests.helpers import run_ranks

pytestmark = pytest.mark.dist

TINY = dict(num_hidden_layers=4, vocab_size=128, tie_word_embeddings=True, initializer_range=0.2)
RTOL = 1e-5


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("interleaved")
    policy = make_tiny_hf_model(root / "policy", "qwen2", seed=31, **TINY)
    reference = make_tiny_hf_model(root / "reference", "qwen2", seed=32, **TINY)
    out = root / "report.pt"
    args = ["--hf-dir", policy, "--ref-dir", reference, "--vocab-size", TINY["vocab_size"]]
    assert (
        run_ranks(2, "tests.workers.interleaved_step", *args, "--ckpt-dir", root / "ckpt", "--out", out) == 0
    )
    report = torch.load(out, weights_only=False)
    shutil.rmtree(root, ignore_errors=True)
    return report


def _same(got, expected):
    return all(got[k] == pytest.approx(expected[k], rel=RTOL) for k in ("loss", "grad_norm"))


@pytest.mark.parametrize("layout", ["pp2", "pp2_vpp2"])
def test_two_dpo_steps_are_the_same_with_model_chunks(report, layout):
    for step in range(2):
        assert _same(report[layout][step], report["dp2"][step]), (layout, step, report[layout][step])
        # enough micro-batches for the interleaved schedule's steady phase (warm-up is 2·PP at PP2×VPP2)
        assert report[layout][step]["micro_batches"] >= 5
    # an odd number of packed micro-batches: one placeholder makes it a multiple of PP (plain PP runs as packed)
    counts = [(s["packed"], s["micro_batches"]) for s in report[layout]]
    assert any(p % 2 for p, _ in counts) and all(m == p + (p % 2) * (layout == "pp2_vpp2") for p, m in counts)
    assert report["dp2"][1]["loss"] != pytest.approx(
        report["dp2"][0]["loss"], rel=1e-3
    )  # step 1 changed them


def test_batched_p2p_exchange_at_pp2_would_be_wrong(report):
    # what parallel.vpp must not run: the comparison above sees it
    assert not _same(report["pp2_vpp2_batched"][0], report["dp2"][0]), report["pp2_vpp2_batched"][0]


def test_resume_with_model_chunks_is_bit_exact_and_reshards(report):
    resume = report["resume"]
    assert resume["pp2_vpp2"] == resume["straight"] and resume["same_weights"], resume
    for layout in ("pp2", "dp2"):  # the chunked checkpoint loaded at plain PP2 and at one stage
        assert _same(resume[layout], resume["straight"]), (layout, resume)
