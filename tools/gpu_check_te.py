"""tools/gpu_check.py's TransformerEngine phases (run only where the image has TE) and the MoE hook.

te_xent: TE's ``parallel_cross_entropy`` — whose triton wrapper (TE 2.7–2.20) unpacks ``B, SQ, V = _input.shape``,
so it is given 3-D logits as the trainer's logits path gives it — against the chunked path, values and per-row
gradients under a non-uniform upstream gradient (the defect behind the TE 2.8 floor multiplies every row by row 0's
gradient); then the fused head against TE's cross-entropy on the same hidden states and head weight.
te_spec: the TE layer spec at TP 1 against transformers and the local spec (the trainer's default spec on GPU).
moe: the hook for Qwen3-MoE (issue 23).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from gpu_check_phases import PhaseResult, device, rel_err, spec_parity, timed, tiny_model, what_ran

TE_VALUE_BOUND = 1e-4  # TE vs chunked on the same logits: both fp32 inside
TE_GRAD_BOUND = 1e-2  # both round the fp32 gradient to the logits' dtype: a bf16 ulp or two
# the worst row's max|Δ| / max|row| of the gradient: a row scaled by another row's upstream is off by O(1)
ROW_BOUND = 5e-2


def _te_cross_entropy_usable() -> tuple[bool, str]:
    from spin_megatron.algorithm.logprob import te_cross_entropy_usable, te_version

    try:
        from transformer_engine.pytorch.cross_entropy import parallel_cross_entropy  # noqa: F401
    except ImportError as exc:
        return False, f"TransformerEngine's cross-entropy does not import ({exc})"
    if not te_cross_entropy_usable(te_version()):
        return False, f"TransformerEngine {te_version()} is older than the log-prob path's floor (2.8)"
    return True, ""


def row_rel_err(grad, reference) -> float:
    """The worst row's max|Δ| / max|reference row| over rows that have a gradient ([..., V] → rows)."""
    grad, reference = (
        grad.float().reshape(-1, grad.shape[-1]),
        reference.float().reshape(-1, reference.shape[-1]),
    )
    scale = reference.abs().amax(dim=-1)
    rows = scale > 0
    return ((grad - reference).abs().amax(dim=-1)[rows] / scale[rows]).max().item() if rows.any() else 0.0


def _xent_inputs(opts):
    """3-D logits [B, S, V/TP] with padded columns, targets with ignored positions, a non-uniform upstream."""
    import torch

    batch, seq, vocab, padded = (2, 64, 1000, 1024) if opts.dry_run else (2, 1024, 151936, 152064)
    dtype = torch.float32 if opts.dry_run else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(batch, seq, padded, generator=gen) * 2).to(device(opts), dtype)
    target = torch.randint(0, vocab, (batch, seq), generator=gen)
    target[:, : seq // 8] = -100  # prompt positions
    upstream = torch.randn(batch, seq, generator=gen) * torch.linspace(0.1, 3, seq)  # every row its own
    return logits, target.to(logits.device), upstream.to(logits.device), vocab


def _te_vs_chunked(result: PhaseResult, opts) -> bool:
    import torch

    from spin_megatron.algorithm.logprob import vocab_parallel_logprobs

    logits, target, upstream, vocab = _xent_inputs(opts)
    kept = logits.clone()
    runs = {}
    for backend in ("te", "chunked"):
        x = logits.clone().requires_grad_()
        logp = vocab_parallel_logprobs(x, target, vocab_size=vocab, backend=backend)
        (logp * upstream).sum().backward()
        runs[backend] = (logp.detach(), x.grad, torch.equal(x.detach(), kept))
    errors = {"value_rel_err": rel_err(runs["te"][0], runs["chunked"][0]),
              "grad_rel_err": rel_err(runs["te"][1], runs["chunked"][1]),
              "grad_row_rel_err": row_rel_err(runs["te"][1], runs["chunked"][1]),
              "input_kept": runs["te"][2], "logits_shape": list(logits.shape)}  # fmt: skip
    result.put(te_vs_chunked=errors)
    return (errors["value_rel_err"] <= TE_VALUE_BOUND and errors["grad_rel_err"] <= TE_GRAD_BOUND
            and errors["grad_row_rel_err"] <= ROW_BOUND and errors["input_kept"])  # fmt: skip


def _fused_vs_te(result: PhaseResult, opts) -> bool:
    """The fused head against TE's cross-entropy on ``hidden @ weightᵀ`` (3-D), both gradients, time, memory."""
    import torch

    from spin_megatron.algorithm.logprob import fused_head_logprobs, vocab_parallel_logprobs

    dev = device(opts)
    batch, seq, hidden_size, vocab, padded = (
        (2, 64, 64, 1000, 1024) if opts.dry_run else (2, 2048, 1536, 151936, 152064)
    )
    dtype = torch.float32 if opts.dry_run else torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    hidden = (torch.randn(batch, seq, hidden_size, generator=gen) * 0.5).to(dev, dtype).requires_grad_()
    weight = (torch.randn(padded, hidden_size, generator=gen) * 0.02).to(dev, dtype).requires_grad_()
    target = torch.randint(0, vocab, (batch, seq), generator=gen).to(dev)
    upstream = torch.randn(batch, seq, generator=gen).to(dev)

    def run(fn):
        hidden.grad = weight.grad = None
        logp, seconds, peak = timed(lambda: _backward(fn(), upstream), dev)
        return (logp, hidden.grad.clone(), weight.grad.clone()), {"seconds": seconds, "peak_gib": peak}

    te, te_cost = run(
        lambda: vocab_parallel_logprobs(hidden @ weight.t(), target, vocab_size=vocab, backend="te")
    )
    fused, fused_cost = run(lambda: fused_head_logprobs(hidden, weight, target, vocab_size=vocab))
    errors = {
        "value_rel_err": rel_err(fused[0], te[0]),
        "grad_hidden_rel_err": rel_err(fused[1], te[1]),
        "grad_weight_rel_err": rel_err(fused[2], te[2]),
        "te": te_cost,
        "fused_head": fused_cost,
    }
    result.put(fused_head_vs_te=errors)
    return (
        errors["value_rel_err"] <= 2e-3
        and max(errors["grad_hidden_rel_err"], errors["grad_weight_rel_err"]) <= 2e-2
    )


def _backward(logp, upstream):
    (logp * upstream).sum().backward()
    return logp.detach()


def phase_te_xent(result: PhaseResult, out: Path, opts) -> str:
    usable, why = _te_cross_entropy_usable()
    if not usable:
        result.put(detail=why)
        return "skipped"
    result.put(
        **what_ran(
            dtype="fp32" if opts.dry_run else "bf16", logprob_backend="te vs chunked; fused_head vs te"
        ),
        bounds={"value": TE_VALUE_BOUND, "grad": TE_GRAD_BOUND, "row": ROW_BOUND},
    )
    ok = _te_vs_chunked(result, opts)
    ok &= _fused_vs_te(result, opts)
    return "pass" if ok else "fail"


def phase_te_spec(result: PhaseResult, out: Path, opts) -> str:
    import torch

    from spin_megatron.algorithm.logprob import te_version
    from spin_megatron.models.builder import te_available, te_spec_usable

    if not te_available():
        result.put(detail="TransformerEngine does not import here (or no CUDA)")
        return "skipped"
    dtypes = [d for d in (torch.float32, torch.bfloat16) if te_spec_usable(d, te_version())]
    names = ", ".join(str(d)[6:] for d in dtypes)
    result.put(**what_ran(dtype=names, layer_spec="te", logprob_backend="fused_head (packed)"))
    hf_dir = tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    return "pass" if spec_parity(result, hf_dir, opts, use_te=True, dtypes=dtypes) else "fail"


# ===== HOOK (issue 23): Qwen3-MoE ===============================================================================
# Runs as soon as models/mapping.py maps MOE_ARCHITECTURE and models/tiny.py builds MOE_TINY_KIND: the same parity
# as `parity` / `te_spec` on a tiny Qwen3-MoE, for the local spec and (TE present) the TE spec, whose experts are
# TE's grouped GEMM. To extend it, add checks below the marked line, each reporting with result.put(...):
#   - one DPO step (parallel.dpo_step.train_step) of the tiny MoE: finite loss, the router's aux loss apart;
#   - the MFU of an MoE shape (bench/mfu_gpu.py would take its config from a --model flag).
MOE_ARCHITECTURE = "Qwen3MoeForCausalLM"
MOE_TINY_KIND = "qwen3_moe"
MOE_TINY = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, head_dim=64)


def phase_moe(result: PhaseResult, out: Path, opts) -> str:
    import torch

    from spin_megatron.models.builder import te_available
    from spin_megatron.models.mapping import MAPPINGS

    if MOE_ARCHITECTURE not in MAPPINGS:
        result.put(detail=f"waits for issue 23: no {MOE_ARCHITECTURE} mapping in models/mapping.py yet")
        return "skipped"
    try:
        hf_dir = tiny_model(Path(tempfile.mkdtemp()) / "tiny_moe", MOE_TINY_KIND, **MOE_TINY)
    except ValueError as exc:  # models/tiny.py does not build it yet: say so, do not guess
        result.put(detail=f"waits for issue 23: {exc}")
        return "skipped"
    from spin_megatron.algorithm.logprob import te_version
    from spin_megatron.models.builder import te_spec_usable

    both = (torch.float32, torch.bfloat16)
    specs = {"local": both}
    if te_available():  # the TE spec's experts: TE's grouped GEMM
        specs["te"] = tuple(d for d in both if te_spec_usable(d, te_version()))
    result.put(**what_ran(dtype="fp32, bf16", layer_specs=list(specs), logprob_backend="fused_head (packed)"))
    ok = True
    for spec, dtypes in specs.items():
        ok &= spec_parity(result, hf_dir, opts, use_te=spec == "te", dtypes=dtypes, prefix=f"{spec}_")
    # ----- add further MoE checks here (see the comment above) -----
    return "pass" if ok else "fail"
