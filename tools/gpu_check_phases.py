"""The phases of tools/gpu_check.py and what they share. Each phase runs in a process of its own
(``gpu_check.py --run-phase NAME``), reports its numbers as it goes (:class:`PhaseResult`), and records an
out-of-memory error or a nested command's timeout instead of dying with it. The TE and MoE phases are in
gpu_check_te.py, train and mfu in gpu_check_runs.py."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from gpu_check import CHILD_PREFIX, REPO, RESULT_PREFIX, kill_group

# tests only: <phase>:<oom|timeout|hang>[:<n>],... fails a phase after its n-th result (PhaseResult._fault)
FAULT_ENV = "GPU_CHECK_FAULT"
# max|Δ| / max|reference| of a log-prob path against the naive fp32 log_softmax: values, then every gradient
VALUE_BOUND, GRAD_BOUND = 2e-3, 2e-2
# max|Δ| / max|transformers| of the logits (and packed log-probs) by layer spec and dtype; TE runs fp32 GEMMs in
# TF32 whatever allow_tf32 says: its unit roundoff (2**-11) times a small factor
PARITY_BOUNDS = {
    ("local", "fp32"): 1e-4,
    ("te", "fp32"): 6 * 2.0**-11,
    ("local", "bf16"): 3e-2,
    ("te", "bf16"): 3e-2,
}


class PhaseResult(dict):
    """A phase's numbers, printed as one result line after every ``put``: the orchestrator keeps the last line,
    so a phase killed at its timeout, or dying of an out-of-memory error, still leaves what it had measured."""

    def __init__(self, phase: str):
        super().__init__()
        self.phase, self.puts = phase, 0

    def put(self, **values) -> None:
        self.update(values)
        print(RESULT_PREFIX + json.dumps(self, default=str), flush=True)
        self.puts += 1
        self._fault()

    def _fault(self) -> None:
        """``GPU_CHECK_FAULT=<phase>:<kind>[:<n>],...`` (tests): after the phase's n-th result (default 1) raise an
        out-of-memory error (oom) or a nested command's timeout (timeout), or hang (hang) with a child in the
        phase's process group and a nested command in a session of its own, their pids recorded."""
        for entry in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
            name, kind, *count = entry.split(":")
            if name == self.phase and self.puts == int(count[0] if count else 1):
                self._raise(kind)

    def _raise(self, kind: str) -> None:
        import torch

        if kind == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated by GPU_CHECK_FAULT)")
        if kind == "timeout":
            raise subprocess.TimeoutExpired("simulated nested command", 1.0)
        if kind != "hang":
            raise ValueError(f"{FAULT_ENV}: kind must be oom, timeout or hang, got {kind!r}")
        child = subprocess.Popen(["sleep", "600"])
        nested = start_nested(["sleep", "600"], subprocess.DEVNULL)
        self.put(hung_pids=[child.pid, nested.pid])
        time.sleep(3600)


def run_phase(name: str, target: str, out: Path, opts) -> int:
    """Run the phase ``target`` (module:function) in this process; its status decides the exit code."""
    import torch

    result = PhaseResult(name)
    if not opts.dry_run and not torch.cuda.is_available():
        result.put(status="fail", detail="CUDA is not available (use --dry-run for the CPU plumbing check)")
        return 1
    module, function = target.split(":")
    phase = getattr(importlib.import_module(module), function)
    try:
        status = phase(result, out, opts)
    except torch.cuda.OutOfMemoryError as exc:
        result.put(status="fail", failure="out_of_memory", detail=str(exc).splitlines()[0][:300])
        return 1
    except subprocess.TimeoutExpired as exc:
        command = exc.cmd if isinstance(exc.cmd, str) else " ".join(map(str, exc.cmd))
        result.put(
            status="fail", failure="timeout", detail=f"{command[-200:]} timed out after {exc.timeout:.0f} s"
        )
        return 1
    result.put(status=status)
    return 1 if status == "fail" else 0


# ----- shared helpers ---------------------------------------------------------------------------------------
def time_left(opts) -> float:
    return opts.deadline - time.time() if opts.deadline else float("inf")


def start_nested(command: list[str], log) -> subprocess.Popen:
    """Start ``command`` in a session of its own and tell the orchestrator its group (killed with the phase)."""
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    print(CHILD_PREFIX + str(proc.pid), flush=True)
    return proc


def run_nested(command: list[str], opts, limit_s: float) -> tuple[int, str]:
    """Run ``command`` for at most ``limit_s``, and not past the phase's deadline less 5 s (so that the phase
    records the timeout itself); on timeout its whole process group is killed and TimeoutExpired raised."""
    timeout = max(1.0, min(limit_s, time_left(opts) - 5))
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
        proc = start_nested(command, log)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            proc.wait()
            code = None
        log.seek(0)
        text = log.read()
    print(f"$ {' '.join(command)}  (exit {code})\n{text[-4000:]}", flush=True)
    if code is None:
        raise subprocess.TimeoutExpired(command, timeout)
    return code, text


def device(opts):
    import torch

    return torch.device("cpu") if opts.dry_run else torch.device("cuda", 0)


def rel_err(value, reference) -> float:
    """max|value − reference| / max|reference|: a bound that means the same at every scale."""
    reference = reference.float()
    return ((value.float() - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


def te_full_version() -> str | None:
    from importlib import metadata

    for name in ("transformer-engine", "transformer_engine", "transformer-engine-torch"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def what_ran(*, dtype: str, **settings) -> dict:
    """The versions and settings a phase's numbers were measured with (layer_spec, logprob_backend, ...)."""
    import torch

    return {"torch_version": torch.__version__, "te_version": te_full_version(), "dtype": dtype, **settings}


def timed(fn, dev):
    """(value, seconds, peak GiB) of ``fn()``; the peak on CUDA only."""
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    value = fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None
    return value, round(time.perf_counter() - start, 4), peak


# ----- env ----------------------------------------------------------------------------------------------------
MODULES = ("megatron.core", "transformers", "triton", "hydra", "omegaconf", "datasets", "pyarrow", "pandas",
           "safetensors", "transformer_engine", "apex", "sglang", "wandb", "psutil")  # fmt: skip


def _module_origins() -> dict:
    """Version of each module and whether it came with the image or was carried (a PYTHONPATH entry)."""
    carried = [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO
    ]
    modules = {}
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # recorded: which optional pieces the image lacks
            modules[name] = f"missing ({type(exc).__name__})"
            continue
        where = str(getattr(module, "__file__", "") or "")
        origin = "carried" if any(where.startswith(str(Path(p).resolve())) for p in carried) else "image"
        modules[name] = f"{getattr(module, '__version__', 'present')} ({origin})"
    return modules


def phase_env(result: PhaseResult, out: Path, opts) -> str:
    import platform

    import torch

    from spin_megatron.algorithm.logprob import te_cross_entropy_available
    from spin_megatron.models.builder import default_use_te

    modules = _module_origins()
    lines = [f"python {platform.python_version()}", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
    lines += [f"{name}: {state}" for name, state in modules.items()]
    if shutil.which("nvidia-smi"):
        lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
    spec = "te" if default_use_te(torch.bfloat16) else "local"
    result.put(**what_ran(dtype="bf16", layer_spec=spec), modules=modules,
               te_cross_entropy=te_cross_entropy_available(),
               alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))  # fmt: skip
    dev = device(opts)
    size, dtype = (512, torch.float32) if opts.dry_run else (8192, torch.bfloat16)
    a, b = (torch.randn(size, size, device=dev, dtype=dtype) for _ in range(2))
    a @ b  # warm-up
    iterations = 3 if opts.dry_run else 20
    _, seconds, _ = timed(lambda: [a @ b for _ in range(iterations)], dev)
    tflops = 2 * size**3 * iterations / seconds / 1e12
    name = "cpu" if opts.dry_run else torch.cuda.get_device_name(0)
    memory = {}
    if not opts.dry_run:
        free, total = torch.cuda.mem_get_info()
        memory = {"free_gib": round(free / 2**30, 2), "total_gib": round(total / 2**30, 2)}
    lines.insert(0, f"device {name}; {dtype} matmul {size}³: {tflops:.1f} TFLOP/s; {memory}")
    (out / "env.txt").write_text("\n".join(lines) + "\n")
    result.put(device=name, matmul_tflops=round(tflops, 2), **memory)
    return "pass"


# ----- parity -------------------------------------------------------------------------------------------------
def tiny_model(out_dir: Path, architecture: str = "qwen2", **overrides) -> Path:
    from spin_megatron.models.tiny import make_tiny_hf_model

    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024)  # fmt: skip
    return make_tiny_hf_model(out_dir, architecture, seed=1, **{**shape, **overrides})


def spec_parity(result: PhaseResult, hf_dir: Path, opts, *, use_te: bool, dtypes, prefix: str = "") -> bool:
    """The Megatron model (TE or local spec) vs transformers: logits in each dtype, and packed (THD) fused-head
    log-probs in the first dtype vs transformers' unpacked log_softmax; each relative to the reference's largest
    entry, within :data:`PARITY_BOUNDS`. Every number is reported as it comes."""
    import torch
    from transformers import AutoModelForCausalLM

    from spin_megatron.models import build_gpt_model, load_arch
    from spin_megatron.models.builder import expose_hidden_states
    from spin_megatron.models.hf_io import HFReader
    from spin_megatron.models.mapping import mapping_for
    from spin_megatron.models.weights import load_hf_weights
    from spin_megatron.parallel import init_parallel
    from spin_megatron.parallel.dpo_step import DPOSettings
    from spin_megatron.parallel.forward import forward_batch, head_weight, token_logprobs
    from spin_megatron.parallel.packing import IGNORE_INDEX, ScoredSequence, pack_items
    from spin_megatron.parallel.schedule import forward_logits

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    groups, dev, spec = init_parallel(1, 1), device(opts), "te" if use_te else "local"
    arch = load_arch(hf_dir)
    mapping, reader = mapping_for(arch, arch.padded_vocab_size(1)), HFReader(hf_dir)
    ids = torch.randint(0, arch.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(dev).eval()
        reference = hf(ids.to(dev)).logits.float()

    def build(dtype):
        model = build_gpt_model(arch, groups, dtype=dtype, use_te=use_te, perform_initialization=False,
                                fused_swiglu=not opts.no_fused_swiglu)  # fmt: skip
        load_hf_weights(model, reader, mapping, groups)
        return model

    ok = True
    for dtype in dtypes:
        name = str(dtype)[6:].replace("float32", "fp32").replace("bfloat16", "bf16")
        error = rel_err(forward_logits(build(dtype), groups, ids, arch.vocab_size), reference)
        result.put(**{f"{prefix}logits_rel_err_{name}": error})
        ok &= error <= PARITY_BOUNDS[(spec, name)]
    model = build(dtypes[0])
    expose_hidden_states(model)
    seqs = [ScoredSequence(ids[0, :40].tolist(), ids[0, 40:70].tolist()),
            ScoredSequence(ids[1, :20].tolist(), ids[1, 20:90].tolist())]  # fmt: skip
    (batch,) = pack_items([seqs], token_budget=256)
    batch = batch.to(groups.device)
    settings = DPOSettings(beta=0.1, vocab_size=arch.vocab_size, fused_head=True)
    with torch.no_grad():
        packed = token_logprobs(
            forward_batch(batch, model, keep_dtype=True), batch, groups, settings, weight=head_weight(model)
        )
        expected = []
        for s in seqs:
            full = torch.tensor([s.prompt_ids + s.response_ids], device=dev)
            logp = torch.log_softmax(hf(full).logits[0].float(), -1)
            positions = torch.arange(len(s.prompt_ids) - 1, len(full[0]) - 1, device=dev)
            expected.append(logp[positions, full[0, positions + 1]])
    got = packed.reshape(-1)[batch.targets.reshape(-1) != IGNORE_INDEX]  # response tokens, in packing order
    error = rel_err(got, torch.cat(expected))
    result.put(**{f"{prefix}packed_fused_head_rel_err": error})
    return ok and error <= PARITY_BOUNDS[(spec, "fp32" if dtypes[0] == torch.float32 else "bf16")]


def phase_parity(result: PhaseResult, out: Path, opts) -> str:
    import torch

    result.put(**what_ran(dtype="fp32, bf16", layer_spec="local", logprob_backend="fused_head (packed)"))
    hf_dir = tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    ok = spec_parity(result, hf_dir, opts, use_te=False, dtypes=(torch.float32, torch.bfloat16))
    return "pass" if ok else "fail"


# ----- log-probs ----------------------------------------------------------------------------------------------
def compare_to_reference(run, reference) -> tuple[float, float]:
    """Relative errors (values, the worst gradient) of a log-prob run ``(values, grads...)`` vs the reference."""
    value_err = rel_err(run[0], reference[0])
    grad_err = max(rel_err(g, ref) for g, ref in zip(run[1:], reference[1:]))
    return value_err, grad_err


def _logprob_paths(hidden, weight, target, upstream):
    import torch

    from spin_megatron.algorithm.logprob import fused_head_logprobs, vocab_parallel_logprobs

    def backward(logps):
        (logps * upstream).sum().backward()  # a different gradient for every row
        return logps.detach()

    return {
        "naive": lambda: backward(
            torch.log_softmax((hidden @ weight.t()).float(), -1).gather(-1, target[:, None])[:, 0]
        ),
        "chunked": lambda: backward(vocab_parallel_logprobs(hidden @ weight.t(), target, backend="chunked")),
        "fused_head": lambda: backward(fused_head_logprobs(hidden, weight, target)),
    }


def _logprob_size(result: PhaseResult, tokens: int, vocab: int, hidden_size: int, dtype, dev) -> bool:
    import torch

    gen = torch.Generator(device="cpu").manual_seed(tokens)
    hidden = (torch.randn(tokens, hidden_size, generator=gen) * 0.5).to(dev, dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.02).to(dev, dtype).requires_grad_()
    target = torch.randint(0, vocab, (tokens,), generator=gen).to(dev)
    upstream = torch.randn(tokens, generator=gen).to(dev)
    runs, ok = {}, True
    for name, fn in _logprob_paths(hidden, weight, target, upstream).items():
        hidden.grad = weight.grad = None
        try:
            value, seconds, peak = timed(fn, dev)
        except torch.cuda.OutOfMemoryError:
            result.put(**{f"T{tokens}_{name}": "out of memory"})
            torch.cuda.empty_cache()
            continue
        runs[name] = (value, hidden.grad.float().clone(), weight.grad.float().clone())
        entry = {"seconds": seconds, "peak_gib": peak}
        base = runs.get("naive") or runs.get("chunked")
        if base is not runs[name]:
            entry["value_rel_err"], entry["grad_rel_err"] = compare_to_reference(runs[name], base)
            ok &= entry["value_rel_err"] <= VALUE_BOUND and entry["grad_rel_err"] <= GRAD_BOUND
        result.put(**{f"T{tokens}_{name}": entry})
    return ok and len(runs) > 1


def phase_logprob(result: PhaseResult, out: Path, opts) -> str:
    import torch

    vocab, hidden_size = (4096, 64) if opts.dry_run else (151936, 1536)
    sizes = (256,) if opts.dry_run else (4096, 16384)
    dtype = torch.float32 if opts.dry_run else torch.bfloat16
    result.put(
        **what_ran(
            dtype="fp32" if opts.dry_run else "bf16", logprob_backend="naive vs chunked vs fused_head"
        ),
        bounds={"value": VALUE_BOUND, "grad": GRAD_BOUND, "of": "max|Δ| / max|naive|"},
    )
    ok = True
    for tokens in sizes:
        ok &= _logprob_size(result, tokens, vocab, hidden_size, dtype, device(opts))
    return "pass" if ok else "fail"
