"""``spin-train`` / ``torchrun -m spin_megatron.train``: Hydra overrides in, a SPIN run out.

    spin-train experiment=tiny_cpu trainer.total_steps=4
    torchrun --nproc_per_node 8 -m spin_megatron.train experiment=qwen2.5_3b_gsm8k parallel.tp=2

The configuration is composed with Hydra's compose API from ``conf/`` (schema: ``spin_megatron/config.py``) and
validated completely — unknown keys, wrong types, invalid values, parallel sizes that do not fit the model or the
world size, missing files — before any process group starts. Every such mistake is one line on stderr and exit
code 2.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

from spin_megatron.config import REPO, Config, register_configs
from spin_megatron.errors import CheckpointError, ConfigError, UserError

PROG = "spin-train"
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
        return f"unknown config key {full_key or first!s}: check the spelling (see spin_megatron/config.py)"
    if full_key:
        return f"invalid value for {full_key}: {first}"
    return f"invalid configuration: {first}"


def model_arch(cfg: Config):
    """The architecture the run will train, read without building anything (tiny config, checkpoint, HF)."""
    from spin_megatron.models.arch import arch_from_hf_config, load_arch
    from spin_megatron.models.mcore_io import arch_from_meta, read_meta

    m = cfg.model
    if m.tiny is not None:
        t = m.tiny
        family = "Qwen2" if t.architecture == "qwen2" else "Llama"
        wanted = arch_from_hf_config(
            {
                "architectures": [f"{family}ForCausalLM"],
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "vocab_size": t.vocab_size,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "tie_word_embeddings": t.tie_word_embeddings,
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


def preflight(cfg: Config, world_size: int) -> None:
    """Checks that need no process group: layout vs model and world size, weights, files, resume state,
    reward function and engine plug-in."""
    from spin_megatron.checkpoint import read_trainer_state
    from spin_megatron.models.hf_io import HFReader
    from spin_megatron.models.mapping import mapping_for
    from spin_megatron.models.weights import check_hf_checkpoint
    from spin_megatron.parallel.state import validate_parallel_sizes
    from spin_megatron.rewards import get_reward_fn
    from spin_megatron.trainer import resume_path

    dp = validate_parallel_sizes(world_size, cfg.parallel.tp, cfg.parallel.pp)
    arch = model_arch(cfg)
    arch.check_parallel(cfg.parallel.tp, cfg.parallel.pp)
    if cfg.model.hf_path is not None and cfg.model.mcore_ckpt is None:
        check_hf_checkpoint(
            HFReader(cfg.model.hf_path), mapping_for(arch, arch.padded_vocab_size(cfg.parallel.tp))
        )
    if cfg.trainer.prompts_per_step < dp:
        raise ConfigError(
            f"trainer.prompts_per_step={cfg.trainer.prompts_per_step} is smaller than the "
            f"data-parallel size {dp}: every replica needs at least one prompt"
        )
    for key in ("train_files", "val_files"):
        for path in getattr(cfg.data, key):
            if not Path(path).is_file():
                raise ConfigError(f"data.{key}: {path} does not exist")
    resume = resume_path(cfg)
    if resume is not None:
        theirs = read_trainer_state(resume).get("model_signature")
        if theirs != json.loads(json.dumps(arch.signature())):
            raise CheckpointError(
                f"checkpoint {resume} is from a different model than the configured one; point "
                "trainer.output_dir (or trainer.resume) elsewhere, or configure that model"
            )
    get_reward_fn(cfg.algorithm.reward)
    if ":" in cfg.rollout.engine:
        module, _, name = cfg.rollout.engine.partition(":")
        try:
            factory = getattr(importlib.import_module(module), name, None)
        except ImportError as exc:
            raise ConfigError(
                f"rollout.engine={cfg.rollout.engine}: cannot import {module!r} ({exc})"
            ) from None
        if not callable(factory):
            raise ConfigError(f"rollout.engine={cfg.rollout.engine}: {module!r} has no factory {name!r}")


def prepare_data(cfg: Config):
    """Tokenizer, training and validation prompts — loaded before any process group, so bad data fails fast."""
    from spin_megatron.data import load_prompt_split, load_tokenizer
    from spin_megatron.trainer import TrainingData, tokenizer_dir

    tokenizer = load_tokenizer(tokenizer_dir(cfg))
    train, stats = load_prompt_split(cfg.data, tokenizer, "train")
    val = load_prompt_split(cfg.data, tokenizer, "val")[0] if cfg.trainer.test_freq else []
    return TrainingData(tokenizer=tokenizer, train=train, val=val, train_stats=stats)


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config(overrides)
        preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        data = prepare_data(cfg)
    except UserError as exc:
        if rank == 0:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    from spin_megatron.parallel.state import destroy_parallel, init_parallel
    from spin_megatron.preemption import PreemptionFlag
    from spin_megatron.trainer import SPINTrainer

    preemption = PreemptionFlag().install()  # before the process group: a signal during set-up is kept
    groups = init_parallel(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.trainer.seed)
    try:
        trainer = SPINTrainer(cfg, groups, data, preemption)
        outcome = trainer.fit()
    except UserError as exc:
        where = f" [rank {rank}]" if groups.world_size > 1 else ""
        print(f"{PROG}: error{where}: {exc}", file=sys.stderr)
        return 2
    finally:
        destroy_parallel()
    out = Path(cfg.trainer.output_dir)
    if rank == 0 and outcome == "preempted":
        print(
            f"{PROG}: received {preemption.signal_name}: stopped after step {trainer.step} with a checkpoint in "
            f"{out / 'checkpoints'}; run the same command (trainer.resume=auto) to continue",
            flush=True,
        )
    elif rank == 0:
        print(
            f"done: metrics {out / 'metrics.jsonl'}, checkpoints {out / 'checkpoints'}"
            + (f", HF export {out / 'hf'}" if cfg.trainer.export_hf else "")
            + f"; plot with: spin-plot {out}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
