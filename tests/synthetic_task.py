"""A tiny synthetic task on which a tiny random model can visibly learn in a few online-DPO steps (not a test module).

With the real Qwen2.5 tokenizer (151,936 tokens) a random tiny model samples near-uniform tokens and nothing simple
is learnable in a handful of steps. Here instead:

- :func:`make_char_tokenizer` writes a character-level fast tokenizer of ~50 tokens with Qwen-style chat tokens;
- :func:`make_prompt_file` writes a GSM8K-shaped jsonl (``question`` / ``answer``) the data loader accepts;
- :func:`sevens` is a reward: the fraction of the response's characters that are the digit ``7``. It is
  continuous (samples of a prompt rarely tie once a 7 appears) and learnable as a global preference of the output
  layer for one token, independent of the prompt.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PAD, IM_START, IM_END, UNK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END, UNK)
CHARACTERS = string.digits + string.ascii_lowercase + " \n#.,?+=-"
CHAT_TEMPLATE = (
    "{% for m in messages %}" + IM_START + "{{ m['content'] }}" + IM_END + "{% endfor %}"
    "{% if add_generation_prompt %}" + IM_START + "{% endif %}"
)


def make_char_tokenizer(out_dir: str | Path) -> Path:
    """Save a character-level ``PreTrainedTokenizerFast`` to ``out_dir`` (loadable by ``AutoTokenizer``).

    Ids 0-3 are the special tokens (pad ``<|endoftext|>``, ``<|im_start|>``, eos ``<|im_end|>``, ``<unk>``),
    then one id per character of :data:`CHARACTERS`; upper case is folded to lower case. ``len(tokenizer)`` is
    the model's vocabulary size (``tokenizer.vocab_size`` is the same here: the special tokens are part of the
    WordLevel vocabulary, not added on top of it).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    backend.decoder = decoders.Fuse()  # join the characters back without separators
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=IM_END, pad_token=PAD, unk_token=UNK, model_max_length=4096
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_prompt_file(path: str | Path, n: int = 64, *, seed: int = 0) -> Path:
    """A jsonl of ``n`` rows ``{"question": "count 1 2 3", "answer": "#### 6"}`` (content barely matters)."""
    rng = random.Random(seed)
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            numbers = [rng.randint(0, 9) for _ in range(rng.randint(2, 4))]
            question = "count " + " ".join(map(str, numbers))
            f.write(json.dumps({"question": question, "answer": f"#### {sum(numbers)}"}) + "\n")
    return path


def sevens(prompt: str, response: str, row: Mapping[str, Any]) -> float:
    """The fraction of the response's characters that are ``7`` (0.0 for an empty response)."""
    return response.count("7") / len(response) if response else 0.0
