"""Reading and writing Hugging Face checkpoint folders tensor by tensor.

:class:`HFReader` opens ``model.safetensors`` / ``model.safetensors.index.json`` lazily (one tensor at a time, shapes
from the headers without reading data). :class:`HFShardWriter` streams ``(name, tensor)`` pairs into safetensors
files of bounded size, so exporting never needs the whole model in memory.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from spin_megatron.errors import CheckpointError, MissingPathError

# Files copied alongside the weights so the folder loads with AutoTokenizer / generation defaults.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
)


class HFReader:
    """Lazy access to the tensors of an HF model folder (safetensors, single file or sharded)."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {name: self.dir / fname for name, fname in weight_map.items()}
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self._files = {name: single for name in f.keys()}
        else:
            raise MissingPathError(
                f"no model.safetensors or model.safetensors.index.json in {self.dir}; "
                "re-save the model with save_pretrained(..., safe_serialization=True)"
            )
        for path in set(self._files.values()):
            if not path.is_file():
                raise MissingPathError(f"{path} is listed in the safetensors index but missing")

    def names(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self._files[name], framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise CheckpointError(f"HF checkpoint {self.dir} has no tensor {name!r}")
        with safe_open(self._files[name], framework="pt") as f:
            return f.get_tensor(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get(name)


class HFShardWriter:
    """Write tensors into ``<prefix>-NNNNN.safetensors`` files of at most ``max_shard_bytes`` each."""

    def __init__(self, out_dir: str | Path, prefix: str = "model", max_shard_bytes: int = 2 << 30):
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.max_shard_bytes = max_shard_bytes
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._count = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def add_all(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in named:
            self.add(name, tensor)

    def flush(self) -> None:
        if not self._pending:
            return
        self._count += 1
        fname = f"{self.prefix}-{self._count:05d}.safetensors"
        save_file(self._pending, str(self.out_dir / fname), metadata={"format": "pt"})
        for name in self._pending:
            self.weight_map[name] = fname
        self._pending, self._pending_bytes = {}, 0


def write_index(out_dir: str | Path, weight_map: dict[str, str], total_bytes: int) -> None:
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(out_dir) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_hf_config(out_dir: str | Path, hf_config: dict, dtype: torch.dtype) -> None:
    cfg = dict(hf_config)
    name = str(dtype).removeprefix("torch.")
    cfg["torch_dtype"] = name
    if "dtype" in cfg:
        cfg["dtype"] = name
    (Path(out_dir) / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def copy_tokenizer_files(src_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy whichever tokenizer/generation files exist in ``src_dir``; return their names."""
    copied = []
    for fname in TOKENIZER_FILES:
        src = Path(src_dir) / fname
        if src.is_file():
            shutil.copyfile(src, Path(out_dir) / fname)
            copied.append(fname)
    return copied
