"""The SPIN / online-DPO loop (DESIGN.md): generate → score → pair → reference log-probs → DPO update →
reference refresh every ``ref_update_freq`` steps → weight sync → metrics / validation / checkpoint."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from spin_megatron.checkpoint import find_latest, load_checkpoint, save_checkpoint
from spin_megatron.config import Config
from spin_megatron.data import PromptSampler, load_prompt_split, load_tokenizer, shard
from spin_megatron.errors import ConfigError
from spin_megatron.experience import (
    ROLLOUT_SUMS,
    generate_scored,
    make_pairs,
    sampling_params,
    stop_token_ids,
)
from spin_megatron.metrics import MetricsLogger, Timer
from spin_megatron.models.hf_export import write_hf_checkpoint
from spin_megatron.models.mapping import mapping_for
from spin_megatron.parallel.collectives import max_over_world, sum_over_world
from spin_megatron.parallel.dpo_step import METRIC_SUMS, DPOSettings, compute_reference_logps, train_step
from spin_megatron.parallel.packing import pack_items
from spin_megatron.parallel.state import ParallelGroups
from spin_megatron.parallel.weight_sync import engine_rank, sync_weights
from spin_megatron.policy import build_policy, build_reference, refresh_reference, resolve_model_source
from spin_megatron.rewards import get_reward_fn
from spin_megatron.rollout import build_engine, maybe_dump
from spin_megatron.step_metrics import step_metrics
from spin_megatron.validation import validate


class SPINTrainer:
    def __init__(self, cfg: Config, groups: ParallelGroups):
        self.cfg, self.groups, self.out = cfg, groups, Path(cfg.trainer.output_dir)
        resume_from = resume_path(cfg)
        self.source = resolve_model_source(cfg, groups, groups.tp_size)
        self.tokenizer = load_tokenizer(self.source.tokenizer_dir)
        train_examples, self.data_stats = load_prompt_split(cfg.data, self.tokenizer, "train")
        self.sampler = PromptSampler(train_examples, shuffle=cfg.data.shuffle, seed=cfg.data.seed)
        val_examples = load_prompt_split(cfg.data, self.tokenizer, "val")[0] if cfg.trainer.test_freq else []
        self.val_examples = shard(val_examples, groups.dp_rank, groups.dp_size)
        self.reward_fn = get_reward_fn(cfg.algorithm.reward)
        self.policy = build_policy(cfg, self.source, groups)
        self.reference = build_reference(cfg, self.source, groups, self.policy)
        self.mapping = mapping_for(self.source.arch, self.source.padded_vocab_size)
        self.settings = dpo_settings(cfg, self.source.arch.vocab_size)
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.engine_src = engine_rank(groups)
        self.engine = build_engine(cfg, self.source, groups) if groups.rank == self.engine_src else None
        self.step, self.skipped_steps = 0, 0
        if resume_from is not None:
            self._load(resume_from)
        self.logger = MetricsLogger(
            self.out,
            cfg.logging,
            run_config=asdict(cfg),
            enabled=groups.rank == 0,
            total_steps=cfg.trainer.total_steps,
            resume_step=self.step if resume_from is not None else None,
        )
        self.timer = Timer(synchronize=torch.cuda.synchronize if torch.cuda.is_available() else None)
        self._sync()  # the engine starts from the policy's weights

    # ------------------------------------------------------------------------------------------- the loop
    def fit(self) -> None:
        trainer_cfg = self.cfg.trainer
        if self.step == 0 and trainer_cfg.test_freq:
            self.logger.log(0, self._validate())
        while self.step < trainer_cfg.total_steps:
            self.step += 1
            metrics = self.train_one_step()
            last = self.step == trainer_cfg.total_steps
            if trainer_cfg.test_freq and (self.step % trainer_cfg.test_freq == 0 or last):
                metrics.update(self._validate())
            self.logger.log(self.step, metrics)
            if last or (trainer_cfg.save_freq and self.step % trainer_cfg.save_freq == 0):
                self._save()
        self._finish()

    def train_one_step(self) -> dict[str, float]:
        cfg, groups, timer = self.cfg, self.groups, self.timer
        with timer("generate"):
            examples = shard(
                self.sampler.next_batch(cfg.trainer.prompts_per_step), groups.dp_rank, groups.dp_size
            )
            params = sampling_params(cfg.rollout, self.stop_ids, seed=cfg.trainer.seed + 7919 * self.step)
            samples = generate_scored(
                self.engine,
                examples,
                params,
                reward_fn=self.reward_fn,
                tokenizer=self.tokenizer,
                groups=groups,
                engine_src=self.engine_src,
            )
            experience = make_pairs(samples, examples, cfg.algorithm)
            maybe_dump(cfg.rollout, groups, self.step, samples, on_engine_rank=groups.rank == self.engine_src)
        counts = {
            "pairs": len(experience.items),
            "tokens": sum(s.num_tokens for i in experience.items for s in i),
            "chosen_tokens": sum(len(item[0].response_ids) for item in experience.items),
        }
        counts = sum_over_world(counts, tuple(counts), groups, contribute=groups.rank == self.engine_src)
        dpo_sums, grad_norm = torch.zeros(len(METRIC_SUMS)), None
        if counts["pairs"] > 0:
            batches = [
                b.to(groups.device)
                for b in pack_items(
                    experience.items,
                    token_budget=cfg.trainer.micro_batch_tokens,
                    pad_token_id=self.tokenizer.pad_token_id or 0,
                )
            ]
            with timer("ref"):
                compute_reference_logps(self.reference, groups, batches, self.settings)
            with timer("update"):
                dpo_sums, grad_norm, updated = train_step(
                    self.policy.model,
                    self.policy.optimizer,
                    groups,
                    batches,
                    self.settings,
                    global_pairs=int(counts["pairs"]),
                    global_chosen_tokens=int(counts["chosen_tokens"]),
                )
                self.policy.scheduler.step(1)
            self.skipped_steps += not updated
        else:
            self.skipped_steps += 1  # every prompt tied everywhere: nothing to learn from this batch
        if cfg.trainer.ref_update_freq and self.step % cfg.trainer.ref_update_freq == 0:
            refresh_reference(self.reference, self.policy)
        if self.step % cfg.rollout.sync_every == 0:
            with timer("sync"):
                self._sync()
        return self._metrics(experience, dpo_sums, grad_norm, counts)

    # ------------------------------------------------------------------------------------------- helpers
    def _metrics(self, experience, dpo_sums, grad_norm, counts) -> dict[str, float]:
        groups = self.groups
        rollout = sum_over_world(
            experience.sums, ROLLOUT_SUMS, groups, contribute=groups.rank == self.engine_src
        )
        on_last = groups.is_last_stage and groups.tp_rank == 0
        dpo = sum_over_world(
            dict(zip(METRIC_SUMS, dpo_sums.tolist())), METRIC_SUMS, groups, contribute=on_last
        )
        dpo["logp_diff/max"] = max_over_world(float(dpo_sums[-1]) if on_last else 0.0, groups)
        return step_metrics(
            rollout,
            dpo,
            counts,
            grad_norm=grad_norm,
            lr=self.policy.optimizer.param_groups[0]["lr"],
            times=self.timer.pop(),
            skipped_steps=self.skipped_steps,
        )

    def _sync(self) -> None:
        sync_weights(
            self.policy.model,
            self.mapping,
            self.groups,
            self.engine,
            bucket_bytes=self.cfg.rollout.sync_bucket_mb << 20,
        )

    def _validate(self) -> dict[str, float]:
        return validate(
            self.engine,
            self.policy.model,
            self.val_examples,
            rollout_cfg=self.cfg.rollout,
            stop_ids=self.stop_ids,
            reward_fn=self.reward_fn,
            tokenizer=self.tokenizer,
            groups=self.groups,
            engine_src=self.engine_src,
            settings=self.settings,
            token_budget=self.cfg.trainer.micro_batch_tokens,
        )

    def _save(self) -> None:
        state = {
            "scheduler": self.policy.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "model_signature": self.source.arch.signature(),
            "skipped_steps": self.skipped_steps,
            "config": asdict(self.cfg),
        }
        save_checkpoint(
            self.out,
            self.step,
            self.policy,
            self.reference,
            self.groups,
            state,
            keep_last_n=self.cfg.trainer.keep_last_n,
        )

    def _load(self, path: Path) -> None:
        state = load_checkpoint(
            path, self.policy, self.reference, self.groups, model_signature=self.source.arch.signature()
        )
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.skipped_steps = state["step"], state.get("skipped_steps", 0)
        if self.groups.rank == 0:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def _finish(self) -> None:
        if self.cfg.trainer.export_hf:
            write_hf_checkpoint(
                self.policy.model,
                self.mapping,
                self.groups,
                self.out / "hf",
                hf_config=self.source.arch.hf_config,
                dtype=next(self.policy.model.parameters()).dtype,
                tokenizer_src=self.source.tokenizer_dir,
            )
        self.logger.finish()
        if self.engine is not None:
            self.engine.shutdown()


def dpo_settings(cfg: Config, vocab_size: int) -> DPOSettings:
    a = cfg.algorithm
    return DPOSettings(
        beta=a.beta,
        loss_type=a.loss_type,
        label_smoothing=a.label_smoothing,
        reference_free=a.reference_free,
        rpo_alpha=a.rpo_alpha,
        length_normalize=a.length_normalize,
        vocab_size=vocab_size,
        chunk_tokens=cfg.trainer.logprob_chunk_tokens,
        sample_temperature=cfg.rollout.temperature,
    )


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
