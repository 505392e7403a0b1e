"""The trainer's factory for the ``sglang`` engine: one engine per data-parallel replica, with the replica's
share of ports, GPUs and attached servers, and a model for the servers to load."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from spin_megatron.errors import ConfigError
from spin_megatron.rollout.sglang.config import SGLangConfig
from spin_megatron.rollout.sglang.engine import SGLangEngine


def build_sglang_engine(cfg, source, groups) -> SGLangEngine:
    """The trainer's factory (``rollout.engine=sglang``), called on one data-parallel replica's engine rank.

    ``cfg.rollout.sglang`` (an :class:`SGLangConfig` or a mapping; absent = defaults) configures the servers.
    Without ``model_path`` or ``urls`` they load the policy's HF checkpoint, or, when the policy starts from a
    Megatron checkpoint, its architecture with random (``--load-format dummy``) weights: the trainer's first
    weight sync overwrites them, as it does for the ``hf`` engine. Each replica gets its own servers: replica
    ``r`` shifts the launched ports by ``r × num_engines`` (router: ``r``) and ``gpu_ids`` (default 0..N-1) by
    ``r × num_engines × tp_size`` (one node), a non-zero ``weight_sync_master_port`` by ``r``, and ``urls``
    are split evenly over the replicas. With
    ``launcher=ray`` every replica gets its own placement group on the Ray cluster (see sglang_ray); the
    policy checkpoint directory must then be on a file system the Ray nodes share.
    """
    raw = getattr(cfg.rollout, "sglang", None)
    config = raw if isinstance(raw, SGLangConfig) else SGLangConfig(**dict(raw or {}))
    replica, replicas = groups.dp_rank, groups.dp_size
    if config.weight_sync_master_port:  # replicas on one node must not share the rendezvous port
        config = replace(config, weight_sync_master_port=config.weight_sync_master_port + replica)
    if config.urls:
        if len(config.urls) % replicas:
            raise ConfigError(
                f"rollout.sglang.urls lists {len(config.urls)} servers, which does not split evenly over "
                f"{replicas} data-parallel replicas; give a multiple of {replicas}"
            )
        share = len(config.urls) // replicas
        mine = config.urls[replica * share : (replica + 1) * share]
        return SGLangEngine(replace(config, urls=mine, num_engines=1))
    if (
        config.launcher == "local"
    ):  # (with Ray, Ray picks nodes, GPUs and ports: one placement group per replica)
        # Default placement: the replica's engines start at the GPU of its engine rank on this node (its TP
        # group's GPUs when TP stays inside a node), not at a global offset that would run past the node's GPUs.
        local_base = int(os.environ.get("LOCAL_RANK", "0"))
        gpus_per_replica = config.num_engines * config.tp_size
        config = replace(
            config,
            base_port=config.base_port + replica * config.num_engines,
            router_port=config.router_port + replica,
            router_metrics_port=config.router_metrics_port + replica if config.router_metrics_port else 0,
            gpu_ids=config.gpu_ids or tuple(range(local_base, local_base + gpus_per_replica)),
        )
    if not config.model_path:
        config = _with_policy_checkpoint(config, source, Path(cfg.trainer.output_dir))
    return SGLangEngine(config)


def _with_policy_checkpoint(config: SGLangConfig, source, output_dir: Path) -> SGLangConfig:
    if source.hf_dir is not None:
        return replace(config, model_path=str(source.hf_dir))
    model_dir = output_dir / "sglang_init_model"
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f"config.json.{os.getpid()}"  # replicas may write at once: rename is atomic
    staging.write_text(json.dumps(source.arch.hf_config, indent=2))
    staging.replace(model_dir / "config.json")
    extra = (*config.extra_server_args, "--load-format", "dummy")
    return replace(config, model_path=str(model_dir), extra_server_args=extra)
