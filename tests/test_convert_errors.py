"""Every user mistake with spin-convert: one line on stderr naming the problem and the fix, exit code 2, and
nothing existing modified. All of these are caught before any process group starts."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from spin_megatron.convert import main
from spin_megatron.models.mcore_io import FORMAT, META_FILE


def _run(capsys, *args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_one_line_error(code, err, *fragments):
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("spin-convert: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.fixture
def hf_copy(tiny_qwen2, tmp_path):
    return shutil.copytree(tiny_qwen2, tmp_path / "hf")


def _fake_mcore(path, hf_dir):
    """A checkpoint description (spin_model.json) for the checks that only read metadata."""
    path.mkdir()
    meta = {
        "format": FORMAT,
        "hf_config": json.loads((hf_dir / "config.json").read_text()),
        "padded_vocab_size": 256,
        "dtype": "fp32",
        "saved_tp": 1,
        "saved_pp": 1,
    }
    (path / META_FILE).write_text(json.dumps(meta))
    return path


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_non_empty_output_is_refused_and_untouched(capsys, tiny_qwen2, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err = _run(capsys, "hf-to-mcore", "--hf-dir", tiny_qwen2, "--out", out)
    _assert_one_line_error(code, err, f"output folder {out} is not empty", "--force")
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_output_equal_to_input_is_refused_even_with_force(capsys, hf_copy):
    before = _snapshot(hf_copy)
    code, err = _run(capsys, "hf-to-mcore", "--hf-dir", hf_copy, "--out", hf_copy, "--force")
    _assert_one_line_error(code, err, "is the input folder")
    assert _snapshot(hf_copy) == before


def test_missing_tensor_is_named(capsys, hf_copy, tmp_path):
    tensors = load_file(hf_copy / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, hf_copy / "model.safetensors", metadata={"format": "pt"})
    code, err = _run(capsys, "hf-to-mcore", "--hf-dir", hf_copy, "--out", tmp_path / "out")
    _assert_one_line_error(code, err, "missing 1 tensor(s): model.layers.2.mlp.up_proj.weight")
    assert not (tmp_path / "out").exists()


def test_wrongly_shaped_tensor_is_named(capsys, hf_copy, tmp_path):
    tensors = load_file(hf_copy / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:16]
    save_file(tensors, hf_copy / "model.safetensors", metadata={"format": "pt"})
    code, err = _run(capsys, "hf-to-mcore", "--hf-dir", hf_copy, "--out", tmp_path / "out")
    _assert_one_line_error(
        code, err, "wrong shape: model.layers.0.self_attn.k_proj.weight (16, 64) (expected (32, 64))"
    )


def test_unexpected_tensor_is_named(capsys, hf_copy, tmp_path):
    tensors = load_file(hf_copy / "model.safetensors")
    tensors["model.layers.4.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].clone()
    save_file(tensors, hf_copy / "model.safetensors", metadata={"format": "pt"})
    code, err = _run(capsys, "hf-to-mcore", "--hf-dir", hf_copy, "--out", tmp_path / "out")
    _assert_one_line_error(code, err, "unexpected 1 tensor(s): model.layers.4.mlp.up_proj.weight")


def test_unsupported_architecture(capsys, hf_copy, tmp_path):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["architectures"] = ["MixtralForCausalLM"]
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    code, err = _run(capsys, "hf-to-mcore", "--hf-dir", hf_copy, "--out", tmp_path / "out")
    _assert_one_line_error(code, err, "unsupported architecture ['MixtralForCausalLM']", "Qwen2ForCausalLM")


@pytest.mark.parametrize(
    "flag, value, fragment",
    [
        (
            "--tp",
            3,
            "--tp=3 does not divide the model's 4 attention heads; valid values for this model: 1, 2",
        ),
        ("--pp", 3, "--pp=3 does not divide the model's 4 layers; valid values for this model: 1, 2, 4"),
        ("--tp", 0, "--tp and --pp must be ≥ 1"),
        ("--ep", 2, "--ep=2 splits experts, but Qwen2ForCausalLM has none; use --ep=1"),
        ("--vpp", 2, "--vpp 2 interleaves pipeline stages, but --pp is 1: set --pp > 1 or --vpp 1"),
    ],
)
def test_parallel_sizes_that_do_not_fit_the_model(capsys, tiny_qwen2, tmp_path, flag, value, fragment):
    code, err = _run(capsys, "hf-to-mcore", "--hf-dir", tiny_qwen2, "--out", tmp_path / "out", flag, value)
    _assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--ep", 3], "--ep=3 does not divide the model's 4 experts; valid values for this model: 1, 2, 4"),
        (["--ep", 2, "--etp", 3], "--etp=3 does not divide the model's 32 expert intermediate size"),
    ],
)
def test_expert_parallel_sizes_that_do_not_fit_the_model(capsys, tiny_qwen3_moe, tmp_path, flags, fragment):
    code, err = _run(capsys, "hf-to-mcore", "--hf-dir", tiny_qwen3_moe, "--out", tmp_path / "out", *flags)
    _assert_one_line_error(code, err, fragment)


def test_world_size_mismatch_under_torchrun(capsys, tiny_qwen2, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, err = _run(capsys, "hf-to-mcore", "--hf-dir", tiny_qwen2, "--out", tmp_path / "out", "--tp", 2)
    _assert_one_line_error(
        code, err, "started with 3 processes but --tp 2 × --pp 1 = 2", "--nproc_per_node 2"
    )


def test_missing_hf_folder(capsys, tmp_path):
    code, err = _run(capsys, "hf-to-mcore", "--hf-dir", tmp_path / "nope", "--out", tmp_path / "out")
    _assert_one_line_error(code, err, "config.json not found")


def test_hf_folder_without_weights(capsys, tiny_qwen2, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(tiny_qwen2 / "config.json", hf)
    code, err = _run(capsys, "hf-to-mcore", "--hf-dir", hf, "--out", tmp_path / "out")
    _assert_one_line_error(code, err, "no model.safetensors")


def test_incomplete_mcore_checkpoint(capsys, tmp_path):
    (tmp_path / "ckpt" / "model").mkdir(parents=True)
    code, err = _run(capsys, "mcore-to-hf", "--mcore-dir", tmp_path / "ckpt", "--out", tmp_path / "out")
    _assert_one_line_error(code, err, f"has no {META_FILE}", "spin-convert hf-to-mcore")


def test_verify_refuses_two_different_models(capsys, tiny_qwen2, tiny_llama, tmp_path):
    mcore = _fake_mcore(tmp_path / "mcore", tiny_llama)
    code, err = _run(capsys, "verify", "--hf-dir", tiny_qwen2, "--mcore-dir", mcore)
    _assert_one_line_error(code, err, "describe different models", "architecture")


def test_hf_config_from_a_different_model(capsys, tiny_qwen2, tiny_llama, tmp_path):
    mcore = _fake_mcore(tmp_path / "mcore", tiny_qwen2)
    code, err = _run(
        capsys, "mcore-to-hf", "--mcore-dir", mcore, "--out", tmp_path / "out", "--hf-config-from", tiny_llama
    )
    _assert_one_line_error(code, err, "describe different models")


def test_bad_shard_size_and_dtype(capsys, tiny_qwen2, tmp_path):
    mcore = _fake_mcore(tmp_path / "mcore", tiny_qwen2)
    code, err = _run(
        capsys, "mcore-to-hf", "--mcore-dir", mcore, "--out", tmp_path / "o", "--max-shard-size", "lots"
    )
    _assert_one_line_error(code, err, "--max-shard-size 'lots'")
    code, err = _run(capsys, "hf-to-mcore", "--hf-dir", tiny_qwen2, "--out", tmp_path / "o", "--dtype", "fp8")
    _assert_one_line_error(code, err, "unknown dtype 'fp8'", "fp32, bf16, fp16")


def test_force_replaces_only_after_success(capsys, tiny_qwen2, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert main(["hf-to-mcore", "--hf-dir", str(tiny_qwen2), "--out", str(out), "--force"]) == 0
    assert not (out / "old.txt").exists() and (out / META_FILE).is_file()
    assert not list(tmp_path.glob(".out.*"))  # no staging or replaced folder left behind
