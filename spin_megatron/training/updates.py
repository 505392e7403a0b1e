"""One rollout batch's optimizer steps (step 4 of the loop in ``trainer.py``): reference log-probs, then
``prompts_per_step / mini_batch_size`` mini-batches × ``update_epochs`` DPO updates, each the exact mean over its
mini-batch's pairs at any layout; the pairs re-split over the replicas by tokens first (``trainer.balance_dp``).

Functions of the trainer (they read its models, settings and counters and may refresh its reference inside a
step, ``trainer.ref_model_sync_steps``), kept apart so that ``trainer.py`` reads as the loop.
"""

from __future__ import annotations

import torch

from spin_megatron.config import Config
from spin_megatron.errors import TrainingHalted
from spin_megatron.parallel.balance import balance_over_replicas
from spin_megatron.parallel.collectives import sum_over_world
from spin_megatron.parallel.ddp import finish_param_gather
from spin_megatron.parallel.dpo_step import (
    METRIC_SUMS,
    DPOSettings,
    compute_reference_logps,
    prepare_batch_terms,
    sample_agreement,
    train_step,
)
from spin_megatron.parallel.packing import ScoredSequence, pack_items
from spin_megatron.rollout import reported_logprob_temperature
from spin_megatron.training.minibatch import mini_batches


def train_on_batch(trainer, experience, shares):
    """Reference log-probs, then the optimizer steps of this rollout batch: ``prompts_per_step /
    mini_batch_size`` mini-batches (contiguous parts of the global batch, each sharded over the replicas: the
    same prompts at any DP size), each one update whose loss is the exact mean over that mini-batch's pairs, ``update_epochs`` times.

    A mini-batch without pairs anywhere takes no step; a NaN/Inf gradient skips its step (weights unchanged).
    The LR schedule advances on applied updates only (Megatron's rule). Returns the metric sums over all
    updates, the last grad norm and the update counters."""
    t, groups = trainer.cfg.trainer, trainer.groups
    chunks = mini_batches(experience.items, experience.item_prompts, shares)
    counters = {"updates": 0.0, "nan_skipped": 0.0, "zero_pair": 0.0}
    if t.balance_dp and groups.dp_size > 1:  # pairs re-split over the replicas by tokens
        chunks, spread = balance_over_replicas(chunks, groups)
        counters.update(
            {"dp_token_spread/before": spread["before"], "dp_token_spread/after": spread["after"]}
        )
    local = [[len(c), sum(len(i[0].response_ids) for i in c)] for c in chunks]
    flat = {f"{k}/{j}": float(v) for k, row in enumerate(local) for j, v in enumerate(row)}
    totals = sum_over_world(flat, tuple(flat), groups, contribute=groups.rank == trainer.engine_src)
    pad = trainer.tokenizer.pad_token_id or 0
    batches = [
        [b.to(groups.device) for b in pack_items(c, token_budget=t.micro_batch_tokens, pad_token_id=pad)]
        for c in chunks
    ]
    sums = torch.zeros(len(METRIC_SUMS), device=groups.device)
    grad_norm = None
    ref_of = [None] * len(chunks)  # the reference version each mini-batch's ref log-probs were computed with
    sampled_by = trainer.ref_version  # the reference that sampled this batch (sample_from=reference)
    first = True
    for _epoch in range(t.update_epochs):
        for k, mb in enumerate(batches):
            pairs, chosen_tokens = int(totals[f"{k}/0"]), int(totals[f"{k}/1"])
            if pairs == 0:
                counters["zero_pair"] += 1
                continue
            if ref_of[k] != trainer.ref_version:
                # the engine sampled from this very reference: measure the agreement on it (once per step)
                measure = trainer._sample_source == "reference" and trainer.ref_version == sampled_by
                measure = measure and ref_of[k] is None
                with trainer.timer("ref"):
                    agreement = compute_reference_logps(
                        trainer.reference, groups, mb, trainer.settings, agreement=measure
                    )
                ref_of[k] = trainer.ref_version
                sums[-3:-1] += agreement[:2]
                sums[-1] = torch.maximum(sums[-1], agreement[2])
            with trainer.timer("update"):
                prepare_batch_terms(trainer.policy.model, groups, mb, trainer.settings)
                step_sums, norm, updated = train_step(
                    trainer.policy.model,
                    trainer.policy.optimizer,
                    groups,
                    mb,
                    trainer.settings,
                    global_pairs=pairs,
                    global_chosen_tokens=chosen_tokens,
                    step=trainer.step,
                    # the engine sampled with the policy's current weights: the first update sees them
                    agreement=first and trainer._sample_source == "policy" and trainer._staleness == 0,
                    sample_stats=trainer._samples_from_scorer(first, sampled_by),
                )
            first = False
            sums[:-1] += step_sums[:-1]
            sums[-1] = torch.maximum(sums[-1], step_sums[-1])
            if not updated:
                counters["nan_skipped"] += 1
                trainer.skipped_steps += 1
                trainer.consecutive_skips += 1
                if trainer.consecutive_skips >= t.max_consecutive_skips:
                    trainer._save()
                    raise TrainingHalted(
                        f"{trainer.consecutive_skips} consecutive optimizer steps had NaN/Inf gradients and were "
                        f"skipped (weights unchanged by them); saved the state as step {trainer.step} (its remaining "
                        f"optimizer steps and reference refresh not taken) in {trainer.out / 'checkpoints'}; lower "
                        "optim.lr or check the data, then resume"
                    )
                continue
            trainer.consecutive_skips = 0
            trainer._ref_is_policy = False
            grad_norm = norm
            counters["updates"] += 1
            trainer.policy.scheduler.step(1)
            if t.ref_model_sync_steps and trainer.policy.scheduler.num_steps % t.ref_model_sync_steps == 0:
                trainer._refresh_reference()
    if counters["zero_pair"] == len(batches) * t.update_epochs:  # no pair anywhere: nothing trained
        agreement = agreement_without_pairs(trainer, experience.samples)
        sums[-3:-1], sums[-1] = agreement[:2], agreement[2]
    # parallel.overlap_param_gather: the last update's all-gather waits for a next forward, and the weights are
    # read before one (engine sync, reference refresh, checkpoint, export)
    finish_param_gather(trainer.policy.model)
    return sums, grad_norm, counters


def agreement_without_pairs(trainer, samples) -> torch.Tensor:
    """``rollout/logp_diff`` (the check of the last weight sync) needs samples, not pairs: on a step without
    pairs, the model that sampled scores this replica's samples in a forward pass of their own."""
    groups, zeros = trainer.groups, torch.zeros(3, device=trainer.groups.device)
    if trainer._sample_source == "policy" and not trainer._samples_from_scorer(True, trainer.ref_version):
        return zeros  # the engine sampled from an older policy (overlap, sync_every > 1)
    scored = [[ScoredSequence(s.prompt_ids, s.response_ids, s.logprobs)] for s in samples if s.logprobs]
    if not scored:
        return zeros
    budget, pad = trainer.cfg.trainer.micro_batch_tokens, trainer.tokenizer.pad_token_id or 0
    batches = [b.to(groups.device) for b in pack_items(scored, token_budget=budget, pad_token_id=pad)]
    model = trainer.reference if trainer._sample_source == "reference" else trainer.policy.model
    with trainer.timer("ref"):
        return sample_agreement(model, groups, batches, trainer.settings)


def dpo_settings(cfg: Config, vocab_size: int) -> DPOSettings:
    a = cfg.algorithm
    return DPOSettings(
        beta=a.beta,
        loss_type=a.canonical_loss,
        label_smoothing=a.label_smoothing,
        reference_free=a.reference_free,
        rpo_alpha=a.rpo_alpha,
        length_normalize=a.length_normalized,
        discopop_tau=a.discopop_tau,
        ld_alpha=a.ld_alpha,
        use_weighting=a.use_weighting,
        chosen_is_gold=a.mode == "spin",
        vocab_size=vocab_size,
        chunk_tokens=cfg.trainer.logprob_chunk_tokens,
        sample_temperature=reported_logprob_temperature(cfg.rollout),
        fused_head=cfg.trainer.logprob_impl == "fused_head",
    )
