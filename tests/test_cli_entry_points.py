import subprocess
import sys

from tests.helpers import REPO


def test_spin_train_says_not_yet_instead_of_pretending():
    result = subprocess.run(
        [sys.executable, "-m", "spin_megatron.train"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2
    assert result.stderr.startswith("spin-train: error: the trainer is not implemented yet")


def test_spin_convert_help_lists_the_three_commands():
    result = subprocess.run(
        [sys.executable, "-m", "spin_megatron.convert", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0
    for command in ("hf-to-mcore", "mcore-to-hf", "verify"):
        assert command in result.stdout
