"""Reward-model checkpoints SGLang 0.5.23 misreads, and the fix: the refusal the preflight gives
(:func:`missing_head_bias`) and the zero bias that makes such a checkpoint score as transformers does
(:func:`add_zero_score_bias`)."""

from __future__ import annotations

import json
from pathlib import Path

# ----- checkpoints SGLang 0.5.23 misreads ------------------------------------------------------------------
# SGLang's heads of these architectures are nn.Linear(hidden, num_labels) WITH a bias (models/qwen2_classification.py,
# qwen3_classification.py), transformers' have none: a checkpoint without `score.bias` is served with the bias
# left at its random init, a constant added to every score that differs from launch to launch and from server
# to server (--random-seed does not fix it; sgl-project/sglang#38768). Seen on the CPU server: offsets of -0.055
# and -0.034 on two launches with the same seed; exact agreement with transformers once a zero bias is added.
BIASED_SCORE_HEADS = ("Qwen2ForSequenceClassification", "Qwen3ForSequenceClassification")
ZERO_BIAS_FILE = "score_bias.safetensors"
_INDEX = "model.safetensors.index.json"


def _checkpoint_keys(path: Path) -> set[str]:
    index = path / _INDEX
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    keys: set[str] = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            keys.update(handle.keys())
    return keys


def missing_head_bias(path: str) -> str | None:
    """Why SGLang 0.5.23 would add a random constant to this local checkpoint's scores (None: it would not)."""
    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        return None  # a hub name or no checkpoint here: nothing to inspect
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    biased = [a for a in architectures if a in BIASED_SCORE_HEADS]
    if not biased or "score.bias" in _checkpoint_keys(directory):
        return None
    return (
        f"{path} is a {biased[0]} checkpoint without score.bias: SGLang 0.5.23 serves its head with a bias left at "
        "its random initialisation, shifting every score by a constant that differs between servers and launches "
        f'(sgl-project/sglang#38768). Add a zero bias once (transformers ignores it): python -c "from '
        f"spin_megatron.reward_model.sglang_checkpoint import add_zero_score_bias; add_zero_score_bias('{path}')\" — or use "
        "reward_model.backend=hf"
    )


def add_zero_score_bias(path: str) -> Path:
    """Write ``score.bias = 0`` beside the checkpoint's weights (``score_bias.safetensors``, listed in the
    safetensors index when there is one), so that SGLang serves exactly transformers' ``W·h``."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    directory = Path(path)
    index = directory / _INDEX
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    files = [directory / weight_map["score.weight"]] if weight_map else list(directory.glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            if "score.weight" in handle.keys():
                weight = handle.get_tensor("score.weight")
                break
    else:
        raise ValueError(
            f"{path}: no score.weight in its safetensors files; is it a sequence-classification model?"
        )
    out = directory / ZERO_BIAS_FILE
    save_file({"score.bias": torch.zeros(weight.shape[0], dtype=weight.dtype)}, str(out))
    if weight_map is not None:
        data = json.loads(index.read_text())
        data["weight_map"]["score.bias"] = ZERO_BIAS_FILE
        index.write_text(json.dumps(data, indent=2))
    return out
