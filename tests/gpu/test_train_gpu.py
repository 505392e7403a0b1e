"""GPU smoke: spin-train end to end on one CUDA device (nccl, the TE layer spec when TE is installed, the
in-process hf engine on the GPU), fp32 and bf16. Skipped without CUDA; run with `make gpu-smoke`."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_two_dpo_steps_on_cuda(tmp_path, dtype):
    out = tmp_path / dtype
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "spin_megatron.train",
            "experiment=tiny_cpu",
            f"model.dtype={dtype}",
            "trainer.total_steps=2",
            "trainer.test_freq=2",
            f"trainer.output_dir={out}",
            "logging.progress_bar=false",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step1, step2 = metrics[1], metrics[2]
    assert abs(step1["loss"] - 0.6931) < (1e-4 if dtype == "fp32" else 2e-2)  # policy == reference at step 1
    assert step2["rewards/margins"] > 0 and step2["loss"] < step1["loss"]
    assert step1["rollout/logp_diff"] < (1e-3 if dtype == "fp32" else 5e-2)  # engine agrees with the trainer
    assert "val/gold_nll" in step2


def test_fused_swiglu_on_and_off_train_alike(tmp_path):
    """model.fused_swiglu compiles Megatron's fused bias-SwiGLU with torch.compile; off, the plain activation.
    Both must run and give the same first update (fp32)."""
    losses = {}
    for fused in (True, False):
        out = tmp_path / f"fused_{fused}"
        result = subprocess.run(
            [sys.executable, "-m", "spin_megatron.train", "experiment=tiny_cpu", f"model.fused_swiglu={fused}",
             "trainer.total_steps=2", "trainer.test_freq=0", f"trainer.output_dir={out}",
             "logging.progress_bar=false"],
            capture_output=True, text=True, cwd=REPO, timeout=900,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-4000:]
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[fused] = (metrics[-1]["loss"], metrics[-1]["grad_norm"])
    assert abs(losses[True][0] - losses[False][0]) < 1e-4 and abs(losses[True][1] - losses[False][1]) < 1e-3
