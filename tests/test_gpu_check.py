"""tools/gpu_check.py's plumbing on CPU (--dry-run): phases in subprocesses, results written per phase, a rerun of
a subset keeps the rest, at most 8 output files; and gpu_check_prepare's data folder."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow
SCRIPT = REPO / "tools" / "gpu_check.py"


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)  # fmt: skip


def test_dry_run_of_every_phase_on_cpu(tmp_path):
    done = _run("--out", tmp_path, "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert {k: v["status"] for k, v in results.items()} == {
        "env": "pass", "parity": "pass", "logprob": "pass", "te_xent": "skipped", "train": "pass", "mfu": "skipped",
    }  # fmt: skip
    assert results["parity"]["packed_fused_head_max_abs_diff"] < 1e-4 and results["train"]["resumed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "console.log",
        "env.txt",
        "metrics.jsonl",
        "results.json",
    ]
    # a rerun of one phase keeps the others' results; an unknown phase is a one-line error
    assert _run("--out", tmp_path, "--dry-run", "--phases", "logprob").returncode == 0
    assert json.loads((tmp_path / "results.json").read_text())["train"]["status"] == "pass"
    bad = _run("--out", tmp_path, "--phases", "nope")
    assert bad.returncode == 2 and "unknown phase(s) ['nope']" in bad.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_failing_phase_is_reported_with_its_error_tail(tmp_path):
    done = _run("--out", tmp_path, "--phases", "env")  # no --dry-run on a CPU machine: the phase must fail
    results = json.loads((tmp_path / "results.json").read_text())
    assert done.returncode == 1 and results["env"]["status"] == "fail"
    assert "CUDA is not available" in results["env"]["detail"]


def test_prepare_writes_the_data_folder_under_the_limit(qwen_tokenizer_dir, gsm8k_dir, tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "tools"))
    import gpu_check_prepare

    monkeypatch.setattr(gpu_check_prepare, "DATA", tmp_path / "data")
    monkeypatch.setattr(gpu_check_prepare, "WHEELS", tmp_path / "whl")
    assert (
        gpu_check_prepare.main(
            ["--skip-wheels", "--shared-data", str(qwen_tokenizer_dir.parent), "--rows", "5"]
        )
        == 0
    )
    assert len((tmp_path / "data" / "gsm8k" / "train.jsonl").read_text().splitlines()) == 5
    assert (tmp_path / "data" / "qwen2.5-tokenizer" / "vocab.json").is_file()
    assert gpu_check_prepare.size_of(tmp_path / "data") < 20 << 20
