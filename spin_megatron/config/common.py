"""Paths and the small validators every section uses."""

from __future__ import annotations

import os
from pathlib import Path

from spin_megatron.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    """The team's data folder (tokenizer, GSM8K): ``$SPIN_SHARED_DATA``, else ``../shared/data`` beside the
    checkout. Read at each call, so a GPU machine that carries the data elsewhere finds it without the hub."""
    return Path(os.environ.get("SPIN_SHARED_DATA", REPO.parent / "shared" / "data"))


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


def _positive(key: str, value, *, zero_ok: bool = False) -> None:
    ok = value >= 0 if zero_ok else value > 0
    if not ok:
        raise ConfigError(f"{key} must be {'≥ 0' if zero_ok else '> 0'}, got {value!r}")


def _default_files(split: str) -> list[str]:
    path = shared_data_dir() / "gsm8k" / f"{split}.jsonl"
    return [str(path)] if path.is_file() else []


def default_tokenizer() -> str:
    path = shared_data_dir() / "qwen2.5-tokenizer"
    return str(path) if (path / "vocab.json").is_file() else "Qwen/Qwen2.5-0.5B-Instruct"


def _file_list(key: str, value) -> list[str]:
    """``data.*_files`` as a list: one path (``data.train_files=/path/train.jsonl``) or a list of paths."""
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [str(value)] if str(value) else []
    if isinstance(value, (list, tuple)) and all(isinstance(path, (str, Path)) for path in value):
        return [str(path) for path in value]
    raise ConfigError(f"{key} must be a file path or a list of file paths, got {value!r}")
