"""The whole GPU proof in one command: each phase in a process session of its own with its own timeout, results
written as they come, under a total budget (default 420 s: the lent machine gives 15 minutes in all, start
included, so a second, shorter call must fit after the first).

    python3 tools/gpu_check.py --out DIR [--phases parity,mfu] [--budget-s 420] [--no-fused-swiglu] [--dry-run]

Phases, in this order (the most valuable numbers first):
- env      versions, nvidia-smi, which modules the image has and which were carried, a bf16 matmul's TFLOP/s
- parity   transformers vs the Megatron local spec: fp32 (TF32 off) and bf16 logits; packed (THD) fused-head
           log-probs vs transformers' unpacked log_softmax
- logprob  naive vs chunked vs fused-head log-probs at T = 4096 and 16384, vocab 151,936: values and gradients
           (relative to the largest reference entry), time, peak memory
- te_xent  TE's parallel_cross_entropy on 3-D logits vs the chunked path, per-row gradients under a non-uniform
           upstream gradient; the fused head vs TE's cross-entropy (values, both gradients, time, memory)
- te_spec  the TE layer spec at TP1 vs the local spec and transformers (fp32 from TE 2.11, bf16), packed log-probs
- moe      a tiny Qwen3-MoE's parity (local spec; TE grouped GEMM when TE is there) (tools/gpu_check_te.py)
- train    spin-train in bf16 with the hf engine on CUDA for 2 steps, then a resume to step 3
- mfu      bench/mfu_gpu.py on the Qwen2.5-1.5B shape, fused head then logits path, the micro-batch sized from
           the free memory by the planner; mfu.json is rewritten after each run

A phase that runs out of memory, or whose nested command times out, records that and what it had measured; a
phase past its timeout is killed with its whole process group (and the groups of the commands it started), and
its last reported numbers are kept. Each phase records what it ran with (layer spec, TE/torch versions, log-prob
backend, dtype, micro-batch). ``--phases`` reruns a subset and keeps the other results.

Output (at most 8 files in DIR): results.json, env.txt, mfu.json, metrics.jsonl (of the train phase),
console.log (every phase's output). ``--dry-run`` runs the same plumbing on CPU with small sizes (the test suite
does, so this cannot rot). SGLang servers are not covered (their wheels exceed the carry limit); TE phases run
only where the image has TransformerEngine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# name: (timeout in s, module:function of the phase); the run order
PHASES = {
    "env": (45, "gpu_check_phases:phase_env"),
    "parity": (120, "gpu_check_phases:phase_parity"),
    "logprob": (90, "gpu_check_phases:phase_logprob"),
    "te_xent": (60, "gpu_check_te:phase_te_xent"),
    "te_spec": (90, "gpu_check_te:phase_te_spec"),
    "moe": (90, "gpu_check_te:phase_moe"),
    "train": (180, "gpu_check_runs:phase_train"),
    "mfu": (240, "gpu_check_runs:phase_mfu"),
}
DEFAULT_BUDGET_S = 420.0
MIN_PHASE_S = 10  # a phase given less is skipped
RESULT_PREFIX = "GPU_CHECK_RESULT "
# a phase's nested command runs in a session of its own; its process group is killed with the phase
CHILD_PREFIX = "GPU_CHECK_CHILD_PGID "


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the (at most 8) result files")
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="total time; phases that no longer fit are skipped",
    )
    parser.add_argument(
        "--no-fused-swiglu",
        action="store_true",
        help="plain SwiGLU everywhere (no torch.compile): for a rerun",
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU plumbing check with small sizes")
    parser.add_argument("--run-phase", help=argparse.SUPPRESS)  # internal: run one phase in this process
    parser.add_argument(
        "--deadline", type=float, help=argparse.SUPPRESS
    )  # internal: the phase's time.time() end
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.run_phase:
        from gpu_check_phases import run_phase

        return run_phase(args.run_phase, PHASES[args.run_phase][1], out, args)
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
    results["run"] = {"phases": phases, "budget_s": args.budget_s, "dry_run": args.dry_run,
                      "fused_swiglu": not args.no_fused_swiglu, "python": sys.version.split()[0],
                      "started": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    deadline = time.monotonic() + args.budget_s
    for phase in phases:
        timeout = min(PHASES[phase][0], deadline - time.monotonic())
        if timeout < MIN_PHASE_S:
            results[phase] = {"status": "skipped", "detail": "no time left in --budget-s"}
        else:
            results[phase] = run_in_session(phase, out, timeout, args)
        results_path.write_text(json.dumps(results, indent=2))  # after each phase: a kill loses nothing done
        status = results[phase]["status"] + (
            f" ({results[phase]['failure']})" if "failure" in results[phase] else ""
        )
        print(f"gpu_check: {phase}: {status} ({results[phase].get('seconds', 0):.0f} s)", flush=True)
    again = [
        p for p in phases if results[p]["status"] == "fail" or "no time left" in results[p].get("detail", "")
    ]
    if again:  # the second, shorter call
        print(f"gpu_check: rerun what is missing: --out {out} --phases {','.join(again)}", flush=True)
    return 1 if any(results[p]["status"] == "fail" for p in phases) else 0


def phase_command(phase: str, out: Path, timeout: float, args) -> list[str]:
    flags = (["--dry-run"] if args.dry_run else []) + (["--no-fused-swiglu"] if args.no_fused_swiglu else [])
    return [sys.executable, __file__, "--out", str(out), "--run-phase", phase,
            "--deadline", f"{time.time() + timeout:.1f}", *flags]  # fmt: skip


def subprocess_env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PYTHONUNBUFFERED"] = "1"
    if "PYTORCH_ALLOC_CONF" not in env:  # less fragmentation between the MFU bench's passes
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return env


def run_in_session(phase: str, out: Path, timeout: float, args) -> dict:
    """Run one phase in a session of its own; past ``timeout`` kill its process group (and its nested commands'
    groups), so nothing it started keeps the GPU into the next phase. Returns its last reported result."""
    start = time.monotonic()
    # the phase's temporary folders (tiny models, the train phase's run and checkpoints: ~0.4 GB) live under a
    # TMPDIR of its own, removed once its process group is gone, also after a kill
    scratch = tempfile.TemporaryDirectory(prefix=f"gpu_check_{phase}_", ignore_cleanup_errors=True)
    with scratch, tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
        proc = subprocess.Popen(phase_command(phase, out, timeout, args), stdout=log, stderr=subprocess.STDOUT,
                                cwd=REPO, env={**subprocess_env(), "TMPDIR": scratch.name},
                                start_new_session=True)  # fmt: skip
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        kill_group(proc.pid)  # also after a normal exit: whatever the phase left running
        proc.wait()
        log.seek(0)
        text = log.read()
        for line in text.splitlines():
            if line.startswith(CHILD_PREFIX):
                kill_group(int(line[len(CHILD_PREFIX) :]))
    seconds = time.monotonic() - start
    with open(out / "console.log", "a") as console:
        console.write(f"\n===== {phase} (exit {code}, {seconds:.1f} s) =====\n{text}")
    reported = [line[len(RESULT_PREFIX) :] for line in text.splitlines() if line.startswith(RESULT_PREFIX)]
    result = json.loads(reported[-1]) if reported else {}
    if code is None:
        result.update(
            status="fail", failure="timeout", detail=f"killed with its process group after {timeout:.0f} s"
        )
    elif code != 0:
        result["status"] = "fail"
    result.setdefault("status", "pass")
    result.update(seconds=round(seconds, 1), fused_swiglu=not args.no_fused_swiglu)
    if result["status"] == "fail":
        result["error_tail"] = "\n".join(text.splitlines()[-25:])
    return result


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # gone already (or the id is no longer ours)
        pass


if __name__ == "__main__":
    sys.exit(main())
