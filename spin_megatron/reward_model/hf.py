"""The in-process reward model: transformers' ``AutoModelForSequenceClassification`` on the engine rank.

Conversations are rendered with the reward model's own tokenizer and chat template, tokenized, sorted by length
and scored ``micro_batch_size`` at a time (right-padded; the model pools its last non-pad token, as transformers'
sequence-classification heads do), so a batch pads to its own longest conversation, not the step's.
"""

from __future__ import annotations

import torch

from spin_megatron.errors import ConfigError
from spin_megatron.reward_model.base import Conversation, TruncationCount, load_chat_template

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_reward_tokenizer(path: str, chat_template: str | None = None):
    """The reward model's tokenizer with ``chat_template`` (a template string or a ``.jinja`` file) applied."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if chat_template is not None:
        tokenizer.chat_template = load_chat_template(chat_template)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def render(tokenizer, conversations: list[Conversation], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids of each rendered conversation (the template writes the special tokens), each cut to its last
    ``max_length`` tokens (the end, where the reward head reads); returns them and how many were cut."""
    texts = tokenizer.apply_chat_template(conversations, tokenize=False)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    cut = sum(len(row) > max_length for row in ids)
    return [row[-max_length:] for row in ids], cut


def scalar_head_error(config) -> str | None:
    """Why a model config is not a scalar reward model (None: it is)."""
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(
        a.endswith(("ForSequenceClassification", "ForRewardModel")) for a in architectures
    ):
        return (
            f"its architecture {architectures[0]} has no classification head (a reward model is "
            "*ForSequenceClassification with num_labels=1)"
        )
    if getattr(config, "num_labels", 1) != 1:
        return f"its head has num_labels={config.num_labels}, not one scalar"
    return None


class HFRewardModel:
    """A :class:`~spin_megatron.reward_model.base.RewardScorer` running transformers in this process."""

    def __init__(
        self,
        path: str,
        *,
        tokenizer_path: str | None = None,
        chat_template: str | None = None,
        max_length: int = 4096,
        micro_batch_size: int = 8,
        dtype: str = "float32",
        device: str = "cpu",
    ):
        from transformers import AutoModelForSequenceClassification

        self.tokenizer = load_reward_tokenizer(tokenizer_path or path, chat_template)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=_DTYPES[dtype])
        why = scalar_head_error(self.model.config)
        if why:
            raise ConfigError(f"reward_model.path={path} is not a scalar reward model: {why}")
        self._pad = self.tokenizer.pad_token_id
        self.model.to(device).eval()
        self.max_length, self.micro_batch_size = max_length, micro_batch_size
        self.device = torch.device(device)
        self.cuts = TruncationCount(max_length)

    @torch.inference_mode()
    def score(self, conversations: list[Conversation]) -> list[float]:
        ids, cut = render(self.tokenizer, conversations, self.max_length)
        self.cuts.add(cut)
        return self.score_ids(ids)

    @torch.inference_mode()
    def score_ids(self, ids: list[list[int]]) -> list[float]:
        """Scores of tokenized conversations, in their order (batched by length)."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        scores = [0.0] * len(ids)
        for start in range(0, len(order), self.micro_batch_size):
            batch = order[start : start + self.micro_batch_size]
            pad = self._pad_for(batch, ids)
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            logits = self.model(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)
            ).logits
            for row, i in enumerate(batch):
                scores[i] = float(logits[row, 0].float())
        return scores

    def _pad_for(self, batch: list[int], ids: list[list[int]]) -> int:
        """A pad id no conversation of the batch contains: the head pools the rightmost token that is not the
        pad id, so a pad id that is also the template's last token (eos used as pad) would pool the wrong one."""
        used = {token for i in batch for token in ids[i]}
        pad = self._pad if self._pad is not None and self._pad not in used else None
        if pad is None:
            pad = next(token for token in range(len(used) + 1) if token not in used)
        self.model.config.get_text_config().pad_token_id = pad
        return pad

    def shutdown(self) -> None:
        self.model = None
