"""The configuration schema: one dataclass per section, registered with Hydra's ConfigStore.

YAML presets in ``conf/`` contain only what differs from these defaults. Every field is validated in
``__post_init__`` with a :class:`ConfigError` naming the key and the allowed values, before any process group
starts (Hydra itself rejects unknown keys and wrong types); checks that span sections are in ``run.py``.

``model`` (model.py), ``data`` (data.py), ``rollout`` (rollout.py; its SGLang section in rollout/sglang/config.py),
``algorithm`` (algorithm.py), ``optim`` / ``parallel`` / ``trainer`` / ``logging`` / ``cluster`` (training.py),
``reward_model`` (reward_model/config.py).
"""

from spin_megatron.config.algorithm import AlgorithmConfig
from spin_megatron.config.common import REPO, default_tokenizer, shared_data_dir
from spin_megatron.config.data import DataConfig
from spin_megatron.config.model import ModelConfig, TinyModelConfig
from spin_megatron.config.rollout import RolloutConfig
from spin_megatron.config.run import Config, register_configs
from spin_megatron.config.training import (
    RECOMPUTE_MODULES,
    TE_RECOMPUTE_MODULES,
    ClusterConfig,
    LoggingConfig,
    OptimConfig,
    ParallelConfig,
    TrainerConfig,
    WandbConfig,
)

__all__ = [
    "REPO",
    "RECOMPUTE_MODULES",
    "TE_RECOMPUTE_MODULES",
    "AlgorithmConfig",
    "ClusterConfig",
    "Config",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RolloutConfig",
    "TinyModelConfig",
    "TrainerConfig",
    "WandbConfig",
    "default_tokenizer",
    "register_configs",
    "shared_data_dir",
]
