"""Rank worker for test_logprob's TP=2 case: chunked and fused-head log-probs on each rank's vocabulary shard vs
log_softmax over the gathered vocabulary; rank 0 writes the worst relative errors as JSON."""

import argparse
import json
import sys

import torch
import torch.distributed as dist

from spin_megatron.logprob import fused_head_logprobs, vocab_parallel_logprobs
from spin_megatron.parallel import destroy_parallel, init_parallel

B, S, H, VOCAB, PADDED = 3, 15, 16, 101, 128


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    groups = init_parallel(2, 1)
    report = {str(t): run_case(groups, t) for t in (1.0, 0.7)}
    gathered = [None] * groups.world_size
    dist.all_gather_object(gathered, report)
    if groups.rank == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f)
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
