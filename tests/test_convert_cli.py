"""spin-convert end to end: plain multi-rank start, torchrun, resharding on load, bit-exact round trip."""

import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from spin_megatron.ports import pick_free_port
from tests.helpers import REPO, run_cli

pytestmark = pytest.mark.dist


def _rel_error(output: str) -> float:
    match = re.search(r"max relative = ([0-9.e+-]+)", output)
    assert match, output
    return float(match.group(1))


def _hf_tensors(hf_dir):
    tensors = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture(scope="module")
def qwen_tp2_ckpt(tiny_qwen2, tmp_path_factory):
    out = tmp_path_factory.mktemp("mcore") / "qwen_tp2"
    result = run_cli("hf-to-mcore", "--hf-dir", tiny_qwen2, "--out", out, "--tp", 2)
    assert result.returncode == 0, result.stderr
    assert "written at tp=2 pp=1" in result.stdout
    return out


def test_saved_at_tp2_loads_at_pp2_vpp2_under_torchrun(qwen_tp2_ckpt, tiny_qwen2):
    # the two stages as two model chunks each (interleaved pipeline): one layer per chunk
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={pick_free_port()}",
        "-m",
        "spin_megatron.convert",
        "verify",
        "--hf-dir",
        str(tiny_qwen2),
        "--mcore-dir",
        str(qwen_tp2_ckpt),
        "--tp",
        "1",
        "--pp",
        "2",
        "--vpp",
        "2",
    ]
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(REPO),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(tp=1 pp=2 vpp=2)" in result.stdout and _rel_error(result.stdout) <= 1e-5


def test_written_with_model_chunks_verifies_at_one_stage(tiny_qwen2, tmp_path):
    # Megatron's model0/model1 nesting on the way out; global tensor names, so one stage reads it
    mcore = tmp_path / "mcore"
    result = run_cli("hf-to-mcore", "--hf-dir", tiny_qwen2, "--out", mcore, "--pp", 2, "--vpp", 2)
    assert result.returncode == 0 and "written at tp=1 pp=2 vpp=2" in result.stdout, result.stderr
    result = run_cli("verify", "--hf-dir", tiny_qwen2, "--mcore-dir", mcore)
    assert result.returncode == 0 and _rel_error(result.stdout) <= 1e-5, result.stdout + result.stderr


def test_saved_at_tp2_verifies_at_tp2(qwen_tp2_ckpt, tiny_qwen2):
    result = run_cli("verify", "--hf-dir", tiny_qwen2, "--mcore-dir", qwen_tp2_ckpt, "--tp", 2)
    assert result.returncode == 0, result.stderr
    assert _rel_error(result.stdout) <= 1e-5


def test_tp2_checkpoint_exports_bit_exact_hf_at_tp1(qwen_tp2_ckpt, tiny_qwen2, tmp_path):
    out = tmp_path / "hf"
    result = run_cli("mcore-to-hf", "--mcore-dir", qwen_tp2_ckpt, "--out", out)
    assert result.returncode == 0, result.stderr
    original, exported = _hf_tensors(tiny_qwen2), _hf_tensors(out)
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)


def test_round_trip_through_tp2_pp2_is_bit_exact_and_loads_in_transformers(tiny_llama, tmp_path):
    mcore, hf2 = tmp_path / "mcore", tmp_path / "hf2"
    result = run_cli("hf-to-mcore", "--hf-dir", tiny_llama, "--out", mcore, "--tp", 2, "--pp", 2)
    assert result.returncode == 0, result.stderr
    result = run_cli(
        "mcore-to-hf", "--mcore-dir", mcore, "--out", hf2, "--tp", 2, "--pp", 2, "--max-shard-size", "20KB"
    )
    assert result.returncode == 0, result.stderr
    assert len(list(hf2.glob("model-pp01-*.safetensors"))) > 1  # small shards: the writer streams
    original, exported = _hf_tensors(tiny_llama), _hf_tensors(hf2)
    assert sorted(exported) == sorted(k for k in original if k != "lm_head.weight")
    assert all(torch.equal(original[k], exported[k]) for k in exported)
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(hf2, dtype=torch.float32).eval()(ids).logits
    assert torch.equal(a, b)


def test_bf16_conversion_keeps_config_dtype_and_verifies_loosely(tiny_qwen2, tmp_path):
    mcore, hf2 = tmp_path / "mcore", tmp_path / "hf2"
    assert run_cli("hf-to-mcore", "--hf-dir", tiny_qwen2, "--out", mcore, "--dtype", "bf16").returncode == 0
    result = run_cli("verify", "--hf-dir", tiny_qwen2, "--mcore-dir", mcore)
    assert result.returncode == 0 and "tol 2e-02" in result.stdout, result.stdout + result.stderr
    assert run_cli("mcore-to-hf", "--mcore-dir", mcore, "--out", hf2).returncode == 0
    assert all(t.dtype == torch.bfloat16 for t in _hf_tensors(hf2).values())
    assert '"torch_dtype": "bfloat16"' in (hf2 / "config.json").read_text()


def test_moe_saved_at_tp2_ep2_verifies_at_ep2_and_exports_bit_exact_at_ep1(tiny_qwen3_moe_mixed, tmp_path):
    mcore, hf2 = tmp_path / "mcore", tmp_path / "hf2"
    result = run_cli(
        "hf-to-mcore", "--hf-dir", tiny_qwen3_moe_mixed, "--out", mcore, "--tp", 2, "--ep", 2, "--etp", 1
    )
    assert result.returncode == 0, result.stderr
    assert "written at tp=2 pp=1 ep=2 etp=1; loadable at any TP/PP/EP" in result.stdout
    result = run_cli("verify", "--hf-dir", tiny_qwen3_moe_mixed, "--mcore-dir", mcore, "--ep", 2)
    assert result.returncode == 0, result.stderr
    assert "(tp=1 pp=1 ep=2 etp=1)" in result.stdout and _rel_error(result.stdout) <= 1e-5
    assert run_cli("mcore-to-hf", "--mcore-dir", mcore, "--out", hf2).returncode == 0
    original, exported = _hf_tensors(tiny_qwen3_moe_mixed), _hf_tensors(hf2)
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in exported
    assert sorted(exported) == sorted(k for k in original if k != "lm_head.weight")  # tied
    assert all(torch.equal(original[k], exported[k]) for k in exported)
