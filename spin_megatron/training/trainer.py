"""The SPIN / online-DPO loop. ``train_one_step`` reads as the step:

1. take the next ``prompts_per_step`` prompts (never one twice in a batch), split over the data-parallel replicas;
2. generate ``rollout.n`` samples per prompt on each replica's engine and score them (``_generate``; with
   ``rollout.max_staleness=1`` they were generated while the last step trained: ``overlap.py``);
3. build the pairs (``experience.make_pairs``: best vs worst online, gold vs sample in SPIN mode);
4. train on them: reference log-probs, then the mini-batches' DPO updates (``updates.train_on_batch``);
5. refresh the reference every ``ref_update_freq`` steps (a new SPIN iteration);
6. sync the engine with the weights it samples from (``_sync``), then metrics, validation, checkpoint (``fit``).

Engine failures are retried with restarts, agreed over the world, and past them the run saves and stops in one
line; a NaN gradient skips its update.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from spin_megatron.algorithm.experience import (
    generate_scored,
    make_pairs,
    metric_reward_fns,
    rollout_sum_keys,
    sampling_params,
    sampling_seed,
    stop_token_ids,
)
from spin_megatron.algorithm.rewards import get_reward_fn
from spin_megatron.algorithm.step_metrics import step_metrics
from spin_megatron.config import Config
from spin_megatron.data import PromptExample, PromptSampler, shard
from spin_megatron.errors import TrainingHalted
from spin_megatron.faults import kill_point
from spin_megatron.models.hf_export import write_hf_checkpoint
from spin_megatron.models.mapping import mapping_for
from spin_megatron.parallel.collectives import broadcast_object, max_over_world, sum_over_world
from spin_megatron.parallel.dpo_step import (
    METRIC_SUMS,
)
from spin_megatron.parallel.state import ParallelGroups
from spin_megatron.parallel.weight_sync import engine_rank, sync_weights
from spin_megatron.planning.fit import check_training_memory
from spin_megatron.reward_model import build_reward_scoring
from spin_megatron.rollout import build_engine, maybe_dump
from spin_megatron.rollout.supervisor import EngineSupervisor, RolloutError
from spin_megatron.training.checkpoint import load_trainer_checkpoint, resume_path, save_trainer_checkpoint
from spin_megatron.training.metrics import MetricsLogger, Timer
from spin_megatron.training.minibatch import mini_batch_shares
from spin_megatron.training.optim_state import reset_state, restart_schedule
from spin_megatron.training.overlap import RolloutOverlap
from spin_megatron.training.policy import (
    build_policy,
    build_reference,
    refresh_reference,
    resolve_model_source,
)
from spin_megatron.training.preemption import PreemptionFlag
from spin_megatron.training.updates import dpo_settings, train_on_batch
from spin_megatron.training.validation import validate


@dataclass
class TrainingData:
    tokenizer: object
    train: list[PromptExample]
    val: list[PromptExample]
    train_stats: object = None


class SPINTrainer:
    def __init__(
        self,
        cfg: Config,
        groups: ParallelGroups,
        data: TrainingData,
        preemption: PreemptionFlag | None = None,
    ):
        self.cfg, self.groups, self.out = cfg, groups, Path(cfg.trainer.output_dir)
        self.preemption = preemption or PreemptionFlag()
        resume_from = resume_path(cfg)
        self.tokenizer = data.tokenizer
        self.sampler = PromptSampler(data.train, shuffle=cfg.data.shuffle, seed=cfg.data.seed)
        self.val_examples = shard(data.val, groups.dp_rank, groups.dp_size)
        self.reward_fn = get_reward_fn(cfg.algorithm.rule_reward) if cfg.algorithm.rule_reward else None
        self.metric_fns = metric_reward_fns(cfg.algorithm)  # logged beside the reward, never paired on
        self.source = resolve_model_source(cfg, groups, groups.tp_size)
        check_training_memory(
            cfg, self.source.arch, groups.world_size
        )  # GPU only: refuse plans that cannot fit
        self.policy = build_policy(cfg, self.source, groups)
        self.reference = build_reference(cfg, self.source, groups, self.policy)
        self.mapping = mapping_for(self.source.arch, self.source.padded_vocab_size)
        self.settings = dpo_settings(cfg, self.source.arch.vocab_size)
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.engine_src = engine_rank(groups)
        self.engine, self.reward_model = None, None
        if groups.rank == self.engine_src and cfg.reward_model.enabled:  # scores beside the engine
            self.reward_model = build_reward_scoring(cfg, str(groups.device))
        if groups.rank == self.engine_src:
            self.engine = EngineSupervisor(
                lambda: build_engine(cfg, self.source, groups),
                timeout_s=cfg.rollout.timeout_s,
                vocab_size=self.source.arch.vocab_size,
            )
        self.step, self.skipped_steps, self.consecutive_skips = 0, 0, 0
        self.ref_version = 0  # bumped at every reference refresh
        # SPIN's opponent: the engine holds the reference (synced at refreshes), else the policy
        self._sample_source = cfg.algorithm.sampler
        self._engine_holds = None  # which model's weights the engine holds: "policy" | "reference"
        # the reference equals the policy: built as its copy, or a hard refresh and no update since (not known
        # after a resume: then False, which costs at most one redundant sync)
        self._ref_is_policy = resume_from is None
        self._engine_version = 0  # sample_from=policy: the step whose policy the engine holds
        self._staleness = 0  # of the batch being trained (policy versions between sampler and trainee)
        self.overlap = RolloutOverlap(self) if cfg.rollout.max_staleness else None
        if resume_from is not None:
            load_trainer_checkpoint(self, resume_from)
        self.logger = MetricsLogger(
            self.out,
            cfg.logging,
            run_config=asdict(cfg),
            enabled=groups.rank == 0,
            total_steps=cfg.trainer.total_steps,
            resume_step=self.step if resume_from is not None else None,
        )
        self.timer = Timer(synchronize=torch.cuda.synchronize if torch.cuda.is_available() else None)
        self._sync()  # the engine starts from the weights it samples from (on resume: as saved)

    # ------------------------------------------------------------------------------------------- the loop
    def fit(self) -> str:
        """Train to ``trainer.total_steps``; returns "finished" or "preempted" (checkpoint written either way)."""
        trainer_cfg = self.cfg.trainer
        if self.step == 0 and trainer_cfg.test_freq:
            self.logger.log(0, self._validate_or_halt({}))
        while self.step < trainer_cfg.total_steps:
            self.step += 1
            started = time.perf_counter()
            metrics = self.train_one_step()
            metrics["time/step"] = time.perf_counter() - started  # the whole step (console: s/step)
            last = self.step == trainer_cfg.total_steps
            if trainer_cfg.test_freq and (self.step % trainer_cfg.test_freq == 0 or last):
                metrics.update(self._validate_or_halt(metrics))
            self.logger.log(self.step, metrics)
            saved = last or (trainer_cfg.save_freq and self.step % trainer_cfg.save_freq == 0)
            if saved:
                self._save()
            if not last and self.preemption.requested(self.groups):
                if not saved:
                    self._save()
                self.logger.finish()
                return "preempted"
        self._finish()
        return "finished"

    def train_one_step(self) -> dict[str, float]:
        cfg, groups, timer = self.cfg, self.groups, self.timer
        sampler_state = self.sampler.state_dict()
        prefetched = self.overlap.take(self.step) if self.overlap is not None else None
        with timer("generate"):
            if prefetched is not None:  # generated while the last step trained
                shares, samples, error = prefetched.shares, prefetched.samples, None
                self._staleness = self.overlap.staleness(prefetched.version)
                sampler_state = prefetched.sampler_before
            else:
                shares, samples, error = self._generate()
            examples = [ex for share in shares for ex in share]
            experience = make_pairs(samples or [], examples, cfg.algorithm, margin=cfg.reward_model.margin)
            maybe_dump(
                cfg.rollout, groups, self.step, samples or [], on_engine_rank=groups.rank == self.engine_src
            )
        syncs_this_step = self._sync_due()
        if self.engine is not None and self.overlap is None:
            # Colocated SGLang: free its GPU memory for the update (no-op otherwise). Released weights come
            # back empty, so they are released only when this step's sync reloads them.
            self.engine.sleep(release_weights=syncs_this_step)
        kill_point("generate", self.step)
        counts = {
            "pairs": len(experience.items),
            "tokens": sum(s.num_tokens for i in experience.items for s in i),
            "rollout_failed": float(error is not None),
            "restarts": float(self.engine.restarts) if self.engine is not None else 0.0,
        }
        counts = sum_over_world(counts, tuple(counts), groups, contribute=groups.rank == self.engine_src)
        if counts["rollout_failed"]:
            self._halt_after_rollout_failure(error, sampler_state)
        counts["staleness"] = max_over_world(float(self._staleness), groups)
        if self.overlap is not None:
            self.overlap.start()  # the next batch, generated while this one trains
        ref_version = self.ref_version
        dpo_sums, grad_norm, updates = train_on_batch(self, experience, shares)
        counts.update(updates)
        if cfg.trainer.ref_update_freq and self.step % cfg.trainer.ref_update_freq == 0:
            self._refresh_reference()
        if self.overlap is not None:
            with timer("wait_rollout"):
                self.overlap.finish()  # before the sync: a sync never lands inside a generation
        if syncs_this_step or (self._sample_source == "reference" and self.ref_version != ref_version):
            kill_point("sync", self.step)
            with timer("sync"):
                self._sync(save_on_failure=True)
        if self.engine is not None and self.overlap is None:
            self.engine.wake()  # validation, the next step and a checkpointed stop all find it awake
        return self._metrics(experience, dpo_sums, grad_norm, counts)

    def _generate(self):
        """This step's prompts and their scored samples, generated now (the synchronous loop)."""
        cfg, groups = self.cfg, self.groups
        if self.engine is not None:
            self.engine.wake()  # colocated SGLang: take the KV cache back
        if self._sample_source == "reference" and not (
            self._engine_holds == "reference" or self._ref_is_policy
        ):
            self._sync()  # validation left the policy in an engine that samples from the reference
        self._staleness = 0 if self._sample_source == "reference" else (self.step - 1) - self._engine_version
        shares = mini_batch_shares(
            self.sampler.next_batch(cfg.trainer.prompts_per_step),
            groups.dp_rank,
            groups.dp_size,
            cfg.trainer.mini_batches,
        )
        examples = [ex for share in shares for ex in share]
        params = sampling_params(cfg.rollout, self.stop_ids, seed=sampling_seed(cfg, self.step, groups))
        samples, error = generate_scored(
            self.engine,
            examples,
            params,
            reward_fn=self.reward_fn,
            metric_fns=self.metric_fns,
            reward_model=self.reward_model,
            tokenizer=self.tokenizer,
            groups=groups,
            engine_src=self.engine_src,
            max_restarts=cfg.rollout.max_restarts,
            resync=self._sync,
        )
        return shares, samples, error

    def _sync_due(self) -> bool:
        """Whether this step ends with a weight sync (known before the update: colocated engines release
        their weights only then)."""
        t = self.cfg.trainer
        if self._sample_source == "policy":
            return self.step % self.cfg.rollout.sync_every == 0
        if t.ref_update_freq:
            return self.step % t.ref_update_freq == 0
        if t.ref_model_sync_steps:  # refreshes counted in optimizer steps: one may land inside this step
            done = int(self.policy.scheduler.num_steps)
            return (done % t.ref_model_sync_steps) + t.updates_per_rollout >= t.ref_model_sync_steps
        return False

    def _samples_from_scorer(self, first_update: bool, sampled_by: int) -> bool:
        """Whether the model scoring this update generated the samples: the policy before its first update of a
        step that follows a sync, or the reference version that sampled."""
        if self._sample_source == "policy":
            return (
                first_update and self._staleness == 0 and (self.step - 1) % self.cfg.rollout.sync_every == 0
            )
        return self.ref_version == sampled_by

    def _refresh_reference(self) -> None:
        alpha = self.cfg.trainer.ref_model_mixup_alpha
        refresh_reference(self.reference, self.policy, alpha=alpha)
        self.ref_version += 1
        self._ref_is_policy = alpha == 1.0
        if self.cfg.trainer.reset_optimizer_on_refresh:  # a new SPIN iteration, as a new uclaml run
            reset_state(self.policy.optimizer)
            restart_schedule(self.policy.scheduler)

    def _halt_after_rollout_failure(self, error: str | None, sampler_state: dict) -> None:
        """Save the state before this step (its prompts are retried on resume), then stop every rank."""
        self.sampler.load_state_dict(sampler_state)
        self.step -= 1
        self._save()
        raise TrainingHalted(
            f"rollout failed after {self.cfg.rollout.max_restarts} engine restart(s)"
            + (f" ({error})" if error else " on another replica")
            + f"; saved step {self.step} in {self.out / 'checkpoints'}; fix the engine and resume (trainer.resume=auto)"
        )

    # ------------------------------------------------------------------------------------------- helpers
    def _metrics(self, experience, dpo_sums, grad_norm, counts) -> dict[str, float]:
        groups, rm = self.groups, self.cfg.reward_model
        rule_scores = not rm.enabled or rm.combine == "rule_then_model"  # the rule sets the ranking score
        rollout = sum_over_world(
            experience.sums,
            rollout_sum_keys(self.cfg.algorithm),
            groups,
            contribute=groups.rank == self.engine_src,
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
            rpo_alpha=self.cfg.algorithm.rpo_alpha,
            sampler=self._sample_source,
            score_is_rule=rule_scores,
        )

    def _sync(self, save_on_failure: bool = False, source: str | None = None) -> None:
        """``source`` (default: the model the samples come from, ``algorithm.sample_from``) → engine. A sync that
        fails part-way (a server died, an update was refused) restarts the engine and syncs again,
        ``rollout.max_restarts`` times; then the run saves (after an update) and stops. Collective over the
        model-parallel group: every rank learns the engine rank's outcome."""
        source = source or self._sample_source
        model = self.reference if source == "reference" else self.policy.model
        max_restarts = self.cfg.rollout.max_restarts
        for attempt in range(max_restarts + 1):
            sync_weights(
                model,
                self.mapping,
                self.groups,
                self.engine,
                bucket_bytes=self.cfg.rollout.sync_bucket_mb << 20,
            )
            error = self.engine.take_sync_error() if self.engine is not None else None
            error = broadcast_object(error, self.engine_src, self.groups.replica)
            # agreed over the world: an export can be collective across replicas (MoE experts over EP), so every
            # replica syncs again when any failed, and a halt stops them all
            if max_over_world(float(error is not None), self.groups) == 0.0:
                self._engine_holds = source
                if source == "policy":
                    self._engine_version = self.step
                return
            if attempt < max_restarts and error is not None and self.engine is not None:
                print(f"rollout: weight sync failed ({error}); restarting the engine", file=sys.stderr)
                self.engine.restart()
        saved = (
            f"saved step {self.step} in {self.out / 'checkpoints'}" if save_on_failure else "nothing to save"
        )
        if save_on_failure:
            self._save()
        error = error or "on another replica"
        raise TrainingHalted(
            f"weight sync into the rollout engine failed after {max_restarts} engine restart(s) ({error}); "
            f"{saved}; fix the engine and resume (trainer.resume=auto)"
        )

    def _validate_or_halt(self, step_metrics: dict[str, float]) -> dict[str, float]:
        """Validation metrics; if its generation fails past the engine's restarts, the step's training metrics
        are logged and its state saved (a resume goes on with the next step), then the run stops in one line."""
        try:
            return self._validate()
        except RolloutError as exc:
            if self.step == 0:
                raise TrainingHalted(
                    f"validation before the first step: {exc}; fix the engine and rerun"
                ) from exc
            self.logger.log(self.step, step_metrics)
            self._save()
            raise TrainingHalted(
                f"{exc} (after {self.cfg.rollout.max_restarts} engine restart(s)); saved step {self.step} in "
                f"{self.out / 'checkpoints'} without its validation; fix the engine and resume (trainer.resume=auto)"
            ) from exc

    def _validate(self) -> dict[str, float]:
        if self.engine is not None:
            self.engine.wake()  # no-op when awake (train_one_step wakes it at its end)
        if self._engine_holds == "reference" and not self._ref_is_policy:
            # validation measures the policy; the next step puts the opponent back before it samples
            self._sync(source="policy")
        return validate(
            self.engine,
            self.policy.model,
            self.val_examples,
            rollout_cfg=self.cfg.rollout,
            stop_ids=self.stop_ids,
            reward_fn=self.reward_fn,
            # without a rule, the reward model scores the greedy answers (a pairwise judge cannot: refused)
            reward_model=self.reward_model if self.reward_fn is None else None,
            tokenizer=self.tokenizer,
            groups=self.groups,
            engine_src=self.engine_src,
            settings=self.settings,
            token_budget=self.cfg.trainer.micro_batch_tokens,
            max_restarts=self.cfg.rollout.max_restarts,
            resync=lambda: self._sync(source="policy"),
            gold=self.cfg.data.has_gold,
        )

    def _save(self) -> None:
        save_trainer_checkpoint(self)

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
        if self.overlap is not None:
            self.overlap.close()
        if self.engine is not None:
            self.engine.shutdown()
        if self.reward_model is not None:
            self.reward_model.shutdown()
