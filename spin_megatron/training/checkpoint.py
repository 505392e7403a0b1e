"""Trainer checkpoints: policy, optimizer, reference (Megatron dist-checkpointing), schedule, data position,
RNG states, step. Written atomically; resumable at any TP/PP/VPP/DP layout for the model and optimizer.

Layout::

    <output_dir>/checkpoints/step_0000006/
        dist/                 torch_dist shards of {model, optimizer, reference}
        rng/rank_00000.pt     per-rank RNG states (bit-exact resume at the same layout)
        trainer_state.json    step, scheduler, data sampler, model signature, layout, config
        COMPLETE              written last

A checkpoint is written into ``.step_0000006.partial`` and renamed once ``COMPLETE`` exists, so a run killed
mid-write never leaves a folder that :func:`find_latest` would pick up; older checkpoints are pruned only after
a newer one is complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from spin_megatron.config import Config
from spin_megatron.errors import CheckpointError, ConfigError, MissingPathError
from spin_megatron.faults import kill_point
from spin_megatron.models.chunks import chunks_of
from spin_megatron.models.weights import unwrap
from spin_megatron.parallel.ddp import finish_param_gather
from spin_megatron.parallel.state import ParallelGroups
from spin_megatron.training.optim_state import inner_optimizers, materialize_fresh_state

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{7})$")
_OPTIM_META = {"distrib_optim_sharding_type": "fully_reshardable"}
_REF_PREFIX = "reference."


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def find_latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``output_dir`` (None if there is none)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return None
    complete = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
    return max(complete, key=lambda p: int(_STEP_DIR.match(p.name).group(1)), default=None)


def _chunk_keys(model, key: str) -> list[str]:
    """Megatron's state-dict keys of model chunks: ``model`` for one, ``model0``, ``model1``, … for several. The
    sharded tensors inside carry global names, so a checkpoint loads at any TP/PP/VPP layout."""
    count = len(chunks_of(unwrap(model)))
    return [key] if count == 1 else [f"{key}{i}" for i in range(count)]


def _chunk_states(model, key: str, metadata: dict, prefix: str = "") -> dict:
    chunks = chunks_of(unwrap(model))
    return {
        k: unwrap(chunk).sharded_state_dict(prefix=prefix, metadata=metadata)
        for k, chunk in zip(_chunk_keys(model, key), chunks, strict=True)
    }


def _load_chunk_states(model, loaded: dict, key: str, prefix: str = "") -> None:
    for k, chunk in zip(_chunk_keys(model, key), chunks_of(unwrap(model)), strict=True):
        unwrap(chunk).load_state_dict({n.removeprefix(prefix): v for n, v in loaded[k].items()}, strict=False)


def _sharded_state(policy, reference, *, is_loading: bool) -> dict:
    # a fresh dict each time: Megatron stores the data-parallel group in it (ensure_metadata_has_dp_cp_group),
    # and a kept one would carry a destroyed layout's group into the next (the replicas' copies then clash)
    metadata = dict(_OPTIM_META)
    model_sd = _chunk_states(policy.model, "model", metadata)
    optimizer_sd = policy.optimizer.sharded_state_dict(
        model_sd if len(model_sd) > 1 else model_sd["model"], is_loading=is_loading, metadata=metadata
    )
    reference_sd = _chunk_states(reference, "reference", metadata, _REF_PREFIX)
    return {**model_sd, "optimizer": optimizer_sd, **reference_sd}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    policy,
    reference,
    groups: ParallelGroups,
    trainer_state: dict,
    *,
    keep_last_n: int = 0,
    write_extra=None,
) -> Path:
    """Collective. Returns the final checkpoint path. ``write_extra(folder)`` (every rank) adds files of its own
    to the checkpoint before it is marked complete."""
    from megatron.core import dist_checkpointing

    root = checkpoint_root(output_dir)
    final, partial_dir = root / f"step_{step:07d}", root / f".step_{step:07d}.partial"
    if groups.rank == 0:
        if partial_dir.exists():
            shutil.rmtree(partial_dir)  # left by a run killed mid-write
        (partial_dir / "dist").mkdir(parents=True)
        (partial_dir / "rng").mkdir()
    dist.barrier()
    # before the first update Adam has no state, which Megatron cannot save (DistributedOptimizer.state_dict
    # asserts one shared step): an online run whose first batches give no pair would fail at its first save
    materialize_fresh_state(policy.optimizer)
    dist_checkpointing.save(_sharded_state(policy, reference, is_loading=False), str(partial_dir / "dist"))
    torch.save(_rng_state(), partial_dir / "rng" / f"rank_{groups.rank:05d}.pt")
    if write_extra is not None:
        write_extra(partial_dir)
    kill_point("checkpoint", step)
    dist.barrier()
    if groups.rank == 0:
        state = {
            **trainer_state,
            "step": step,
            "world_size": groups.world_size,
            "layout": {
                "tp": groups.tp_size,
                "pp": groups.pp_size,
                "vpp": groups.vp_size,
                "dp": groups.dp_size,
                "cp": groups.cp_size,
            },
        }
        _write_synced(partial_dir / "trainer_state.json", json.dumps(state, indent=2, default=str))
        _write_synced(partial_dir / COMPLETE, "")
        if final.exists():
            shutil.rmtree(final)  # the same step saved again after a resume: replace it only now
        os.replace(partial_dir, final)
        _prune(root, keep_last_n)
    dist.barrier()
    return final


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _prune(root: Path, keep_last_n: int) -> None:
    if keep_last_n <= 0:
        return
    complete = sorted(
        (p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()),
        key=lambda p: p.name,
    )
    for old in complete[:-keep_last_n]:
        shutil.rmtree(old)


def read_trainer_state(path: str | Path) -> dict:
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise MissingPathError(
            f"{path} is not a complete checkpoint (no {COMPLETE} marker): pick another "
            "or use trainer.resume=auto"
        )
    return json.loads((path / "trainer_state.json").read_text())


def load_checkpoint(
    path: str | Path, policy, reference, groups: ParallelGroups, *, model_signature: dict
) -> dict:
    """Collective. Restores model, optimizer, reference and (same layout) RNG; returns the trainer state."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    state = read_trainer_state(path)
    if state.get("model_signature") != model_signature:
        theirs, ours = state.get("model_signature") or {}, model_signature
        diffs = [f"{k} {theirs.get(k)} vs {ours[k]}" for k in ours if theirs.get(k) != ours[k]]
        raise CheckpointError(
            f"checkpoint {path} is from a different model ({', '.join(diffs[:3])}); "
            "point trainer.output_dir / trainer.resume elsewhere"
        )
    _prepare_optimizer_for_loading(policy.optimizer)
    loaded = dist_checkpointing.load(_sharded_state(policy, reference, is_loading=True), str(path / "dist"))
    _load_chunk_states(policy.model, loaded, "model")
    _load_optimizer_state(policy.optimizer, loaded["optimizer"])
    _load_chunk_states(reference, loaded, "reference", _REF_PREFIX)
    policy.scheduler.load_state_dict(state["scheduler"])
    rng_file = path / "rng" / f"rank_{groups.rank:05d}.pt"
    if state["world_size"] == groups.world_size and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def _prepare_optimizer_for_loading(optimizer) -> None:
    """Create Adam's state tensors so the loading state dict has somewhere to put them."""
    for opt in inner_optimizers(optimizer):
        init = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
        if init is not None and not opt.optimizer.state:
            init()


def _load_optimizer_state(optimizer, state: dict) -> None:
    """Megatron's DistributedOptimizer.load_state_dict, made to work with torch's (non-fused) Adam.

    Without apex/TE, Megatron gives every parameter state a shared ``step`` tensor and then copies the loaded
    tensors for *every* key of that state, ``step`` included, which the checkpoint does not hold
    (``KeyError: 'step'``). So: restore the non-tensor state first, set ``step`` aside while the parameter
    state is copied in, then give every parameter its own ``step`` — torch's Adam increments it in place, and a
    shared tensor would advance once per parameter per step, skewing the bias correction.
    """
    inner = inner_optimizers(optimizer)
    if len(inner) > 1:  # a ChainedOptimizer (MoE: dense and expert parameters): a state per inner optimizer
        for index, opt in enumerate(inner):
            _load_optimizer_state(opt, state[index])
        return
    opt = inner[0]
    param_state = state.get("param_state")
    if param_state is None or not hasattr(opt, "load_parameter_state_from_fully_reshardable"):
        # a non-distributed optimizer: Megatron saves the shared step only `if step:`, so a state saved before
        # the first update comes back without one (torch's Adam then raises KeyError: 'step')
        torch_state = state.get("optimizer", state)  # mixed precision nests torch's state dict one level down
        for param in torch_state.get("state", {}).values():
            if isinstance(param, dict):
                param.setdefault("step", torch.tensor(0.0))
        opt.load_state_dict(state)
        return
    opt.load_state_dict(
        {k: v for k, v in state.items() if k not in ("param_state", "param_state_sharding_type")}
    )
    steps = {}
    for key, param_state_dict in opt.optimizer.state.items():
        if "step" in param_state_dict:
            steps[key] = param_state_dict.pop("step")
    opt.load_parameter_state_from_fully_reshardable(param_state)
    for key, step in steps.items():
        opt.optimizer.state[key]["step"] = step.clone() if torch.is_tensor(step) else step


# ----------------------------------------------------------------------------------- the trainer's state
def save_trainer_checkpoint(trainer) -> Path:
    """The trainer's checkpoint: its models and optimizer, LR schedule, data position, counters, config.
    Collective."""
    finish_param_gather(trainer.policy.model)  # (a halt inside the updates saves before their end)
    state = {
        "scheduler": trainer.policy.scheduler.state_dict(),
        "sampler": trainer.overlap.sampler_state()
        if trainer.overlap is not None
        else trainer.sampler.state_dict(),
        "model_signature": trainer.source.arch.signature(),
        "skipped_steps": trainer.skipped_steps,
        # the reference refreshes so far: a prefetched batch (overlap) records the version that sampled it
        "ref_version": trainer.ref_version,
        "config": asdict(trainer.cfg),
    }
    return save_checkpoint(
        trainer.out,
        trainer.step,
        trainer.policy,
        trainer.reference,
        trainer.groups,
        state,
        keep_last_n=trainer.cfg.trainer.keep_last_n,
        write_extra=trainer.overlap.save if trainer.overlap is not None else None,
    )


def load_trainer_checkpoint(trainer, path: Path) -> None:
    """Restore what :func:`save_trainer_checkpoint` wrote into a freshly built trainer. Collective."""
    state = load_checkpoint(
        path,
        trainer.policy,
        trainer.reference,
        trainer.groups,
        model_signature=trainer.source.arch.signature(),
    )
    trainer.sampler.load_state_dict(state["sampler"])
    trainer.step, trainer.skipped_steps = state["step"], state.get("skipped_steps", 0)
    t = trainer.cfg.trainer  # (checkpoints before ref_version was saved: the count its schedule implies)
    implied = trainer.step // t.ref_update_freq if t.ref_update_freq else 0
    if t.ref_model_sync_steps:
        implied = int(trainer.policy.scheduler.num_steps) // t.ref_model_sync_steps
    trainer.ref_version = state.get("ref_version", implied)
    if trainer.overlap is not None:
        trainer.overlap.load(path)
    # (consecutive NaN skips are not carried over: a resume after a halt starts a fresh count)
    if trainer.groups.rank == 0:
        print(f"resumed from {path} at step {trainer.step}", flush=True)


def resume_path(cfg: Config) -> Path | None:
    """The checkpoint to resume from, or None; refuses to start over an earlier run's checkpoints."""
    mode, latest = cfg.trainer.resume, find_latest(cfg.trainer.output_dir)
    if mode == "never":
        if latest is not None:
            raise ConfigError(
                f"trainer.output_dir={cfg.trainer.output_dir} already holds checkpoints (latest "
                f"{latest.name}); use trainer.resume=auto to continue it or choose a new output_dir"
            )
        return None
    if mode == "auto":
        return latest
    return Path(mode)
