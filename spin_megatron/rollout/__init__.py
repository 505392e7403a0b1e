"""Rollout engines (``hf`` in-process, ``sglang`` servers, ``replay`` of a dump) behind one protocol."""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

from spin_megatron.models.builder import parse_dtype
from spin_megatron.parallel.state import ParallelGroups
from spin_megatron.rollout.replay import ReplayEngine, RolloutDump


def per_replica_path(path: str, groups: ParallelGroups) -> Path:
    """One dump file per data-parallel replica: ``rollouts.jsonl`` → ``rollouts.dp1.jsonl`` when DP > 1."""
    p = Path(path)
    return p if groups.dp_size == 1 else p.with_name(f"{p.stem}.dp{groups.dp_rank}{p.suffix}")


def dump_files(path: str) -> list[Path]:
    """The dump at ``path``, or the per-replica files a data-parallel run wrote in its place."""
    p = Path(path)
    if p.is_file():
        return [p]
    replicas = sorted(p.parent.glob(f"{p.stem}.dp*{p.suffix}"))
    return replicas or [p]  # a missing file: ReplayEngine reports it


def reported_logprob_temperature(rollout_cfg) -> float:
    """The temperature at which the configured engine's returned log-probs are taken (what ``rollout/logp_diff``
    compares against): SGLang servers launched by the trainer return the model's own log-probs (temperature 1,
    ``SGLANG_RETURN_ORIGINAL_LOGPROB``); the hf engine and replayed samples, those of the sampling temperature."""
    return 1.0 if rollout_cfg.engine == "sglang" else rollout_cfg.temperature


def build_engine(cfg, source, groups: ParallelGroups):
    """The configured engine, on this replica's engine rank (the caller decides where)."""
    rollout = cfg.rollout
    if ":" in rollout.engine:  # a user-supplied factory(cfg, source, groups) -> RolloutEngine
        module, _, name = rollout.engine.partition(":")
        return getattr(importlib.import_module(module), name)(cfg, source, groups)
    if rollout.engine == "replay":
        return ReplayEngine(dump_files(rollout.replay_path))
    if rollout.engine == "hf":
        build = functools.partial(
            build_hf_engine,
            source.arch.hf_config,
            dtype=parse_dtype(cfg.model.dtype),
            device=str(groups.device),
            max_batch_size=rollout.max_batch_size,
            seed=cfg.trainer.seed,
            show_progress=cfg.logging.progress_bar,
        )
        if rollout.hf_process == "separate":
            from spin_megatron.rollout.engine_process import EngineProcess

            return EngineProcess(build, threads=rollout.hf_threads)
        return build()
    from spin_megatron.rollout.sglang.factory import build_sglang_engine

    return build_sglang_engine(cfg, source, groups)


def build_hf_engine(
    hf_config: dict, *, dtype, device: str, max_batch_size: int, seed: int, show_progress: bool
):
    """The ``hf`` engine with random weights of the policy's shapes (the first weight sync fills them); a
    module-level function so that ``rollout.hf_process=separate`` can build it in a spawned process."""
    from spin_megatron.rollout.hf_engine import HFEngine

    engine = HFEngine.from_config(
        hf_config, dtype=dtype, pad_token_id=hf_config.get("pad_token_id") or 0, max_batch_size=max_batch_size,
        seed=seed, show_progress=show_progress,
    )  # fmt: skip
    engine.model.to(device)
    return engine


def maybe_dump(rollout_cfg, groups: ParallelGroups, step: int, samples, *, on_engine_rank: bool) -> None:
    if rollout_cfg.dump_path and on_engine_rank:
        RolloutDump(per_replica_path(rollout_cfg.dump_path, groups)).write(step, samples)
