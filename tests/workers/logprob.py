"""Rank worker for test_logprob's TP=2 case: chunked and fused-head log-probs on each rank's vocabulary shard vs
log_softmax over the gathered vocabulary, and their per-token statistics vs a dense reference; rank 0 writes the
worst relative errors as JSON. test_logprob runs :func:`stats_case` at TP=1 too."""

import argparse
import json
import sys

import torch
import torch.distributed as dist

from spin_megatron.algorithm import logprob
from spin_megatron.algorithm.logprob import TOKEN_STATS, fused_head_logprobs, vocab_parallel_logprobs
from spin_megatron.parallel import destroy_parallel, init_parallel

B, S, H, VOCAB, PADDED = 3, 15, 16, 101, 128
TIED = (10, 70)  # two vocabulary ids with the same output-layer row, one on each rank at TP=2


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def reference(hidden, weight, target, temperature, upstream):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    logits = (hidden @ weight.t())[..., :VOCAB] / temperature
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    logp = torch.where(target != -100, logp, torch.zeros_like(logp))
    (logp * upstream).sum().backward()
    return logp.detach(), hidden.grad, weight.grad


def run_case(groups, temperature):
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(B, S, H, generator=gen) * 0.5
    weight = torch.randn(PADDED, H, generator=gen)
    target = torch.randint(0, VOCAB, (B, S), generator=gen)
    target[:, :4] = -100  # prompt positions
    upstream = torch.randn(B, S, generator=gen)
    ref_logp, ref_dh, ref_dw = reference(hidden, weight, target, temperature, upstream)
    width = PADDED // groups.tp_size
    cols = slice(groups.tp_rank * width, (groups.tp_rank + 1) * width)

    logits = (hidden @ weight.t())[..., cols].detach().requires_grad_()
    logp = vocab_parallel_logprobs(
        logits,
        target,
        tp_group=groups.tp,
        temperature=temperature,
        vocab_size=VOCAB,
        chunk_tokens=8,
        backend="chunked",
    )
    (logp * upstream).sum().backward()
    full_logits = (hidden @ weight.t()).detach().requires_grad_()
    ref_logits_logp = torch.log_softmax(full_logits[..., :VOCAB] / temperature, -1)
    ref_logits_logp = ref_logits_logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    (
        torch.where(target != -100, ref_logits_logp, torch.zeros_like(ref_logits_logp)) * upstream
    ).sum().backward()
    chunked = {
        "value": rel(logp.detach(), ref_logp),
        "grad_logits": rel(logits.grad, full_logits.grad[..., cols]),
    }

    h = hidden.clone().requires_grad_()
    w = weight[cols].clone().requires_grad_()
    logp = fused_head_logprobs(
        h, w, target, tp_group=groups.tp, temperature=temperature, vocab_size=VOCAB, chunk_tokens=8
    )
    (logp * upstream).sum().backward()
    fused = {
        "value": rel(logp.detach(), ref_logp),
        "grad_hidden": rel(h.grad, ref_dh),
        "grad_weight": rel(w.grad, ref_dw[cols]),
    }
    return {"chunked": chunked, "fused": fused}


def dense_token_stats(logits, target, temperature):
    """TOKEN_STATS from the full logits: softmax over the real vocabulary, 0 at ignored positions."""
    real = logits.detach().float()[..., :VOCAB]
    logp = torch.log_softmax(real / temperature, -1)
    prob = logp.exp()
    picked = real.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    stats = {
        "entropy": -(prob * logp).sum(-1),
        "mean_logit": real.mean(-1),
        "is_top1": (picked >= real.max(-1).values).float(),
        "log_sum_sq_probs": prob.square().sum(-1).log(),
    }
    return {
        name: torch.where(target != -100, value, torch.zeros_like(value)) for name, value in stats.items()
    }


def tie_data():
    """Like run_case's data, but hidden/weight are multiples of 1/4 and 1/8: every logit is exact in fp32 whatever
    the summation order, so the tie built at the last two positions (targets TIED, equal maxima) stays a tie, and
    the padded rows' logits there exceed every real one (is_top1 would be 0 if padding leaked in)."""
    gen = torch.Generator().manual_seed(11)
    hidden = (torch.randn(B, S, H, generator=gen) * 2).round() / 4
    weight = (torch.randn(PADDED, H, generator=gen) * 8).round() / 8
    target = torch.randint(0, VOCAB, (B, S), generator=gen)
    target[:, :4] = -100
    upstream = torch.randn(B, S, generator=gen)
    weight[list(TIED)] = 0.0
    weight[list(TIED), 0] = 5.0
    weight[VOCAB:, 0] = 8.0
    hidden[:, -2:] = 0.0
    hidden[:, -2:, 0] = 2.0
    target[:, -2], target[:, -1] = TIED
    return hidden, weight, target, upstream


def _score(path, hidden, weight, target, upstream, cols, stats, **kwargs):
    """(logps, stats dict, gradients) of one path on this rank's vocabulary columns."""
    if path == "fused":
        inputs = (hidden.clone().requires_grad_(), weight[cols].clone().requires_grad_())
        out = fused_head_logprobs(*inputs, target, stats=stats, **kwargs)
    else:
        inputs = ((hidden @ weight.t())[..., cols].detach().requires_grad_(),)
        out = vocab_parallel_logprobs(*inputs, target, backend="chunked", stats=stats, **kwargs)
    logp, got = out if stats else (out, {})
    (logp * upstream).sum().backward()
    return logp.detach(), got, [x.grad for x in inputs]


def stats_case(tp_group, tp_rank, tp_size, temperature, chunk=8):
    """Errors of the TOKEN_STATS from the fused, chunked and TE-backend (no-grad pass) paths vs the dense reference;
    exactness checks (logps and gradients unchanged by stats, detached, 0 when ignored, a tie present) as 0/1."""
    hidden, weight, target, upstream = tie_data()
    full = hidden @ weight.t()
    want = dense_token_stats(full, target, temperature)
    ties = (want["is_top1"] == 1) & (full[..., :VOCAB].argmax(-1) != target) & (target != -100)
    width = PADDED // tp_size
    cols = slice(tp_rank * width, (tp_rank + 1) * width)
    kwargs = dict(tp_group=tp_group, temperature=temperature, vocab_size=VOCAB, chunk_tokens=chunk)
    ignored = target == -100
    report = {}
    for path in ("chunked", "fused"):
        logp, got, grads = _score(path, hidden, weight, target, upstream, cols, TOKEN_STATS, **kwargs)
        plain_logp, _, plain_grads = _score(path, hidden, weight, target, upstream, cols, (), **kwargs)
        errors = {f"stat_{name}": rel(got[name], want[name]) for name in TOKEN_STATS}
        errors["logp_changed"] = float(not torch.equal(logp, plain_logp))
        errors["grad_changed"] = float(not all(map(torch.equal, grads, plain_grads)))
        errors["not_detached"] = float(any(value.requires_grad for value in got.values()))
        errors["ignored_nonzero"] = float(any(value[ignored].any() for value in got.values()))
        errors["no_tie"] = float(ties.sum().item() < 2)
        report[f"stats_{path}"] = errors
    logits = full[..., cols].clone().requires_grad_()
    token_stats = logprob._token_stats(TOKEN_STATS, target, -100)
    got = logprob._token_stats_pass(logits, target, tp_group, temperature, -100, VOCAB, chunk, token_stats)
    report["stats_te_pass"] = {f"stat_{name}": rel(got[name], want[name]) for name in TOKEN_STATS}
    report["stats_te_pass"]["not_detached"] = float(any(value.requires_grad for value in got.values()))
    return report


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    groups = init_parallel(2, 1)
    report = {
        str(t): {**run_case(groups, t), **stats_case(groups.tp, groups.tp_rank, groups.tp_size, t)}
        for t in (1.0, 0.6)
    }
    gathered = [None] * groups.world_size
    dist.all_gather_object(gathered, report)
    if groups.rank == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f)
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
