"""Fuzzing the loaders and validators: random jsonl content and random override values may only ever produce
the documented user errors (ConfigError / MissingPathError …, subclasses of UserError) — never a traceback."""

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spin_megatron.config import DataConfig
from spin_megatron.data import build_examples, load_rows
from spin_megatron.errors import UserError
from spin_megatron.train import load_config

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)
rows = st.dictionaries(st.sampled_from(["question", "answer", "prompt", "x"]), json_values, max_size=3)
lines = st.lists(st.one_of(rows.map(json.dumps), st.text(max_size=30)), min_size=0, max_size=6)


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    from spin_megatron.data import load_tokenizer
    from tests.synthetic_task import make_char_tokenizer

    return load_tokenizer(str(make_char_tokenizer(tmp_path_factory.mktemp("tok"))))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=lines)
def test_random_jsonl_only_raises_user_errors(lines, tmp_path_factory, char_tokenizer):
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_text("\n".join(lines))
    cfg = DataConfig(train_files=[str(path)], val_files=[], max_prompt_tokens=64)
    try:
        loaded = load_rows(cfg.train_files, hub_dataset="none", hub_config=None, split="train")
        examples, stats = build_examples(loaded, char_tokenizer, cfg, split_name="fuzz")
    except UserError:
        return
    assert stats.kept == len(examples) > 0


keys = st.sampled_from(
    [
        "trainer.total_steps",
        "trainer.save_freq",
        "rollout.n",
        "rollout.temperature",
        "rollout.top_p",
        "rollout.top_k",
        "algorithm.beta",
        "algorithm.loss_type",
        "algorithm.mode",
        "algorithm.label_smoothing",
        "optim.lr",
        "optim.lr_decay_style",
        "parallel.tp",
        "data.max_prompt_tokens",
        "data.overlong_prompts",
        "logging.wandb.mode",
        "rollout.engine",
        "trainer.resume",
        "model.dtype",
        "trainer.nonexistent",
        "rollout.sglang.mem_fraction_static",
        "rollout.sglang.sync_mode",
        "cluster.gpu_memory_gb",
    ]
)
values = st.one_of(
    st.integers(-3, 5),
    st.floats(-2, 2, allow_nan=False).map(lambda f: f"{f:.3g}"),
    st.text(string.ascii_letters + "_-.:", min_size=1, max_size=10),
    st.sampled_from(["null", "true", "[1,2]", "{a: 1}", "sigmoid", "online", "spin", "bf16", "0.5"]),
)


@settings(max_examples=80, deadline=None)
@given(overrides=st.lists(st.tuples(keys, values), max_size=3))
def test_random_overrides_only_raise_config_errors(overrides):
    args = ["experiment=tiny_cpu", *(f"{k}={v}" for k, v in overrides)]
    try:
        load_config(args)
    except UserError:
        pass
