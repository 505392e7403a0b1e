import json

import datasets
import pytest

from spin_megatron.config import DataConfig
from spin_megatron.data import (
    PromptExample,
    PromptSampler,
    build_examples,
    gold_terminator,
    load_prompt_split,
    load_rows,
    load_tokenizer,
    shard,
)
from spin_megatron.errors import ConfigError, MissingPathError

EOS = 151645  # <|im_end|>


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    return load_tokenizer(str(qwen_tokenizer_dir))


@pytest.fixture(scope="module")
def test_rows(gsm8k_dir):
    return load_rows(
        [str(gsm8k_dir / "test.jsonl")], hub_dataset="openai/gsm8k", hub_config="main", split="test"
    )


@pytest.fixture(scope="module")
def few_rows(test_rows):
    return test_rows.select(range(20))


def cfg(**overrides) -> DataConfig:
    return DataConfig(**{"train_files": [], "val_files": [], **overrides})


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_gsm8k_examples_have_chat_prompt_and_clean_gold_ending_in_eos(tokenizer, test_rows):
    examples, stats = build_examples(test_rows, tokenizer, cfg(), split_name="gsm8k test")
    assert (stats.total, stats.kept, stats.dropped_overlong, stats.truncated) == (1319, 1319, 0, 0)
    assert stats.seconds < 10  # batched: ~0.4 s here, ~2.3 s for the 7473 train rows (2 CPU cores)
    assert [e.prompt_id for e in examples] == list(range(1319))
    first = examples[0]
    prompt = tokenizer.decode(first.prompt_ids)
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert test_rows[0]["question"] in prompt and 'final answer after "####"' in prompt
    assert all(e.gold_ids[-1] == EOS for e in examples)
    gold_texts = [tokenizer.decode(e.gold_ids[:-1]) for e in examples]
    assert not any("<<" in text for text in gold_texts)
    assert sum("<<" in e.row["answer"] for e in examples) > 1000  # the raw row keeps the annotations
    assert gold_texts[0].rstrip().endswith("#### " + first.row["answer"].split("####")[-1].strip())


def test_plain_text_prompt_and_system_prompt(tokenizer, few_rows):
    (plain, *_), _ = build_examples(
        few_rows, tokenizer, cfg(use_chat_template=False, instruction=""), split_name="t"
    )
    assert tokenizer.decode(plain.prompt_ids) == few_rows[0]["question"]
    (chat, *_), _ = build_examples(few_rows, tokenizer, cfg(system_prompt="Be brief."), split_name="t")
    assert tokenizer.decode(chat.prompt_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_a_gold_cut_at_max_gold_tokens_gets_no_terminator(tokenizer, few_rows):
    full, _ = build_examples(few_rows, tokenizer, cfg(), split_name="t")
    examples, stats = build_examples(few_rows, tokenizer, cfg(max_gold_tokens=8), split_name="t")
    assert all(e.gold_ids == f.gold_ids[:8] and EOS not in e.gold_ids for e, f in zip(examples, full))
    assert stats.gold_truncated == 20 and "20 gold responses truncated" in stats.summary("t")


def test_max_gold_tokens_boundary(tokenizer, few_rows):
    row = few_rows.select([0])
    (example,), _ = build_examples(row, tokenizer, cfg(), split_name="t")
    text_tokens = len(example.gold_ids) - 1  # the gold's own tokens, then <|im_end|>
    (fits,), stats = build_examples(row, tokenizer, cfg(max_gold_tokens=text_tokens + 1), split_name="t")
    assert fits.gold_ids == example.gold_ids and stats.gold_truncated == 0
    (cut,), stats = build_examples(row, tokenizer, cfg(max_gold_tokens=text_tokens), split_name="t")
    assert cut.gold_ids == example.gold_ids[:-1] and stats.gold_truncated == 1  # complete text, yet no end


# ---------------------------------------------------------------------------------------------- gold terminator

# A Llama-3-style chat template (header tokens around the role, <|eot_id|> after each turn's content).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.fixture(scope="module")
def base_tokenizer(qwen_tokenizer_dir):
    """Qwen2.5's tokenizer as the base model ships it: EOS <|endoftext|> (151643), same ChatML template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir), eos_token="<|endoftext|>")
    assert tok.eos_token_id == 151643 and "<|im_end|>" in tok.chat_template
    return tok


@pytest.fixture
def custom_tokenizer(qwen_tokenizer_dir):
    """``custom_tokenizer(template)``: a fresh Qwen2.5 tokenizer with Llama-3's special tokens and ``template``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))
    tok.add_special_tokens(
        {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|end_of_text|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "</s>"],
        }
    )

    def make(template):
        tok.chat_template = template
        return tok

    return make


def test_qwen_instruct_gold_ends_with_im_end(tokenizer):
    assert tokenizer.eos_token_id == EOS  # the shared tokenizer is the instruct one: EOS is <|im_end|>
    assert gold_terminator(tokenizer, cfg()) == [EOS]


def test_qwen_base_gold_ends_with_the_templates_im_end_not_eos(base_tokenizer, few_rows):
    assert gold_terminator(base_tokenizer, cfg()) == [EOS]  # what the chat template ends a turn with
    examples, _ = build_examples(few_rows, base_tokenizer, cfg(), split_name="t")
    assert all(e.gold_ids[-1] == EOS and 151643 not in e.gold_ids for e in examples)
    plain, _ = build_examples(few_rows, base_tokenizer, cfg(use_chat_template=False), split_name="t")
    assert all(e.gold_ids[-1] == 151643 for e in plain)  # no template: the tokenizer's EOS


def test_llama3_style_gold_ends_with_eot_id(custom_tokenizer, few_rows):
    tok = custom_tokenizer(LLAMA3_TEMPLATE)
    eot, end_of_text = tok.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    assert tok.eos_token_id == end_of_text != eot
    assert gold_terminator(tok, cfg()) == [eot]
    examples, _ = build_examples(few_rows, tok, cfg(system_prompt="Be brief."), split_name="t")
    assert all(e.gold_ids[-1] == eot for e in examples)
    assert tok.decode(examples[0].prompt_ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_whitespace_before_the_end_token_is_left_out(custom_tokenizer):
    # Llama-2-style: " " + content + " " + eos; the gold ends with </s> alone, as the sampled responses do.
    tok = custom_tokenizer(
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }} \n</s>\n{% endif %}{% endfor %}"
    )
    assert gold_terminator(tok, cfg()) == tok.convert_tokens_to_ids(["</s>"])


def test_a_template_without_an_end_token_falls_back_to_eos(custom_tokenizer):
    tok = custom_tokenizer("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    assert gold_terminator(tok, cfg()) == [tok.eos_token_id]


def test_a_template_that_cannot_render_an_assistant_turn_is_a_config_error(custom_tokenizer):
    tok = custom_tokenizer("{% for m in messages %}{{ raise_exception('user turns only') }}{% endfor %}")
    with pytest.raises(ConfigError, match="cannot render an assistant turn.*user turns only"):
        gold_terminator(tok, cfg())


def test_overlong_prompts_are_dropped_or_left_truncated_and_counted(tokenizer, few_rows):
    full, _ = build_examples(few_rows, tokenizer, cfg(), split_name="t")
    lengths = sorted(len(e.prompt_ids) for e in full)
    limit = lengths[10]
    overlong = sum(n > limit for n in lengths)
    kept, stats = build_examples(few_rows, tokenizer, cfg(max_prompt_tokens=limit), split_name="t")
    assert (stats.total, stats.kept, stats.dropped_overlong, stats.truncated) == (
        20,
        20 - overlong,
        overlong,
        0,
    )
    assert {e.prompt_id for e in kept} == {e.prompt_id for e in full if len(e.prompt_ids) <= limit}
    cut, stats = build_examples(
        few_rows, tokenizer, cfg(max_prompt_tokens=limit, overlong_prompts="left_truncate"), split_name="t"
    )
    assert (stats.kept, stats.dropped_overlong, stats.truncated) == (20, 0, overlong)
    for short, long in zip(cut, full):
        assert short.prompt_ids == long.prompt_ids[-limit:]  # the end (question + generation prompt) survives


def test_all_prompts_too_long_is_a_config_error(tokenizer, few_rows):
    with pytest.raises(ConfigError, match=r"all 20 prompts of t are longer than data.max_prompt_tokens=5"):
        build_examples(few_rows, tokenizer, cfg(max_prompt_tokens=5), split_name="t")


def test_missing_field_names_the_file_the_keys_and_the_setting(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": "1+1?", "solution": "#### 2"}])
    with pytest.raises(ConfigError) as err:
        load_prompt_split(cfg(train_files=[str(path)]), tokenizer, "train")
    message = str(err.value)
    assert "'question'" in message and str(path) in message and "data.prompt_key" in message
    assert "['problem', 'solution']" in message and "\n" not in message
    with pytest.raises(ConfigError, match="data.answer_key"):
        load_prompt_split(cfg(train_files=[str(path)], prompt_key="problem"), tokenizer, "train")


def test_empty_prompt_names_the_row(tokenizer):
    rows = [{"question": "2+2?", "answer": "#### 4"}, {"question": "  ", "answer": "#### 1"}]
    with pytest.raises(ConfigError, match=r"row 1 of t has an empty prompt"):
        build_examples(rows, tokenizer, cfg(), split_name="t")


def test_malformed_jsonl_line_is_reported_as_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answer": "1"}\n\n{"question": "b", "answer": \n')
    with pytest.raises(ConfigError, match=rf"^{path}:3: not valid JSON \("):
        load_rows([str(path)], hub_dataset="x", hub_config=None, split="train")


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(MissingPathError, match=r"nope.jsonl does not exist; fix data.val_files"):
        load_rows(
            [str(tmp_path / "nope.jsonl")],
            hub_dataset="x",
            hub_config=None,
            split="t",
            setting="data.val_files",
        )
    (tmp_path / "d.csv").write_text("question,answer\n")
    with pytest.raises(ConfigError, match=r"d.csv has an unsupported extension"):
        load_rows([str(tmp_path / "d.csv")], hub_dataset="x", hub_config=None, split="t")


def test_unreadable_parquet_and_mixed_types_are_config_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match=r"bad.parquet: not a readable parquet file"):
        load_rows([str(tmp_path / "bad.parquet")], hub_dataset="x", hub_config=None, split="t")
    path = write_jsonl(
        tmp_path / "mixed.jsonl", [{"question": "a", "answer": 1}, {"question": "b", "answer": "x"}]
    )
    with pytest.raises(ConfigError, match=r"mixed.jsonl: rows do not share one schema"):
        load_rows([str(path)], hub_dataset="x", hub_config=None, split="t")


def test_unreachable_hub_without_local_files_is_a_config_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match=r"no local files were given \(data.train_files is empty\)"):
        load_rows([], hub_dataset="openai/gsm8k", hub_config="main", split="train")


def test_parquet_and_json_array_load_like_jsonl(tmp_path, monkeypatch, few_rows):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    few_rows.to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.json").write_text(json.dumps(few_rows.to_list()))
    for name in ("d.parquet", "d.json"):
        rows = load_rows([str(tmp_path / name)], hub_dataset="x", hub_config=None, split="t")
        assert rows.to_list() == few_rows.to_list()
    both = load_rows(
        [str(tmp_path / "d.json"), str(tmp_path / "d.parquet")], hub_dataset="x", hub_config=None, split="t"
    )
    assert len(both) == 40


def test_load_tokenizer_missing_path_and_offline_hub_name(tmp_path, monkeypatch):
    with pytest.raises(MissingPathError, match="model.tokenizer_path"):
        load_tokenizer(str(tmp_path / "no-tokenizer"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingPathError, match=r"HF_HUB_OFFLINE=1, hub not tried"):
        load_tokenizer("Qwen/Qwen2.5-0.5B-Instruct")


def fake_examples(count: int) -> list[PromptExample]:
    return [PromptExample(prompt_id=i, prompt_ids=[i], gold_ids=[0], row={}) for i in range(count)]


def ids(batch) -> list[int]:
    return [e.prompt_id for e in batch]


def test_sampler_is_deterministic_and_never_repeats_a_prompt_in_a_batch():
    examples = fake_examples(10)
    a, b = PromptSampler(examples, seed=3), PromptSampler(examples, seed=3)
    stream = [ids(a.next_batch(5)) for _ in range(4)]  # 20 prompts = exactly two epochs
    assert stream == [ids(b.next_batch(5)) for _ in range(4)]
    flat = sum(stream, [])
    assert sorted(flat[:10]) == sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # reshuffled with seed + epoch
    assert a.epoch == 1 and a.index == 10
    assert ids(PromptSampler(examples, seed=4).next_batch(10)) != flat[:10]
    # 4 per batch from 10: each epoch gives two batches and skips its last 2 prompts (never a repeat)
    c = PromptSampler(examples, seed=3)
    batches = [ids(c.next_batch(4)) for _ in range(30)]
    assert all(len(set(batch)) == 4 for batch in batches)
    assert [c.epoch, c.index] == [14, 8]
    for epoch in range(15):  # each epoch: 8 distinct prompts of that epoch's permutation, in its order
        order = list(PromptSampler(examples, seed=3)._epoch_order(epoch))
        assert batches[2 * epoch] + batches[2 * epoch + 1] == order[:8]
    plain = PromptSampler(examples, shuffle=False)
    assert [ids(plain.next_batch(4)) for _ in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match=r"num_prompts must be in \[1, 10\]"):
        PromptSampler(examples).next_batch(11)


def test_sampler_with_five_prompts_and_four_per_step_never_repeats():
    """The audit's case (issue 22 A1): 5 rows, 4 prompts per step — the old sampler's second batch was
    [4, then 3 of the next epoch] and met a prompt twice whenever the permutations overlapped."""
    sampler = PromptSampler(fake_examples(5), seed=1)
    for _ in range(50):
        batch = ids(sampler.next_batch(4))
        assert len(set(batch)) == 4, batch


def test_sampler_state_dict_resumes_with_the_same_prompts():
    examples = fake_examples(7)
    original = PromptSampler(examples, seed=5)
    for _ in range(3):
        original.next_batch(3)
    state = json.loads(json.dumps(original.state_dict()))  # survives a checkpoint round trip
    resumed = PromptSampler(examples, seed=5)
    resumed.load_state_dict(state)
    assert [ids(resumed.next_batch(3)) for _ in range(6)] == [ids(original.next_batch(3)) for _ in range(6)]
    with pytest.raises(ConfigError, match="num_examples=7"):
        PromptSampler(fake_examples(8), seed=5).load_state_dict(state)


def test_shard_is_contiguous_and_balanced():
    batch = list(range(10))
    shards = [shard(batch, rank, 4) for rank in range(4)]
    assert [len(s) for s in shards] == [3, 3, 2, 2]
    assert sum(shards, []) == batch
    assert PromptSampler.shard(batch, 0, 1) == batch
    with pytest.raises(ValueError):
        shard(batch, 4, 4)


def test_validation_split_keeps_the_first_val_max_prompts(tokenizer, gsm8k_dir):
    data_cfg = cfg(val_files=[str(gsm8k_dir / "test.jsonl")], val_max_prompts=16)
    examples, stats = load_prompt_split(data_cfg, tokenizer, "val")
    assert ids(examples) == list(range(16)) and stats.kept == 1319


def test_stop_tokens_are_eos_and_special_end_of_turn_tokens_only(tokenizer):
    """Qwen2.5's vocabulary holds "</s>" as ordinary text (id 128247): a sample writing it must not stop."""
    from spin_megatron.algorithm.experience import stop_token_ids

    assert stop_token_ids(tokenizer) == (151643, 151645)  # <|endoftext|>, <|im_end|>
