"""DPO losses against hand-computed values, and gradients against autograd of the written-out formulas."""

import math

import pytest
import torch

from spin_megatron.loss import LOSS_TYPES, chosen_nll, dpo_loss, preference_metrics, sequence_logps

PC, PR, RC, RR = -10.0, -14.0, -11.0, -12.0  # logits = (PC-PR) - (RC-RR) = 4 - 1 = 3


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def _loss(loss_type, beta=0.1, **kwargs):
    losses, cr, rr = dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta=beta, loss_type=loss_type, **kwargs)
    return losses.item(), cr.item(), rr.item()


def test_sigmoid_by_hand():
    loss, chosen, rejected = _loss("sigmoid")
    assert loss == pytest.approx(math.log1p(math.exp(-0.3)))  # -log σ(0.1·3)
    assert chosen == pytest.approx(0.1 * (PC - RC)) and rejected == pytest.approx(0.1 * (PR - RR))


def test_label_smoothing_by_hand():
    loss, _, _ = _loss("sigmoid", label_smoothing=0.2)
    expected = 0.8 * math.log1p(math.exp(-0.3)) + 0.2 * math.log1p(math.exp(0.3))
    assert loss == pytest.approx(expected)


def test_ipo_and_hinge_by_hand():
    assert _loss("ipo", beta=0.25)[0] == pytest.approx((3 - 1 / 0.5) ** 2)
    assert _loss("hinge", beta=0.1)[0] == pytest.approx(1 - 0.3)
    assert _loss("hinge", beta=1.0)[0] == 0.0


def test_reference_free_drops_the_reference():
    loss, chosen, _ = _loss("sigmoid", reference_free=True)
    assert loss == pytest.approx(math.log1p(math.exp(-0.4)))  # logits = 4
    assert chosen == pytest.approx(0.1 * PC)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradients_match_autograd_of_the_formula(loss_type):
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, dtype=torch.float64, generator=gen) * 3 for _ in range(4))
    pc.requires_grad_()
    pr.requires_grad_()
    beta, eps = 0.3, (0.1 if loss_type == "sigmoid" else 0.0)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    grad = torch.autograd.grad(losses.sum(), (pc, pr))
    z = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":  # d/dz of −(1−ε) log σ(βz) − ε log σ(−βz)
        dz = -(1 - eps) * beta * torch.sigmoid(-beta * z) + eps * beta * torch.sigmoid(beta * z)
    elif loss_type == "ipo":
        dz = 2 * (z - 1 / (2 * beta))
    else:
        dz = torch.where(1 - beta * z > 0, -beta * torch.ones_like(z), torch.zeros_like(z))
    torch.testing.assert_close(grad[0], dz.detach())
    torch.testing.assert_close(grad[1], -dz.detach())
    assert torch.autograd.gradcheck(
        lambda a, b: dpo_loss(a, b, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)[0], (pc, pr)
    )


def test_rewards_carry_no_gradient():
    pc = _t(PC).requires_grad_()
    _, chosen, _ = dpo_loss(pc, _t(PR), _t(RC), _t(RR), beta=0.1)
    assert not chosen.requires_grad


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss_type": "kto"}, "unknown algorithm.loss_type 'kto'; valid: sigmoid, ipo, hinge"),
        ({"beta": 0.0}, "algorithm.beta must be > 0"),
        ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "applies to loss_type 'sigmoid' only"),
    ],
)
def test_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), **{"beta": 0.1, **kwargs})


def test_sequence_logps_sum_and_length_normalised():
    token = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-1.0, -1.0, -5.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    assert sequence_logps(token, mask).tolist() == [-9.0, -2.0]
    assert sequence_logps(token, mask, length_normalize=True).tolist() == [-3.0, -1.0]
    assert sequence_logps(token, torch.zeros_like(mask), length_normalize=True).tolist() == [0.0, 0.0]


def test_chosen_nll_is_per_token():
    token = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -100.0, -100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert chosen_nll(token, mask).item() == pytest.approx(10.0 / 4)


def test_trl_named_metrics():
    losses, cr, rr = dpo_loss(_t(PC, -3.0), _t(PR, -1.0), _t(RC, -3.0), _t(RR, -2.0), beta=0.1)
    m = preference_metrics(cr, rr, losses, _t(PC, -3.0), _t(PR, -1.0))
    assert m["rewards/accuracies"] == 0.5
    assert m["rewards/margins"] == pytest.approx(((0.1 - (-0.2)) + (0.0 - 0.1)) / 2)
    assert set(m) == {
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    }
