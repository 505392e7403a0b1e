"""Tiny reward models for the tests (not a test module): made from a config, saved as HF folders.

- :func:`make_random_reward_model`: a random-weight ``Qwen2ForSequenceClassification`` (num_labels=1).
- :func:`make_sevens_reward_model`: one whose weights are set by hand so that its score rises with the fraction of
  ``7`` characters in the conversation (character tokenizer of ``tests/synthetic_task.py``): queries and keys are
  zero, so attention averages over the positions so far; the value reads a "this token is 7" feature of the
  embedding and the output projection writes it to a dimension the scalar head reads. The last token of every
  conversation is the template's ``<|im_end|>``, so the score is ``2f·√8 / √(1 + 4f²)`` for the fraction ``f`` of
  ``7``s among all tokens — increasing in ``f``.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _qwen2_classifier(vocab_size: int, *, hidden: int, layers: int, heads: int, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096, num_labels=1,
        tie_word_embeddings=False,
    )  # fmt: skip
    config.architectures = ["Qwen2ForSequenceClassification"]
    return Qwen2ForSequenceClassification(config).eval()


def make_random_reward_model(out_dir: str | Path, tokenizer_dir: str | Path, *, hidden: int = 32) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = _qwen2_classifier(len(tokenizer), hidden=hidden, layers=2, heads=2)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # scores of order 1, so batching errors would show
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_sevens_reward_model(out_dir: str | Path, tokenizer_dir: str | Path) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    seven = tokenizer.convert_tokens_to_ids("7")
    model = _qwen2_classifier(len(tokenizer), hidden=8, layers=1, heads=1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for name, parameter in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                parameter.fill_(1.0)
        model.model.embed_tokens.weight[:, 0] = 1.0  # every token
        model.model.embed_tokens.weight[seven, 1] = 1.0  # "this token is 7"
        attention = model.model.layers[0].self_attn
        attention.v_proj.weight[0, 1] = 1.0  # value = the 7-feature
        attention.o_proj.weight[2, 0] = 1.0  # its average over the positions so far → dimension 2
        model.score.weight[0, 2] = 1.0
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def sevens_judge(cfg):
    """A pairwise judge plug-in for the tests (``reward_model.judge=tests.reward_models:sevens_judge``): the first
    answer is better with probability 1, 0.5 or 0 as it has more, as many or fewer ``7``s."""
    return _SevensJudge()


class _SevensJudge:
    def judge(self, prompts, first, second):
        return [
            0.5 if a.count("7") == b.count("7") else float(a.count("7") > b.count("7"))
            for a, b in zip(first, second)
        ]
