"""Runs that used to stop for good (issue 22 A): a batch that crossed an epoch boundary could hold a prompt twice
(the engine check then refused its samples, restarts could not help, and a resume drew the same batch), and a
checkpoint written before the first optimizer step crashed in Megatron's optimizer state_dict. A 5-prompt file
at 4 prompts per step crosses a boundary every step; the README's online example on a random model builds no pair,
so its checkpoints come before any optimizer step.
"""

import json
import subprocess
import sys

import pytest

from spin_megatron.train import main
from tests.helpers import REPO, assert_same_hf_export, run_ranks

ROWS = [  # GSM8K-shaped, short
    {
        "question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
        "answer": f"#### {a + b}",
    }
    for a, b in ((2, 3), (4, 1), (5, 5), (7, 2), (1, 8))
]


@pytest.fixture
def five_prompts(tmp_path):
    path = tmp_path / "five.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def _metrics(out):
    return {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _train(out, *overrides):
    cmd = [sys.executable, "-m", "spin_megatron.train", "logging.progress_bar=false", f"trainer.output_dir={out}",
           *overrides]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Warning" not in result.stderr, result.stderr[
        -4000:
    ]  # library noise is filtered (spin_megatron/quiet.py)
    return result.stdout


def _same_steps(a, b, steps, keys):
    for step in steps:
        for key in keys:
            assert a[step].get(key) == b[step].get(key), (step, key, a[step].get(key), b[step].get(key))


@pytest.mark.e2e
def test_readme_online_example_on_a_random_model_checkpoints_before_any_update_and_resumes(
    tmp_path, five_prompts
):
    """`spin-train experiment=tiny_cpu algorithm.mode=online` (rollout.n defaults to 2 online) on 5 prompts, 4 per
    step, 6 steps: every sample of a random model scores 0, so no pair and no optimizer step ever — the console
    says so, rollout/logp_diff is still measured, and the checkpoints of steps 2.. (before any update) resume: 2
    steps, then 4 more, sample the same prompts and tokens as 6 at once."""
    common = ["experiment=tiny_cpu", "algorithm.mode=online", f"data.train_files=[{five_prompts}]",
              f"data.val_files=[{five_prompts}]", "trainer.test_freq=0", "trainer.export_hf=false"]  # fmt: skip
    stdout = _train(tmp_path / "full", *common, "trainer.total_steps=6")
    assert "no pairs: 4 prompts tied (4 all wrong)" in stdout
    assert "each epoch's last 1 of 5 prompts make no full batch" in stdout
    full = _metrics(tmp_path / "full")
    for step in range(1, 7):
        assert full[step]["pairs/kept"] == 0 and full[step]["train/updates"] == 0
        assert full[step]["rollout/logp_diff"] < 1e-4, full[step]  # measured on samples without pairs
    _train(tmp_path / "split", *common, "trainer.total_steps=2")
    _train(tmp_path / "split", *common, "trainer.total_steps=6")
    split = _metrics(tmp_path / "split")
    _same_steps(full, split, range(3, 7), ("response_length/mean", "rollout/logp_diff", "reward/score_mean"))


@pytest.mark.e2e
@pytest.mark.dist
def test_five_prompts_at_dp2_cross_epochs_and_resume_bit_exactly_with_fresh_iterations(
    tmp_path, five_prompts
):
    """SPIN at DP=2 on 5 prompts, 4 per step: 6 steps, each a new epoch. trainer.reset_optimizer_on_refresh: every
    refresh (ref_update_freq=2) restarts Adam and the LR schedule (warm-up 2 optimizer steps: the LR of steps 3
    and 5 is that of step 1). 3 steps, then a resume inside the second iteration, equal 6 at once: metrics and
    final weights."""
    common = ["experiment=tiny_cpu", f"data.train_files=[{five_prompts}]", f"data.val_files=[{five_prompts}]",
              "trainer.test_freq=0", "trainer.save_freq=3", "trainer.reset_optimizer_on_refresh=true",
              "optim.lr_warmup_steps=2", "optim.lr_decay_style=linear",
              "trainer.balance_dp=false"]  # fmt: skip  # the replicas' pairs in prompt order: this path's e2e run

    def train(out, steps):
        args = [
            *common,
            "logging.progress_bar=false",
            f"trainer.output_dir={out}",
            f"trainer.total_steps={steps}",
        ]
        assert run_ranks(2, "spin_megatron.train", *args, timeout_s=900) == 0
        return _metrics(out)

    full = train(tmp_path / "full", 6)
    assert all(full[step]["train/updates"] == 1 for step in range(1, 7))
    lrs = [full[step]["lr"] for step in range(1, 7)]
    assert lrs[0] == lrs[2] == lrs[4] and lrs[1] == lrs[3] == lrs[5] and lrs[0] != lrs[1], lrs
    train(tmp_path / "split", 3)
    split = train(tmp_path / "split", 6)
    _same_steps(
        full, split, range(4, 7), ("loss", "grad_norm", "rewards/margins", "lr", "response_length/mean")
    )
    assert_same_hf_export(tmp_path / "full", tmp_path / "split")


def test_more_prompts_per_step_than_prompts_is_one_line(capsys, tmp_path, five_prompts):
    code = main(["experiment=tiny_cpu", f"data.train_files=[{five_prompts}]", "trainer.prompts_per_step=6",
                 "trainer.test_freq=0", f"trainer.output_dir={tmp_path / 'run'}"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "trainer.prompts_per_step=6 is more than the 5 training prompts" in err
    assert not (tmp_path / "run").exists()
