"""tools/gpu_check.py on CPU: the dry run of every phase; what survives a phase that runs out of memory, whose
nested command times out, or that hangs (killed with its whole process group); the TE phase's 3-D input and its
per-row gradient check (against a stand-in with TE's interface); the relative tolerances; the device command and
the make targets (nothing from an index, nothing into the image's environment); the payload bound; the MFU
bench's micro-batch from the planner; the start-of-run memory check without TE."""

import argparse
import json
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import REPO

SCRIPT = REPO / "tools" / "gpu_check.py"
sys.path.insert(0, str(REPO / "tools"))


def _run(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env={**os.environ, **(env or {})})  # fmt: skip


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


# ----- the dry run ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dry_run_of_every_phase_on_cpu(tmp_path):
    done = _run("--out", tmp_path, "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    results = _results(tmp_path)
    statuses = {k: v["status"] for k, v in results.items() if k != "run"}
    assert statuses.pop("moe") in ("skipped", "pass")  # skipped until issue 23's Qwen3-MoE mapping lands
    assert statuses == {"env": "pass", "parity": "pass", "logprob": "pass", "te_xent": "skipped",
                        "te_spec": "skipped", "train": "pass", "mfu": "skipped"}  # fmt: skip
    assert results["parity"]["packed_fused_head_rel_err"] < 1e-5 and results["train"]["resumed"]
    # what ran is recorded, also in the dry run
    assert results["parity"]["layer_spec"] == "local" and results["run"]["fused_swiglu"] is True
    train = results["train"]
    assert (train["layer_spec"], train["logprob_backend"], train["dtype"]) == ("local", "fused_head", "fp32")
    assert train["micro_batch_tokens"] == 1024 and train["torch_version"] == torch.__version__
    assert "te_version" in train and "te_cross_entropy" in results["env"]
    planned = results["mfu"]["planned"]  # the bench's micro-batch from the planner: halved on an H100
    assert planned["h100_80gb"]["fused_head"]["te"]["micro_batch_tokens"] == 8192
    assert planned["h200"]["fused_head"]["te"]["micro_batch_tokens"] == 16384
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "console.log",
        "env.txt",
        "metrics.jsonl",
        "results.json",
    ]
    # a rerun of one phase keeps the others' results; an unknown phase is a one-line error
    assert _run("--out", tmp_path, "--dry-run", "--phases", "logprob").returncode == 0
    assert _results(tmp_path)["train"]["status"] == "pass"
    bad = _run("--out", tmp_path, "--phases", "nope")
    assert bad.returncode == 2 and "unknown phase(s) ['nope']" in bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_failing_phase_is_reported_with_its_error_tail(tmp_path):
    done = _run("--out", tmp_path, "--phases", "env")  # no --dry-run on a CPU machine: the phase must fail
    results = _results(tmp_path)
    assert done.returncode == 1 and results["env"]["status"] == "fail"
    assert "CUDA is not available" in results["env"]["detail"]


# ----- failures keep what was measured -------------------------------------------------------------------
def test_out_of_memory_and_a_nested_timeout_are_recorded_and_keep_what_was_measured(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"parity": {"status": "pass", "kept": 1}}))
    faults = "logprob:oom:2,te_xent:timeout:1"  # logprob: after its first measured path; te_xent: at once
    done = _run(
        "--out", tmp_path, "--dry-run", "--phases", "logprob,te_xent", env={"GPU_CHECK_FAULT": faults}
    )
    assert done.returncode == 1, done.stdout + done.stderr
    results = _results(tmp_path)
    logprob, te_xent = results["logprob"], results["te_xent"]
    assert (logprob["status"], logprob["failure"]) == ("fail", "out_of_memory")
    assert "T256_naive" in logprob and "T256_chunked" not in logprob and "simulated" in logprob["detail"]
    assert (te_xent["status"], te_xent["failure"]) == ("fail", "timeout")  # the next phase still ran
    assert "timed out" in te_xent["detail"] and results["parity"] == {"status": "pass", "kept": 1}
    assert "logprob: fail (out_of_memory)" in done.stdout and "--phases logprob,te_xent" in done.stdout


def _dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie holds no GPU memory; its parent (init) reaps it


def test_a_hung_phase_is_killed_with_its_process_group_and_its_nested_commands(tmp_path):
    """The phase hangs with a child in its own process group and a nested command in a session of its own:
    both die at the phase's timeout, and what the phase reported before is kept."""
    done = _run("--out", tmp_path, "--dry-run", "--phases", "te_xent", "--budget-s", "12",
                env={"GPU_CHECK_FAULT": "te_xent:hang:1"}, timeout=120)  # fmt: skip
    result = _results(tmp_path)["te_xent"]
    assert done.returncode == 1 and (result["status"], result["failure"]) == ("fail", "timeout")
    assert "does not import" in result["detail"] or "killed" in result["detail"]
    assert len(result["hung_pids"]) == 2 and all(_dead(pid) for pid in result["hung_pids"])
    assert result["seconds"] < 30


# ----- the TE phase, against a stand-in with TE's interface ----------------------------------------------
class _FakeTECrossEntropy(torch.autograd.Function):
    """TE 2.11's parallel_cross_entropy semantics in torch: fp32 inside, the gradient written into the input in
    forward, multiplied by the upstream gradient in backward — by row 0's for every row when ``defect``."""

    @staticmethod
    def forward(ctx, inp, target, ignore_idx, defect):
        z = inp.float()
        lse = z.logsumexp(-1)
        valid = target != ignore_idx
        picked = z.gather(-1, target.clamp_min(0)[..., None])[..., 0]
        grad = torch.softmax(z, -1)
        grad.scatter_add_(-1, target.clamp_min(0)[..., None], -torch.ones_like(picked)[..., None])
        inp.copy_(grad * valid[..., None])  # TE < 2.19 overwrites its input
        ctx.save_for_backward(inp)
        ctx.defect = defect
        return torch.where(valid, lse - picked, torch.zeros_like(lse))

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        scale = grad_output.reshape(-1)[0].expand_as(grad_output) if ctx.defect else grad_output
        return grad * scale[..., None].to(grad.dtype), None, None, None


@pytest.fixture
def fake_te(monkeypatch):
    """transformer_engine.pytorch.cross_entropy with TE's signature; its wrapper unpacks ``B, SQ, V``."""
    from spin_megatron.algorithm import logprob

    seen = {"shapes": [], "defect": False}

    def parallel_cross_entropy(inp, target, label_smoothing=0.0, reduce_loss=False, dist_process_group=None,
                               ignore_idx=-100, is_cg_capturable=False):  # fmt: skip
        B, SQ, V = inp.shape  # noqa: N806 (TE's own unpacking: a 2-D input raises here, as in TE 2.7-2.20)
        seen["shapes"].append((B, SQ, V))
        return _FakeTECrossEntropy.apply(inp, target, ignore_idx, seen["defect"])

    module = types.ModuleType("transformer_engine.pytorch.cross_entropy")
    module.parallel_cross_entropy = parallel_cross_entropy
    for name, value in (("transformer_engine", types.ModuleType("transformer_engine")),
                        ("transformer_engine.pytorch", types.ModuleType("transformer_engine.pytorch")),
                        ("transformer_engine.pytorch.cross_entropy", module)):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, value)
    monkeypatch.setattr(logprob, "te_version", lambda: (2, 11))
    return seen


@pytest.mark.parametrize("defect", [False, True])
def test_te_phase_passes_3d_logits_and_checks_per_row_gradients(fake_te, defect, tmp_path, capsys):
    import gpu_check_phases
    import gpu_check_te

    fake_te["defect"] = defect  # the pre-2.8 backward: every row scaled by row 0's upstream gradient
    result = gpu_check_phases.PhaseResult("te_xent")
    opts = argparse.Namespace(dry_run=True, no_fused_swiglu=False, deadline=None)
    status = gpu_check_te.phase_te_xent(result, tmp_path, opts)
    assert fake_te["shapes"] and all(len(shape) == 3 for shape in fake_te["shapes"])
    assert result["te_vs_chunked"]["logits_shape"] == [2, 64, 1024] and result["te_vs_chunked"]["input_kept"]
    if defect:
        assert status == "fail" and result["te_vs_chunked"]["grad_row_rel_err"] > gpu_check_te.ROW_BOUND
    else:
        assert status == "pass", result
        assert result["te_vs_chunked"]["grad_row_rel_err"] < 1e-5
        assert result["fused_head_vs_te"]["grad_weight_rel_err"] < 1e-5


# ----- tolerances -----------------------------------------------------------------------------------------
def test_log_prob_gradients_are_compared_relative_to_the_largest_reference_entry():
    from gpu_check_phases import GRAD_BOUND, compare_to_reference

    gen = torch.Generator().manual_seed(0)
    reference = (torch.randn(64, generator=gen) - 12, torch.randn(64, 32, generator=gen) * 1000)
    rounded = (reference[0], reference[1] * (1 + 2**-8))  # one bf16 ulp everywhere: |Δ| up to ~10 ≫ 2e-2
    assert compare_to_reference(rounded, reference)[1] <= GRAD_BOUND
    wrong_row = reference[1].clone()
    wrong_row[3] *= 1.5
    assert compare_to_reference((reference[0], wrong_row), reference)[1] > GRAD_BOUND
    small = (reference[0], reference[1] * 1e-6)  # tiny gradients: an absolute bound would pass anything
    assert compare_to_reference((reference[0], small[1] * 2), small)[1] > GRAD_BOUND


# ----- the device command and the make targets ----------------------------------------------------------
def _wheel(folder: Path, name: str, version: str, module: str) -> None:
    """A minimal pure-Python wheel (pip installs it offline)."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist_info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{dist_info}/RECORD"])
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


def test_the_device_command_installs_only_missing_carried_wheels_into_a_folder_of_its_own(tmp_path):
    import gpu_check_prepare

    command = gpu_check_prepare.device_command()
    assert "python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/spin-site" in command
    assert "PYTHONPATH=/tmp/spin-site:$PWD" in command and "python3 tools/gpu_check.py --out $OUT" in command
    words = command.replace(";", " ").split()
    # no bare pip or python (another environment's): pip only as the image's `python3 -m pip`
    assert "python" not in words and all(
        words[i - 2 : i] == ["python3", "-m"] for i, w in enumerate(words) if w == "pip"
    )
    assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0
    # run the install part: a wheel this Python lacks is installed into the folder, one it has is left to it
    work = tmp_path / "repo"
    (work / ".whl").mkdir(parents=True)
    (work / "tools").mkdir()
    (work / "tools" / "gpu_check_prepare.py").write_text(
        (REPO / "tools" / "gpu_check_prepare.py").read_text()
    )
    _wheel(work / ".whl", "spin_carried_probe", "1.0", "spin_carried_probe")
    _wheel(work / ".whl", "psutil", "0.0.1", "psutil")  # present here: must not shadow this Python's
    site = tmp_path / "site"
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # python3 = the test's Python
    done = subprocess.run(["bash", "-c", gpu_check_prepare.install_command(str(site))], cwd=work,
                          capture_output=True, text=True, env={**os.environ, "PATH": path})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (site / "spin_carried_probe" / "__init__.py").is_file() and not (site / "psutil").exists()


def test_not_in_image_keeps_the_images_packages_except_pinned_ones(tmp_path, monkeypatch):
    import gpu_check_prepare

    for name in ("psutil-0.0.1-py3-none-any.whl", "megatron_core-0.16.1-py3-none-any.whl",
                 "Hydra_Core-1.3.2-py3-none-any.whl", "not_installed_here-1.0-py3-none-any.whl"):  # fmt: skip
        (tmp_path / name).touch()
    wanted = {p.name.split("-")[0] for p in gpu_check_prepare.not_in_image(tmp_path)}
    assert wanted == {"not_installed_here"}  # this Python has the others (megatron-core at the pinned 0.16.1)
    monkeypatch.setitem(gpu_check_prepare.PINNED, "megatron-core", "0.17.0")  # an image with another version
    wanted = {p.name.split("-")[0] for p in gpu_check_prepare.not_in_image(tmp_path)}
    assert wanted == {"megatron_core", "not_installed_here"}


def test_gpu_make_targets_install_nothing_from_an_index():
    targets = ["gpu-check", "gpu-smoke", "bench-gpu"]
    done = subprocess.run(["make", "-n", "-B", *targets], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    installs = [line for line in lines if "pip install" in line]
    assert installs and all("--no-index" in line and "--target" in line for line in installs), installs
    assert not any(word in line for line in lines for word in ("-m venv", "pip install -q -e", "/pip ")), (
        lines
    )
    assert sum("tools/gpu_check.py" in line for line in lines) == 1


def test_prepare_writes_the_data_folder_and_refuses_a_payload_over_20_mb(qwen_tokenizer_dir, gsm8k_dir, tmp_path,
                                                                          monkeypatch, capsys):  # fmt: skip
    import gpu_check_prepare

    monkeypatch.setattr(gpu_check_prepare, "DATA", tmp_path / "data")
    monkeypatch.setattr(gpu_check_prepare, "WHEELS", tmp_path / "whl")
    args = ["--skip-wheels", "--shared-data", str(qwen_tokenizer_dir.parent), "--rows", "5"]
    assert gpu_check_prepare.main(args) == 0
    assert len((tmp_path / "data" / "gsm8k" / "train.jsonl").read_text().splitlines()) == 5
    assert (tmp_path / "data" / "qwen2.5-tokenizer" / "vocab.json").is_file()
    assert gpu_check_prepare.size_of(tmp_path / "data") < gpu_check_prepare.PAYLOAD_LIMIT == 20 << 20
    (tmp_path / "whl").mkdir()
    with open(tmp_path / "whl" / "big-1.0-py3-none-any.whl", "wb") as big:
        big.truncate(20 << 20)  # sparse: counts its full size
    assert gpu_check_prepare.main(args) == 1
    assert "over --max-payload-mb 20" in capsys.readouterr().err


# ----- micro-batch sizing and the memory check ------------------------------------------------------------
def test_the_mfu_bench_sizes_its_micro_batch_with_the_planner():
    """At 16,384 tokens the planner predicts ~80.7 GiB (fused head) and ~89 GiB (logits) for the bench: over an
    H100's 79.6 GiB. The bench halves until the plan fits the free memory; --no-fit keeps what it was given."""
    bench = [sys.executable, str(REPO / "bench" / "mfu_gpu.py"), "--plan-only"]
    plans = {}
    for gib, extra in (("79.1", []), ("139.0", []), ("79.1", ["--no-fit"])):
        done = subprocess.run([*bench, "--gpu-gib", gib, *extra], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stderr
        plans[(gib, bool(extra))] = json.loads(done.stdout.splitlines()[-1])
    h100, h200, given = plans[("79.1", False)], plans[("139.0", False)], plans[("79.1", True)]
    assert {h100[impl][spec]["micro_batch_tokens"] for impl in h100 for spec in h100[impl]} == {8192}
    assert (
        h200["fused_head"]["te"]["micro_batch_tokens"] == h200["logits"]["te"]["micro_batch_tokens"] == 16384
    )
    assert given["fused_head"]["te"]["planned_peak_gib"] == pytest.approx(80.7, abs=0.1)
    assert given["logits"]["te"]["planned_peak_gib"] == pytest.approx(89.0, abs=0.1)
    assert h100["fused_head"]["local"]["kernels"] == "gpu_local"


def test_the_memory_check_at_start_plans_the_local_spec_when_te_is_absent(monkeypatch):
    from spin_megatron.compose import load_config
    from spin_megatron.models import builder
    from spin_megatron.plan import builtin_arch
    from spin_megatron.planning import fit as memory_fit
    from spin_megatron.planning.counting import GB

    cfg, arch = load_config(["experiment=tiny_cpu", "model.dtype=bf16"]), builtin_arch("qwen2.5-0.5b")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=80 * GB))
    seen = []
    real = memory_fit.estimate
    monkeypatch.setattr(memory_fit, "estimate", lambda *a, **k: seen.append(k["kernels"]) or real(*a, **k))
    memory_fit.check_training_memory(cfg, arch, 1)  # TE does not import here
    monkeypatch.setattr(builder, "default_use_te", lambda dtype: True)
    memory_fit.check_training_memory(cfg, arch, 1)
    assert seen == ["gpu_local", "gpu"]
    local, te = (real(cfg, arch, world_size=1, kernels=k) for k in ("gpu_local", "gpu"))
    assert local.stage.activations > te.stage.activations and local.stage.step_temp > te.stage.step_temp == 0
