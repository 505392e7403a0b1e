"""GPU benchmark: model-FLOPs utilisation of one DPO training step on a Qwen2.5-1.5B-shaped model (random init,
bf16, TE layer spec when installed) on one H100/H200. Target ≥ 45 %.

A step = reference forward + policy forward/backward over packed micro-batches (chosen and rejected of each pair
together), as the trainer runs it (spin_megatron.parallel.dpo_step). Model FLOPs per token: 2·N forward for the
reference and 6·N for the policy (N = non-embedding parameters + the output layer), plus attention
(2·2·L·h·s̄ per token forward, ×3 with backward; s̄ = mean causal context = sequence length / 2 within a packed
sequence). MFU = those FLOPs / time / peak dense bf16 throughput of the device (989 TFLOP/s for H100/H200 SXM;
override with --peak-tflops).

Reports the reference/policy time split, the peak GPU memory and the log-prob path (``--logprob-impl``:
``fused_head``, the trainer's default, or ``logits`` with TE's cross-entropy), and fails if an optimizer step was
skipped (a NaN-skipped step is faster and would inflate the MFU). ``--json FILE`` writes the numbers.

    python bench/mfu_gpu.py [--steps 5] [--tokens-per-microbatch 16384] [--prompt 256 --response 768]
                            [--logprob-impl fused_head|logits] [--json mfu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

QWEN25_15B = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
    "torch_dtype": "bfloat16",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--response", type=int, default=768)
    parser.add_argument("--tokens-per-microbatch", type=int, default=16384)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--logprob-impl", choices=("fused_head", "logits"), default="fused_head")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/mfu_gpu.py needs a CUDA device", file=sys.stderr)
        return 2

    from spin_megatron.models.arch import arch_from_hf_config
    from spin_megatron.models.builder import build_gpt_model, expose_hidden_states
    from spin_megatron.parallel import destroy_parallel, init_parallel
    from spin_megatron.parallel.dpo_step import DPOSettings, compute_reference_logps, train_step
    from spin_megatron.parallel.packing import ScoredSequence, pack_items

    groups = init_parallel(1, 1)
    arch = arch_from_hf_config(QWEN25_15B)
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    fused = args.logprob_impl == "fused_head"
    policy = build_gpt_model(arch, groups, dtype=torch.bfloat16, calculate_per_token_loss=True)
    if fused:
        expose_hidden_states(policy)
    config = policy.config
    policy = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True),
        Float16Module(config, policy),
        pg_collection=groups.pgs,
    )
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=1e-6, bf16=True, params_dtype=torch.bfloat16, use_distributed_optimizer=True
        ),
        [policy],
        use_gloo_process_groups=False,
        pg_collection=groups.pgs,
    )
    reference = build_gpt_model(arch, groups, dtype=torch.bfloat16).eval().requires_grad_(False)
    if fused:
        expose_hidden_states(reference)
    settings = DPOSettings(beta=0.1, vocab_size=arch.vocab_size, fused_head=fused)

    gen = torch.Generator().manual_seed(0)

    def seq(n):
        return torch.randint(0, arch.vocab_size, (n,), generator=gen).tolist()

    items = []
    for _ in range(args.pairs):
        prompt = seq(args.prompt)
        items.append([ScoredSequence(prompt, seq(args.response)), ScoredSequence(prompt, seq(args.response))])
    batches = [b.to(groups.device) for b in pack_items(items, token_budget=args.tokens_per_microbatch)]
    tokens = sum(s.num_tokens for item in items for s in item)

    n_params = sum(p.numel() for p in reference.parameters())  # tied: the embedding counts once, as the head
    layers, hidden, seq_len = arch.num_layers, arch.hidden_size, args.prompt + args.response
    attn = 2 * 2 * layers * hidden * seq_len / 2  # forward, per token, causal
    flops_per_token = 2 * n_params + attn + 3 * (2 * n_params + attn)  # reference fwd + policy fwd/bwd
    times, ref_times, skipped = [], [], 0
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        compute_reference_logps(reference, groups, batches, settings)
        torch.cuda.synchronize()
        ref_done = time.perf_counter()
        _, _, updated = train_step(
            policy,
            optimizer,
            groups,
            batches,
            settings,
            global_pairs=args.pairs,
            global_chosen_tokens=args.pairs * args.response,
            step=step + 1,
        )
        torch.cuda.synchronize()
        skipped += not updated
        if step:  # the first step warms up kernels and allocator
            times.append(time.perf_counter() - start)
            ref_times.append(ref_done - start)
    if skipped:
        print(
            f"{skipped} optimizer step(s) were skipped (NaN/Inf gradients): the timing is not valid",
            file=sys.stderr,
        )
        return 1
    seconds, ref_seconds = statistics.median(times), statistics.median(ref_times)
    achieved = flops_per_token * tokens / seconds / 1e12
    peak_gb = torch.cuda.max_memory_allocated() / 2**30
    result = {
        "device": torch.cuda.get_device_name(), "logprob_impl": args.logprob_impl, "params_b": n_params / 1e9,
        "tokens_per_step": tokens, "micro_batches": len(batches), "seconds_per_step": seconds,
        "reference_seconds": ref_seconds, "policy_seconds": seconds - ref_seconds, "tokens_per_s": tokens / seconds,
        "tflops": achieved, "mfu_percent": 100 * achieved / args.peak_tflops, "peak_memory_gb": peak_gb,
    }  # fmt: skip
    print(
        f"{result['device']} [{args.logprob_impl}]: {n_params / 1e9:.2f} B params, {tokens} tokens/step in "
        f"{len(batches)} micro-batches, {seconds:.3f} s/step (reference {ref_seconds:.3f} s, policy "
        f"{seconds - ref_seconds:.3f} s; median of {len(times)}), {tokens / seconds:,.0f} tokens/s, "
        f"{achieved:.0f} TFLOP/s, MFU {result['mfu_percent']:.1f} % of {args.peak_tflops:.0f}, peak memory "
        f"{peak_gb:.1f} GiB"
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
