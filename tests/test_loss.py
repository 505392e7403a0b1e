"""DPO losses against hand-computed values, and gradients against autograd of independently written-out formulas
(from the papers / TRL 1.16's semantics); the batch losses' per-micro-batch split against the whole-batch sort."""

import math

import pytest
import torch

from spin_megatron.algorithm.loss import (
    BATCH_LOSSES,
    LOSS_ALIASES,
    LOSS_TYPES,
    batch_terms,
    canonical_loss_type,
    chosen_nll,
    dpo_loss,
    needs_batch_terms,
    preference_metrics,
    sequence_logps,
)

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


def test_rewards_carry_no_gradient():
    pc = _t(PC).requires_grad_()
    _, chosen, _ = dpo_loss(pc, _t(PR), _t(RC), _t(RR), beta=0.1)
    assert not chosen.requires_grad


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"loss_type": "kto"},
            "unknown algorithm.loss_type 'kto'; valid: sigmoid, robust, hinge, ipo, .*aot_unpaired",
        ),
        ({"beta": 0.0}, "algorithm.beta must be > 0"),
        ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        (
            {"loss_type": "ipo", "label_smoothing": 0.1},
            "applies to loss_type sigmoid, robust, exo_pair, aot, aot_pair only",
        ),
        ({"loss_type": "exo_pair"}, r"set algorithm.label_smoothing > 0, e.g. 1e-3"),
        ({"loss_type": "discopop", "discopop_tau": 0.0}, "discopop_tau must be > 0"),
        ({"loss_type": "aot"}, "sorts across the whole batch"),
        ({"loss_type": "aot_unpaired"}, "'aot_pair' sorts across the whole batch"),
        ({"batch_terms": torch.zeros(1, 1)}, "batch_terms applies to loss_type aot, aot_pair only"),
        ({"loss_type": "aot_pair", "batch_terms": torch.zeros(1, 1)}, r"must have shape \(1, 2\)"),
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


# ---- every loss against an independent formula ---------------------------------------------------------------------

SMOOTHED = {"sigmoid", "robust", "exo_pair", "aot", "aot_pair"}
PAIRWISE = [t for t in LOSS_TYPES if t not in BATCH_LOSSES]


def _nls(x):  # −log σ(x), written without logsigmoid
    return torch.log1p(torch.exp(-x))


def _reference_pairwise(loss_type, c, r, beta, eps, tau=0.05):
    """The per-pair formulas, written from the papers independently of spin_megatron.algorithm.loss."""
    d = c - r
    z = beta * d
    s = torch.sigmoid
    if loss_type == "sigmoid":
        return (1 - eps) * _nls(z) + eps * _nls(-z)
    if loss_type == "robust":
        return ((1 - eps) * _nls(z) - eps * _nls(-z)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.clamp(1 - z, min=0)
    if loss_type == "ipo":
        return (d - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":  # KL([σ(z), σ(−z)] ‖ [1−ε, ε])
        return s(z) * torch.log(s(z) / (1 - eps)) + s(-z) * torch.log(s(-z) / eps)
    if loss_type == "nca_pair":
        return _nls(beta * c) + 0.5 * _nls(-beta * c) + 0.5 * _nls(-beta * r)
    if loss_type == "bco_pair":
        return _nls(beta * c) + _nls(-beta * r)
    if loss_type == "sppo_hard":
        return (c - 1 / (2 * beta)) ** 2 + (r + 1 / (2 * beta)) ** 2
    if loss_type == "apo_zero":
        return (1 - s(beta * c)) + s(beta * r)
    if loss_type == "apo_down":
        return s(beta * c) + (1 - s(z))
    assert loss_type == "discopop"
    mix = s(z / tau)
    return (1 - mix) * _nls(z) + mix * torch.exp(-z)


def _eps(loss_type):
    return 0.1 if loss_type in SMOOTHED else 0.0


# c = 1, r = −2, d = 3 at PC, PR, RC, RR; β = 0.5 (z = 1.5), ε = 0.1 where the loss has one.
_sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
_BY_HAND = {
    "sigmoid": 0.9 * math.log1p(math.exp(-1.5)) + 0.1 * math.log1p(math.exp(1.5)),
    "robust": (0.9 * math.log1p(math.exp(-1.5)) - 0.1 * math.log1p(math.exp(1.5))) / 0.8,
    "hinge": 0.0,
    "ipo": (3 - 1) ** 2,
    "exo_pair": _sig(1.5) * math.log(_sig(1.5) / 0.9) + _sig(-1.5) * math.log(_sig(-1.5) / 0.1),
    "nca_pair": -math.log(_sig(0.5)) - 0.5 * math.log(_sig(-0.5)) - 0.5 * math.log(_sig(1.0)),
    "bco_pair": -math.log(_sig(0.5)) - math.log(_sig(1.0)),
    "sppo_hard": (1 - 1) ** 2 + (-2 + 1) ** 2,
    "apo_zero": 1 - _sig(0.5) + _sig(-1.0),
    "apo_down": _sig(0.5) + 1 - _sig(1.5),
    "discopop": (1 - _sig(1.5 / 0.05)) * -math.log(_sig(1.5)) + _sig(1.5 / 0.05) * math.exp(-1.5),
}


@pytest.mark.parametrize("loss_type", PAIRWISE)
def test_every_pairwise_loss_by_hand(loss_type):
    loss, chosen, rejected = _loss(loss_type, beta=0.5, label_smoothing=_eps(loss_type))
    assert loss == pytest.approx(_BY_HAND[loss_type], rel=1e-12, abs=1e-12)
    assert (chosen, rejected) == pytest.approx((0.5 * 1.0, 0.5 * -2.0))


def _random_batch(n, seed, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (torch.randn(n, dtype=torch.float64, generator=gen) * scale for _ in range(4))
    return pc.requires_grad_(), pr.requires_grad_(), rc, rr


@pytest.mark.parametrize("loss_type", PAIRWISE)
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_pairwise_value_and_gradient_match_the_independent_formula(loss_type, beta):
    pc, pr, rc, rr = _random_batch(16, seed=int(beta * 10))
    eps = _eps(loss_type)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    expected = _reference_pairwise(loss_type, pc - rc, pr - rr, beta, eps)
    torch.testing.assert_close(losses, expected, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(losses.sum(), (pc, pr))
    want = torch.autograd.grad(expected.sum(), (pc, pr))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert got[0].abs().sum() > 0  # the comparison is not between two zeros
    assert torch.autograd.gradcheck(
        lambda a, b: dpo_loss(a, b, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)[0], (pc, pr)
    )


def test_discopop_default_tau_is_0_05():
    pc, pr, rc, rr = _random_batch(8, seed=3, scale=0.3)  # |β·d| comparable to τ, where τ matters
    default = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="discopop")[0]
    torch.testing.assert_close(
        default, dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="discopop", discopop_tau=0.05)[0]
    )
    torch.testing.assert_close(default, _reference_pairwise("discopop", pc - rc, pr - rr, 0.5, 0.0, tau=0.05))
    other = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="discopop", discopop_tau=0.5)[0]
    assert not torch.allclose(default, other)


def test_discopop_is_finite_far_below_zero():
    losses = dpo_loss(_t(-3000.0), _t(0.0), _t(0.0), _t(0.0), beta=0.1, loss_type="discopop")[0]
    assert torch.isfinite(losses).all()  # the naive exp(−z)·σ(z/τ) gives inf·0 = nan here
    assert losses.item() == pytest.approx(300.0)  # → −log σ(z) ≈ −z


def test_sigmoid_and_robust_agree_without_smoothing():
    pc, pr, rc, rr = _random_batch(8, seed=4)
    torch.testing.assert_close(
        dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type="robust")[0], dpo_loss(pc, pr, rc, rr, beta=0.2)[0]
    )
    assert not torch.allclose(
        dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type="robust", label_smoothing=0.2)[0],
        dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=0.2)[0],
    )


# ---- names, ε rules, reference_free ----------------------------------------------------------------------------------


def test_loss_names_and_alias():
    assert LOSS_TYPES == (
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
    assert LOSS_ALIASES == {"aot_unpaired": "aot_pair"}
    assert canonical_loss_type("aot_unpaired") == "aot_pair"
    assert all(canonical_loss_type(t) == t for t in LOSS_TYPES)
    assert [t for t in LOSS_TYPES if needs_batch_terms(t)] == ["aot", "aot_pair"] == list(BATCH_LOSSES)
    assert needs_batch_terms("aot_unpaired")
    with pytest.raises(ValueError, match="valid: sigmoid, robust"):
        canonical_loss_type("orpo")
    pc, pr, rc, rr = _random_batch(6, seed=5)
    rows = batch_terms("aot_unpaired", pc, pr, rc, rr, beta=0.1)
    torch.testing.assert_close(rows, batch_terms("aot_pair", pc, pr, rc, rr, beta=0.1))
    alias = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="aot_unpaired", batch_terms=rows)[0]
    torch.testing.assert_close(
        alias, dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="aot_pair", batch_terms=rows)[0]
    )


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_label_smoothing_only_where_the_formula_has_it(loss_type):
    pc, pr, rc, rr = _random_batch(4, seed=6)
    kwargs = {"beta": 0.1, "loss_type": loss_type, "label_smoothing": 0.1}
    if loss_type in BATCH_LOSSES:
        kwargs["batch_terms"] = batch_terms(loss_type, pc, pr, rc, rr, beta=0.1)
    if loss_type in SMOOTHED:
        with_eps = dpo_loss(pc, pr, rc, rr, **kwargs)[0]
        if loss_type != "exo_pair":  # exo_pair has no ε = 0 form to compare with
            assert not torch.allclose(
                with_eps, dpo_loss(pc, pr, rc, rr, **{**kwargs, "label_smoothing": 0.0})[0]
            )
    else:
        with pytest.raises(ValueError, match=f"only, not '{loss_type}'"):
            dpo_loss(pc, pr, rc, rr, **kwargs)


def test_exo_pair_refuses_zero_smoothing():
    with pytest.raises(ValueError, match=r"set algorithm.label_smoothing > 0, e.g. 1e-3"):
        dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta=0.1, loss_type="exo_pair")
    assert math.isfinite(_loss("exo_pair", label_smoothing=1e-3)[0])


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_reference_free_uses_zero_reference(loss_type):
    pc, pr, rc, rr = _random_batch(8, seed=7)
    zeros = torch.zeros_like(rc)
    kwargs = {"beta": 0.3, "loss_type": loss_type, "label_smoothing": _eps(loss_type)}
    free_kwargs, zero_kwargs = dict(kwargs), dict(kwargs)
    if loss_type in BATCH_LOSSES:
        free_kwargs["batch_terms"] = batch_terms(
            loss_type, pc, pr, rc, rr, reference_free=True, **_bt_kwargs(kwargs)
        )
        zero_kwargs["batch_terms"] = batch_terms(loss_type, pc, pr, zeros, zeros, **_bt_kwargs(kwargs))
    free = dpo_loss(pc, pr, rc, rr, reference_free=True, **free_kwargs)
    zero = dpo_loss(pc, pr, zeros, zeros, **zero_kwargs)
    for a, b in zip(free, zero):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(free[1], 0.3 * pc.detach())
    with_ref = dpo_loss(
        pc, pr, rc, rr, **{**zero_kwargs, "batch_terms": _terms_or_none(loss_type, pc, pr, rc, rr)}
    )
    assert not torch.allclose(free[0], with_ref[0])


def _bt_kwargs(kwargs):
    return {"beta": kwargs["beta"], "label_smoothing": kwargs["label_smoothing"]}


def _terms_or_none(loss_type, pc, pr, rc, rr):
    return batch_terms(loss_type, pc, pr, rc, rr, beta=0.3) if loss_type in BATCH_LOSSES else None


# ---- batch losses: any split of the batch equals the whole-batch sorted formula ------------------------------------


def _reference_batch(loss_type, pc, pr, rc, rr, beta, eps):
    """TRL 1.16's whole-batch aot / aot_unpaired, per rank: sort, pair by rank, smoothed logistic on β·delta."""
    if loss_type == "aot":
        a, b = torch.sort(pc - pr, stable=True).values, torch.sort(rc - rr, stable=True).values
    else:
        a, b = torch.sort(pc - rc, stable=True).values, torch.sort(pr - rr, stable=True).values
    z = beta * (a - b)
    return (1 - eps) * _nls(z) + eps * _nls(-z)


def _split_sum(loss_type, parts, pc, pr, rc, rr, rows, beta, eps):
    """Σ over the parts of each part's summed losses, and the per-pair losses put back in global order."""
    per_pair = torch.empty(pc.shape[0], dtype=pc.dtype)
    total = 0.0
    for idx in parts:
        losses, _, _ = dpo_loss(
            pc[idx],
            pr[idx],
            rc[idx],
            rr[idx],
            beta=beta,
            loss_type=loss_type,
            label_smoothing=eps,
            batch_terms=rows[idx],
        )
        per_pair[idx] = losses.detach()
        total = total + losses.sum()
    return total, per_pair


def _partitions(n, seed):
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    cuts = sorted(torch.randperm(n - 1, generator=gen)[:3].add(1).tolist())
    random_parts = [perm[a:b] for a, b in zip([0, *cuts], [*cuts, n])]
    # 2 data-parallel ranks (rank-major global order after all-gather) × 2 uneven packed micro-batches each.
    half = n // 2
    dp2_mb2 = [
        torch.arange(0, 4),
        torch.arange(4, half),
        torch.arange(half, half + 3),
        torch.arange(half + 3, n),
    ]
    return {
        "whole": [torch.arange(n)],
        "singles": [torch.tensor([j]) for j in range(n)],
        "random": random_parts,
        "dp2_x_mb2": dp2_mb2,
    }


@pytest.mark.parametrize("partition", ["whole", "singles", "random", "dp2_x_mb2"])
@pytest.mark.parametrize("eps", [0.0, 0.15])
@pytest.mark.parametrize("loss_type", ["aot", "aot_pair"])
def test_batch_loss_split_matches_whole_batch_value_and_gradient(loss_type, eps, partition):
    n, beta = 12, 0.4
    for seed in range(3):
        pc, pr, rc, rr = _random_batch(n, seed=100 + seed)
        rows = batch_terms(loss_type, pc, pr, rc, rr, beta=beta, label_smoothing=eps)
        assert rows.shape == (n, 1 if loss_type == "aot" else 2) and not rows.requires_grad
        parts = _partitions(n, seed)[partition]
        assert sorted(torch.cat(parts).tolist()) == list(range(n))
        total, per_pair = _split_sum(loss_type, parts, pc, pr, rc, rr, rows, beta, eps)
        ranked = _reference_batch(loss_type, pc, pr, rc, rr, beta, eps)
        torch.testing.assert_close(total, ranked.sum(), rtol=0, atol=1e-6)
        torch.testing.assert_close(per_pair.mean(), ranked.detach().mean(), rtol=0, atol=1e-6)
        got = torch.autograd.grad(total, (pc, pr))
        want = torch.autograd.grad(ranked.sum(), (pc, pr))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["aot", "aot_pair"])
def test_batch_loss_per_pair_entry_is_its_chosen_rank_loss(loss_type):
    pc, pr, rc, rr = _random_batch(10, seed=8)
    rows = batch_terms(loss_type, pc, pr, rc, rr, beta=0.2)
    losses = dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type=loss_type, batch_terms=rows)[0]
    ranked = _reference_batch(loss_type, pc, pr, rc, rr, 0.2, 0.0).detach()
    chosen_quantity = (pc - pr) if loss_type == "aot" else (pc - rc)
    rank = torch.argsort(torch.argsort(chosen_quantity.detach()))
    torch.testing.assert_close(losses.detach(), ranked[rank])


def test_aot_pair_wrong_rejected_partner_keeps_value_but_breaks_gradient():
    """The rejected side carries only a gradient, so only a gradient check can see a wrong partner there."""
    pc, pr, rc, rr = _random_batch(10, seed=9)
    rows = batch_terms("aot_pair", pc, pr, rc, rr, beta=0.4)
    parts = _partitions(10, 0)["dp2_x_mb2"]
    wrong = rows.clone()
    wrong[:, 1] = wrong[:, 1].roll(1)
    right_total, _ = _split_sum("aot_pair", parts, pc, pr, rc, rr, rows, 0.4, 0.0)
    wrong_total, _ = _split_sum("aot_pair", parts, pc, pr, rc, rr, wrong, 0.4, 0.0)
    torch.testing.assert_close(wrong_total, right_total)
    right_grad = torch.autograd.grad(right_total, pr)[0]
    wrong_grad = torch.autograd.grad(wrong_total, pr)[0]
    assert (right_grad - wrong_grad).abs().max() > 1e-3
    # Nor is it enough to pair r with the chosen partner of c's rank (r and c generally hold different ranks).
    naive = rows.clone()
    naive[:, 1] = (pc - rc).detach()
    naive_total, _ = _split_sum("aot_pair", parts, pc, pr, rc, rr, naive, 0.4, 0.0)
    assert (torch.autograd.grad(naive_total, pr)[0] - right_grad).abs().max() > 1e-3


@pytest.mark.parametrize("loss_type", ["aot", "aot_pair"])
def test_batch_loss_wrong_partner_changes_the_gradient(loss_type):
    pc, pr, rc, rr = _random_batch(10, seed=10)
    rows = batch_terms(loss_type, pc, pr, rc, rr, beta=0.4)
    parts = [torch.arange(10)]
    wrong = rows.clone()
    wrong[:, 0] = wrong[:, 0].flip(0)
    right_total, _ = _split_sum(loss_type, parts, pc, pr, rc, rr, rows, 0.4, 0.0)
    wrong_total, _ = _split_sum(loss_type, parts, pc, pr, rc, rr, wrong, 0.4, 0.0)
    assert (
        torch.autograd.grad(right_total, pc)[0] - torch.autograd.grad(wrong_total, pc)[0]
    ).abs().max() > 1e-3


@pytest.mark.parametrize(
    "loss_type, expected_rows",
    [
        # aot: π_c − π_r = [0, 1, 0, 2] ties pairs 0 and 2 (ranks 0, 1 by index); ref diffs [0, 1, 2, 3].
        ("aot", [[0.0], [2.0], [1.0], [3.0]]),
        # aot_pair: c = [0, 1, 0, 2] (ties as above), r = [0, 1, 2, 3]: rejected partner of c's rank, chosen of r's.
        ("aot_pair", [[0.0, 0.0], [2.0, 0.0], [1.0, 1.0], [3.0, 2.0]]),
    ],
)
def test_batch_loss_ties_pair_by_index_order(loss_type, expected_rows):
    """Tied quantities take ranks in index order, so the pairing (and the subgradient) is deterministic."""
    pc = _t(0.0, 1.0, 0.0, 2.0).requires_grad_()
    if loss_type == "aot":
        pr, rc, rr = _t(0.0, 0.0, 0.0, 0.0), _t(0.0, 1.0, 2.0, 3.0), _t(0.0, 0.0, 0.0, 0.0)
    else:
        pr, rc, rr = _t(0.0, 1.0, 2.0, 3.0), _t(0.0, 0.0, 0.0, 0.0), _t(0.0, 0.0, 0.0, 0.0)
    pr.requires_grad_()
    rows = batch_terms(loss_type, pc, pr, rc, rr, beta=0.5)
    assert rows.tolist() == expected_rows
    total, _ = _split_sum(loss_type, [torch.tensor([j]) for j in range(4)], pc, pr, rc, rr, rows, 0.5, 0.0)
    ranked = _reference_batch(loss_type, pc, pr, rc, rr, 0.5, 0.0)
    torch.testing.assert_close(total, ranked.sum())
    torch.testing.assert_close(
        torch.autograd.grad(total, (pc, pr)), torch.autograd.grad(ranked.sum(), (pc, pr))
    )


def test_reference_free_aot_has_zero_reference_partners():
    pc, pr, rc, rr = _random_batch(6, seed=11)
    assert batch_terms("aot", pc, pr, rc, rr, beta=0.1, reference_free=True).abs().sum() == 0


def test_batch_terms_refused_for_pairwise_losses():
    with pytest.raises(
        ValueError, match="batch_terms applies to loss_type aot, aot_pair only, not 'sigmoid'"
    ):
        batch_terms("sigmoid", _t(PC), _t(PR), _t(RC), _t(RR), beta=0.1)
