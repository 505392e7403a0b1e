"""The DPO loss family (TRL 1.16's ``loss_type`` choices) as pure functions of per-sequence log-probabilities.

Per pair: chosen log-ratio ``c = π_c − ref_c``, rejected ``r = π_r − ref_r`` (reference terms 0 when
``reference_free``), ``d = c − r``, β = ``beta``, ε = ``label_smoothing``, ``ℓ_ε(z) = −(1−ε)·log σ(z) − ε·log σ(−z)``:

* ``sigmoid`` (DPO; cDPO when ε > 0): ``ℓ_ε(β·d)``;
* ``robust`` (rDPO, unbiased under flipped labels): ``(−(1−ε)·log σ(β·d) + ε·log σ(−β·d)) / (1−2ε)``;
* ``hinge`` (SLiC): ``relu(1 − β·d)``;
* ``ipo``: ``(d − 1/(2β))²``;
* ``exo_pair`` (EXO-pref, needs ε > 0): ``σ(β·d)·(log σ(β·d) − log(1−ε)) + σ(−β·d)·(log σ(−β·d) − log ε)``;
* ``nca_pair``: ``−log σ(β·c) − ½·log σ(−β·c) − ½·log σ(−β·r)``;
* ``bco_pair`` (no running-mean shift, as TRL 1.16): ``−log σ(β·c) − log σ(−β·r)``;
* ``sppo_hard``: ``(c − 1/(2β))² + (r + 1/(2β))²``;
* ``aot`` (batch): ``ℓ_ε(β·(sort(π_c − π_r)_k − sort(ref_c − ref_r)_k))`` for each rank k;
* ``aot_pair`` (batch; TRL 1.16 calls it ``aot_unpaired``): ``ℓ_ε(β·(sort(c)_k − sort(r)_k))`` for each rank k;
* ``apo_zero``: ``1 − σ(β·c) + σ(β·r)``;
* ``apo_down``: ``σ(β·c) + 1 − σ(β·d)``;
* ``discopop`` (τ = ``discopop_tau``): ``(1 − σ(β·d/τ))·(−log σ(β·d)) + σ(β·d/τ)·exp(−β·d)``.

The batch losses sort across every pair of one optimizer update, which our trainer spreads over data-parallel ranks
and micro-batches: :func:`batch_terms` computes per-pair constants on the whole batch once, and :func:`dpo_loss`
with those rows gives per-micro-batch losses whose sum and gradient equal the whole-batch formula's.

Implicit rewards are ``β·c`` and ``β·r`` (detached). :func:`chosen_nll` gives the RPO-style NLL term on the chosen
responses, normalised per chosen token, to add with weight α.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = (
    "sigmoid",
    "robust",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_pair",
    "apo_zero",
    "apo_down",
    "discopop",
)
LOSS_ALIASES = {"aot_unpaired": "aot_pair"}
BATCH_LOSSES = ("aot", "aot_pair")
# Losses whose formula has an ε; for the others a non-zero label_smoothing would be silently ignored.
SMOOTHED_LOSSES = ("sigmoid", "robust", "exo_pair", "aot", "aot_pair")
# Columns of batch_terms per batch loss: aot's reference partner; aot_pair's rejected and chosen partners.
_BATCH_TERM_COLUMNS = {"aot": 1, "aot_pair": 2}


def canonical_loss_type(name: str) -> str:
    """``name`` with TRL aliases resolved; ValueError listing the valid choices for an unknown one."""
    name = LOSS_ALIASES.get(name, name)
    if name not in LOSS_TYPES:
        valid = ", ".join(LOSS_TYPES + tuple(LOSS_ALIASES))
        raise ValueError(f"unknown algorithm.loss_type {name!r}; valid: {valid}")
    return name


def needs_batch_terms(loss_type: str) -> bool:
    """Whether ``loss_type`` sorts across the batch, so :func:`dpo_loss` needs :func:`batch_terms` rows."""
    return canonical_loss_type(loss_type) in BATCH_LOSSES


def sequence_logps(
    token_logps: torch.Tensor, mask: torch.Tensor, *, length_normalize: bool = False
) -> torch.Tensor:
    """Per-sequence log-probs ``[B]`` from per-token ``[B, T]`` ones over the response tokens in ``mask``.

    ``length_normalize`` averages over response tokens instead of summing (IPO, length-normalised DPO).
    """
    mask = mask.to(token_logps.dtype)
    total = (token_logps * mask).sum(dim=-1)
    if not length_normalize:
        return total
    return total / mask.sum(dim=-1).clamp(min=1.0)


def _validated(loss_type: str, beta: float, label_smoothing: float, discopop_tau: float) -> str:
    loss_type = canonical_loss_type(loss_type)
    if beta <= 0:
        raise ValueError(f"algorithm.beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"algorithm.label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in SMOOTHED_LOSSES:
        raise ValueError(
            f"algorithm.label_smoothing applies to loss_type {', '.join(SMOOTHED_LOSSES)} only, not {loss_type!r}; "
            "set it to 0"
        )
    if loss_type == "exo_pair" and not label_smoothing:
        # EXO's target distribution is [1−ε, ε]; log ε is −inf at ε = 0.
        raise ValueError(
            "loss_type 'exo_pair' needs label_smoothing > 0: set algorithm.label_smoothing > 0, e.g. 1e-3"
        )
    if loss_type == "discopop" and discopop_tau <= 0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")
    return loss_type


def _log_ratios(pc, pr, rc, rr, reference_free: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if reference_free:
        return pc, pr
    return pc - rc, pr - rr


def _smoothed_logistic(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``ℓ_ε(z) = −(1−ε)·log σ(z) − ε·log σ(−z)``."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _pairwise_losses(loss_type: str, c, r, beta: float, eps: float, tau: float) -> torch.Tensor:
    """Per-pair losses of the losses that need no other pair."""
    z = beta * (c - r)
    if loss_type == "sigmoid":
        return _smoothed_logistic(z, eps)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - z)
    if loss_type == "ipo":
        return (c - r - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        log_qw, log_ql = F.logsigmoid(z), F.logsigmoid(-z)
        # KL(softmax over {chosen, rejected} ‖ [1−ε, ε]) written out.
        return log_qw.exp() * (log_qw - math.log1p(-eps)) + log_ql.exp() * (log_ql - math.log(eps))
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)
    if loss_type == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * c) + 1 - torch.sigmoid(z)
    assert loss_type == "discopop", loss_type
    # exp(−z)·σ(z/τ) as one exp: for z ≪ 0 the product form is inf·0 = nan.
    exp_part = torch.exp(-z + F.logsigmoid(z / tau))
    return -F.logsigmoid(z) * torch.sigmoid(-z / tau) + exp_part


def _ranks(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending sorted values and each element's rank; ties keep index order, so the pairing is deterministic."""
    sorted_values, order = torch.sort(values, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)
    return sorted_values, ranks


@torch.no_grad()
def batch_terms(
    loss_type: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
) -> torch.Tensor:
    """Per-pair constants ``[N, k]`` of a batch loss, from all N pairs of one optimizer update in a fixed order.

    Row j holds the partners of pair j's quantities in the sorted pairing: for ``aot``, the sorted reference
    difference at the rank of ``π_c − π_r``; for ``aot_pair``, the sorted ``r`` at the rank of ``c`` and the sorted
    ``c`` at the rank of ``r``. They do not depend on β or ε, which are validated as in :func:`dpo_loss`.
    """
    loss_type = _validated(loss_type, beta, label_smoothing, 0.05)
    if loss_type not in BATCH_LOSSES:
        raise ValueError(
            f"batch_terms applies to loss_type {', '.join(BATCH_LOSSES)} only, not {loss_type!r}"
        )
    if loss_type == "aot":
        policy_diff = policy_chosen_logps - policy_rejected_logps
        ref_diff = torch.zeros_like(policy_diff) if reference_free else ref_chosen_logps - ref_rejected_logps
        _, policy_ranks = _ranks(policy_diff)
        ref_sorted, _ = _ranks(ref_diff)
        return ref_sorted[policy_ranks].unsqueeze(1)
    c, r = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, reference_free
    )
    c_sorted, c_ranks = _ranks(c)
    r_sorted, r_ranks = _ranks(r)
    return torch.stack([r_sorted[c_ranks], c_sorted[r_ranks]], dim=1)


def _batch_losses(loss_type: str, pc, pr, c, r, rows: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """Each pair's value is the loss at the rank of its chosen quantity; each input's gradient is that of the
    sorted whole-batch sum, since every quantity appears in exactly one rank's term."""
    rows = rows.to(dtype=c.dtype, device=c.device)
    if loss_type == "aot":
        # The reference is frozen, so π_c − π_r against its reference partner carries the whole gradient.
        return _smoothed_logistic(beta * ((pc - pr) - rows[:, 0]), eps)
    chosen_rank_loss = _smoothed_logistic(beta * (c - rows[:, 0]), eps)
    # r sits at a different rank than c: add that rank's loss as a function of r, with value 0 but its gradient.
    rejected_rank_loss = _smoothed_logistic(beta * (rows[:, 1] - r), eps)
    return chosen_rank_loss + (rejected_rank_loss - rejected_rank_loss.detach())


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    discopop_tau: float = 0.05,
    batch_terms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses ``[B]`` and the implicit rewards ``β·c``, ``β·r`` (detached).

    ``label_smoothing`` is ε of sigmoid (cDPO: older TRL applied it there; TRL 1.16's sigmoid has none), robust,
    exo_pair, aot and aot_pair, and is refused for the others. For ``ipo`` pass length-averaged log-probs
    (:func:`sequence_logps` with ``length_normalize=True``), IPO's normalisation. The batch losses (``aot``,
    ``aot_pair``) need ``batch_terms``: the ``[B, k]`` rows of :func:`batch_terms` for these B pairs.
    """
    loss_type = _validated(loss_type, beta, label_smoothing, discopop_tau)
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    c, r = _log_ratios(pc, pr, rc, rr, reference_free)
    if loss_type in BATCH_LOSSES:
        if batch_terms is None:
            raise ValueError(
                f"loss_type {loss_type!r} sorts across the whole batch (all pairs of one optimizer update), so one "
                "micro-batch cannot compute it alone: call batch_terms() on the whole batch and pass these pairs' "
                "rows as batch_terms="
            )
        expected = (pc.shape[0], _BATCH_TERM_COLUMNS[loss_type])
        if tuple(batch_terms.shape) != expected:
            raise ValueError(
                f"batch_terms for {loss_type!r} must have shape {expected}, got {tuple(batch_terms.shape)}"
            )
        losses = _batch_losses(loss_type, pc, pr, c, r, batch_terms, beta, label_smoothing)
    elif batch_terms is not None:
        raise ValueError(
            f"batch_terms applies to loss_type {', '.join(BATCH_LOSSES)} only, not {loss_type!r}"
        )
    else:
        losses = _pairwise_losses(loss_type, c, r, beta, label_smoothing, discopop_tau)
    return losses, beta * c.detach(), beta * r.detach()


def chosen_nll(chosen_token_logps: torch.Tensor, chosen_mask: torch.Tensor) -> torch.Tensor:
    """RPO's NLL term: −Σ log p over all chosen response tokens / number of those tokens (a scalar)."""
    mask = chosen_mask.to(chosen_token_logps.dtype)
    return -(chosen_token_logps * mask).sum() / mask.sum().clamp(min=1.0)


def preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    losses: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
) -> dict[str, float]:
    """TRL-named step metrics, averaged over pairs."""
    return {
        "loss": losses.detach().mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "logps/chosen": policy_chosen_logps.detach().mean().item(),
        "logps/rejected": policy_rejected_logps.detach().mean().item(),
    }
