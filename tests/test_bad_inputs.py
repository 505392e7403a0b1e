"""spin-train's user mistakes: one line naming the problem (and the fix), exit code 2, and the run directory —
which already holds an earlier run's files — left exactly as it was. All of these fail before any process group
starts, so they run in-process."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from spin_megatron.models.tiny import make_tiny_hf_model
from spin_megatron.train import main


@pytest.fixture
def run_dir(tmp_path):
    """A run directory with files of an earlier run, that no failed start may touch."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    (run / "notes.txt").write_text("keep")
    return run


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _fails(capsys, run_dir, *overrides):
    before = _snapshot(run_dir)
    capsys.readouterr()  # drop what fixtures printed
    code = main(["experiment=tiny_cpu", f"trainer.output_dir={run_dir}", *map(str, overrides)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("spin-train: error: "), err
    assert _snapshot(run_dir) == before
    return err


def _jsonl(path, rows):
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return path


GOOD = {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}


def test_malformed_jsonl_line_is_reported_with_file_and_line(capsys, run_dir, tmp_path):
    data = _jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, '{"question": "x", "answer": \n'])
    err = _fails(capsys, run_dir, f"data.train_files=[{data}]")
    assert f"{data}:3: not valid JSON" in err


def test_missing_fields_are_named(capsys, run_dir, tmp_path):
    data = _jsonl(tmp_path / "fields.jsonl", [{"prompt": "2 + 3?", "answer": "#### 5"}])
    err = _fails(capsys, run_dir, f"data.train_files=[{data}]")
    assert "question" in err and "data.prompt_key" in err and "prompt" in err


def test_empty_prompt_is_refused(capsys, run_dir, tmp_path):
    data = _jsonl(tmp_path / "empty.jsonl", [GOOD, {"question": "  ", "answer": "#### 1"}])
    assert "empty" in _fails(capsys, run_dir, f"data.train_files=[{data}]")


def test_all_prompts_longer_than_the_limit(capsys, run_dir, tmp_path):
    data = _jsonl(tmp_path / "long.jsonl", [GOOD, GOOD])
    err = _fails(capsys, run_dir, f"data.train_files=[{data}]", "data.max_prompt_tokens=5")
    assert "all 2 prompts" in err and "are longer than data.max_prompt_tokens=5" in err


def test_unknown_reward_function(capsys, run_dir):
    err = _fails(capsys, run_dir, "algorithm.reward=gsm8k_fuzzy")
    assert "unknown reward function 'gsm8k_fuzzy'" in err and "gsm8k" in err


def test_hf_checkpoint_with_a_missing_tensor(capsys, run_dir, tiny_qwen2, tmp_path):
    hf = shutil.copytree(tiny_qwen2, tmp_path / "hf")
    tensors = load_file(hf / "model.safetensors")
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    err = _fails(capsys, run_dir, "model.tiny=null", f"model.hf_path={hf}", "parallel.pp=1")
    assert "missing 1 tensor(s): model.layers.1.self_attn.q_proj.weight" in err


def test_unsupported_architecture(capsys, run_dir, tmp_path):
    hf = make_tiny_hf_model(tmp_path / "hf", "qwen2")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["architectures"] = ["GemmaForCausalLM"]
    (hf / "config.json").write_text(json.dumps(cfg))
    err = _fails(capsys, run_dir, "model.tiny=null", f"model.hf_path={hf}")
    assert "unsupported architecture ['GemmaForCausalLM']" in err


def test_resume_from_a_different_model(capsys, run_dir):
    ckpt = run_dir / "checkpoints" / "step_0000002"
    ckpt.mkdir()
    (ckpt / "COMPLETE").write_text("")
    (ckpt / "trainer_state.json").write_text(
        json.dumps({"step": 2, "model_signature": {"hidden_size": 4096}})
    )
    err = _fails(capsys, run_dir)
    assert "is from a different model" in err


def test_tp_pp_and_world_size(capsys, run_dir, monkeypatch):
    assert "world size 1 is not divisible by tp×pp = 1×2 = 2" in _fails(capsys, run_dir, "parallel.pp=2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert "parallel.tp=4 does not divide the model's 2 key/value heads" in _fails(
        capsys, run_dir, "parallel.tp=4"
    )
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert "parallel.pp=4 does not divide the model's 2 layers" in _fails(capsys, run_dir, "parallel.pp=4")


def test_hydra_override_mistakes(capsys, run_dir):
    assert "unknown config key rollout.temprature" in _fails(capsys, run_dir, "rollout.temprature=0.7")
    assert "invalid value for trainer.save_freq" in _fails(capsys, run_dir, "trainer.save_freq=often")
