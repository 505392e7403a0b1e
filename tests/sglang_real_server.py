"""Helpers for tests against a real SGLang 0.5.23 server on CPU: its venv, the server flags, the reference
log-probs from transformers."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import torch

from spin_megatron.rollout.sglang.config import SGLangConfig
from tests.sglang_double import free_port

REPO = Path(__file__).resolve().parents[1]
SGLANG_VENV = REPO / ".venv-sglang"
SGLANG_VERSION = "0.5.23"
STAND_IN = REPO / "tools" / "sglang_cpu"  # the sgl_kernel stand-in (see its docstring)
# --sleep-on-idle: an idle scheduler otherwise busy-polls one of this machine's two cores
CPU_SERVER_ARGS = (
    "--device", "cpu", "--attention-backend", "torch_native", "--max-total-tokens", "4096", "--sleep-on-idle",
)  # fmt: skip
CPU_SERVER_ENV = {"SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": str(STAND_IN)}


def ensure_sglang_venv() -> tuple[Path | None, str]:
    """(python of .venv-sglang, "") when it is built or can be built now (`make sglang-venv`), else (None, why)."""
    python = SGLANG_VENV / "bin" / "python"
    if (SGLANG_VENV / f".installed-{SGLANG_VERSION}").is_file():
        return python, ""
    build = subprocess.run(["make", "sglang-venv"], cwd=REPO, capture_output=True, text=True, timeout=1800)
    if build.returncode != 0:
        return None, f"`make sglang-venv` failed: {(build.stderr or build.stdout)[-800:]}"
    return python, ""


def cpu_server_config(python: Path, model_dir: Path, *, log_dir: Path, **overrides) -> SGLangConfig:
    """A launched SGLang server on this CPU: fp32, torch-native attention, the kernel stand-in."""
    num_engines = overrides.get("num_engines", 1)
    settings = dict(
        model_path=str(model_dir), python_executable=str(python), dtype="float32", host="127.0.0.1",
        base_port=free_port(span=num_engines), log_dir=str(log_dir), health_timeout_s=240,
        request_timeout_s=120, max_inflight_requests=8, extra_server_args=CPU_SERVER_ARGS,
        extra_server_env=CPU_SERVER_ENV,
    )  # fmt: skip
    return SGLangConfig(**{**settings, **overrides})


@functools.lru_cache(maxsize=2)
def _hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    return model, original


def perturbed_state(model_dir: Path, seed: int | None) -> dict[str, torch.Tensor]:
    """The checkpoint's weights (``seed=None``) or a reproducible random perturbation of them."""
    _, original = _hf_model(str(model_dir))
    if seed is None:
        return dict(original)
    generator = torch.Generator().manual_seed(seed)
    return {name: t + 0.05 * torch.randn(t.shape, generator=generator) for name, t in original.items()}


@torch.no_grad()
def hf_logprobs(model_dir: Path, state, prompt: list[int], response: list[int]) -> list[float]:
    """log softmax(logits)[token] of every response token under ``state`` (None: the checkpoint's weights)."""
    model, original = _hf_model(str(model_dir))
    model.load_state_dict(original if state is None else state)
    ids = torch.tensor([list(prompt) + list(response)])
    logps = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return [logps[len(prompt) - 1 + k, token].item() for k, token in enumerate(response)]


def sync_then_die_mid_bucket(url: str, model_dir: str) -> None:
    """A trainer's engine rank killed in the middle of a disaggregated sync: one bucket loaded, then SIGKILL
    between two broadcasts of the next one (the server is receiving it). Run in a process of its own."""
    import os
    import signal

    import torch.distributed as dist

    from spin_megatron.rollout.sglang.engine import SGLangEngine

    named = list(perturbed_state(Path(model_dir), seed=7).items())
    engine = SGLangEngine(SGLangConfig(urls=(url,), sync_mode="disaggregated", request_timeout_s=60))
    engine.update_weights(named[:4])
    broadcast, sent = dist.broadcast, []

    def dying(tensor, src, group):
        sent.append(tensor.shape)
        if len(sent) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return broadcast(tensor, src=src, group=group)

    dist.broadcast = dying
    engine.update_weights(named[4:])
