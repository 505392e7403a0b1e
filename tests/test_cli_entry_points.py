import subprocess
import sys

from tests.helpers import REPO


def test_spin_convert_help_lists_the_three_commands():
    result = subprocess.run(
        [sys.executable, "-m", "spin_megatron.convert", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0
    for command in ("hf-to-mcore", "mcore-to-hf", "verify"):
        assert command in result.stdout


def test_spin_train_without_a_model_explains_how_to_pick_one():
    result = subprocess.run(
        [sys.executable, "-m", "spin_megatron.train"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "spin-train: error: no model given: set model.hf_path=HF_DIR or model.mcore_ckpt=DIR, or use a preset "
        "such as experiment=tiny_cpu"
    ]
