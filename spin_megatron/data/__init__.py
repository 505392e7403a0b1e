"""Data: prompt datasets (GSM8K-shaped rows or conversations) tokenized into prompt examples, and the sampler
that hands out global batches of them.

- ``rows``: reading a split from local files or a hub dataset;
- ``prompts``: rows → :class:`PromptExample` (prompt ids, gold ids, the row the reward scores against);
- ``chat`` / ``chat_cache``: conversations split at their last assistant turn, tokenized once and cached;
- ``sampler``: :class:`PromptSampler` (epochs, no prompt twice in a batch, resumable) and ``shard``;
- ``tokenizer``: which tokenizer a run loads.
"""

from spin_megatron.data.prompts import (
    DataStats,
    PromptExample,
    build_examples,
    gold_terminator,
    load_prompt_split,
    prompt_conversation,
)
from spin_megatron.data.rows import load_rows
from spin_megatron.data.sampler import PromptSampler, shard
from spin_megatron.data.tokenizer import load_tokenizer, tokenizer_dir

__all__ = [
    "DataStats",
    "PromptExample",
    "PromptSampler",
    "build_examples",
    "gold_terminator",
    "load_prompt_split",
    "load_rows",
    "load_tokenizer",
    "prompt_conversation",
    "shard",
    "tokenizer_dir",
]
