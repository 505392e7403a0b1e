"""Prompt datasets: rows tokenized into :class:`PromptExample` s (GSM8K's shape: a question column and an answer
column; conversations, ``data.messages_key``, go through :mod:`spin_megatron.data.chat_cache`).

Every prompt keeps ``prompt_id`` = its row index in the source dataset, so samples, pairs and metrics can be traced
back to the row, and ``row`` = the raw row the reward function scores against (GSM8K: ``row["answer"]``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import datasets

from spin_megatron.config import DataConfig
from spin_megatron.data.rows import _first_line, load_rows
from spin_megatron.errors import ConfigError

# GSM8K's calculator annotations, e.g. "48/2 = <<48/2=24>>24": the model should not learn to emit them.
_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


@dataclass
class PromptExample:
    prompt_id: int  # row index in the source dataset: stable across runs, shuffles and drops
    prompt_ids: list[int]  # the prompt as the policy sees it (chat template applied)
    gold_ids: list[int]  # the dataset's response + turn terminator (SPIN's chosen); none when cut short
    row: dict = field(repr=False)  # the raw row; reward functions read e.g. row["answer"]


@dataclass
class DataStats:
    total: int = 0  # rows in the split
    kept: int = 0  # prompts that became examples
    dropped_overlong: int = 0  # prompts longer than data.max_prompt_tokens, dropped
    truncated: int = 0  # prompts longer than data.max_prompt_tokens, left-truncated
    gold_truncated: int = 0  # gold responses cut to data.max_gold_tokens (they get no terminator)
    max_prompt_tokens: int = 0  # longest kept prompt
    seconds: float = 0.0  # time spent rendering and tokenizing

    def summary(self, split_name: str) -> str:
        return (
            f"{split_name}: {self.kept}/{self.total} prompts kept, {self.dropped_overlong} dropped and "
            f"{self.truncated} truncated as overlong, {self.gold_truncated} gold responses truncated, "
            f"longest prompt {self.max_prompt_tokens} tokens ({self.seconds:.2f}s)"
        )


def _column(rows, key: str, cfg_key: str, split_name: str) -> list:
    columns = (
        rows.column_names if isinstance(rows, datasets.Dataset) else sorted({k for r in rows for k in r})
    )
    if key not in columns:
        raise ConfigError(
            f"field {key!r} is missing in {split_name}; its rows have keys {columns}; "
            f"set {cfg_key} to one of them"
        )
    if isinstance(rows, datasets.Dataset):
        return list(rows[key])
    return [row.get(key) for row in rows]


def _prompt_texts(questions: list, cfg: DataConfig, split_name: str) -> list[str]:
    texts = []
    for index, question in enumerate(questions):
        if question is None or (isinstance(question, str) and not question.strip()):
            raise ConfigError(
                f"row {index} of {split_name} has an empty prompt ({cfg.prompt_key!r}); fix or remove that row"
            )
        if not isinstance(question, str):
            raise ConfigError(
                f"row {index} of {split_name}: prompt field {cfg.prompt_key!r} holds {type(question).__name__}, "
                "not text; set data.prompt_key to a text field"
            )
        texts.append(_with_instruction(question, cfg))
    return texts


def _with_instruction(question: str, cfg: DataConfig) -> str:
    return f"{question}\n{cfg.instruction}" if cfg.instruction else question


def _system_messages(cfg: DataConfig) -> list[dict[str, str]]:
    return [] if cfg.system_prompt is None else [{"role": "system", "content": cfg.system_prompt}]


def prompt_conversation(row: dict, cfg: DataConfig) -> list[dict[str, str]]:
    """The prompt of a dataset row as chat messages (system, user), as the policy's template renders it: what a
    reward model is shown before the response. Conversations (``data.messages_key``): the turns before the last
    assistant turn."""
    if cfg.messages_key is not None:
        from spin_megatron.data.chat import prompt_conversation as conversation_prompt

        return conversation_prompt(row, cfg)
    return [
        *_system_messages(cfg),
        {"role": "user", "content": _with_instruction(str(row[cfg.prompt_key]), cfg)},
    ]


def _gold_texts(answers: list, cfg: DataConfig, split_name: str) -> list[str]:
    texts = []
    for index, answer in enumerate(answers):
        if answer is None:
            raise ConfigError(
                f"row {index} of {split_name} has no answer ({cfg.answer_key!r}); fix or remove that row"
            )
        answer = str(answer)
        texts.append(_CALCULATOR_ANNOTATION.sub("", answer) if cfg.strip_calculator_annotations else answer)
    return texts


def _tokenize_prompts(texts: list[str], tokenizer, cfg: DataConfig) -> list[list[int]]:
    if not cfg.use_chat_template:
        return tokenizer(texts, add_special_tokens=True)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"tokenizer {tokenizer.name_or_path} has no chat template; set data.use_chat_template=false"
        )
    conversations = [[*_system_messages(cfg), {"role": "user", "content": text}] for text in texts]
    rendered = tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
    # The template already wrote every special token (BOS included, where a model has one).
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


_PROBE = "SPIN_GOLD_PROBE"  # assistant content: the template's turn terminator follows it


def _special_ids(tokenizer) -> set[int]:
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return set(tokenizer.all_special_ids) | {token_id for token_id, token in added.items() if token.special}


def gold_terminator(tokenizer, cfg: DataConfig) -> list[int]:
    """The token(s) that end a finished gold response, as the policy's own samples end.

    With ``data.use_chat_template``: what the template writes right after an assistant turn's content, up to
    and including its first special token, whitespace left out (Qwen2.5: ``<|im_end|>``, also for the base
    tokenizer whose EOS is ``<|endoftext|>``; Llama 3: ``<|eot_id|>``). A template that writes no special
    token there, or plain-text prompts, end with the tokenizer's EOS.
    """
    if cfg.use_chat_template and getattr(tokenizer, "chat_template", None):
        conversation = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": _PROBE}]
        try:
            rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
        except Exception as err:  # a jinja TemplateError or the template's own raise_exception
            raise ConfigError(
                f"the chat template of tokenizer {tokenizer.name_or_path} cannot render an assistant turn "
                f"({type(err).__name__}: {_first_line(err)}); fix the template or set data.use_chat_template=false"
            ) from err
        start = rendered.rfind(_PROBE)
        if start >= 0:
            after = tokenizer(rendered[start + len(_PROBE) :], add_special_tokens=False)["input_ids"]
            special, kept = _special_ids(tokenizer), []
            for token in after:
                if token in special:
                    return [*kept, token]
                if tokenizer.decode([token]).strip():
                    kept.append(token)
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            f"tokenizer {tokenizer.name_or_path} has no EOS token (and its chat template no end-of-turn token); "
            "use a tokenizer that defines one"
        )
    return [tokenizer.eos_token_id]


def build_examples(
    rows, tokenizer, cfg: DataConfig, *, split_name: str
) -> tuple[list[PromptExample], DataStats]:
    """Tokenized prompts and gold responses of ``rows`` (a ``datasets.Dataset`` or a list of dicts).

    Prompts longer than ``cfg.max_prompt_tokens`` are dropped or keep their last ``max_prompt_tokens`` tokens
    (``cfg.overlong_prompts``); both are counted in the returned stats. A gold response ends with
    :func:`gold_terminator`, unless it does not fit in ``cfg.max_gold_tokens``: then it keeps its first
    ``max_gold_tokens`` tokens and no terminator (it did not end), counted as ``gold_truncated``.
    ``split_name`` names the rows in errors.
    """
    started = time.perf_counter()
    stats = DataStats(total=len(rows))
    if stats.total == 0:
        raise ConfigError(f"{split_name} has no rows")
    terminator = gold_terminator(tokenizer, cfg)
    questions = _column(rows, cfg.prompt_key, "data.prompt_key", split_name)
    prompt_ids = _tokenize_prompts(_prompt_texts(questions, cfg, split_name), tokenizer, cfg)
    if cfg.answer_key is None:  # prompts only (online mode with a reward model): no gold responses
        gold_ids = [[] for _ in questions]
    else:
        answers = _column(rows, cfg.answer_key, "data.answer_key", split_name)
        gold_ids = tokenizer(_gold_texts(answers, cfg, split_name), add_special_tokens=False)["input_ids"]
    records = rows.to_list() if isinstance(rows, datasets.Dataset) else [dict(r) for r in rows]

    examples = []
    for index, (prompt, gold, row) in enumerate(zip(prompt_ids, gold_ids, records)):
        if len(prompt) > cfg.max_prompt_tokens:
            if cfg.overlong_prompts == "drop":
                stats.dropped_overlong += 1
                continue
            prompt = prompt[-cfg.max_prompt_tokens :]  # keep the end: the question and the generation prompt
            stats.truncated += 1
        if cfg.answer_key is None:
            gold = []
        elif len(gold) + len(terminator) > cfg.max_gold_tokens:
            gold = list(gold[: cfg.max_gold_tokens])
            stats.gold_truncated += 1
        else:
            gold = [*gold, *terminator]
        examples.append(PromptExample(prompt_id=index, prompt_ids=list(prompt), gold_ids=gold, row=row))
        stats.max_prompt_tokens = max(stats.max_prompt_tokens, len(prompt))
    stats.kept = len(examples)
    stats.seconds = time.perf_counter() - started
    if not examples:
        raise ConfigError(
            f"all {stats.total} prompts of {split_name} are longer than data.max_prompt_tokens="
            f"{cfg.max_prompt_tokens}; raise it or set data.overlong_prompts=left_truncate"
        )
    return examples, stats


def load_prompt_split(cfg: DataConfig, tokenizer, split: str) -> tuple[list[PromptExample], DataStats]:
    """``split`` = "train" | "val": load_rows + build_examples with the matching config keys.

    Validation keeps the first ``cfg.val_max_prompts`` examples (after overlong prompts were handled).
    Conversations (``data.messages_key``) are loaded by :func:`spin_megatron.data.chat_cache.load_chat_split`.
    """
    assert split in ("train", "val"), split
    if cfg.messages_key is not None:
        from spin_megatron.data.chat_cache import load_chat_split

        return load_chat_split(cfg, tokenizer, split)
    files = cfg.train_files if split == "train" else cfg.val_files
    hub_split = cfg.train_split if split == "train" else cfg.val_split
    setting = f"data.{split}_files"
    rows = load_rows(
        files, hub_dataset=cfg.hub_dataset, hub_config=cfg.hub_config, split=hub_split, setting=setting
    )
    where = ", ".join(map(str, files)) if files else f"hub {cfg.hub_dataset}:{hub_split}"
    examples, stats = build_examples(rows, tokenizer, cfg, split_name=f"{split} data ({where})")
    if split == "val" and cfg.val_max_prompts is not None:
        examples = examples[: cfg.val_max_prompts]
    return examples, stats
