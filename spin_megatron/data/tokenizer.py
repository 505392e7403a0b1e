"""The tokenizer a run uses."""

from __future__ import annotations

import os
from pathlib import Path

from spin_megatron.config import Config, default_tokenizer
from spin_megatron.errors import MissingPathError


def tokenizer_dir(cfg: Config) -> str:
    """The tokenizer to use: model.tokenizer_path, else the model's own (HF folder or checkpoint), else Qwen2.5's."""
    m = cfg.model
    if m.tokenizer_path:
        return m.tokenizer_path
    if m.hf_path:
        return m.hf_path
    if m.mcore_ckpt:
        return str(Path(m.mcore_ckpt) / "tokenizer")
    return default_tokenizer()


def load_tokenizer(path: str):
    """An ``AutoTokenizer`` from a local folder (or, with network, a hub name); pad token = EOS when missing."""
    from transformers import AutoTokenizer

    local = Path(path).expanduser()
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1
    if local.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(str(local), local_files_only=True)
    elif local.exists():
        raise MissingPathError(f"tokenizer path {path} is a file; point model.tokenizer_path at its folder")
    elif looks_local or offline:
        raise MissingPathError(
            f"tokenizer folder {path} does not exist{' (HF_HUB_OFFLINE=1, hub not tried)' if offline else ''}; "
            "set model.tokenizer_path (or model.hf_path) to a local tokenizer folder"
        )
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except OSError as err:
            raise MissingPathError(
                f"tokenizer {path!r} is not a local folder and could not be fetched from the hub; "
                "set model.tokenizer_path to a local tokenizer folder"
            ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
