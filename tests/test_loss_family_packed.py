"""The whole DPO loss family through the packed Megatron update == an independent transformers reference.

``train_step`` over packed micro-batches (pairs back to back, several micro-batches per step) must hand the
optimizer the gradient of the mean over all pairs of the step of TRL 1.16's loss, computed here with a plain HF
model of the same weights, one unpacked sequence at a time with a full log_softmax, the formulas restated from
TRL's ``DPOTrainer._compute_loss`` (not from ``spin_megatron.algorithm.loss``). The reference model differs from the
policy's start (another seed), so log-ratios — and the aot pairings — are not trivially zero.

``aot``/``aot_pair`` sort over the whole optimizer batch: at DP=1 across micro-batches, at DP=2 across the two
ranks' pairs (tests/workers/loss_family.py); sorting per micro-batch or per rank gives a clearly different
gradient, which the tests show they would catch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spin_megatron.models.tiny import make_tiny_hf_model
from spin_megatron.parallel.packing import group_items
from tests.helpers import run_ranks
from tests.workers.loss_family import TOKEN_BUDGET, loss_config, make_pairs, run_step

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,  # padded to 128 rows in Megatron: the padding must get no gradient
    initializer_range=0.2,  # peaked enough that log-ratios reach ±10 and the aot ranks are not all alike
)
# 7 pairs pack as 2 + 2 + 2 + 1: with equal micro-batches a mean of per-micro-batch means equals the global mean,
# and a per-micro-batch normalisation would pass (issue 22 D17)
NUM_PAIRS = 7
RTOL = 1e-4  # of each tensor's largest reference gradient entry (fp32, different kernels and reduction order)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("loss_family")
    policy_dir = make_tiny_hf_model(root / "policy", "qwen2", seed=11, **TINY)
    ref_dir = make_tiny_hf_model(root / "reference", "qwen2", seed=12, **TINY)
    return policy_dir, ref_dir


@pytest.fixture(scope="module")
def groups():
    from spin_megatron.parallel import init_parallel

    return init_parallel(1, 1)


# ----- the reference: transformers, unpacked, TRL 1.16 formulas ------------------------------------------------


def _hf_model(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)


def _response_logps(model, seq):
    """Per response token: log p(token) and log Σ_v p_v² (WPO), from one full unpacked forward."""
    prompt, response = list(seq.prompt_ids), list(seq.response_ids)
    ids = torch.tensor(prompt + response)[None]
    logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(1, torch.tensor(response)[:, None]).squeeze(1)
    return picked, torch.logsumexp(2 * logp.detach(), dim=-1)


def _ld_weight(length, shared, ld_alpha):
    """TRL's LD-DPO token weights: 1 up to the pair's shorter length, α past it."""
    weight = torch.ones(length)
    if ld_alpha is not None:
        weight[shared:] = ld_alpha
    return weight


def _pair_terms(policy, reference, items, ld_alpha):
    """Per pair: policy/reference (LD-weighted) summed log-probs, lengths, raw chosen token log-probs, WPO
    weights. The policy's terms carry the gradient."""
    terms = []
    for chosen, rejected in items:
        lengths = (len(chosen.response_ids), len(rejected.response_ids))
        shared = min(lengths)
        row = {"lengths": lengths}
        for key, seq, n in (("c", chosen, lengths[0]), ("r", rejected, lengths[1])):
            token_logps, log_sum_sq = _response_logps(policy, seq)
            with torch.no_grad():
                ref_token_logps, _ = _response_logps(reference, seq)
            weight = _ld_weight(n, shared, ld_alpha)
            row[f"pi_{key}"] = (token_logps * weight).sum()
            row[f"ref_{key}"] = (ref_token_logps * weight).sum()
            row[f"tokens_{key}"] = token_logps
            row[f"wpo_{key}"] = torch.exp((token_logps.detach() - log_sum_sq).mean())
        terms.append(row)
    return terms


def _trl_pair_loss(loss_type, t, beta, eps, tau, normalize):
    """TRL 1.16 ``_compute_loss`` for one pair (the non-batch losses). ``normalize``: TRL's per-token average
    of the scores (ipo always; sigmoid_norm = our length-normalised sigmoid)."""
    chosen_logratios = t["pi_c"] - t["ref_c"]
    rejected_logratios = t["pi_r"] - t["ref_r"]
    if normalize:
        chosen_logratios = chosen_logratios / t["lengths"][0]
        rejected_logratios = rejected_logratios / t["lengths"][1]
    delta = chosen_logratios - rejected_logratios
    logits = beta * delta
    if loss_type == "sigmoid":
        return -F.logsigmoid(logits)
    if loss_type == "hinge":
        return torch.relu(1 - logits)
    if loss_type == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        eps_t = torch.tensor(eps)
        qw, log_qw = torch.sigmoid(logits), F.logsigmoid(logits)
        ql, log_ql = torch.sigmoid(-logits), F.logsigmoid(-logits)
        return qw * (log_qw - torch.log1p(-eps_t)) + ql * (log_ql - torch.log(eps_t))
    if loss_type == "nca_pair":
        cr, rr = beta * chosen_logratios, beta * rejected_logratios
        return -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr)
    if loss_type == "robust":
        clean = -(1 - eps) * F.logsigmoid(logits)
        flipped = -eps * F.logsigmoid(-logits)
        return (clean - flipped) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * delta)
    assert loss_type == "discopop", loss_type
    modulation = torch.sigmoid(logits / tau)
    return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation


def _trl_batch_losses(loss_type, terms, beta, eps):
    """TRL 1.16's aot / aot_unpaired on one batch: sort, pair by rank, smoothed logistic."""
    stack = {k: torch.stack([t[k] for t in terms]) for k in ("pi_c", "pi_r", "ref_c", "ref_r")}
    if loss_type == "aot":
        logratios_sorted, _ = torch.sort(stack["pi_c"] - stack["pi_r"])
        ref_logratios_sorted, _ = torch.sort(stack["ref_c"] - stack["ref_r"])
        delta = logratios_sorted - ref_logratios_sorted
    else:
        chosen_sorted, _ = torch.sort(stack["pi_c"] - stack["ref_c"])
        rejected_sorted, _ = torch.sort(stack["pi_r"] - stack["ref_r"])
        delta = chosen_sorted - rejected_sorted
    return -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps


def reference_gradient(policy_dir, ref_dir, items, case, *, sort_groups=None):
    """The gradient of TRL's loss averaged over all pairs of ``items``; batch losses sort within each list of
    ``sort_groups`` (default: the whole batch, as one TRL step on all of it)."""
    policy, reference = _hf_model(policy_dir), _hf_model(ref_dir)
    a = case["algorithm"]
    loss_type, beta, eps = a["loss_type"], a.get("beta", 0.1), a.get("label_smoothing", 0.0)
    terms = _pair_terms(policy, reference, items, a.get("ld_alpha"))
    if loss_type in ("aot", "aot_pair"):
        sort_groups = sort_groups or [list(range(len(items)))]
        total = sum(_trl_batch_losses(loss_type, [terms[i] for i in g], beta, eps).sum() for g in sort_groups)
    else:
        normalize = a.get("length_normalize", loss_type == "ipo")
        losses = []
        for t in terms:
            loss = _trl_pair_loss(loss_type, t, beta, eps, a.get("discopop_tau", 0.05), normalize)
            if a.get("use_weighting"):  # WPO (detached weights)
                loss = loss * t["wpo_c"] * t["wpo_r"]
            losses.append(loss)
        total = torch.stack(losses).sum()
    loss = total / len(items)
    if a.get("rpo_alpha"):  # TRL 1.16: loss_type=[..., "sft"]: NLL per chosen token of the batch
        chosen = torch.cat([t["tokens_c"] for t in terms])
        loss = loss + a["rpo_alpha"] * -chosen.mean()
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in policy.named_parameters()}


# ----- comparison -----------------------------------------------------------------------------------------------


def relative_error(ours: dict, expected: dict) -> float:
    """Largest per-tensor max|Δ| / max|expected| over the HF parameters (the padding is checked apart)."""
    assert sorted(k for k in ours if ":" not in k) == sorted(expected)
    return max(
        ((ours[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item() for n, g in expected.items()
    )


def assert_matches(ours, grad_norm, expected):
    assert relative_error(ours, expected) <= RTOL, relative_error(ours, expected)
    for name, padding in ((k, v) for k, v in ours.items() if k.endswith(":padding")):
        assert not padding.any(), f"padded vocabulary rows of {name} got a gradient"
    expected_norm = math.sqrt(sum(g.double().pow(2).sum().item() for g in expected.values()))
    assert grad_norm == pytest.approx(expected_norm, rel=RTOL)


def _micro_batch_groups(items):
    return group_items([sum(s.num_tokens for s in item) for item in items], TOKEN_BUDGET)


# ----- DP=1: every loss over several packed micro-batches ----------------------------------------------------


CASES = {
    "sigmoid": dict(loss_type="sigmoid"),
    "sigmoid-ld_alpha": dict(loss_type="sigmoid", ld_alpha=0.5),
    "sigmoid-wpo": dict(loss_type="sigmoid", use_weighting=True),
    "sigmoid-wpo-ld_alpha": dict(loss_type="sigmoid", use_weighting=True, ld_alpha=0.5),
    "sigmoid-rpo": dict(loss_type="sigmoid", rpo_alpha=0.5),
    "sigmoid-length_normalize": dict(loss_type="sigmoid", length_normalize=True),  # TRL's sigmoid_norm
    "robust": dict(loss_type="robust", label_smoothing=0.1),
    "hinge": dict(loss_type="hinge", beta=0.15),  # β·d on both sides of 1: some pairs get no gradient
    "ipo": dict(loss_type="ipo"),  # length-normalised by default, as TRL
    "ipo-ld_alpha": dict(loss_type="ipo", ld_alpha=0.5),
    "exo_pair": dict(loss_type="exo_pair", label_smoothing=0.01),
    "nca_pair": dict(loss_type="nca_pair"),
    "bco_pair": dict(loss_type="bco_pair"),
    "sppo_hard": dict(loss_type="sppo_hard"),
    "aot": dict(loss_type="aot", beta=0.5),
    "aot-smoothed-ld_alpha": dict(loss_type="aot", beta=0.5, label_smoothing=0.1, ld_alpha=0.5),
    "aot_pair": dict(loss_type="aot_pair", beta=0.5),
    "aot_unpaired-smoothed": dict(loss_type="aot_unpaired", beta=0.5, label_smoothing=0.1),
    "apo_zero": dict(loss_type="apo_zero"),
    "apo_down": dict(loss_type="apo_down"),
    "discopop": dict(loss_type="discopop"),
}
LOGITS_PATH_CASES = ("sigmoid-wpo-ld_alpha", "ipo", "aot_pair")  # also through the logits (non-fused) head


def _case(name):
    algorithm = dict(CASES[name])
    if algorithm["loss_type"] == "aot_unpaired":  # TRL's name; the reference formulas use ours
        algorithm["loss_type"] = "aot_pair"
        return {"algorithm": algorithm}, {**algorithm, "loss_type": "aot_unpaired"}
    return {"algorithm": algorithm}, algorithm


@pytest.mark.parametrize(
    "name, logprob_impl",
    [(n, "fused_head") for n in CASES] + [(n, "logits") for n in LOGITS_PATH_CASES],
)
def test_packed_update_gradient_equals_the_unpacked_trl_reference(name, logprob_impl, models, groups):
    policy_dir, ref_dir = models
    case, algorithm = _case(name)
    items = make_pairs(NUM_PAIRS, TINY["vocab_size"])
    sizes = [len(group) for group in _micro_batch_groups(items)]
    assert len(sizes) >= 2 and len(set(sizes)) > 1, sizes  # uneven micro-batches
    cfg = loss_config(policy_dir, logprob_impl=logprob_impl, **algorithm)
    grads, grad_norm, micro_batches = run_step(
        cfg,
        ref_dir,
        groups,
        items,
        global_pairs=len(items),
        global_chosen_tokens=sum(len(i[0].response_ids) for i in items),
    )
    assert micro_batches >= 2
    expected = reference_gradient(policy_dir, ref_dir, items, case)
    assert_matches(grads, grad_norm, expected)
    if case["algorithm"]["loss_type"] in ("aot", "aot_pair"):
        # sorting each micro-batch on its own is a different loss: this test would see it
        per_micro_batch = reference_gradient(
            policy_dir, ref_dir, items, case, sort_groups=_micro_batch_groups(items)
        )
        assert relative_error(grads, per_micro_batch) > 100 * RTOL


# ----- DP=2: aot / aot_pair sort over both ranks' pairs -------------------------------------------------------

DP2_PAIRS, RANK0_PAIRS = 7, 4  # rank 0: pairs 0–3, rank 1: pairs 4–6; each packs them its own way
DP2_LOSSES = {  # worker spec loss_type:beta:label_smoothing -> the reference's settings
    "aot:0.5:0.0": dict(loss_type="aot", beta=0.5),
    "aot_pair:0.5:0.1": dict(loss_type="aot_pair", beta=0.5, label_smoothing=0.1),
}


@pytest.fixture(scope="module")
def dp2_report(models, tmp_path_factory):
    policy_dir, ref_dir = models
    out = tmp_path_factory.mktemp("dp2") / "grads.pt"
    args = ["--hf-dir", policy_dir, "--ref-dir", ref_dir, "--out", out]
    args += ["--num-pairs", DP2_PAIRS, "--rank0-pairs", RANK0_PAIRS]
    for spec in DP2_LOSSES:
        args += ["--loss", spec]
    assert run_ranks(2, "tests.workers.loss_family", *args) == 0
    return torch.load(out, weights_only=False)


@pytest.mark.dist
@pytest.mark.parametrize("spec", list(DP2_LOSSES))
def test_batch_losses_sort_over_all_data_parallel_ranks(spec, dp2_report, models):
    policy_dir, ref_dir = models
    result = dp2_report[spec]
    assert result["micro_batches"][0] >= 2  # rank 0's pairs span micro-batches too
    items = make_pairs(DP2_PAIRS, TINY["vocab_size"])
    case = {"algorithm": DP2_LOSSES[spec]}
    expected = reference_gradient(policy_dir, ref_dir, items, case)
    assert_matches(result["grads"], result["grad_norm"], expected)
    # sorting each rank's pairs on its own (a per-rank batch) is a different loss: this test would see it
    per_rank = reference_gradient(
        policy_dir, ref_dir, items, case,
        sort_groups=[list(range(RANK0_PAIRS)), list(range(RANK0_PAIRS, DP2_PAIRS))],
    )  # fmt: skip
    assert relative_error(result["grads"], per_rank) > 100 * RTOL
