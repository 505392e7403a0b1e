"""GPU benchmark: model-FLOPs utilisation of one DPO training step on a Qwen2.5-1.5B-shaped model (random init,
bf16, TE layer spec when installed) on one H100/H200. Target ≥ 45 %.

A step = reference forward + policy forward/backward over packed micro-batches (chosen and rejected of each pair
together), as the trainer runs it (spin_megatron.parallel.dpo_step). Model FLOPs per token: 2·N forward for the
reference and 6·N for the policy (N = non-embedding parameters + the output layer), plus attention
(2·2·L·h·s̄ per token forward, ×3 with backward; s̄ = mean causal context = sequence length / 2 within a packed
sequence). MFU = those FLOPs / time / peak dense bf16 throughput of the device (989 TFLOP/s for H100/H200 SXM;
override with --peak-tflops).

The micro-batch: ``--tokens-per-microbatch`` (16384) halved until the memory planner's training peak fits the
free memory ``torch.cuda.mem_get_info`` reports (the planner predicts ~79 GiB for the fused head and ~88 GiB for
the logits path at 16384 tokens: over an H100's 79.6 GiB); ``--no-fit`` takes it as given. The caching allocator
runs with ``expandable_segments`` (less fragmentation between the reference and the policy passes).

Reports the reference/policy time split, the peak GPU memory beside the planned one, the log-prob path
(``--logprob-impl``: ``fused_head``, the trainer's default, or ``logits`` with TE's cross-entropy when TE is there,
else the chunked one), the layer spec, TE/torch versions and the micro-batch, and fails if an optimizer step was
skipped (a NaN-skipped step is faster and would inflate the MFU). ``--json FILE`` writes the numbers, also when
the run dies of an out-of-memory error (exit 3). ``--plan-only`` needs no GPU: the micro-batch the planner would
choose on a GPU with ``--gpu-gib`` free, for the TE and the local layer spec.

    python bench/mfu_gpu.py [--steps 5] [--tokens-per-microbatch 16384] [--prompt 256 --response 768]
                            [--logprob-impl fused_head|logits] [--no-fused-swiglu] [--json mfu.json]
    python bench/mfu_gpu.py --plan-only --gpu-gib 79.1 [--logprob-impl logits]
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"
)  # read at the first CUDA allocation

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

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
CHUNK_TOKENS = 1024  # DPOSettings' default log-prob chunk


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--response", type=int, default=768)
    parser.add_argument("--tokens-per-microbatch", type=int, default=16384, help="the largest to try")
    parser.add_argument("--no-fit", action="store_true", help="use --tokens-per-microbatch as given")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--logprob-impl", choices=("fused_head", "logits"), default="fused_head")
    parser.add_argument(
        "--no-fused-swiglu",
        action="store_true",
        help="plain SwiGLU (no torch.compile: model.fused_swiglu=false)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--plan-only", action="store_true", help="the planner's micro-batch only (no GPU)")
    parser.add_argument(
        "--gpu-gib", type=float, default=79.1, help="--plan-only: free GPU memory to plan for"
    )
    return parser.parse_args(argv)


# ----- the planner's micro-batch -------------------------------------------------------------------------
def bench_config(args):
    """The trainer configuration whose memory plan is this benchmark's step: online pairs of one prompt and two
    responses, bf16, the distributed optimizer, no rollout engine on the GPU."""
    from spin_megatron.config import Config, ModelConfig
    from spin_megatron.planning.fit import _with

    cfg = Config(model=ModelConfig(hf_path="bench:qwen2.5-1.5b-shape"))  # the path is never read
    return _with(cfg, [
        ("model.dtype", "bf16"), ("rollout.replay_path", "unused"), ("trainer.test_freq", 0),
        ("rollout.engine", "replay"), ("algorithm.mode", "online"), ("data.max_prompt_tokens", args.prompt),
        ("rollout.max_new_tokens", args.response), ("trainer.prompts_per_step", args.pairs),
        ("trainer.micro_batch_tokens", args.tokens_per_microbatch), ("trainer.logprob_chunk_tokens", CHUNK_TOKENS),
        ("trainer.logprob_impl", args.logprob_impl), ("optim.use_distributed_optimizer", True),
    ])  # fmt: skip


def plan_micro_batch(args, arch, *, gpu_bytes: int, use_te: bool) -> dict:
    """The micro-batch for a GPU with ``gpu_bytes`` free: the largest that the planner says fits (halving from
    --tokens-per-microbatch), or the given one with --no-fit."""
    from spin_megatron.planning.counting import GB
    from spin_megatron.planning.fit import largest_fitting_micro_batch, planner_kernels
    from spin_megatron.planning.memory import estimate

    cfg, kernels = bench_config(args), planner_kernels(use_te)
    if args.no_fit:
        tokens = args.tokens_per_microbatch
        plan = estimate(cfg, arch, world_size=1, kernels=kernels, gpu_bytes=gpu_bytes)
    else:
        found = largest_fitting_micro_batch(cfg, arch, gpu_bytes=gpu_bytes, kernels=kernels)
        if found is None:
            return {
                "error": f"no micro-batch down to one pair fits {gpu_bytes / GB:.1f} GiB",
                "kernels": kernels,
            }
        tokens, plan = found
    return {
        "micro_batch_tokens": tokens,
        "planned_peak_gib": round(plan.training_peak / GB, 2),
        "planned_for_gib": round(gpu_bytes / GB, 2),
        "kernels": kernels,
        "fitted": not args.no_fit,
    }


# ----- the run ---------------------------------------------------------------------------------------------
def build(args, arch, groups, tokens: int):
    """Policy (DDP + Float16Module + distributed Adam), frozen reference, DPO settings and the packed batches."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    from spin_megatron.models.builder import build_gpt_model, expose_hidden_states
    from spin_megatron.parallel.dpo_step import DPOSettings
    from spin_megatron.parallel.packing import ScoredSequence, pack_items

    fused, swiglu = args.logprob_impl == "fused_head", not args.no_fused_swiglu
    policy = build_gpt_model(
        arch, groups, dtype=torch.bfloat16, calculate_per_token_loss=True, fused_swiglu=swiglu
    )
    reference = (
        build_gpt_model(arch, groups, dtype=torch.bfloat16, fused_swiglu=swiglu).eval().requires_grad_(False)
    )
    if fused:
        expose_hidden_states(policy)
        expose_hidden_states(reference)
    config = policy.config
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    policy = DistributedDataParallel(
        config, ddp_config, Float16Module(config, policy), pg_collection=groups.pgs
    )
    config.finalize_model_grads_func = finalize_model_grads
    optim_config = OptimizerConfig(
        optimizer="adam", lr=1e-6, bf16=True, params_dtype=torch.bfloat16, use_distributed_optimizer=True
    )
    optimizer = get_megatron_optimizer(
        optim_config, [policy], use_gloo_process_groups=False, pg_collection=groups.pgs
    )
    settings = DPOSettings(beta=0.1, vocab_size=arch.vocab_size, fused_head=fused, chunk_tokens=CHUNK_TOKENS)
    gen = torch.Generator().manual_seed(0)

    def seq(n):
        return torch.randint(0, arch.vocab_size, (n,), generator=gen).tolist()

    items = []
    for _ in range(args.pairs):
        prompt = seq(args.prompt)
        items.append([ScoredSequence(prompt, seq(args.response)), ScoredSequence(prompt, seq(args.response))])
    batches = [b.to(groups.device) for b in pack_items(items, token_budget=tokens)]
    n_tokens = sum(s.num_tokens for item in items for s in item)
    return policy, optimizer, reference, settings, batches, n_tokens


def time_steps(args, groups, policy, optimizer, reference, settings, batches) -> tuple[list, list, int]:
    """Seconds per step and of its reference pass (the first step, a warm-up, is left out); skipped updates."""
    from spin_megatron.parallel.dpo_step import compute_reference_logps, train_step

    times, ref_times, skipped = [], [], 0
    for step in range(args.steps + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        compute_reference_logps(reference, groups, batches, settings)
        torch.cuda.synchronize()
        ref_done = time.perf_counter()
        _, _, updated = train_step(policy, optimizer, groups, batches, settings, global_pairs=args.pairs,
                                   global_chosen_tokens=args.pairs * args.response, step=step + 1)  # fmt: skip
        torch.cuda.synchronize()
        skipped += not updated
        if step:  # the first step warms up kernels and allocator
            times.append(time.perf_counter() - start)
            ref_times.append(ref_done - start)
    return times, ref_times, skipped


def what_runs(args, use_te: bool) -> dict:
    """What this run measures with: layer spec, versions, log-prob backend, dtype."""
    from spin_megatron.algorithm.logprob import te_cross_entropy_available, te_version

    te = te_version()
    backend = (
        "fused_head"
        if args.logprob_impl == "fused_head"
        else ("te" if te_cross_entropy_available() else "chunked")
    )
    return {"layer_spec": "te" if use_te else "local", "te_version": ".".join(map(str, te)) if te else None,
            "torch_version": torch.__version__, "logprob_impl": args.logprob_impl, "logprob_backend": backend,
            "dtype": "bf16", "fused_swiglu": not args.no_fused_swiglu,
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}  # fmt: skip


def run(args, result: dict) -> int:
    from spin_megatron.models.arch import arch_from_hf_config
    from spin_megatron.models.builder import default_use_te
    from spin_megatron.parallel import destroy_parallel, init_parallel

    arch, use_te = arch_from_hf_config(QWEN25_15B), default_use_te(torch.bfloat16)
    result.update(what_runs(args, use_te), device=torch.cuda.get_device_name())
    free, total = torch.cuda.mem_get_info()
    result.update(free_gib_at_start=round(free / 2**30, 2), total_gib=round(total / 2**30, 2))
    result.update(plan_micro_batch(args, arch, gpu_bytes=free, use_te=use_te))
    if "error" in result:
        return 1
    groups = init_parallel(1, 1)
    policy, optimizer, reference, settings, batches, tokens = build(
        args, arch, groups, result["micro_batch_tokens"]
    )
    n_params = sum(p.numel() for p in reference.parameters())  # tied: the embedding counts once, as the head
    layers, hidden, seq_len = arch.num_layers, arch.hidden_size, args.prompt + args.response
    attn = 2 * 2 * layers * hidden * seq_len / 2  # forward, per token, causal
    flops_per_token = 2 * n_params + attn + 3 * (2 * n_params + attn)  # reference fwd + policy fwd/bwd
    torch.cuda.reset_peak_memory_stats()
    times, ref_times, skipped = time_steps(args, groups, policy, optimizer, reference, settings, batches)
    if skipped:
        result["error"] = (
            f"{skipped} optimizer step(s) were skipped (NaN/Inf gradients): the timing is not valid"
        )
        return 1
    seconds, ref_seconds = statistics.median(times), statistics.median(ref_times)
    achieved = flops_per_token * tokens / seconds / 1e12
    result.update({
        "params_b": n_params / 1e9, "tokens_per_step": tokens, "micro_batches": len(batches),
        "seconds_per_step": seconds, "reference_seconds": ref_seconds, "policy_seconds": seconds - ref_seconds,
        "tokens_per_s": tokens / seconds, "tflops": achieved, "mfu_percent": 100 * achieved / args.peak_tflops,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    })  # fmt: skip
    destroy_parallel()
    return 0


def summary(result: dict, args) -> str:
    if "mfu_percent" not in result:
        return f"[{args.logprob_impl}] {result.get('error', 'no result')}"
    return (
        f"{result['device']} [{args.logprob_impl}, {result['logprob_backend']}, {result['layer_spec']} spec]: "
        f"{result['params_b']:.2f} B params, {result['tokens_per_step']} tokens/step in {result['micro_batches']} "
        f"micro-batches of ≤ {result['micro_batch_tokens']}, {result['seconds_per_step']:.3f} s/step (reference "
        f"{result['reference_seconds']:.3f} s, policy {result['policy_seconds']:.3f} s), "
        f"{result['tokens_per_s']:,.0f} tokens/s, {result['tflops']:.0f} TFLOP/s, MFU {result['mfu_percent']:.1f} % "
        f"of {args.peak_tflops:.0f}, peak memory {result['peak_memory_gib']:.1f} GiB (planned "
        f"{result['planned_peak_gib']:.1f})"
    )


def plan_only(args) -> dict:
    """``--plan-only``: the planner's micro-batch per log-prob path and layer spec on a GPU with --gpu-gib free."""
    from spin_megatron.models.arch import arch_from_hf_config

    arch, gpu_bytes = arch_from_hf_config(QWEN25_15B), int(args.gpu_gib * 2**30)
    return {
        impl: {
            spec: plan_micro_batch(
                argparse.Namespace(**{**vars(args), "logprob_impl": impl}),
                arch,
                gpu_bytes=gpu_bytes,
                use_te=spec == "te",
            )
            for spec in ("te", "local")
        }
        for impl in ("fused_head", "logits")
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plan_only:
        result = plan_only(args)
        code = 0 if all("error" not in p for impl in result.values() for p in impl.values()) else 1
    elif not torch.cuda.is_available():
        print("bench/mfu_gpu.py needs a CUDA device (--plan-only does not)", file=sys.stderr)
        return 2
    else:
        result = {}
        try:
            code = run(args, result)
        except torch.cuda.OutOfMemoryError as exc:
            result["error"] = "out of memory: " + str(exc).splitlines()[0]
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            code = 3
        print(summary(result, args), file=sys.stdout if code == 0 else sys.stderr)
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)
    return code


if __name__ == "__main__":
    sys.exit(main())
