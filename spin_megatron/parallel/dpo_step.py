"""The DPO update, the reference pass and gold-NLL scoring as Megatron ``forward_step`` / ``loss_func`` pairs.

All run through :func:`~spin_megatron.parallel.forward.run_packed` (Megatron's pipeline schedules) over packed
micro-batches. The loss of a micro-batch is the *sum* of its pairs' DPO losses and it reports its number of pairs
as Megatron's ``num_tokens`` (``calculate_per_token_loss``), so Megatron divides the summed gradients by the global
number of pairs: the update is the mean over all pairs of the step, independent of micro-batching and data
parallelism."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from spin_megatron.algorithm.loss import batch_terms, dpo_loss, needs_batch_terms
from spin_megatron.faults import kill_point, poison_loss
from spin_megatron.models.chunks import chunks_of
from spin_megatron.models.weights import unwrap
from spin_megatron.parallel.forward import run_packed, token_logprobs
from spin_megatron.parallel.moe_metrics import load_balancing_sums
from spin_megatron.parallel.packing import (
    PackedMicroBatch,
    sequence_sums,
)
from spin_megatron.parallel.state import ParallelGroups

METRIC_SUMS = (
    "pairs",
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "nll/chosen",
    "tokens/chosen",
    "tokens/rejected",
    "generated",  # sequences the engine generated (spin: the rejected ones; online: both)
    "logp_sample/sum",  # Σ over generated sequences of Σ_t log π
    "ref_logp_sample/sum",  # Σ over generated sequences of Σ_t log π_ref
    "logits/chosen",  # Σ over chosen tokens of the mean logit over the vocabulary
    "logits/rejected",
    "top1/chosen",  # chosen tokens that are the policy's argmax
    "entropy/sum",  # Σ over all response tokens of the policy's entropy
    "moe/load_balancing_loss/sum",  # MoE aux loss (unscaled) Σ over layers and micro-batches (aux loss on only)
    "moe/load_balancing_loss/terms",
    "logp_diff/sum",
    "logp_diff/tokens",
    "logp_diff/max",  # must stay last: a max, the others are sums
)
POLICY_STATS = ("entropy", "mean_logit", "is_top1")


@dataclass(frozen=True, kw_only=True)
class DPOSettings:
    beta: float
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    reference_free: bool = False
    rpo_alpha: float = 0.0
    length_normalize: bool = False
    ld_alpha: float | None = None  # LD-DPO: weight of the tokens past the shorter response of the pair
    use_weighting: bool = False  # WPO pair weights
    chosen_is_gold: bool = False  # spin mode: the chosen response is the dataset's, not a sample
    vocab_size: int  # real vocabulary: padded rows are excluded from the softmax
    chunk_tokens: int = 1024
    sample_temperature: float = 1.0  # rollout temperature, for the train-rollout log-prob agreement
    fused_head: bool = False  # models return hidden states; log-probs come from fused_head_logprobs


def _ld_weights(batch) -> torch.Tensor | None:
    """LD-DPO: per-position flag ``[T]``: 1 where the response token lies within the shorter response of its
    pair (the shared part), 0 past it (the verbose tail), 0 where nothing is scored."""
    lengths = batch.response_lengths.long()
    scored = batch.sequence_index >= 0
    seq = batch.sequence_index.clamp(min=0)
    rank = torch.cumsum(scored.long(), 0)  # sequences are packed in order, responses contiguous
    position = rank - (torch.cumsum(lengths, 0) - lengths)[seq]  # 1-based within its response
    shared = lengths.view(-1, 2).min(dim=1).values.repeat_interleave(2)
    return (scored & (position <= shared[seq])).to(torch.float32)


def _weighted_sums(token_logps: torch.Tensor, batch, settings) -> torch.Tensor:
    """Per-sequence log-probs, summed (LD-DPO: shared part + α·tail): what rewards/* and logps/* report."""
    if settings.ld_alpha is not None and batch.num_pairs:
        shared = _ld_weights(batch).to(token_logps.dtype).view(token_logps.shape)
        token_logps = token_logps * (shared + settings.ld_alpha * (1 - shared))
    return sequence_sums(token_logps, batch)


def _as_used(weighted: torch.Tensor, batch, settings) -> torch.Tensor:
    """The per-sequence log-probs the loss sees: the weighted sums, length-averaged with ``length_normalize``
    (IPO; TRL normalises inside the loss only, its metrics stay on sums — so do ours)."""
    return weighted / batch.response_lengths.clamp(min=1.0) if settings.length_normalize else weighted


def _no_loss(output, stats=None):
    zero = output.sum() * 0.0
    return zero, torch.tensor(0, dtype=torch.int, device=output.device), stats or {}


def _reference_loss(batch, output, *, groups, settings, agreement=False, weight=None):
    token_logps = token_logprobs(output, batch, groups, settings, weight=weight)
    weighted = _weighted_sums(token_logps, batch, settings).detach()
    batch.ref_logps = _as_used(weighted, batch, settings)
    batch.extras["ref_weighted"] = weighted
    batch.extras["ref_sums"] = sequence_sums(token_logps, batch).detach()
    measured = (
        _agreement(output, token_logps, batch, groups, settings, weight) if agreement else _zeros3(output)
    )
    return _no_loss(output, {"agreement": torch.stack(measured)})


def _zeros3(output):
    zero = torch.zeros((), device=output.device)
    return zero, zero, zero


@torch.no_grad()
def compute_reference_logps(
    reference,
    groups: ParallelGroups,
    batches: list[PackedMicroBatch],
    settings: DPOSettings,
    *,
    agreement: bool = False,
) -> torch.Tensor:
    """Fill ``batch.ref_logps`` on the last pipeline stage, with the frozen reference model. ``agreement``: also
    measure |reference − engine| log-probs (the engine sampled from the reference); returns ``[Σ, count, max]``
    (zeros off the last stage)."""
    outputs = run_packed(
        reference,
        groups,
        batches,
        partial(_reference_loss, groups=groups, settings=settings, agreement=agreement),
        forward_only=True,
    )
    return _reported(_fold_agreement([o["agreement"] for o in outputs], groups.device), groups)


def _reported(values: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """Metric sums as this rank reports them: CP ranks > 0 computed the same sums as CP rank 0 (the losses run on
    the gathered micro-batch), so they report zeros and sums over the job count every pair once."""
    return values if groups.cp_rank == 0 else torch.zeros_like(values)


def _agreement_loss(batch, output, *, groups, settings, weight=None):
    token_logps = token_logprobs(output, batch, groups, settings, weight=weight)
    measured = _agreement(output, token_logps, batch, groups, settings, weight)
    return _no_loss(output, {"agreement": torch.stack(measured)})


@torch.no_grad()
def sample_agreement(
    model, groups: ParallelGroups, batches: list[PackedMicroBatch], settings
) -> torch.Tensor:
    """``[Σ, count, max]`` of |model − engine| log-probs over the sampled tokens of ``batches`` (one sequence an
    item), on the last stage: ``rollout/logp_diff`` of a step whose samples gave no pair to train on."""
    outputs = run_packed(
        model, groups, batches, partial(_agreement_loss, groups=groups, settings=settings), forward_only=True
    )
    return _reported(_fold_agreement([o["agreement"] for o in outputs], groups.device), groups)


def _fold_agreement(parts, device) -> torch.Tensor:
    total = torch.zeros(3, device=device)
    for part in parts:
        total[:2] += part[:2]
        total[2] = torch.maximum(total[2], part[2])
    return total


def _policy_used_loss(batch, output, *, groups, settings, weight=None):
    token_logps = token_logprobs(output, batch, groups, settings, weight=weight)
    batch.extras["policy_used"] = _as_used(
        _weighted_sums(token_logps, batch, settings), batch, settings
    ).detach()
    return _no_loss(output)


@torch.no_grad()
def prepare_batch_terms(model, groups: ParallelGroups, batches: list[PackedMicroBatch], settings) -> None:
    """Losses that sort across the batch (aot, aot_pair): the batch is every pair of this optimizer step, over
    all micro-batches and data-parallel ranks. A forward-only policy pass gives each pair's log-probs; they are
    gathered in (dp rank, micro-batch) order and every micro-batch gets the rows of its own pairs."""
    if not needs_batch_terms(settings.loss_type):
        return
    was_training = model.training
    model.eval()
    try:
        run_packed(model, groups, batches, partial(_policy_used_loss, groups=groups, settings=settings),
             forward_only=True)  # fmt: skip
    finally:
        model.train(was_training)
    if not groups.is_last_stage:
        return
    real = [b for b in batches if b.num_pairs]
    local = [
        torch.stack(
            [
                b.extras["policy_used"][0::2],
                b.extras["policy_used"][1::2],
                b.ref_logps[0::2],
                b.ref_logps[1::2],
            ],
            dim=1,
        ).cpu()
        for b in real
    ]
    local = torch.cat(local) if local else torch.zeros(0, 4)
    gathered = [None] * groups.dp_size
    dist.all_gather_object(gathered, local, group=groups.dp)
    offset = sum(len(g) for g in gathered[: groups.dp_rank])
    everything = torch.cat(gathered).to(groups.device)
    terms = batch_terms(
        settings.loss_type,
        *everything.unbind(1),
        beta=settings.beta,
        label_smoothing=settings.label_smoothing,
        reference_free=settings.reference_free,
    )
    for b in real:
        b.extras["batch_terms"] = terms[offset : offset + b.num_pairs]
        offset += b.num_pairs


@torch.no_grad()
def _agreement(
    output, token_logps, batch, groups, settings, weight=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Σ|Δ|, count and max of |trainer − engine| log-probs over sampled tokens (sampling temperature)."""
    engine = batch.engine_logprobs.reshape(-1)
    known = torch.isfinite(engine)
    zero = torch.zeros((), device=output.device)
    if not bool(known.any()):
        return zero, zero, zero
    ours = (
        token_logps
        if settings.sample_temperature == 1.0
        else token_logprobs(
            output.detach(),
            batch,
            groups,
            settings,
            settings.sample_temperature,
            None if weight is None else weight.detach(),
        )
    )
    diff = (ours.detach().reshape(-1)[known] - engine[known]).abs()
    return diff.sum(), torch.tensor(float(diff.numel()), device=output.device), diff.max()


def _policy_loss(
    batch, output, *, groups, settings, pair_scale, step, agreement=False, sample_stats=True, weight=None
):
    stats = POLICY_STATS + (("log_sum_sq_probs",) if settings.use_weighting else ())
    token_logps, per_token = token_logprobs(output, batch, groups, settings, weight=weight, stats=stats)
    if batch.num_pairs == 0:  # a placeholder micro-batch of a rank without pairs: contributes nothing
        return _no_loss(output, {"sums": torch.zeros(len(METRIC_SUMS), device=output.device)})
    sums = sequence_sums(token_logps, batch)
    weighted = _weighted_sums(token_logps, batch, settings)
    used = _as_used(weighted, batch, settings)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        used[0::2],
        used[1::2],
        batch.ref_logps[0::2],
        batch.ref_logps[1::2],
        beta=settings.beta,
        loss_type=settings.loss_type,
        label_smoothing=settings.label_smoothing,
        reference_free=settings.reference_free,
        discopop_tau=settings.discopop_tau,
        batch_terms=batch.extras.get("batch_terms"),
    )
    if settings.use_weighting:
        # WPO: each pair weighs exp(mean_t log p_t − log Σ_v p_v²) of its chosen times that of its rejected
        # (the policy's own, length-normalised probability of the pair; no gradient through the weight).
        aligned = sequence_sums(token_logps.detach() - per_token["log_sum_sq_probs"], batch)
        weights = torch.exp(aligned / batch.response_lengths.clamp(min=1.0))
        losses = losses * weights[0::2] * weights[1::2]
    loss = losses.sum()
    chosen_nll = -sums[0::2].sum()
    if settings.rpo_alpha:
        # RPO: NLL per chosen token over the whole step; Megatron divides by the global pair count afterwards.
        loss = loss + settings.rpo_alpha * chosen_nll * pair_scale
    loss = poison_loss(loss, step)
    with torch.no_grad():
        if settings.length_normalize:  # the metrics stay on summed log-probs (TRL)
            reference = (
                torch.zeros_like(weighted) if settings.reference_free else batch.extras["ref_weighted"]
            )
            chosen_rewards = settings.beta * (weighted[0::2] - reference[0::2])
            rejected_rewards = settings.beta * (weighted[1::2] - reference[1::2])
        # objective/*: only where the scoring model is the one that sampled (sample_stats)
        generated = sums.new_full(sums.shape, float(sample_stats))
        if settings.chosen_is_gold:
            generated[0::2] = 0
        raw = sums.detach()
        per_seq = {k: sequence_sums(v, batch) for k, v in per_token.items()}
        measured = (
            _agreement(output, token_logps, batch, groups, settings, weight) if agreement else _zeros3(output)
        )
        stats = torch.stack(
            [
                torch.tensor(float(batch.num_pairs), device=output.device),
                losses.detach().sum(),
                chosen_rewards.sum(),
                rejected_rewards.sum(),
                (chosen_rewards > rejected_rewards).float().sum(),
                weighted[0::2].detach().sum(),
                weighted[1::2].detach().sum(),
                chosen_nll.detach(),
                batch.response_lengths[0::2].sum(),
                batch.response_lengths[1::2].sum(),
                generated.sum(),
                (generated * raw).sum(),
                (generated * batch.extras["ref_sums"]).sum(),
                per_seq["mean_logit"][0::2].sum(),
                per_seq["mean_logit"][1::2].sum(),
                per_seq["is_top1"][0::2].sum(),
                per_seq["entropy"].sum(),
                *_zeros3(output)[:2],  # the MoE aux-loss sums: filled in once per step by train_step
                *measured,
            ]
        )
    # the pair count Megatron divides the gradients by, summed over DP×CP: CP rank 0 counts a micro-batch's pairs
    counted = batch.num_pairs if groups.cp_rank == 0 else 0
    return loss, torch.tensor(counted, dtype=torch.int, device=output.device), {"sums": stats}


def grads_finite(model, groups: ParallelGroups) -> bool:
    """Whether every gradient on every rank is finite (checked on Megatron DDP's grad buffers)."""
    finite = torch.ones(1, device=groups.device)
    for chunk in chunks_of(model):
        for buffer in getattr(chunk, "buffers", []) + getattr(chunk, "expert_parallel_buffers", []):
            if not bool(torch.isfinite(buffer.grad_data).all()):
                finite.zero_()
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def train_step(
    model,
    optimizer,
    groups: ParallelGroups,
    batches: list[PackedMicroBatch],
    settings: DPOSettings,
    *,
    global_pairs: int,
    global_chosen_tokens: int,
    step: int = 0,
    agreement: bool = False,
    sample_stats: bool = True,
) -> tuple[torch.Tensor, float | None, bool]:
    """One optimizer step on this rank's micro-batches (their ``ref_logps`` filled on the last stage).

    Returns ``(metric sums of METRIC_SUMS — zeros off the last stage and on CP ranks > 0 —, grad norm, whether it
    updated)``;
    ``logp_diff/max`` is a max, the others are sums. ``agreement``: measure |policy − engine| log-probs (the
    engine sampled from these very weights). ``sample_stats``: add the ``objective/*`` sums (the policy or
    reference scoring the samples is the model that generated them). A NaN/Inf anywhere in the gradients skips the optimizer
    step on every rank (weights and optimizer state stay as they were).
    """
    loss_fn = partial(
        _policy_loss,
        groups=groups,
        settings=settings,
        pair_scale=global_pairs / max(1, global_chosen_tokens),
        step=step,
        agreement=agreement,
        sample_stats=sample_stats,
    )
    optimizer.zero_grad()
    model.zero_grad_buffer()
    outputs = run_packed(model, groups, batches, loss_fn, forward_only=False)
    sums = torch.zeros(len(METRIC_SUMS), device=groups.device)
    for reduced in outputs:
        stats = reduced["sums"]
        sums[:-1] += stats[:-1]
        sums[-1] = torch.maximum(sums[-1], stats[-1])
    sums = _reported(sums, groups)
    aux = load_balancing_sums(unwrap(model), groups, len(batches))
    if groups.is_last_stage:
        sums[METRIC_SUMS.index("moe/load_balancing_loss/sum")] = aux[0]
        sums[METRIC_SUMS.index("moe/load_balancing_loss/terms")] = aux[1]
    kill_point("update", step)
    if not grads_finite(model, groups):
        optimizer.zero_grad()
        model.zero_grad_buffer()
        return sums, None, False
    update_ok, grad_norm, _ = optimizer.step()
    return sums, grad_norm, bool(update_ok)


def _nll_loss(batch, output, *, groups, settings, weight=None):
    token_logps = token_logprobs(output, batch, groups, settings, weight=weight)
    nll = -sequence_sums(token_logps, batch).sum()
    return _no_loss(output, {"nll": torch.stack([nll, batch.response_lengths.sum()])})


@torch.no_grad()
def gold_nll(
    model, groups: ParallelGroups, batches: list[PackedMicroBatch], settings: DPOSettings
) -> torch.Tensor:
    """``[Σ NLL, Σ tokens]`` of the scored sequences on this rank (zeros off the last stage)."""
    was_training = model.training
    model.eval()
    try:
        outputs = run_packed(
            model, groups, batches, partial(_nll_loss, groups=groups, settings=settings), forward_only=True
        )
    finally:
        model.train(was_training)
    total = torch.zeros(2, device=groups.device)
    for reduced in outputs:
        total += reduced["nll"]
    return _reported(total, groups)
