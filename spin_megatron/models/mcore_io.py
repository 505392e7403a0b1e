"""A model-only Megatron-Core checkpoint: ``dist_checkpointing`` shards plus a small JSON description.

Layout of a checkpoint folder::

    spin_model.json     format tag, the HF config, padded vocab size, dtype, the TP/PP it was written at
    model/              torch_dist shards (loadable at any TP/PP: dist_checkpointing reshards on load)
    tokenizer/          tokenizer files copied from the HF folder it came from (if any)

``spin_model.json`` is written last, so a folder without it is an incomplete checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from spin_megatron.errors import CheckpointError, MissingPathError
from spin_megatron.models.arch import ModelArch, arch_from_hf_config
from spin_megatron.models.builder import DTYPES, build_gpt_model
from spin_megatron.models.chunks import chunks_of
from spin_megatron.models.weights import unwrap
from spin_megatron.parallel.state import ParallelGroups

META_FILE = "spin_model.json"
FORMAT = "spin-megatron/mcore-model/v1"
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def read_meta(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / META_FILE
    if not Path(ckpt_dir).is_dir():
        raise MissingPathError(f"Megatron checkpoint folder {ckpt_dir} does not exist")
    if not path.is_file():
        raise MissingPathError(
            f"{ckpt_dir} has no {META_FILE}: not a (complete) spin-megatron model checkpoint; "
            "create one with `spin-convert hf-to-mcore`"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    return meta


def arch_from_meta(meta: dict, source: str = META_FILE) -> ModelArch:
    return arch_from_hf_config(meta["hf_config"], source=source)


def checkpoint_padded_vocab(meta: dict, tp_size: int) -> int:
    """The embedding rows stored in the checkpoint, which the model must be built with to load it."""
    padded = int(meta["padded_vocab_size"])
    if padded % tp_size:
        raise CheckpointError(
            f"the checkpoint's padded vocabulary ({padded} rows) cannot be split {tp_size} ways; "
            f"use a tensor-parallel size that divides {padded}"
        )
    return padded


def write_meta(
    ckpt_dir: str | Path,
    arch: ModelArch,
    padded_vocab_size: int,
    dtype: torch.dtype,
    groups: ParallelGroups,
    **extra,
) -> None:
    meta = {
        "format": FORMAT,
        "architecture": arch.architecture,
        "hf_config": arch.hf_config,
        "padded_vocab_size": padded_vocab_size,
        "dtype": DTYPE_NAMES[dtype],
        "saved_tp": groups.tp_size,
        "saved_pp": groups.pp_size,
        "saved_ep": groups.ep_size,
        **extra,
    }
    (Path(ckpt_dir) / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def save_model_shards(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    """Collective: every rank writes its shards into ``<ckpt_dir>/model``."""
    from megatron.core import dist_checkpointing

    target = Path(ckpt_dir) / "model"
    target.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(_chunk_states(model), str(target))


def _chunk_states(model) -> dict:
    """One chunk's sharded state dict, or Megatron's ``model0``, ``model1``, … nesting for model chunks
    (interleaved pipeline). The sharded tensors carry global names: any TP/PP/VPP layout loads them."""
    chunks = [unwrap(chunk) for chunk in chunks_of(unwrap(model))]
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def load_model_shards(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    """Collective: fill this rank's stage from ``<ckpt_dir>/model`` (any TP/PP/VPP it was saved at)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    expected = _chunk_states(model)
    try:
        state = dist_checkpointing.load(expected, str(Path(ckpt_dir) / "model"))
    except CheckpointingException as exc:
        raise CheckpointError(f"cannot load {ckpt_dir}: {str(exc).splitlines()[0]}") from exc
    chunks = chunks_of(unwrap(model))
    states = [state] if len(chunks) == 1 else [state[f"model{i}"] for i in range(len(chunks))]
    for chunk, chunk_state in zip(chunks, states, strict=True):
        result = unwrap(chunk).load_state_dict(chunk_state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise CheckpointError(
                f"{ckpt_dir} does not match the model: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )


def build_model_from_checkpoint(
    ckpt_dir: str | Path, groups: ParallelGroups, dtype: torch.dtype | None = None, **build_kwargs
):
    """Build this rank's stage at the current TP/PP and load it; returns ``(model, arch, meta)``."""
    meta = read_meta(ckpt_dir)
    arch = arch_from_meta(meta, source=str(Path(ckpt_dir) / META_FILE))
    dtype = dtype or DTYPES[meta["dtype"]]
    padded = checkpoint_padded_vocab(meta, groups.tp_size)
    model = build_gpt_model(arch, groups, dtype=dtype, padded_vocab_size=padded, **build_kwargs)
    load_model_shards(model, ckpt_dir)
    return model, arch, meta
