"""``spin-plan``: will this configuration fit the cluster's GPUs? Per-GPU memory, the verdict, the cheapest fix.

    spin-plan experiment=qwen2.5_3b_gsm8k cluster.gpu_memory_gb=80 parallel.tp=2
    spin-plan --arch qwen2.5-32b experiment=qwen2.5_3b_gsm8k cluster.nodes=4 parallel.tp=8

Takes spin-train's Hydra overrides plus the ``cluster`` section. The model shape comes from ``model.hf_path``'s
config.json, ``model.mcore_ckpt``'s meta or ``model.tiny``; ``--arch NAME`` (or an ``hf_path`` that is not a local
folder but names a known model, e.g. ``Qwen/Qwen2.5-3B-Instruct``) uses a built-in shape instead. The estimate is
``spin_megatron.planning.memory``. Exit code 0 when it fits; 2 with a one-line error (naming the cheapest change that
fits) when it does not, or for any configuration mistake. The trainer runs the same check at start on GPU
(:func:`check_training_memory`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spin_megatron.compose import load_config, model_arch
from spin_megatron.config import Config
from spin_megatron.errors import ConfigError, UserError
from spin_megatron.models.arch import ModelArch, arch_from_hf_config
from spin_megatron.planning.counting import GB, pipeline_bubble
from spin_megatron.planning.fit import check_fits
from spin_megatron.planning.memory import MemoryPlan, estimate
from spin_megatron.planning.scaling import scaling_lines

PROG = "spin-plan"
_TINY_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "num_attention_heads")
_TINY_KEYS += ("num_key_value_heads", "tie_word_embeddings")

_QWEN = dict(rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768)
# Qwen3 (config.json of Qwen/Qwen3-8B, -30B-A3B, -235B-A22B): head_dim 128 whatever the width, untied head
_QWEN3 = dict(
    _QWEN,
    architectures=["Qwen3ForCausalLM"],
    head_dim=128,
    vocab_size=151936,
    tie_word_embeddings=False,
    max_position_embeddings=40960,
)
_QWEN3_MOE = dict(
    architectures=["Qwen3MoeForCausalLM"],
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    router_aux_loss_coef=0.001,
)
BUILTIN_ARCHS = {
    "qwen2.5-0.5b": dict(_QWEN, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                         tie_word_embeddings=True),
    "qwen2.5-3b": dict(_QWEN, hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, intermediate_size=11008, vocab_size=151936,
                       tie_word_embeddings=True),
    "qwen2.5-7b": dict(_QWEN, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                       tie_word_embeddings=False),
    "qwen2.5-32b": dict(_QWEN, hidden_size=5120, num_hidden_layers=64, num_attention_heads=40,
                        num_key_value_heads=8, intermediate_size=27648, vocab_size=152064,
                        tie_word_embeddings=False),
    "llama3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
                        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=12288),
    "qwen3-30b-a3b": dict(_QWEN3, **_QWEN3_MOE, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, intermediate_size=6144, moe_intermediate_size=768),
    "qwen3-235b-a22b": dict(_QWEN3, **_QWEN3_MOE, hidden_size=4096, num_hidden_layers=94, num_attention_heads=64,
                            num_key_value_heads=4, intermediate_size=12288, moe_intermediate_size=1536),
}  # fmt: skip


def builtin_arch(name: str) -> ModelArch:
    if name not in BUILTIN_ARCHS:
        raise ConfigError(
            f"--arch {name!r} is not a built-in shape; choose one of {', '.join(BUILTIN_ARCHS)}"
        )
    family = "Llama" if name.startswith("llama") else "Qwen2"
    return arch_from_hf_config(
        {"architectures": [f"{family}ForCausalLM"], **BUILTIN_ARCHS[name]}, source=name
    )  # (Qwen3 shapes name their own architectures)


def _builtin_named_like(path: str) -> str | None:
    squashed = "".join(c for c in Path(path).name.lower() if c.isalnum())
    matches = [n for n in BUILTIN_ARCHS if "".join(c for c in n if c.isalnum()) in squashed]
    return max(matches, key=len) if matches else None


def resolve_arch(cfg: Config, arch_name: str | None = None) -> tuple[ModelArch, str]:
    """The model shape and where it came from: a built-in shape, or what spin-train would train."""
    if arch_name is not None:
        return builtin_arch(arch_name), f"built-in {arch_name}"
    m = cfg.model
    if m.tiny is not None:
        return model_arch(cfg), "model.tiny"
    if m.mcore_ckpt is not None:
        return model_arch(cfg), m.mcore_ckpt
    named = _builtin_named_like(m.hf_path)
    if not Path(m.hf_path).is_dir() and named is not None:
        return builtin_arch(named), f"built-in {named} (model.hf_path={m.hf_path} is not a local folder)"
    return model_arch(cfg), m.hf_path


def training_world_size(cfg: Config) -> int:
    c = cfg.cluster
    return c.nodes * c.gpus_per_node - (c.rollout_gpus if c.placement == "disaggregated" else 0)


# ------------------------------------------------------------------------------------------------ printing
def _pipeline_note(plan: MemoryPlan) -> str:
    """The pipeline's bubble, and what interleaving buys (a smaller bubble) and costs (stage 0's activations)."""
    note = f"; pipeline bubble {plan.bubble:.0%} of the step"
    if plan.vpp > 1:
        return note + f" with VPP {plan.vpp} (1F1B: {pipeline_bubble(plan.pp, 1, plan.num_microbatches):.0%})"
    if plan.arch.num_layers % (2 * plan.pp):
        return note
    return note + f" (parallel.vpp=2: {pipeline_bubble(plan.pp, 2, plan.num_microbatches):.0%})"


def _activation_features(cfg: Config) -> str:
    par = cfg.parallel
    recompute = par.recompute_granularity or "no"
    if recompute == "selective":
        recompute += f" ({', '.join(par.selective_modules)})"
    return f"{recompute} recompute" + (", sequence parallel" if par.sequence_parallel_enabled else "")


def format_plan(plan: MemoryPlan, cfg: Config, source: str) -> str:
    """The human-readable table: one line per component, GB per GPU, a note; then weight sync and the verdict."""
    a, s, c, sg = plan.arch, plan.stage, cfg.cluster, cfg.rollout.sglang
    e = "bf16" if cfg.model.dtype == "bf16" else "fp32"
    par = cfg.parallel
    shards = (
        f"÷ DP {plan.dp}" + (f" × CP {plan.cp}" if plan.cp > 1 else "") + " (distributed optimizer)"
        if cfg.optim.use_distributed_optimizer
        else "not sharded"
    )
    if a.moe is not None and cfg.optim.use_distributed_optimizer:
        shards += f", experts ÷ expert-DP {plan.tp * plan.dp // (par.ep * (par.etp or par.tp))}"
    experts = ""
    if a.moe is not None:
        m = a.moe
        experts = (
            f"; {m.num_experts // par.ep} of {m.num_experts} experts (EP {par.ep}, ETP {par.etp or par.tp})"
        )
    where = f"stage {s.stage + 1} of {plan.pp}"
    unit = f"{plan.layers_in_flight_unit} layers" + (
        f" (a model chunk, VPP {plan.vpp})" if plan.vpp > 1 else ""
    )
    acts = f"{plan.in_flight} micro-batch(es) × {unit} × {plan.micro_batch_tokens} tokens"
    if plan.cp > 1:  # context parallel: this GPU's chunks of every sequence, and the other ranks' keys/values
        acts += f" ÷ CP {plan.cp} (+ the gathered keys/values)"
    paths = {k: f"{v / GB:.2f}" for k, v in plan.logprob_paths.items()}
    logprob = (
        f"chunked: logits + grad [T, V/TP] + fp32 chunk (naive {paths['naive']}, fused head {paths['fused']})"
    )
    rows = [
        (
            "actor parameters",
            s.params,
            f"{s.num_params / 1e9:.3g} B params on this GPU ({where}), {e}{experts}",
        ),
        ("actor gradients", s.grads, "fp32 grad buffer (grad_reduce_in_fp32)"),
        (
            "optimizer: fp32 main params",
            s.optimizer_main,
            shards if s.optimizer_main else "none: fp32 params",
        ),
        ("optimizer: Adam moments", s.optimizer_moments, f"exp_avg + exp_avg_sq, fp32, {shards}"),
        ("reference model", s.reference, f"frozen copy, {e}"),
        ("activations", s.activations, f"{acts}, {_activation_features(cfg)}"),
        ("log-prob buffers", s.logprob, logprob if s.logprob else "none on this stage"),
        ("transients", max(s.transient, s.step_temp), "output-layer grads, backward working set"),
    ]
    if s.rollout_resident:
        rows.append(
            ("rollout engine (resident)", s.rollout_resident, "hf engine, or SGLang without memory saver")
        )
    if s.reward_model:
        rm = cfg.reward_model
        rows.append(
            (
                "reward model",
                s.reward_model,
                f"{rm.dtype} weights + {rm.micro_batch_size} × {rm.max_length} tokens",
            )
        )
    rows.append(("= training peak", plan.training_peak, ""))
    if plan.engine == "sglang":
        seqs = plan.kv_tokens // max(1, plan.kv_min_tokens // cfg.rollout.n)
        kv = f"→ {plan.kv_tokens:,} tokens ({seqs} full sequences)"
        if plan.sglang_kv <= 0:
            kv = "≤ 0: SGLang would not start"
        pool = f"{sg.mem_fraction_static:.2f} × {plan.gpu_bytes / GB:.0f} GB"
        colocated = plan.placement == "colocated"
        rows += [
            ("SGLang weights", plan.sglang_weights, f"÷ tp_size {sg.tp_size}"),
            ("SGLang KV cache", max(0, plan.sglang_kv), f"{pool} − {'trainer − ' * colocated}weights {kv}"),
            ("SGLang working memory", plan.sglang_runtime, "CUDA graphs, decode activations (assumed)"),
            ("= generation peak", plan.generation_peak, "pool + Adam moments + working memory" * colocated),
        ]
        if plan.sync_peak:
            rows.append(("= weight-sync peak", plan.sync_peak, "trainer + SGLang weights + sync buffers"))
    headroom = f"{plan.gpu_bytes / GB:.0f} GB × (1 − {c.memory_headroom:.2f} headroom)"
    rows.append(("available", plan.usable_bytes, headroom))
    width = max(len(r[0]) for r in rows)
    lines = [
        f"{PROG}: {a.architecture} h={a.hidden_size} L={a.num_layers} heads={a.num_attention_heads}/"
        f"{a.num_kv_heads} V={a.vocab_size}"
        + (f" experts={a.moe.num_experts} top-{a.moe.top_k}" if a.moe is not None else "")
        + f" ({source})",
        f"cluster: {c.nodes} node(s) × {c.gpus_per_node} GPUs × {c.gpu_memory_gb:g} GB, {c.placement}, "
        f"rollout engine {cfg.rollout.engine}",
        f"layout: TP {plan.tp} × PP {plan.pp}"
        + (f" × CP {plan.cp}" if plan.cp > 1 else "")
        + f" × DP {plan.dp} = {plan.world_size} training GPUs"
        + (f" (experts: EP {par.ep} × ETP {par.etp or par.tp})" if a.moe is not None else "")
        + (_pipeline_note(plan) if plan.pp > 1 else "")
        + f"; {e}; "
        f"{plan.num_microbatches} micro-batches of ≤ {plan.micro_batch_tokens} tokens per DP rank per step",
        "",
        f"{'component'.ljust(width)}  {'GB/GPU':>8}  note",
    ]
    lines += [f"{name.ljust(width)}  {value / GB:8.2f}  {note}".rstrip() for name, value, note in rows]
    if plan.sync_engines:
        lines.append(
            f"weight sync: {plan.sync_bytes_per_engine / GB:.2f} GB per engine × {plan.sync_engines} engine(s) "
            + (
                f"every {plan.sync_every} step(s)"
                if plan.sync_every
                else "once (the opponent is never refreshed)"
            )
            + f" = {plan.sync_bytes_per_step / GB:.1f} GB/step, "
            f"{plan.sync_buckets} buckets of {cfg.rollout.sync_bucket_mb} MB per engine"
        )
    if plan.dispatch_bytes_per_step:
        lines.append(
            f"MoE token dispatch ({par.moe_token_dispatcher}): {plan.dispatch_bytes_per_step / GB:.1f} GB sent per "
            "GPU per optimizer step (policy forward + backward, reference forward)"
        )
    lines += scaling_lines(plan, cfg)
    lines += [f"note: {n}" for n in plan.notes]
    phase = max(plan.phases(), key=plan.phases().get)
    share = f"{100 * plan.peak / plan.usable_bytes:.0f}% of available"
    lines.append(
        f"verdict: {'fits' if plan.fits else 'DOES NOT FIT'} — peak {plan.peak / GB:.1f} GB ({phase}), {share}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, as for spin-train (cluster.* included)"
    )
    parser.add_argument(
        "--arch", choices=sorted(BUILTIN_ARCHS), help="a built-in model shape (no checkpoint needed)"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        try:
            cfg = load_config(args.overrides)
        except ConfigError as exc:
            if args.arch is None or "no model given" not in str(exc):
                raise
            cfg = load_config([*args.overrides, f"model.hf_path={args.arch}"])
        arch, source = resolve_arch(cfg, args.arch)
        plan = estimate(cfg, arch, world_size=training_world_size(cfg))
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(format_plan(plan, cfg, source), flush=True)
    try:
        check_fits(plan, cfg)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
