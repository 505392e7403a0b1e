"""The DPO update and the reference pass as Megatron ``forward_step`` / ``loss_func`` pairs.

Both run through :func:`run_schedule` (Megatron's pipeline schedules) over packed micro-batches. The loss of a
micro-batch is the *sum* of its pairs' DPO losses and it reports its number of pairs as Megatron's
``num_tokens`` (``calculate_per_token_loss``), so Megatron divides the summed gradients by the global number of
pairs: the update is the mean over all pairs of the step, independent of micro-batching and data parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from spin_megatron.logprob import vocab_parallel_logprobs
from spin_megatron.loss import dpo_loss
from spin_megatron.parallel.packing import PackedMicroBatch, sequence_sums
from spin_megatron.parallel.schedule import run_schedule
from spin_megatron.parallel.state import ParallelGroups

METRIC_SUMS = (
    "pairs",
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "nll/chosen_tokens",
    "tokens/chosen",
)


@dataclass(frozen=True, kw_only=True)
class DPOSettings:
    beta: float
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reference_free: bool = False
    rpo_alpha: float = 0.0
    length_normalize: bool = False
    vocab_size: int  # real vocabulary: padded rows are excluded from the softmax
    chunk_tokens: int = 1024


def _forward(batch: PackedMicroBatch, model):
    return model(batch.input_ids, batch.position_ids, None, packed_seq_params=batch.packed_seq_params())


def _sequence_logps(output, batch, groups, settings) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sequence log-probs as the loss uses them, per-sequence summed log-probs)."""
    token_logps = vocab_parallel_logprobs(
        output,
        batch.targets,
        tp_group=groups.tp,
        vocab_size=settings.vocab_size,
        chunk_tokens=settings.chunk_tokens,
    )
    sums = sequence_sums(token_logps, batch)
    if settings.length_normalize:
        return sums / batch.response_lengths.clamp(min=1.0), sums
    return sums, sums


def _reference_loss(batch, groups, settings, output):
    used, _ = _sequence_logps(output, batch, groups, settings)
    batch.ref_logps = used.detach()
    zero = output.sum() * 0.0
    return zero, torch.tensor(0, dtype=torch.int, device=output.device), {}


@torch.no_grad()
def compute_reference_logps(
    reference, groups: ParallelGroups, batches: list[PackedMicroBatch], settings: DPOSettings
) -> None:
    """Fill ``batch.ref_logps`` on the last pipeline stage, with the frozen reference model."""
    run_schedule(
        reference,
        groups,
        lambda b, m: (_forward(b, m), partial(_reference_loss, b, groups, settings)),
        batches,
        num_microbatches=len(batches),
        seq_length=batches[0].input_ids.shape[1],
        micro_batch_size=1,
        forward_only=True,
    )


def _policy_loss(batch, groups, settings, pair_scale, output):
    used, sums = _sequence_logps(output, batch, groups, settings)
    if batch.num_pairs == 0:  # a placeholder micro-batch of a rank without pairs: contributes nothing
        zero = output.sum() * 0.0
        return zero, torch.tensor(0, dtype=torch.int, device=output.device), _empty_stats(output.device)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        used[0::2],
        used[1::2],
        batch.ref_logps[0::2],
        batch.ref_logps[1::2],
        beta=settings.beta,
        loss_type=settings.loss_type,
        label_smoothing=settings.label_smoothing,
        reference_free=settings.reference_free,
    )
    loss = losses.sum()
    chosen_tokens = batch.response_lengths[0::2].sum()
    chosen_nll = -sums[0::2].sum()
    if settings.rpo_alpha:
        # RPO: NLL per chosen token over the whole step; Megatron divides by the global pair count afterwards.
        loss = loss + settings.rpo_alpha * chosen_nll * pair_scale
    stats = torch.stack(
        [
            torch.tensor(float(batch.num_pairs), device=output.device),
            losses.detach().sum(),
            chosen_rewards.sum(),
            rejected_rewards.sum(),
            (chosen_rewards > rejected_rewards).float().sum(),
            used[0::2].detach().sum(),
            used[1::2].detach().sum(),
            chosen_nll.detach(),
            chosen_tokens,
        ]
    )
    return loss, torch.tensor(batch.num_pairs, dtype=torch.int, device=output.device), {"sums": stats}


def _empty_stats(device):
    return {"sums": torch.zeros(len(METRIC_SUMS), device=device)}


def train_step(
    model,
    optimizer,
    groups: ParallelGroups,
    batches: list[PackedMicroBatch],
    settings: DPOSettings,
    *,
    global_pairs: int,
    global_chosen_tokens: int,
) -> tuple[torch.Tensor, float | None, bool]:
    """One optimizer step on the micro-batches of this rank.

    Returns ``(metric sums on this rank — zeros off the last stage —, grad norm, whether the update happened)``.
    """
    pair_scale = global_pairs / max(1, global_chosen_tokens)
    optimizer.zero_grad()
    model.zero_grad_buffer()
    outputs = run_schedule(
        model,
        groups,
        lambda b, m: (_forward(b, m), partial(_policy_loss, b, groups, settings, pair_scale)),
        batches,
        num_microbatches=len(batches),
        seq_length=batches[0].input_ids.shape[1],
        micro_batch_size=1,
        forward_only=False,
    )
    sums = torch.zeros(len(METRIC_SUMS), device=groups.device)
    for reduced in outputs:
        sums += reduced["sums"]
    update_ok, grad_norm, _ = optimizer.step()
    return sums, grad_norm, bool(update_ok)
