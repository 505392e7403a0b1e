"""GPU benchmark: model-FLOPs utilisation of one DPO training step on a Qwen2.5-1.5B-shaped model (random init,
bf16, TE layer spec when installed) on one H100/H200. Target ≥ 45 %.

A step = reference forward + policy forward/backward over packed micro-batches (chosen and rejected of each pair
together), as the trainer runs it (spin_megatron.parallel.dpo_step). Model FLOPs per token: 2·N forward for the
reference and 6·N for the policy (N = non-embedding parameters + the output layer), plus attention
(2·2·L·h·s̄ per token forward, ×3 with backward; s̄ = mean causal context = sequence length / 2 within a packed
sequence). MFU = those FLOPs / time / peak dense bf16 throughput of the device (989 TFLOP/s for H100/H200 SXM;
override with --peak-tflops).

    python bench/mfu_gpu.py [--steps 5] [--tokens-per-microbatch 16384] [--prompt 256 --response 768]
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/mfu_gpu.py needs a CUDA device", file=sys.stderr)
        return 2

    from spin_megatron.models.arch import arch_from_hf_config
    from spin_megatron.models.builder import build_gpt_model
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

    policy = build_gpt_model(arch, groups, dtype=torch.bfloat16, calculate_per_token_loss=True)
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
    settings = DPOSettings(beta=0.1, vocab_size=arch.vocab_size)

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
    times = []
    for step in range(args.steps + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        compute_reference_logps(reference, groups, batches, settings)
        train_step(
            policy,
            optimizer,
            groups,
            batches,
            settings,
            global_pairs=args.pairs,
            global_chosen_tokens=args.pairs * args.response,
        )
        torch.cuda.synchronize()
        if step:  # the first step warms up kernels and allocator
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    achieved = flops_per_token * tokens / seconds / 1e12
    print(
        f"{torch.cuda.get_device_name()}: {n_params / 1e9:.2f} B params, {tokens} tokens/step in {len(batches)} "
        f"micro-batches, {seconds:.3f} s/step (median of {len(times)}), {tokens / seconds:,.0f} tokens/s, "
        f"{achieved:.0f} TFLOP/s, MFU {100 * achieved / args.peak_tflops:.1f} % of {args.peak_tflops:.0f}"
    )
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
