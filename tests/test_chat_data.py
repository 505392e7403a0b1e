"""Conversations as SPIN data (data.messages_key): the split at the last assistant turn in each layout, with a
Qwen2.5 and a Llama-3 chat template; bad rows; left truncation by whole turns; the tokenization cache; hub
datasets by name and split; worker processes; the config and metrics that go with conversations."""

import json
import pickle

import datasets
import pytest

from spin_megatron.algorithm.experience import stop_token_ids
from spin_megatron.config import DataConfig
from spin_megatron.data import PromptExample, chat_cache, load_prompt_split, load_tokenizer
from spin_megatron.data.chat import prompt_conversation, shorter_prompts
from spin_megatron.errors import ConfigError
from tests.helpers import REPO

TINY = REPO / "tests" / "data" / "ultrachat_tiny"
TRAIN = TINY / "data" / "train_sft.jsonl"
KEPT = 24  # the last two rows of TRAIN are malformed on purpose

# Meta-Llama-3-8B-Instruct's chat template (header tokens around the role, content trimmed, <|eot_id|> after it)
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def qwen(qwen_tokenizer_dir):
    return load_tokenizer(str(qwen_tokenizer_dir))


@pytest.fixture(scope="module")
def llama3(qwen_tokenizer_dir, tmp_path_factory):
    """A tokenizer folder with Llama-3's special tokens and chat template (on Qwen2.5's vocabulary: no hub)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))
    tok.add_special_tokens(
        {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"],
        }
    )
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    folder = tmp_path_factory.mktemp("llama3_tokenizer")
    tok.save_pretrained(folder)
    return load_tokenizer(str(folder))


def cfg(files=(TRAIN,), **overrides) -> DataConfig:
    settings = {"train_files": [str(f) for f in files], "val_files": [], "messages_key": "messages",
                "cache_dir": None, **overrides}  # fmt: skip
    return DataConfig(**settings)


def ultrachat_rows() -> list[dict]:
    return [json.loads(line) for line in TRAIN.read_text().splitlines()]


def write_layout(folder, layout: str):
    """The kept conversations of TRAIN in one of the layouts SPIN data comes in; returns (path, messages_key)."""
    rows = ultrachat_rows()[:KEPT]
    if layout == "messages":  # HuggingFaceH4/ultrachat_200k, JSON Lines
        path = folder / "ultrachat.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path, "messages"
    other = [[*r["messages"][:-1], {"role": "assistant", "content": "I am not sure."}] for r in rows]
    if (
        layout == "real"
    ):  # uclaml/SPIN's SPIN_iter0 (real = the SFT data, generated = the model's answer), parquet
        path = folder / "spin_iter0.parquet"
        datasets.Dataset.from_dict({"real": [r["messages"] for r in rows], "generated": other}).to_parquet(
            path
        )
        return path, "real"
    path = folder / "chosen_rejected.json"  # uclaml's generate.py output: a JSON array of chosen/rejected
    path.write_text(
        json.dumps([{"chosen": r["messages"], "rejected": o} for r, o in zip(rows, other)], indent=2)
    )
    return path, "chosen"


@pytest.mark.parametrize("layout", ["messages", "real", "chosen"])
@pytest.mark.parametrize("template", ["qwen", "llama3"])
def test_prompt_and_gold_are_the_templates_rendering_split_at_the_last_assistant_turn(
    layout, template, request, tmp_path
):
    tokenizer = request.getfixturevalue(template)
    path, key = write_layout(tmp_path, layout)
    examples, stats = load_prompt_split(cfg([path], messages_key=key), tokenizer, "train")
    assert (stats.total, stats.kept, stats.dropped_bad) == (KEPT, KEPT, 0)
    stops = stop_token_ids(tokenizer)
    tail_after_end = {"qwen": tokenizer("\n")["input_ids"], "llama3": []}[template]
    for example, row in zip(examples, ultrachat_rows()):
        whole = tokenizer.apply_chat_template(row["messages"], tokenize=True)["input_ids"]
        # the conversation = prompt + gold + what the template writes after the end-of-turn (Qwen: a newline)
        assert whole == example.prompt_ids + example.gold_ids + tail_after_end, (layout, example.prompt_id)
        assert example.gold_ids[-1] in stops  # the gold ends as a sample ends: with the rollout's stop token
        prompt_text = tokenizer.decode(example.prompt_ids)
        rendered = tokenizer.apply_chat_template(
            row["messages"][:-1], add_generation_prompt=True, tokenize=False
        )
        assert prompt_text == rendered
        for turn in row["messages"][:-1]:  # the multi-turn history is in the prompt
            assert turn["content"].strip() in prompt_text
    end = {"qwen": "<|im_end|>", "llama3": "<|eot_id|>"}[template]
    assert tokenizer.convert_ids_to_tokens(examples[0].gold_ids[-1]) == end
    assert sum(len(r["messages"]) > 2 for r in ultrachat_rows()[:KEPT]) >= 3  # multi-turn rows were checked


def _write(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path


def _turn(role, content="hi"):
    return {"role": role, "content": content}


BAD = [
    ([_turn("user"), _turn("assistant"), _turn("user")], "ends with a user turn"),
    ([_turn("user")], "has no assistant turn"),
    ([_turn("user"), _turn("tool"), _turn("assistant")], "unknown role 'tool'"),
    ([_turn("system"), _turn("assistant")], "no user turn before its last assistant turn"),
    ([], "has no turns"),
    ([_turn("user"), {"role": "assistant", "content": None}], "without text content"),
    ([_turn("user"), _turn("assistant", "  ")], "empty last assistant turn"),
]


def test_bad_rows_are_dropped_and_counted_by_default_or_refused_with_the_row_number(qwen, tmp_path):
    good = [_turn("user", "2 + 2?"), _turn("assistant", "4")]
    path = _write(tmp_path / "bad.jsonl", [good, *[conversation for conversation, _ in BAD], good])
    assert DataConfig().bad_rows == "drop"  # a 200k-row set with a few broken rows still trains
    examples, stats = load_prompt_split(cfg([path]), qwen, "train")
    assert [e.prompt_id for e in examples] == [0, len(BAD) + 1]
    assert (stats.total, stats.kept, stats.dropped_bad) == (len(BAD) + 2, 2, len(BAD))
    assert f"{len(BAD)} malformed dropped (first: row 1 ends with a user turn" in stats.summary("train data")
    for number, (conversation, why) in enumerate(BAD):
        one = _write(tmp_path / f"bad{number}.jsonl", [good, conversation])
        with pytest.raises(ConfigError, match=f"^row 1 of train data .*{why}.*set data.bad_rows=drop$"):
            load_prompt_split(cfg([one], bad_rows="error"), qwen, "train")


def _long_conversation(words: int = 40):
    text = " ".join(["word"] * words)
    return [
        _turn("system", "You are brief."),
        _turn("user", f"first {text}"), _turn("assistant", f"one {text}"),
        _turn("user", f"second {text}"), _turn("assistant", f"two {text}"),
        _turn("user", "third question"), _turn("assistant", "the answer"),
    ]  # fmt: skip


def test_shorter_prompts_drop_whole_earliest_exchanges_keeping_system_and_last_user_turn():
    prompt = _long_conversation()[:-1]
    candidates = list(shorter_prompts(prompt))
    assert [cut for cut, _ in candidates] == [2, 4]
    assert [[t["content"].split()[0] for t in p] for _, p in candidates] == [
        ["You", "second", "two", "third"],
        ["You", "third"],
    ]


def test_left_truncate_drops_whole_turns_and_drop_drops_the_row(qwen, tmp_path):
    conversation = _long_conversation()
    path = _write(tmp_path / "long.jsonl", [conversation, [_turn("user", "2 + 2?"), _turn("assistant", "4")]])
    kept_turns = [conversation[0], *conversation[3:]]  # the first exchange removed
    short = qwen.apply_chat_template(kept_turns, tokenize=True)["input_ids"]
    full_prompt = qwen.apply_chat_template(conversation[:-1], add_generation_prompt=True, tokenize=True)
    limit = len(short) - 4  # the shortened prompt fits (the gold and the newline after it are not prompt)
    assert len(full_prompt["input_ids"]) > limit
    truncate = cfg([path], max_prompt_tokens=limit, overlong_prompts="left_truncate")
    (long, _), stats = load_prompt_split(truncate, qwen, "train")
    assert (stats.truncated, stats.dropped_overlong) == (1, 0)
    assert (
        long.prompt_ids + long.gold_ids + [198] == short
    )  # the template's rendering of the shorter conversation
    text = qwen.decode(long.prompt_ids)
    assert (
        "You are brief." in text
        and "third question" in text
        and "second word" in text
        and "first" not in text
    )
    _, stats = load_prompt_split(cfg([path], max_prompt_tokens=limit), qwen, "train")  # drop (the default)
    assert (stats.kept, stats.dropped_overlong, stats.truncated) == (1, 1, 0)
    # system + last user turn alone too long: dropped even with left_truncate
    _, stats = load_prompt_split(
        cfg([path], max_prompt_tokens=30, overlong_prompts="left_truncate"), qwen, "train"
    )
    assert (stats.kept, stats.dropped_overlong) == (1, 1)


def test_a_gold_longer_than_max_gold_tokens_is_cut_without_its_end(qwen):
    full, _ = load_prompt_split(cfg(), qwen, "train")
    cut, stats = load_prompt_split(cfg(max_gold_tokens=5), qwen, "train")
    assert all(c.gold_ids == f.gold_ids[:5] for c, f in zip(cut, full) if len(f.gold_ids) > 5)
    assert stats.gold_truncated == sum(len(f.gold_ids) > 5 for f in full) > 0


def test_the_second_load_comes_from_the_cache_until_files_tokenizer_or_settings_change(qwen, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(TRAIN.read_text())
    settings = {"cache_dir": str(tmp_path / "cache")}
    first, stats = load_prompt_split(cfg([path], **settings), qwen, "train")
    again, cached = load_prompt_split(cfg([path], **settings), qwen, "train")
    assert not stats.cached and cached.cached and "from the cache" in cached.summary("train data")
    assert [(e.prompt_id, e.prompt_ids, e.gold_ids, e.row) for e in first] == [
        (e.prompt_id, e.prompt_ids, e.gold_ids, e.row) for e in again
    ]
    assert (cached.kept, cached.dropped_bad, cached.first_bad) == (
        stats.kept,
        stats.dropped_bad,
        stats.first_bad,
    )
    # an example pickles (to another process) as a plain PromptExample with the same fields
    plain = pickle.loads(pickle.dumps(again[5]))
    assert type(plain) is PromptExample and plain == again[5].materialize()
    assert not load_prompt_split(cfg([path], max_prompt_tokens=64, **settings), qwen, "train")[1].cached
    assert not load_prompt_split(cfg([path], system_prompt="Be kind.", **settings), qwen, "train")[1].cached
    qwen_other_template = load_tokenizer(qwen.name_or_path)
    qwen_other_template.chat_template = qwen.chat_template.replace("You are Qwen", "You are Q")
    assert not load_prompt_split(cfg([path], **settings), qwen_other_template, "train")[1].cached
    path.write_text(TRAIN.read_text().replace("Paris", "Paris, on the Seine"))
    examples, stats = load_prompt_split(cfg([path], **settings), qwen, "train")
    assert not stats.cached and "Seine" in qwen.decode(examples[0].gold_ids)
    assert load_prompt_split(cfg([path], **settings), qwen, "train")[1].cached


def test_hub_dataset_by_name_and_split_reads_like_local_files(qwen):
    # the folder is laid out like the hub repository (README configs + data files): the same datasets code path
    hub = cfg([], hub_dataset=str(TINY), hub_config=None, train_split="train_sft", val_split="test_sft")
    examples, stats = load_prompt_split(hub, qwen, "train")
    local, _ = load_prompt_split(cfg(), qwen, "train")
    assert (stats.total, stats.kept) == (26, KEPT)
    assert [(e.prompt_ids, e.gold_ids) for e in examples] == [(e.prompt_ids, e.gold_ids) for e in local]
    val, _ = load_prompt_split(hub, qwen, "val")
    assert len(val) == 4 and "sister" in qwen.decode(val[3].prompt_ids)


def test_worker_processes_give_the_same_tokens_and_pass_errors_on(qwen, monkeypatch, tmp_path):
    """... started by spawn, not fork: a forked worker can inherit a lock some thread of this process held (the
    tokenizer's pool, torch's, the test runner's) and wait for it forever, as one CI run of the suite did."""
    import multiprocess

    one, _ = load_prompt_split(cfg(tokenize_workers=1), qwen, "train")
    monkeypatch.setattr(chat_cache, "_ROWS_PER_WORKER", 5)  # 26 rows: 2 worker processes
    pools, pool = [], multiprocess.Pool
    monkeypatch.setattr(
        multiprocess, "Pool", lambda *a, **k: pools.append(multiprocess.get_start_method()) or pool(*a, **k)
    )
    two, stats = load_prompt_split(
        cfg(tokenize_workers=2, cache_dir=str(tmp_path)), qwen, "train"
    )  # built anew
    assert pools == ["spawn"] and multiprocess.get_start_method(allow_none=True) in (None, "fork")  # restored
    assert [(e.prompt_ids, e.gold_ids) for e in one] == [(e.prompt_ids, e.gold_ids) for e in two]
    assert stats.dropped_bad == 2
    with pytest.raises(ConfigError, match="^row 24 of train data .* ends with a user turn"):
        load_prompt_split(cfg(tokenize_workers=2, bad_rows="error"), qwen, "train")


def test_unreadable_rows_and_a_missing_field_are_one_line_errors(qwen, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(TRAIN.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(ConfigError, match=r"broken.jsonl:2: not valid JSON"):
        load_prompt_split(cfg([broken]), qwen, "train")
    with pytest.raises(ConfigError, match=r"field 'conversation' is missing .* set data.messages_key"):
        load_prompt_split(cfg(messages_key="conversation"), qwen, "train")
    with pytest.raises(ConfigError, match="no conversation of train data .* is usable"):
        load_prompt_split(cfg(max_prompt_tokens=8), qwen, "train")


def test_the_reward_model_is_shown_the_prompt_turns():
    row = ultrachat_rows()[8]
    assert prompt_conversation(row, cfg()) == row["messages"][:-1]
    system = prompt_conversation(row, cfg(system_prompt="Be kind."))
    assert system == [{"role": "system", "content": "Be kind."}, *row["messages"][:-1]]
    from spin_megatron.data import prompt_conversation as data_prompt_conversation

    assert data_prompt_conversation(row, cfg()) == row["messages"][:-1]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.messages_key=messages"], "algorithm.reward=gsm8k scores GSM8K"),
        (["data.messages_key=messages", "algorithm.reward=none", "data.use_chat_template=false"],
         "set data.use_chat_template=true"),
        (["data.messages_key=messages", "algorithm.reward=none", "data.bad_rows=skip"], "data.bad_rows='skip'"),
        (["data.messages_key=messages", "algorithm.reward=none", "algorithm.mode=online", "rollout.n=2"],
         "algorithm.reward=none leaves nothing to rank"),
    ],
)  # fmt: skip
def test_config_refusals(overrides, message):
    from spin_megatron.compose import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(["experiment=tiny_cpu", *overrides])


def test_spin_on_conversations_needs_no_rule_reward():
    from spin_megatron.compose import load_config

    config = load_config(["experiment=tiny_cpu", "data.messages_key=messages", "algorithm.reward=none"])
    assert config.data.has_gold and config.algorithm.rule_reward is None


def test_no_accuracy_is_reported_without_a_rule():
    from collections import defaultdict

    from spin_megatron.algorithm.step_metrics import step_metrics
    from spin_megatron.training.validation import _val_metrics

    gen = {"val/prompts": 4.0, "val/score_sum": 0.0, "val/correct": 0.0, "val/response_length_sum": 8.0,
           "val/eos": 4.0}  # fmt: skip
    assert "val/accuracy" not in _val_metrics(gen, None, rule=False, scored=False)
    assert "val/score_mean" not in _val_metrics(gen, None, rule=False, scored=False)
    assert "val/score_mean" in _val_metrics(gen, None, rule=False, scored=True)  # the reward model scored
    rollout = defaultdict(float, {"samples": 4.0, "reward/scored": 0.0})
    metrics = step_metrics(
        rollout, defaultdict(float), defaultdict(float), grad_norm=None, lr=0.0, times={}, skipped_steps=0
    )
    assert "reward/accuracy" not in metrics and "reward/score_mean" not in metrics


def test_an_sglang_request_carries_the_conversation_prompt_and_the_stop_token_the_gold_ends_with(qwen):
    """The engines see token ids only: a conversation's prompt goes to SGLang's /generate as its ids, with the stop
    token its gold ends with (the real-server e2e runs GSM8K prompts; this is the request-level check)."""
    from spin_megatron.algorithm.experience import sampling_params
    from spin_megatron.config import RolloutConfig
    from spin_megatron.rollout.sglang import protocol

    example = load_prompt_split(cfg(), qwen, "train")[0][13]  # three exchanges
    params = sampling_params(RolloutConfig(n=1), stop_token_ids(qwen), seed=3)
    payload = protocol.generate_payload(example.prompt_ids, params, seed=7)
    assert payload["input_ids"] == example.prompt_ids
    assert qwen.decode(payload["input_ids"]).count("<|im_start|>assistant\n") == 3
    assert example.gold_ids[-1] in payload["sampling_params"]["stop_token_ids"]


def test_a_failed_build_leaves_no_partial_cache_and_an_unwritable_cache_dir_is_one_line(qwen, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match="^row 24 of train data"):
        load_prompt_split(cfg(bad_rows="error", cache_dir=str(cache)), qwen, "train")
    assert [p.suffix for p in cache.iterdir()] == [".lock"]  # no folder, partial or complete
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(ConfigError, match=r"data.cache_dir=.*file cannot be written .* or null"):
        load_prompt_split(cfg(cache_dir=str(blocked)), qwen, "train")
