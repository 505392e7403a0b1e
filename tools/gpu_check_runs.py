"""tools/gpu_check.py's phases that run the project's commands: spin-train (with a resume) and the MFU bench,
each in a session of its own (gpu_check_phases.run_nested)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

from gpu_check_phases import REPO, PhaseResult, run_nested, time_left, what_ran

# ----- train --------------------------------------------------------------------------------------------------
TRAIN_NEEDS = ("hydra", "omegaconf", "datasets", "pyarrow", "transformers")


def phase_train(result: PhaseResult, out: Path, opts) -> str:
    import torch

    missing = [m for m in TRAIN_NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        result.put(detail=f"missing modules {missing}: carry them (tools/gpu_check_prepare.py --extra ...)")
        return "fail"
    from spin_megatron.compose import load_config
    from spin_megatron.models.builder import default_use_te, parse_dtype

    run = Path(tempfile.mkdtemp()) / "run"
    common = ["experiment=tiny_cpu", f"trainer.output_dir={run}", "trainer.test_freq=0", "trainer.save_freq=2",
              "logging.progress_bar=false", "trainer.export_hf=false"]  # fmt: skip
    if not opts.dry_run:
        common += ["model.dtype=bf16", "trainer.device=cuda"]
    if opts.no_fused_swiglu:
        common.append("model.fused_swiglu=false")
    cfg = load_config(common)
    spec = "te" if torch.cuda.is_available() and default_use_te(parse_dtype(cfg.model.dtype)) else "local"
    result.put(**what_ran(dtype=cfg.model.dtype, layer_spec=spec, logprob_backend=cfg.trainer.logprob_impl,
                          micro_batch_tokens=cfg.trainer.micro_batch_tokens))  # fmt: skip
    for steps, limit in ((2, 110), (3, 80)):  # the second run resumes from the step-2 checkpoint
        command = [sys.executable, "-m", "spin_megatron.train", *common, f"trainer.total_steps={steps}"]
        code, text = run_nested(command, opts, limit)
        if code != 0:
            result.put(detail=f"spin-train total_steps={steps} exited {code}")
            return "fail"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    shutil.copy(run / "metrics.jsonl", out / "metrics.jsonl")
    steps = [m["step"] for m in metrics]
    bound = 1e-3 if opts.dry_run else 0.1
    ok = steps[-3:] == [1, 2, 3] and all(m["rollout/logp_diff"] < bound for m in metrics[-3:])
    result.put(steps=steps, loss=metrics[-1]["loss"], logp_diff=[m["rollout/logp_diff"] for m in metrics],
               resumed="resumed from" in text)  # fmt: skip
    return "pass" if ok and result["resumed"] else "fail"


# ----- mfu ----------------------------------------------------------------------------------------------------
MFU_IMPLS = ("fused_head", "logits")  # the trainer's default first
PLAN_GPUS = {"h100_80gb": 79.1, "h200": 139.0}  # free GiB after the CUDA context


def _bench(*args: str, opts) -> list[str]:
    flags = ["--no-fused-swiglu"] if opts.no_fused_swiglu else []
    return [sys.executable, str(REPO / "bench" / "mfu_gpu.py"), *args, *flags]


def _planned(result: PhaseResult, opts) -> str:
    """No CUDA: the micro-batch the bench's planner would choose on an H100 and an H200, per path and spec."""
    planned = {}
    for gpu, gib in PLAN_GPUS.items():
        code, text = run_nested(_bench("--plan-only", "--gpu-gib", str(gib), opts=opts), opts, 60)
        planned[gpu] = json.loads(text.strip().splitlines()[-1]) if code == 0 else {"error": text[-300:]}
        result.put(planned=planned)
    result.put(fused_swiglu=not opts.no_fused_swiglu, detail="no CUDA: the planned micro-batch only")
    return "skipped" if all("error" not in plans for plans in planned.values()) else "fail"


def phase_mfu(result: PhaseResult, out: Path, opts) -> str:
    if opts.dry_run:
        return _planned(result, opts)
    runs = {}
    for impl in MFU_IMPLS:
        if time_left(opts) < 30:
            runs[impl] = {"error": "skipped: no time left in the phase"}
            continue
        path = Path(tempfile.mkdtemp()) / f"mfu_{impl}.json"
        code, text = run_nested(
            _bench("--steps", "3", "--logprob-impl", impl, "--json", str(path), opts=opts), opts, 150
        )
        runs[impl] = (
            json.loads(path.read_text()) if path.is_file() else {"error": f"exit {code}: {text[-500:]}"}
        )
        (out / "mfu.json").write_text(json.dumps(runs, indent=2))  # after each run: a later failure keeps it
        keep = (
            "mfu_percent",
            "seconds_per_step",
            "micro_batch_tokens",
            "planned_peak_gib",
            "peak_memory_gib",
            "layer_spec",
            "logprob_backend",
            "te_version",
            "torch_version",
            "dtype",
            "fused_swiglu",
            "error",
        )
        result.put(**{impl: {k: runs[impl][k] for k in keep if k in runs[impl]}})
    return "pass" if all("mfu_percent" in r for r in runs.values()) else "fail"
