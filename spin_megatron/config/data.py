"""``data.*``: the prompt datasets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from spin_megatron.config.common import (
    _choice,
    _default_files,
    _file_list,
    _positive,
)
from spin_megatron.errors import ConfigError


@dataclass(kw_only=True)
class DataConfig:
    # local .jsonl/.parquet files: a list or one path (typed Any so that Hydra takes a plain path too)
    train_files: Any = field(default_factory=lambda: _default_files("train"))
    val_files: Any = field(default_factory=lambda: _default_files("test"))  # as train_files
    hub_dataset: str = "openai/gsm8k"  # used when the *_files lists are empty (needs network)
    hub_config: str | None = "main"  # the hub dataset's configuration name
    train_split: str = "train"  # hub split for training
    val_split: str = "test"  # hub split for validation
    prompt_key: str = "question"  # field holding the prompt text
    # field holding the gold response (SPIN's chosen; GSM8K's '#### n' answer); null: prompts only (online mode)
    answer_key: str | None = "answer"
    instruction: str = 'Let\'s think step by step and output the final answer after "####".'  # appended
    system_prompt: str | None = None  # None: the chat template's default
    use_chat_template: bool = True  # wrap prompts with the tokenizer's chat template
    max_prompt_tokens: int = 512  # longer prompts are dropped or left-truncated
    # drop | left_truncate (keep the last tokens; conversations: drop whole earliest turns, keeping the system
    # turn and the last user turn)
    overlong_prompts: str = "drop"
    # SPIN chosen: gold tokens + the chat template's end-of-turn token; a longer gold is cut here, unterminated
    max_gold_tokens: int = 512
    strip_calculator_annotations: bool = True  # remove GSM8K's <<48/2=24>> from gold responses
    shuffle: bool = True  # reshuffle the training prompts every epoch
    seed: int = 1  # shuffling seed
    val_max_prompts: int | None = 128  # validate on the first N val prompts (None: all)
    # field holding a conversation, a list of {role, content} (UltraChat's messages, uclaml's real or chosen):
    # prompt = every turn before the last assistant turn, gold = that turn (spin_megatron/data/chat.py);
    # prompt_key, answer_key, instruction and strip_calculator_annotations are then not used
    messages_key: str | None = None
    # conversations that end with a user turn, have no assistant turn or unknown roles: drop (counted) | error
    bad_rows: str = "drop"
    # tokenized conversations are kept here, keyed by files, tokenizer, chat template and data.* settings, and
    # loaded from here on the next start and on resume; null: no cache
    cache_dir: str | None = "~/.cache/spin_megatron/data"
    tokenize_workers: int = 0  # processes tokenizing conversations; 0: one per CPU core, at most 8

    def __post_init__(self):
        self.train_files = _file_list("data.train_files", self.train_files)
        self.val_files = _file_list("data.val_files", self.val_files)
        _choice("data.overlong_prompts", self.overlong_prompts, ("drop", "left_truncate"))
        _choice("data.bad_rows", self.bad_rows, ("drop", "error"))
        _positive("data.max_prompt_tokens", self.max_prompt_tokens)
        _positive("data.max_gold_tokens", self.max_gold_tokens)
        _positive("data.tokenize_workers", self.tokenize_workers, zero_ok=True)
        if self.val_max_prompts is not None:
            _positive("data.val_max_prompts", self.val_max_prompts)
        if self.messages_key is not None and not self.messages_key:
            raise ConfigError("data.messages_key must name a field (e.g. messages), or be null")
        if self.messages_key is not None and not self.use_chat_template:
            raise ConfigError(
                "data.messages_key renders conversations with the chat template: set data.use_chat_template=true"
            )

    @property
    def has_gold(self) -> bool:
        """Rows carry a reference response (SPIN's chosen): an answer field, or a conversation's last turn."""
        return self.messages_key is not None or self.answer_key is not None
