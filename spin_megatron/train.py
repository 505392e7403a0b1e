"""``spin-train`` / ``torchrun -m spin_megatron.train``: Hydra overrides in, a SPIN run out.

    spin-train experiment=tiny_cpu trainer.total_steps=4
    torchrun --nproc_per_node 8 -m spin_megatron.train experiment=qwen2.5_3b_gsm8k parallel.tp=2

The configuration is composed with Hydra's compose API from ``conf/`` (schema: ``spin_megatron/config/``) and
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

from spin_megatron.compose import (  # load_config: also spin-train's API for tools/tests
    load_config,
    model_arch,
)
from spin_megatron.config import Config
from spin_megatron.errors import CheckpointError, ConfigError, UserError

PROG = "spin-train"


def check_device(cfg: Config) -> None:
    """``trainer.device=cuda`` on a machine where torch sees no GPU stops here: without it the run would train
    on CPU with the CPU shims on (a CPU-only torch build, a missing driver, CUDA_VISIBLE_DEVICES="")."""
    import torch

    if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + (
            f" built for CUDA {torch.version.cuda}" if torch.version.cuda else " (a CPU-only build)"
        )
        raise ConfigError(
            f"trainer.device=cuda but CUDA is not available ({build}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}); install a CUDA torch / check the driver, or "
            "use trainer.device=auto to run on CPU"
        )


def preflight(cfg: Config, world_size: int) -> None:
    """Checks that need no process group: layout vs model and world size, weights, files, resume state,
    reward function and engine plug-in."""
    from spin_megatron.algorithm.rewards import get_reward_fn
    from spin_megatron.models.hf_io import HFReader
    from spin_megatron.models.mapping import mapping_for
    from spin_megatron.models.weights import check_hf_checkpoint
    from spin_megatron.parallel.context_parallel import check_context_parallel
    from spin_megatron.parallel.state import validate_parallel_sizes
    from spin_megatron.planning.fit import check_training_memory
    from spin_megatron.reward_model import preflight_reward_model
    from spin_megatron.training.checkpoint import read_trainer_state, resume_path
    from spin_megatron.training.policy import check_moe_engine, check_moe_training_layout

    check_device(cfg)
    par = cfg.parallel
    dp = validate_parallel_sizes(world_size, par.tp, par.pp, par.ep, par.etp, cp=par.cp)
    arch = model_arch(cfg)
    arch.check_parallel(par.tp, par.pp, ep=par.ep, etp=par.etp, vpp=par.vpp)
    check_moe_training_layout(cfg, arch)
    check_context_parallel(cfg, arch)
    check_moe_engine(cfg, arch)
    if cfg.model.hf_path is not None and cfg.model.mcore_ckpt is None:
        check_hf_checkpoint(
            HFReader(cfg.model.hf_path), mapping_for(arch, arch.padded_vocab_size(cfg.parallel.tp))
        )
    if cfg.trainer.prompts_per_step < dp:
        raise ConfigError(
            f"trainer.prompts_per_step={cfg.trainer.prompts_per_step} is smaller than the "
            f"data-parallel size {dp}: every replica needs at least one prompt"
        )
    from spin_megatron.training.policy import (
        check_recompute_modules,  # (parallel.recompute_modules that need TE)
    )

    check_recompute_modules(cfg)
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
    for reward in [cfg.algorithm.rule_reward, *cfg.algorithm.reward_metrics]:
        if reward is not None:
            get_reward_fn(reward)
    preflight_reward_model(cfg)
    if cfg.rollout.engine == "sglang":
        cfg.rollout.sglang.check_python()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # device 0 is its own GPU: no context on another rank's
        check_training_memory(
            cfg, arch, world_size
        )  # on GPU: the plan, reward model included, before any group
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
    from spin_megatron.data import load_prompt_split, load_tokenizer, tokenizer_dir
    from spin_megatron.training.trainer import TrainingData

    tokenizer = load_tokenizer(tokenizer_dir(cfg))
    train, stats = load_prompt_split(cfg.data, tokenizer, "train")
    per_step = cfg.trainer.prompts_per_step
    # a batch never repeats a prompt (PromptSampler): it needs that many distinct ones
    if per_step > len(train):
        raise ConfigError(
            f"trainer.prompts_per_step={per_step} is more than the {len(train)} training prompts of "
            f"data.train_files (after data.* filtering); lower trainer.prompts_per_step or add prompts"
        )
    val = load_prompt_split(cfg.data, tokenizer, "val")[0] if cfg.trainer.test_freq else []
    return TrainingData(tokenizer=tokenizer, train=train, val=val, train_stats=stats)


def run_notes(cfg: Config, num_train: int) -> list[str]:
    """What a run does that its configuration does not say out loud (printed once at start)."""
    notes = []
    skipped = num_train % cfg.trainer.prompts_per_step
    if skipped:
        again = "other ones every epoch" if cfg.data.shuffle else "the same ones: data.shuffle=false"
        notes.append(
            f"each epoch's last {skipped} of {num_train} prompts make no full batch of trainer.prompts_per_step="
            f"{cfg.trainer.prompts_per_step} and are skipped ({again})"
        )
    t = cfg.trainer
    if cfg.algorithm.mode == "spin" and not (t.ref_update_freq or t.ref_model_sync_steps):
        notes.append(
            "algorithm.mode=spin with no reference refresh (trainer.ref_update_freq=0): the whole run is ONE "
            "SPIN iteration against the initial model; set trainer.ref_update_freq=K to start a new iteration "
            "every K steps"
        )
    return notes


def lost_peer_message(reason: str, output_dir: str) -> str:
    """What a surviving rank says when another rank of the run died or hung (see ``parallel/peers.py``)."""
    from spin_megatron.training.checkpoint import find_latest

    latest = find_latest(output_dir)
    saved = f"the last complete checkpoint is {latest}" if latest else f"no checkpoint in {output_dir} yet"
    return (
        f"lost contact with another process of this run ({reason}): a node or rank died or hung; {saved}; "
        "relaunch the same command on every node (trainer.resume=auto) to continue from it"
    )


def main(argv: list[str] | None = None) -> int:
    from spin_megatron.quiet import silence_library_noise

    silence_library_noise()
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
    if rank == 0:  # prompts dropped or cut, gold responses truncated (those get no terminator)
        print(f"{PROG}: {data.train_stats.summary('train data')}", flush=True)
        for note in run_notes(cfg, len(data.train)):
            print(f"{PROG}: {note}", flush=True)
    from spin_megatron.parallel.peers import EXIT_LOST_PEER, lost_peer
    from spin_megatron.parallel.state import destroy_parallel, init_parallel
    from spin_megatron.training.preemption import PreemptionFlag
    from spin_megatron.training.trainer import SPINTrainer

    preemption = PreemptionFlag().install()  # before the process group: a signal during set-up is kept
    where = f" [rank {rank}]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        par = cfg.parallel
        groups = init_parallel(
            par.tp, par.pp, ep=par.ep, etp=par.etp, vpp=par.vpp, cp=par.cp, seed=cfg.trainer.seed
        )
        try:
            trainer = SPINTrainer(cfg, groups, data, preemption)
            outcome = trainer.fit()
        finally:
            destroy_parallel()
    except UserError as exc:
        print(f"{PROG}: error{where}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        reason = lost_peer(exc)
        if reason is None:
            raise  # a bug: keep the traceback
        print(f"{PROG}: error{where}: {lost_peer_message(reason, cfg.trainer.output_dir)}", file=sys.stderr)
        return EXIT_LOST_PEER
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
            + f"; plot with: spin-plot {out} (then open {out / 'plots' / 'overview.png'})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
