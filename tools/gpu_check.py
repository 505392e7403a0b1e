"""The whole GPU proof in one command: each phase in its own subprocess with its own timeout, results written as
each phase finishes, under a total budget (default 450 s).

    python tools/gpu_check.py --out DIR [--phases env,parity,...] [--budget-s 450] [--dry-run]

Phases:
- env      versions, nvidia-smi, importable modules, a bf16 matmul's throughput
- parity   transformers vs the Megatron local spec on CUDA: fp32 (TF32 off) and bf16 logits; packed (THD)
           fused-head log-probs vs transformers' unpacked log_softmax
- logprob  naive vs chunked vs fused-head log-probs at T = 4096 and 16384, vocab 151,936: values, gradients,
           time, peak memory
- te_xent  TE's parallel_cross_entropy vs the chunked path, when TE can be imported (else skipped)
- train    spin-train in bf16 with the hf engine on CUDA for 2 steps, then a resume to step 3
- mfu      bench/mfu_gpu.py on the Qwen2.5-1.5B shape, fused-head and logits paths

Output (at most 8 files in DIR): results.json (pass/fail/skipped, seconds, numbers, error tails, per phase),
env.txt, mfu.json, metrics.jsonl (of the train phase), console.log (every phase's output).
``--dry-run`` runs the same plumbing on CPU with small sizes (what the test suite does, so this cannot rot).
TE layers and SGLang servers are NOT covered: neither fits the GPU machine's 64 MiB carry limit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = {"env": 60, "parity": 120, "logprob": 120, "te_xent": 60, "train": 240, "mfu": 240}  # timeouts, s
RESULT_PREFIX = "GPU_CHECK_RESULT "


# ----- the orchestrator -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the (at most 8) result files")
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}"
    )
    parser.add_argument(
        "--budget-s", type=float, default=450.0, help="total time; phases that no longer fit are skipped"
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU plumbing check with small sizes")
    parser.add_argument("--run-phase", help=argparse.SUPPRESS)  # internal: run one phase in this process
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.run_phase:
        return run_phase(args.run_phase, out, args.dry_run)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        print(
            f"gpu_check: error: unknown phase(s) {unknown}; choose from {', '.join(PHASES)}", file=sys.stderr
        )
        return 2
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}  # a rerun keeps the rest
    deadline = time.monotonic() + args.budget_s
    for phase in phases:
        remaining = deadline - time.monotonic()
        timeout = min(PHASES[phase], remaining)
        if timeout < 10:
            results[phase] = {"status": "skipped", "detail": "no time left in --budget-s"}
        else:
            results[phase] = _run_in_subprocess(phase, out, timeout, args.dry_run)
        results_path.write_text(json.dumps(results, indent=2))  # after each phase: a kill loses nothing done
        print(
            f"gpu_check: {phase}: {results[phase]['status']} ({results[phase].get('seconds', 0):.0f} s)",
            flush=True,
        )
    failed = [p for p in phases if results[p]["status"] == "fail"]
    return 1 if failed else 0


def _run_in_subprocess(phase: str, out: Path, timeout: float, dry_run: bool) -> dict:
    command = [sys.executable, __file__, "--out", str(out), "--run-phase", phase] + (
        ["--dry-run"] if dry_run else []
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
        code, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        code, text = (
            None,
            (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace"),
        )
    seconds = time.monotonic() - start
    with open(out / "console.log", "a") as log:
        log.write(f"\n===== {phase} (exit {code}, {seconds:.1f} s) =====\n{text}")
    reported = [line[len(RESULT_PREFIX) :] for line in text.splitlines() if line.startswith(RESULT_PREFIX)]
    result = json.loads(reported[-1]) if reported else {}
    if code is None:
        result.update(status="fail", detail=f"timed out after {timeout:.0f} s")
    elif code != 0:
        result.update(status="fail")
    result.setdefault("status", "pass")
    result["seconds"] = round(seconds, 1)
    if result["status"] == "fail":
        result["error_tail"] = "\n".join(text.splitlines()[-25:])
    return result


# ----- phases (each runs in its own process) --------------------------------------------------------------
def run_phase(name: str, out: Path, dry_run: bool) -> int:
    import torch

    if not dry_run and not torch.cuda.is_available():
        _report(
            {"status": "fail", "detail": "CUDA is not available (use --dry-run for the CPU plumbing check)"}
        )
        return 1
    result = {"env": phase_env, "parity": phase_parity, "logprob": phase_logprob, "te_xent": phase_te_xent,
              "train": phase_train, "mfu": phase_mfu}[name](out, dry_run)  # fmt: skip
    _report(result)
    return 1 if result.get("status") == "fail" else 0


def _report(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def _device(dry_run: bool):
    import torch

    return torch.device("cpu") if dry_run else torch.device("cuda", 0)


def _timed(fn, device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return value, time.perf_counter() - start, peak


def phase_env(out: Path, dry_run: bool) -> dict:
    import importlib
    import platform

    import torch

    lines = [f"python {platform.python_version()}", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
    modules = {}
    for module in ("megatron.core", "transformers", "triton", "hydra", "omegaconf", "datasets", "safetensors",
                   "transformer_engine", "apex", "sglang", "wandb", "psutil"):  # fmt: skip
        try:
            imported = importlib.import_module(module)
            modules[module] = getattr(imported, "__version__", "present")
        except Exception as exc:  # reported: which optional pieces the image lacks
            modules[module] = f"missing ({type(exc).__name__})"
        lines.append(f"{module}: {modules[module]}")
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
        lines.append(smi)
    device = _device(dry_run)
    size, dtype = (512, torch.float32) if dry_run else (8192, torch.bfloat16)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    iterations = 3 if dry_run else 20
    _, seconds, _ = _timed(lambda: [a @ b for _ in range(iterations)], device)
    tflops = 2 * size**3 * iterations / seconds / 1e12
    name = "cpu" if dry_run else torch.cuda.get_device_name(0)
    lines.insert(0, f"device {name}; {dtype} matmul {size}³: {tflops:.1f} TFLOP/s")
    (out / "env.txt").write_text("\n".join(lines) + "\n")
    return {"device": name, "matmul_tflops": round(tflops, 2), "modules": modules}


def _tiny_model(out_dir: Path, vocab: int):
    from spin_megatron.models.tiny import make_tiny_hf_model

    return make_tiny_hf_model(
        out_dir, "qwen2", seed=1, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=1024,
    )  # fmt: skip


def phase_parity(out: Path, dry_run: bool) -> dict:
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from spin_megatron.models import build_gpt_model, load_arch
    from spin_megatron.models.builder import expose_hidden_states
    from spin_megatron.models.hf_io import HFReader
    from spin_megatron.models.mapping import mapping_for
    from spin_megatron.models.weights import load_hf_weights
    from spin_megatron.parallel import init_parallel
    from spin_megatron.parallel.dpo_step import DPOSettings, _forward, _head_weight, _token_logps
    from spin_megatron.parallel.packing import IGNORE_INDEX, ScoredSequence, pack_items
    from spin_megatron.parallel.schedule import forward_logits

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    groups = init_parallel(1, 1)
    hf_dir = _tiny_model(Path(tempfile.mkdtemp()) / "tiny", vocab=1024)
    arch = load_arch(hf_dir)
    mapping, reader = mapping_for(arch, arch.padded_vocab_size(1)), HFReader(hf_dir)
    device = _device(dry_run)
    ids = torch.randint(0, arch.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
        reference = hf(ids.to(device)).logits.float()
    result, ok = {}, True
    for dtype, bound in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        model = build_gpt_model(arch, groups, dtype=dtype, use_te=False, perform_initialization=False)
        load_hf_weights(model, reader, mapping, groups)
        logits = forward_logits(model, groups, ids, arch.vocab_size).float()
        error = ((logits - reference).abs().max() / reference.abs().max()).item()
        result[f"logits_rel_err_{str(dtype)[6:]}"] = error
        ok &= error <= bound
    # packed (THD) micro-batch through the trainer's forward and the fused head vs unpacked transformers
    model = build_gpt_model(arch, groups, dtype=torch.float32, use_te=False, perform_initialization=False)
    load_hf_weights(model, reader, mapping, groups)
    expose_hidden_states(model)
    seqs = [ScoredSequence(ids[0, :40].tolist(), ids[0, 40:70].tolist()),
            ScoredSequence(ids[1, :20].tolist(), ids[1, 20:90].tolist())]  # fmt: skip
    (batch,) = pack_items([seqs], token_budget=256)
    batch = batch.to(groups.device)
    settings = DPOSettings(beta=0.1, vocab_size=arch.vocab_size, fused_head=True)
    with torch.no_grad():
        packed = _token_logps(_forward(batch, model), batch, groups, settings, weight=_head_weight(model))
        expected = []
        for s in seqs:
            full = torch.tensor([s.prompt_ids + s.response_ids], device=device)
            logp = torch.log_softmax(hf(full).logits[0].float(), -1)
            positions = torch.arange(len(s.prompt_ids) - 1, len(full[0]) - 1, device=device)
            expected.append(logp[positions, full[0, positions + 1]])
    got = packed.reshape(-1)[batch.targets.reshape(-1) != IGNORE_INDEX]  # response tokens, in packing order
    gap = (got - torch.cat(expected)).abs().max().item()
    result["packed_fused_head_max_abs_diff"] = gap
    ok &= gap <= 1e-3
    return {"status": "pass" if ok else "fail", **result}


def phase_logprob(out: Path, dry_run: bool) -> dict:
    import torch

    from spin_megatron.logprob import fused_head_logprobs, vocab_parallel_logprobs

    device = _device(dry_run)
    vocab, hidden_size = (4096, 64) if dry_run else (151936, 1536)
    sizes = (256,) if dry_run else (4096, 16384)
    dtype = torch.float32 if dry_run else torch.bfloat16
    gen = torch.Generator(device="cpu").manual_seed(0)
    result, ok = {}, True
    for tokens in sizes:
        hidden = (torch.randn(tokens, hidden_size, generator=gen) * 0.5).to(device, dtype).requires_grad_()
        weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.02).to(device, dtype).requires_grad_()
        target = torch.randint(0, vocab, (tokens,), generator=gen).to(device)

        def naive(hidden=hidden, weight=weight, target=target):
            logps = torch.log_softmax((hidden @ weight.t()).float(), -1).gather(-1, target[:, None])[:, 0]
            logps.sum().backward()
            return logps.detach()

        def chunked(hidden=hidden, weight=weight, target=target):
            logits = hidden @ weight.t()
            logps = vocab_parallel_logprobs(logits, target, backend="chunked")
            logps.sum().backward()
            return logps.detach()

        def fused(hidden=hidden, weight=weight, target=target):
            logps = fused_head_logprobs(hidden, weight, target)
            logps.sum().backward()
            return logps.detach()

        runs = {}
        for name, fn in (("naive", naive), ("chunked", chunked), ("fused_head", fused)):
            hidden.grad = weight.grad = None
            try:
                value, seconds, peak = _timed(fn, device)
            except torch.cuda.OutOfMemoryError:
                result[f"T{tokens}_{name}"] = "out of memory"
                continue
            runs[name] = (value, hidden.grad.float().clone(), weight.grad.float().clone())
            result[f"T{tokens}_{name}"] = {"seconds": round(seconds, 4), "peak_gib": peak}
        base = runs.get("naive") or runs.get("chunked")
        for name, (value, grad_h, grad_w) in runs.items():
            dv = (value - base[0]).abs().max().item()
            dg = max((grad_h - base[1]).abs().max().item(), (grad_w - base[2]).abs().max().item())
            result[f"T{tokens}_{name}"].update(max_abs_diff=dv, max_grad_diff=dg)
            ok &= dv <= 2e-2 and dg <= 2e-2
    return {"status": "pass" if ok else "fail", **result}


def phase_te_xent(out: Path, dry_run: bool) -> dict:
    import torch

    from spin_megatron.logprob import te_cross_entropy_available, te_version, vocab_parallel_logprobs

    if dry_run or not te_cross_entropy_available():
        return {"status": "skipped", "detail": f"TransformerEngine not usable here (version {te_version()})"}
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2048, 151936, generator=gen).to("cuda", torch.bfloat16)
    target = torch.randint(0, 151936, (2048,), generator=gen).cuda()
    te = vocab_parallel_logprobs(logits, target, backend="te")
    chunked = vocab_parallel_logprobs(logits, target, backend="chunked")
    gap = (te - chunked).abs().max().item()
    return {"status": "pass" if gap <= 1e-2 else "fail", "max_abs_diff": gap, "te_version": te_version()}


def phase_train(out: Path, dry_run: bool) -> dict:
    import tempfile

    run = Path(tempfile.mkdtemp()) / "run"
    common = ["experiment=tiny_cpu", f"trainer.output_dir={run}", "trainer.test_freq=0", "trainer.save_freq=2",
              "logging.progress_bar=false", "trainer.export_hf=false"]  # fmt: skip
    if not dry_run:
        common += ["model.dtype=bf16", "trainer.device=cuda"]
    for steps in (2, 3):  # the second run resumes from the step-2 checkpoint
        done = subprocess.run([sys.executable, "-m", "spin_megatron.train", *common, f"trainer.total_steps={steps}"],
                              capture_output=True, text=True, cwd=REPO, timeout=200)  # fmt: skip
        print(done.stdout[-3000:], done.stderr[-3000:])
        if done.returncode != 0:
            return {"status": "fail", "detail": f"spin-train total_steps={steps} exited {done.returncode}"}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    shutil.copy(run / "metrics.jsonl", out / "metrics.jsonl")
    steps = [m["step"] for m in metrics]
    last = metrics[-1]
    ok = steps[-3:] == [1, 2, 3] and all(
        m["rollout/logp_diff"] < (0.1 if not dry_run else 1e-3) for m in metrics[-3:]
    )
    return {"status": "pass" if ok else "fail", "steps": steps, "loss": last["loss"],
            "logp_diff": [m["rollout/logp_diff"] for m in metrics], "resumed": "resumed from" in done.stdout}  # fmt: skip


def phase_mfu(out: Path, dry_run: bool) -> dict:
    if dry_run:
        return {"status": "skipped", "detail": "needs CUDA"}
    results = {}
    for impl in ("fused_head", "logits"):
        path = out / f"mfu_{impl}.tmp.json"
        done = subprocess.run([sys.executable, str(REPO / "bench" / "mfu_gpu.py"), "--steps", "3",
                               "--logprob-impl", impl, "--json", str(path)],
                              capture_output=True, text=True, cwd=REPO, timeout=110)  # fmt: skip
        print(done.stdout[-2000:], done.stderr[-2000:])
        results[impl] = json.loads(path.read_text()) if path.is_file() else {"error": done.stderr[-500:]}
        path.unlink(missing_ok=True)
    (out / "mfu.json").write_text(json.dumps(results, indent=2))
    ok = all("mfu_percent" in r for r in results.values())
    return {"status": "pass" if ok else "fail",
            **{f"mfu_{k}": round(v.get("mfu_percent", 0), 1) for k, v in results.items()}}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
