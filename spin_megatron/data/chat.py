"""Conversations as SPIN data: a row holds a list of ``{role, content}`` turns (``data.messages_key``).

The prompt is every turn before the last assistant turn, rendered with the policy's chat template and its
generation prompt; the gold (SPIN's chosen) is the rest of the template's rendering of the whole conversation,
up to and including the template's end-of-turn token (:func:`spin_megatron.data.gold_terminator`), which is the
token the rollout stops at. So ``prompt ids + gold ids`` is the template's rendering of the conversation, except
for what the template writes after the end-of-turn (Qwen's ``<|im_end|>`` is followed by a newline): that text
is not part of the gold, because a sample ends at the stop token and never contains it either.

Rows that end with a user turn, have no assistant turn, no user turn before it or unknown roles are refused
with their row number (``data.bad_rows=error``) or dropped and counted (``drop``). Over-long prompts
(``data.max_prompt_tokens``) are dropped, or with ``data.overlong_prompts=left_truncate`` lose whole earliest
exchanges (a user turn and what follows it up to the next user turn), keeping the leading system turns and the
last user turn; a prompt still too long then is dropped. The loading and caching of whole datasets is in
:mod:`spin_megatron.data.chat_cache`.
"""

from __future__ import annotations

from collections.abc import Mapping

from spin_megatron.config import DataConfig
from spin_megatron.errors import ConfigError

ROLES = ("system", "user", "assistant")

# columns the tokenization adds to the rows (the raw columns stay: they are the ``row`` reward functions see)
PROMPT_IDS = "spin_prompt_ids"
GOLD_IDS = "spin_gold_ids"
DROPPED = "spin_dropped"  # "": kept | "overlong" | why the row is malformed
CUT_TURNS = "spin_cut_turns"  # turns removed by left_truncate
GOLD_CUT = "spin_gold_cut"  # gold longer than data.max_gold_tokens, kept without its end-of-turn
ADDED_COLUMNS = (PROMPT_IDS, GOLD_IDS, DROPPED, CUT_TURNS, GOLD_CUT)
OVERLONG = "overlong"


class BadRow(ValueError):
    """A conversation SPIN cannot train on; the message says why, without the row number."""


def split_conversation(messages, cfg: DataConfig) -> tuple[list[dict[str, str]], dict[str, str]]:
    """(prompt turns, last assistant turn) of a conversation, each turn reduced to ``{role, content}``;
    ``data.system_prompt`` becomes the first turn when the conversation has no system turn of its own.
    Raises :class:`BadRow`."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadRow("has no turns" if not messages else f"is {type(messages).__name__}, not a list of turns")
    turns = []
    for number, turn in enumerate(messages):
        if not isinstance(turn, Mapping):
            raise BadRow(f"has turn {number} of type {type(turn).__name__}, not a {{role, content}} object")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise BadRow(f"has turn {number} with unknown role {role!r} (known: {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise BadRow(f"has turn {number} ({role}) without text content")
        turns.append({"role": role, "content": content})
    roles = [turn["role"] for turn in turns]
    if "assistant" not in roles:
        raise BadRow("has no assistant turn")
    if roles[-1] != "assistant":
        raise BadRow(f"ends with a {roles[-1]} turn, not an assistant turn")
    if "user" not in roles[:-1]:
        raise BadRow("has no user turn before its last assistant turn")
    if not turns[-1]["content"].strip():
        raise BadRow("has an empty last assistant turn")
    prompt = turns[:-1]
    if cfg.system_prompt is not None and roles[0] != "system":
        prompt.insert(0, {"role": "system", "content": cfg.system_prompt})
    return prompt, turns[-1]


def prompt_conversation(row: Mapping, cfg: DataConfig) -> list[dict[str, str]]:
    """The prompt turns of a (kept) row, before any left truncation: what a reward model is shown before the
    response (its own ``max_length`` cuts an over-long conversation from the left)."""
    return split_conversation(row[cfg.messages_key], cfg)[0]


def shorter_prompts(prompt: list[dict[str, str]]):
    """``(turns removed, prompt)`` with 1, 2, ... whole earliest exchanges removed: the leading system turns and
    everything from the last user turn on are kept, and each removed exchange ends where the next user turn
    starts, so the conversation still alternates."""
    lead = 0
    while prompt[lead]["role"] == "system":
        lead += 1
    last_user = max(i for i, turn in enumerate(prompt) if turn["role"] == "user")
    starts = [i for i in range(lead + 1, last_user + 1) if prompt[i]["role"] == "user"]
    for start in starts:
        yield start - lead, prompt[:lead] + prompt[start:]


def _find_last(ids: list[int], pattern: list[int]) -> int:
    """Start of the last occurrence of ``pattern`` in ``ids``, or -1."""
    n = len(pattern)
    for start in range(len(ids) - n, -1, -1):
        if ids[start : start + n] == pattern:
            return start
    return -1


class ConversationEncoder:
    """Renders and tokenizes conversations; ``__call__`` is a batched ``datasets.map`` function."""

    def __init__(self, tokenizer, cfg: DataConfig, terminator: list[int], split_name: str):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"data.messages_key={cfg.messages_key} renders conversations with the chat template, but tokenizer "
                f"{tokenizer.name_or_path} has none; use a tokenizer with a chat template (model.tokenizer_path)"
            )
        self.tokenizer, self.cfg, self.terminator, self.split_name = tokenizer, cfg, terminator, split_name

    def _render(self, conversations: list[list[dict]], *, generation_prompt: bool) -> list[str]:
        if not conversations:  # (transformers takes an empty list for an empty conversation)
            return []
        return self.tokenizer.apply_chat_template(
            conversations, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        # the template already wrote every special token (BOS included, where a model has one)
        if not texts:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "encode_batch_fast"):  # the same ids, without offsets: 2x
            return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _gold_texts(self, prompts: list[list[dict]], answers: list[dict], prompt_texts: list[str], rows):
        fulls = self._render([[*p, a] for p, a in zip(prompts, answers)], generation_prompt=False)
        for row, full, prompt_text in zip(rows, fulls, prompt_texts):
            if not full.startswith(prompt_text):
                raise ConfigError(
                    f"row {row} of {self.split_name}: the chat template renders the whole conversation with a "
                    "different beginning than its prompt and generation prompt, so prompt + gold cannot equal "
                    "the conversation; use a template that renders earlier turns the same way (or another tokenizer)"
                )
        return [full[len(prompt_text) :] for full, prompt_text in zip(fulls, prompt_texts)]

    def _gold(self, gold_ids: list[int], gold_text: str) -> tuple[list[int], bool]:
        """(gold ids ending with the end-of-turn, or cut at max_gold_tokens without it; whether cut)."""
        end = _find_last(gold_ids, self.terminator)
        if end >= 0:
            body = gold_ids[:end]
        else:  # a template that writes no end-of-turn token: the gold ends with the EOS the rollout stops at
            body = self._tokenize([gold_text.rstrip()])[0]
        if len(body) + len(self.terminator) > self.cfg.max_gold_tokens:
            return body[: self.cfg.max_gold_tokens], True
        return [*body, *self.terminator], False

    def _fit(self, prompt: list[dict]) -> tuple[int, list[dict], str, list[int]] | None:
        """(cut turns, turns, text, ids) of the longest left-truncated prompt that fits, or None. Shorter
        candidates are never longer in tokens, so a binary search finds it in a few tokenizations."""
        candidates = list(shorter_prompts(prompt))
        best, low, high = None, 0, len(candidates) - 1
        while low <= high:
            middle = (low + high) // 2
            text = self._render([candidates[middle][1]], generation_prompt=True)[0]
            (ids,) = self._tokenize([text])
            if len(ids) <= self.cfg.max_prompt_tokens:
                best, high = (*candidates[middle], text, ids), middle - 1
            else:
                low = middle + 1
        return best

    def _parse(self, conversations: list, rows: list[int]) -> list:
        """Per row: (prompt turns, last assistant turn), or why the row is dropped."""
        parsed = []
        for row, messages in zip(rows, conversations):
            try:
                parsed.append(split_conversation(messages, self.cfg))
            except BadRow as err:
                if self.cfg.bad_rows == "error":
                    raise ConfigError(
                        f"row {row} of {self.split_name}: the conversation ({self.cfg.messages_key!r}) {err}; "
                        "fix or remove that row, or set data.bad_rows=drop"
                    ) from None
                parsed.append(str(err))
        return parsed

    def __call__(self, conversations: list, rows: list[int]) -> dict[str, list]:
        """The token columns of a batch: prompts first, then the golds of the rows whose prompt fits."""
        parsed = self._parse(conversations, rows)
        good = [i for i, item in enumerate(parsed) if not isinstance(item, str)]
        texts = self._render([parsed[i][0] for i in good], generation_prompt=True)
        prompts = {
            i: (0, parsed[i][0], text, ids) for i, text, ids in zip(good, texts, self._tokenize(texts))
        }
        for i in good:
            if len(prompts[i][3]) > self.cfg.max_prompt_tokens:
                fit = self._fit(parsed[i][0]) if self.cfg.overlong_prompts == "left_truncate" else None
                prompts[i] = fit if fit is not None else OVERLONG
        kept = [i for i in good if prompts[i] != OVERLONG]
        gold_texts = self._gold_texts([prompts[i][1] for i in kept], [parsed[i][1] for i in kept],
                                      [prompts[i][2] for i in kept], [rows[i] for i in kept])  # fmt: skip
        golds = dict(zip(kept, map(self._gold, self._tokenize(gold_texts), gold_texts)))
        out = {name: [] for name in ADDED_COLUMNS}
        for i, item in enumerate(parsed):
            dropped = item if isinstance(item, str) else "" if i in golds else OVERLONG
            cut, prompt_ids = (prompts[i][0], prompts[i][3]) if i in golds else (0, [])
            gold_ids, gold_cut = golds.get(i, ([], False))
            for name, value in zip(ADDED_COLUMNS, (prompt_ids, gold_ids, dropped, cut, gold_cut)):
                out[name].append(value)
        return out
