"""Rollout overlapped with training (``rollout.max_staleness=1``).

While step t trains, the engine already generates the batch of step t+1, from the weights it holds:

- ``algorithm.sample_from=policy``: the policy after step t-1 (synced at its end). Step t+1 then trains on samples
  one policy version old (``rollout/staleness`` = 1): one-step off-policy, as slime, NeMo-RL and verl overlap.
- ``algorithm.sample_from=reference`` (SPIN's opponent): the reference, which only changes at a refresh. The next
  batch is prefetched only when no refresh lands in between, so its samples are exactly those of the synchronous
  loop (staleness 0, the same tokens, the same run); after a refresh the next batch is generated once the new
  reference is synced.

The generation runs in a thread on the replica's engine rank (the engine itself is a separate process: SGLang
servers, or ``rollout.hf_process=separate``); the step waits for it after its update and before the weight sync,
so a sync never lands in the middle of a generation. The other ranks of the model-parallel group receive the
samples then (a collective, on the main thread). A prefetch that fails is dropped — its prompts go back to the
sampler and its step generates them itself, with the engine restarts of a normal step.

The prefetched batch is part of the checkpoint (``prefetch/dp_<r>.pt`` beside the shards, written before the
checkpoint is marked complete): a run killed while the next batch was being generated resumes from the batch that
was complete at the checkpoint, and ends bit-identical to an uninterrupted run with the same ``max_staleness``.
"""

from __future__ import annotations

import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from spin_megatron.algorithm.experience import attempt_scored, sampling_params, sampling_seed
from spin_megatron.errors import ConfigError
from spin_megatron.parallel.collectives import broadcast_object, max_over_world
from spin_megatron.training.minibatch import mini_batch_shares


@dataclass
class Prefetch:
    step: int  # the rollout step these samples are for
    shares: list  # that step's prompts on this replica, one list per mini-batch
    version: (
        int  # the engine's weights that generated them: policy step (sample_from=policy) or reference version
    )
    sampler_before: dict  # the sampler before these prompts were drawn (put back if the prefetch fails)
    samples: list | None = None  # once collected (every rank of the replica)
    future: Future | None = None  # in flight (engine rank)


class RolloutOverlap:
    """The trainer's prefetch of its next batch. ``start`` after a step's samples are in hand, ``finish`` after
    its update (before the weight sync), ``take`` at the next step."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.pending: Prefetch | None = None
        # auto-placed SGLang servers on the trainer's own GPUs are colocated: known only once they run
        inner = getattr(trainer.engine, "engine", None)
        mode = broadcast_object(getattr(inner, "sync_mode", None), trainer.engine_src, trainer.groups.replica)
        if mode == "colocated":
            raise ConfigError(
                "rollout.max_staleness=1 overlaps generation with training, but these SGLang servers share the "
                "training GPUs (colocated): give them GPUs of their own (rollout.sglang.gpu_ids, launcher=ray, "
                "urls) or set rollout.max_staleness=0"
            )
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rollout-prefetch") if trainer.engine else None

    # ----- the step's three points ---------------------------------------------------------------------------
    def take(self, step: int) -> Prefetch | None:
        """This step's collected batch, if one was prefetched (and is within the staleness bound)."""
        prefetch, self.pending = self.pending, None
        if prefetch is None or prefetch.samples is None:
            return None
        if prefetch.step != step or self.staleness(prefetch.version) > self.trainer.cfg.rollout.max_staleness:
            self.trainer.sampler.load_state_dict(prefetch.sampler_before)  # never trained on: generated anew
            return None
        return prefetch

    def start(self) -> None:
        """Draw the next step's prompts and start generating them, if the next step may use them."""
        t = self.trainer
        nxt = t.step + 1
        if nxt > t.cfg.trainer.total_steps:
            return
        if t._sample_source == "reference":
            refresh = t.cfg.trainer.ref_update_freq and t.step % t.cfg.trainer.ref_update_freq == 0
            if refresh:
                return  # the next batch must come from the refreshed reference: generated at its step
            if not (t._engine_holds == "reference" or t._ref_is_policy):
                t._sync()  # validation left the policy in the engine
            version = t.ref_version
        else:
            version = t._engine_version
        sampler_before = t.sampler.state_dict()
        shares = mini_batch_shares(
            t.sampler.next_batch(t.cfg.trainer.prompts_per_step),
            t.groups.dp_rank,
            t.groups.dp_size,
            t.cfg.trainer.mini_batches,
        )
        self.pending = Prefetch(nxt, shares, version, sampler_before)
        if t.engine is not None:
            examples = [ex for share in shares for ex in share]
            params = sampling_params(t.cfg.rollout, t.stop_ids, seed=sampling_seed(t.cfg, nxt, t.groups))
            self.pending.future = self._pool.submit(
                attempt_scored,
                t.engine,
                examples,
                params,
                t.reward_fn,
                t.tokenizer,
                t.metric_fns,
                t.reward_model,
            )

    def finish(self) -> None:
        """Wait for the prefetch and hand its samples to every rank of the replica (collective)."""
        prefetch = self.pending
        if prefetch is None:
            return
        t = self.trainer
        outcome = prefetch.future.result() if prefetch.future is not None else None
        prefetch.future = None
        status, payload = broadcast_object(outcome, t.engine_src, t.groups.replica)
        if status == "error":  # the reward function raised: as in a normal step, on every rank
            raise payload
        # agreed over the world: a replica whose prefetch failed generates at its step, and that generation's
        # restarts and re-syncs involve every replica (experience.generate_scored), so all of them do
        if max_over_world(float(status != "ok"), t.groups) > 0.0:
            if status == "ok":
                payload = "another replica's prefetch failed"
            if t.groups.rank == t.engine_src:
                print(
                    f"rollout: the prefetched batch of step {prefetch.step} failed ({payload}); that step "
                    "generates it again itself",
                    file=sys.stderr,
                    flush=True,
                )
            t.sampler.load_state_dict(prefetch.sampler_before)
            self.pending = None
            return
        prefetch.samples = payload

    def staleness(self, version: int) -> int:
        """Policy versions between the weights that sampled and those trained at this step (0: on-policy)."""
        t = self.trainer
        if t._sample_source == "reference":
            return t.ref_version - version
        return (t.step - 1) - version

    # ----- checkpoint ----------------------------------------------------------------------------------------
    def sampler_state(self) -> dict:
        """The sampler as checkpointed: before the prefetched prompts (a resume that cannot use the prefetched
        batch — another layout, a lost file, a save while it was in flight — draws them again; one that can steps
        past them)."""
        if (
            self.pending is not None
        ):  # collected (saved beside) or still in flight (a halt mid-update: not saved)
            return self.pending.sampler_before
        return self.trainer.sampler.state_dict()

    def save(self, folder: Path) -> None:
        """On the replica's engine rank, inside the checkpoint being written: the collected next batch."""
        t = self.trainer
        if self.pending is None or self.pending.samples is None or t.groups.rank != t.engine_src:
            return
        p = self.pending
        (folder / "prefetch").mkdir(exist_ok=True)
        state = {"dp_size": t.groups.dp_size, "step": p.step, "version": p.version, "shares": p.shares,
                 "sampler_before": p.sampler_before, "samples": p.samples}  # fmt: skip
        torch.save(state, folder / "prefetch" / f"dp_{t.groups.dp_rank:05d}.pt")

    def load(self, checkpoint: Path) -> None:
        """Every rank of a replica reads its replica's prefetched batch (none: the step generates it). A batch
        saved with another data-parallel size is dropped: its shares do not split the same way."""
        t = self.trainer
        path = checkpoint / "prefetch" / f"dp_{t.groups.dp_rank:05d}.pt"
        if not path.is_file():
            return
        state = torch.load(path, weights_only=False)
        if state["dp_size"] != t.groups.dp_size or state["step"] != t.step + 1:
            if t.groups.rank == 0:
                print(
                    f"resume: the prefetched batch in {checkpoint} does not fit this layout; regenerating it"
                )
            return  # the checkpoint's sampler is before its prompts (sampler_state): the step draws them
        t.sampler.next_batch(
            t.cfg.trainer.prompts_per_step
        )  # past the prefetched prompts, as when they were drawn
        self.pending = Prefetch(state["step"], state["shares"], state["version"], state["sampler_before"],
                                samples=state["samples"])  # fmt: skip

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
