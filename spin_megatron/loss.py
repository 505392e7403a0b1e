"""The DPO loss family as pure functions of per-sequence log-probabilities.

With ``logits = (π_c − π_r) − (ref_c − ref_r)`` (reference terms 0 when ``reference_free``):

* ``sigmoid`` (DPO): ``−(1−ε)·log σ(β·logits) − ε·log σ(−β·logits)``; ε = ``label_smoothing`` > 0 is the
  conservative ("robust", cDPO) variant;
* ``ipo``: ``(logits − 1/(2β))²`` — IPO is defined on length-averaged log-probs: reduce with
  :func:`sequence_logps` ``(length_normalize=True)`` before calling;
* ``hinge`` (SLiC): ``relu(1 − β·logits)``.

Implicit rewards are ``β·(π − ref)`` (detached). :func:`chosen_nll` gives the RPO-style NLL term on the chosen
responses, normalised per chosen token, to add with weight α.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses ``[B]`` and the implicit rewards of chosen and rejected (detached)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown algorithm.loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"algorithm.beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"algorithm.label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"algorithm.label_smoothing applies to loss_type 'sigmoid' only, not {loss_type!r}")

    if reference_free:
        ref_chosen_logps = torch.zeros_like(policy_chosen_logps)
        ref_rejected_logps = torch.zeros_like(policy_rejected_logps)
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(
            -beta * logits
        )
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * logits)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


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
