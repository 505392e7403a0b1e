"""Command-line frictions, through the real composition (conf/ + overrides, as spin-train reads them)."""

import re

import pytest

from spin_megatron.compose import load_config
from spin_megatron.errors import ConfigError
from spin_megatron.planning.workload import num_microbatches
from spin_megatron.train import main


def _one_line_error(capsys, *overrides) -> str:
    assert main(list(overrides)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("spin-train: error: "), err
    return err


# ---------------------------------------------------------------------------------------------- data.*_files


@pytest.mark.parametrize("key", ["train_files", "val_files"])
def test_a_single_data_file_path_is_a_one_item_list(key, tmp_path):
    path = str(tmp_path / "rows.jsonl")
    cfg = load_config(["experiment=tiny_cpu", f"data.{key}={path}"])
    assert getattr(cfg.data, key) == [path]
    listed = load_config(["experiment=tiny_cpu", f"data.{key}=[{path},{path}.2]"])
    assert getattr(listed.data, key) == [path, f"{path}.2"]
    assert getattr(load_config(["experiment=tiny_cpu", f"data.{key}=[]"]).data, key) == []


def test_a_single_missing_data_file_is_reported_by_its_key(capsys):
    err = _one_line_error(capsys, "experiment=tiny_cpu", "data.train_files=/nonexistent/train.jsonl")
    assert "data.train_files: /nonexistent/train.jsonl does not exist" in err


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("3", "data.train_files must be a file path or a list of file paths, got 3"),
        ("[1,2]", "data.train_files must be a file path or a list of file paths, got [1, 2]"),
        (
            "{a: 1}",
            "invalid value for data.train_files",
        ),  # OmegaConf refuses to merge a mapping into the list
    ],
)
def test_data_files_that_are_not_paths_are_refused(value, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(["experiment=tiny_cpu", f"data.train_files={value}"])


# ---------------------------------------------------------------------------------------------- model.tiny


def test_tiny_preset_with_hf_path_names_the_fix(capsys):
    err = _one_line_error(capsys, "experiment=tiny_cpu", "model.hf_path=/models/qwen")
    assert "model.tiny builds a random model and model.hf_path loads one" in err
    assert "add model.tiny=null" in err
    cfg = load_config(
        ["experiment=tiny_cpu", "model.tiny=null", "model.hf_path=/models/qwen"]
    )  # the fix works
    assert cfg.model.tiny is None and cfg.model.hf_path == "/models/qwen"


# ---------------------------------------------------------------------------------------------- pairs_per_prompt


def test_pairs_per_prompt_all_from_the_command_line():
    cfg = load_config(["experiment=tiny_cpu", "algorithm.mode=spin", "algorithm.pairs_per_prompt=all"])
    assert cfg.algorithm.pairs_per_prompt == "all"
    assert num_microbatches(cfg, dp=1) >= 1
    two = load_config(
        ["experiment=tiny_cpu", "algorithm.mode=spin", "rollout.n=2", "algorithm.pairs_per_prompt=2"]
    )
    assert two.algorithm.pairs_per_prompt == 2
    with pytest.raises(ConfigError, match="algorithm.pairs_per_prompt=3 exceeds rollout.n=2"):
        load_config(
            ["experiment=tiny_cpu", "algorithm.mode=spin", "rollout.n=2", "algorithm.pairs_per_prompt=3"]
        )


def test_pairs_per_prompt_all_counts_one_pair_per_sample_in_the_memory_plan():
    base = ["experiment=tiny_cpu", "algorithm.mode=spin", "trainer.micro_batch_tokens=1"]
    every = load_config([*base, "rollout.n=4", "algorithm.pairs_per_prompt=all"])
    four = load_config([*base, "algorithm.pairs_per_prompt=4"])  # rollout.n follows: 4
    assert four.rollout.n == 4
    assert (
        num_microbatches(every, dp=1) == num_microbatches(four, dp=1) > num_microbatches(load_config(base), 1)
    )


@pytest.mark.parametrize("value", ["0", "-1", "some", "1.5", "true"])
def test_bad_pairs_per_prompt_is_one_line(capsys, value):
    err = _one_line_error(capsys, "experiment=tiny_cpu", f"algorithm.pairs_per_prompt={value}")
    assert "algorithm.pairs_per_prompt must be an integer ≥ 1 or all" in err


# ---------------------------------------------------------------------------------------------- SGLang servers


def test_extra_server_env_takes_new_keys_from_the_command_line():
    """Both SGLang sections' extra_server_env are open mappings: a Hydra override adds keys (issue 22, item 13)."""
    cfg = load_config(
        ["experiment=tiny_cpu_sglang", "rollout.sglang.extra_server_env={NCCL_SOCKET_IFNAME: eth0}",
         "rollout.sglang.extra_server_env.GLOO_SOCKET_IFNAME=lo", "reward_model.sglang.extra_server_env={A: 1}"]
    )  # fmt: skip
    preset = load_config(["experiment=tiny_cpu_sglang"]).rollout.sglang.extra_server_env
    assert preset and cfg.rollout.sglang.extra_server_env == {
        **preset, "NCCL_SOCKET_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "lo"
    }  # fmt: skip
    assert cfg.reward_model.sglang.extra_server_env == {"A": "1"}
    with pytest.raises(ConfigError, match="unknown config key rollout.sglang.extra_server_envv"):
        load_config(["experiment=tiny_cpu", "rollout.sglang.extra_server_envv={A: b}"])


def test_a_missing_sglang_python_is_one_line_before_any_process_group(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(
        "spin_megatron.parallel.state.init_parallel", lambda *a, **k: pytest.fail("a process group started")
    )
    err = _one_line_error(
        capsys, "experiment=tiny_cpu", "rollout.engine=sglang", f"trainer.output_dir={tmp_path}",
        "rollout.sglang.python_executable=/nonexistent/python",
    )  # fmt: skip
    assert "rollout.sglang.python_executable='/nonexistent/python' is not an executable file" in err
