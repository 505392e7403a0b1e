"""Composing and reading a run's configuration without building anything: Hydra compose + validation
(``load_config``) and the architecture the run will train (``model_arch``). Shared by spin-train, spin-plan and
the trainer; imports neither of them."""

from __future__ import annotations

import os
from pathlib import Path

from spin_megatron.config import REPO, Config, register_configs
from spin_megatron.errors import CheckpointError, ConfigError

CONF_DIR = Path(os.environ.get("SPIN_CONF_DIR", REPO / "conf"))


def load_config(overrides: list[str]) -> Config:
    """Compose ``conf/config.yaml`` with ``overrides`` and return the validated :class:`Config`."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR.resolve()), version_base="1.3"):
            composed = compose(config_name="config", overrides=overrides)
        return OmegaConf.to_object(composed)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_describe_hydra_error(exc)) from None


def _describe_hydra_error(exc: Exception) -> str:
    cause = exc.__cause__ or exc
    full_key = getattr(cause, "full_key", None) or getattr(exc, "full_key", None)
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if "not in struct" in str(cause) or "Key '" in first and "not in" in first:
        return f"unknown config key {full_key or first!s}: check the spelling (see spin_megatron/config/)"
    if full_key:
        return f"invalid value for {full_key}: {first}"
    return f"invalid configuration: {first}"


def model_arch(cfg: Config):
    """The architecture the run will train, read without building anything (tiny config, checkpoint, HF)."""
    from spin_megatron.models.arch import arch_from_hf_config, load_arch
    from spin_megatron.models.mcore_io import arch_from_meta, read_meta

    m = cfg.model
    if m.tiny is not None:
        from spin_megatron.models.tiny import tiny_arch_settings

        t = m.tiny
        wanted = arch_from_hf_config(
            {
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "vocab_size": t.vocab_size,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "tie_word_embeddings": t.tie_word_embeddings,
                **tiny_arch_settings(
                    t.architecture,
                    num_experts=t.num_experts,
                    num_experts_per_tok=t.num_experts_per_tok,
                    moe_intermediate_size=t.moe_intermediate_size,
                ),
            }
        )
        created = Path(cfg.trainer.output_dir) / "init_model"
        if not (created / "config.json").is_file():
            return wanted
        existing = load_arch(created)  # the tiny model this run directory was started with
        shape = (
            "architecture",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_attention_heads",
            "num_kv_heads",
            "vocab_size",
            "tie_word_embeddings",
            "head_dim",
            "moe",
        )
        diffs = [
            f"{k} {getattr(existing, k)} vs {getattr(wanted, k)}"
            for k in shape
            if getattr(existing, k) != getattr(wanted, k)
        ]
        if diffs:
            raise CheckpointError(
                f"trainer.output_dir={cfg.trainer.output_dir} was started with a different tiny "
                f"model ({', '.join(diffs)}); choose a new trainer.output_dir"
            )
        return existing
    if m.mcore_ckpt is not None:
        return arch_from_meta(read_meta(m.mcore_ckpt))
    return load_arch(m.hf_path)
