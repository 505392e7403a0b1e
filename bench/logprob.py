"""Benchmark: per-token log-probs, forward + backward, naive vs chunked vs fused-head (CPU, fp32).

Default shape: T=4096 tokens, hidden 896, vocab 151936 (Qwen2.5-0.5B's output layer). Each variant computes
``logp = log_softmax(hidden @ Wᵀ)[target]`` and the gradients of ``Σ g·logp`` w.r.t. ``hidden`` and ``W``:

* naive    — full logits, ``torch.log_softmax``, ``gather`` (what most RL code does);
* chunked  — full logits, then :func:`spin_megatron.algorithm.logprob.vocab_parallel_logprobs` (chunked fp32);
* fused    — :func:`spin_megatron.algorithm.logprob.fused_head_logprobs`: logits never exist beyond one chunk.

Every variant runs in its own fresh process (peak RSS is a per-process high-water mark), all in this run, and is
reported as a ratio to naive. Usage: ``python bench/logprob.py [--tokens 4096] [--chunk 512] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = ("naive", "chunked", "fused")


def _rss_high_water_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_variant(args) -> dict:
    import torch

    from spin_megatron.algorithm.logprob import fused_head_logprobs, vocab_parallel_logprobs

    torch.manual_seed(0)
    hidden = (torch.randn(args.tokens, args.hidden) * 0.5).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden) * 0.02).requires_grad_()
    target = torch.randint(0, args.vocab, (args.tokens,))
    upstream = torch.randn(args.tokens)

    def step():
        if args.variant == "naive":
            logits = hidden @ weight.t()
            logp = torch.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1)
        elif args.variant == "chunked":
            logits = hidden @ weight.t()
            logp = vocab_parallel_logprobs(logits, target, chunk_tokens=args.chunk, backend="chunked")
        else:
            logp = fused_head_logprobs(hidden, weight, target, chunk_tokens=args.chunk)
        (logp * upstream).sum().backward()
        hidden.grad = weight.grad = None
        return logp.detach()

    baseline = _rss_high_water_bytes()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        logp = step()
        times.append(time.perf_counter() - start)
    return {
        "variant": args.variant,
        "seconds": min(times),
        "peak_extra_bytes": _rss_high_water_bytes() - baseline,
        "logp_sum": float(logp.double().sum()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0

    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    base = results["naive"]
    print(
        f"log-probs fwd+bwd: T={args.tokens} hidden={args.hidden} vocab={args.vocab} fp32, chunk={args.chunk}, "
        f"best of {args.repeats}"
    )
    print(
        f"{'variant':<9} {'time s':>8} {'× naive':>8} {'peak extra MiB':>15} {'× naive':>8} {'Σlogp vs naive':>15}"
    )
    for variant, r in results.items():
        print(
            f"{variant:<9} {r['seconds']:8.2f} {r['seconds'] / base['seconds']:8.2f} "
            f"{r['peak_extra_bytes'] / 2**20:15.0f} {r['peak_extra_bytes'] / base['peak_extra_bytes']:8.3f} "
            f"{r['logp_sum'] - base['logp_sum']:15.2e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
