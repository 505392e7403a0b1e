"""The pure half of the SGLang engine: command lines, request payloads, response parsing.

Nothing here starts a process, opens a socket or imports SGLang, so all of it is unit-tested on CPU. The
wire format is SGLang's native HTTP API (``python/sglang/srt/entrypoints/http_server.py`` and the request
dataclasses in ``python/sglang/srt/managers/io_struct.py``, SGLang 0.5.x):

- ``POST /generate`` takes a ``GenerateReqInput`` (``input_ids``, ``sampling_params``, ``return_logprob``,
  ...) and answers ``{"output_ids": [...], "meta_info": {"finish_reason": {"type": ...},
  "output_token_logprobs": [[logprob, token_id, text], ...], ...}}`` (a list of those for batched input);
- the weight endpoints answer ``{"success": bool, "message": str}`` (HTTP 400 when ``success`` is false);
  ``/update_weights_from_tensor`` and ``/update_weights_from_distributed`` run only inside a session opened by
  ``/begin_weight_update`` and closed by ``/end_weight_update`` (``managers/scheduler_components/
  weight_updater.py``, 0.5.23);
- ``/release_memory_occupation`` / ``/resume_memory_occupation`` take ``{"tags": [...] | null}`` and answer
  ``null`` on success.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from spin_megatron.rollout.protocol import SamplingParams
from spin_megatron.rollout.sglang.config import SGLangConfig, engine_gpu_groups
from spin_megatron.types import FinishReason

# Memory regions SGLang's memory saver can release. Releasing/resuming them by name (never `tags=None`, which
# also covers version-specific regions such as cuda_graph) lets a weight update resume the weights alone.
MEMORY_TAGS = ("kv_cache", "weights")
WEIGHT_UPDATE_GROUP = "spin_megatron_weight_sync"
ORIGINAL_LOGPROB_ENV = "SGLANG_RETURN_ORIGINAL_LOGPROB"
# 0.5.23's /health runs a one-token generation on an idle server (``entrypoints/http_server.py``
# ``health_generate``) unless this is false: with released memory that generation runs on unmapped memory,
# and one landing between the flush and the release trips the release's idle assertion.
HEALTH_GENERATION_ENV = "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"
SNIPPET_CHARS = 300


class SGLangServerError(RuntimeError):
    """An SGLang server failed, answered with an error, or answered something we cannot parse."""


def snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


# ----- command lines -------------------------------------------------------------------------------------
def build_server_command(config: SGLangConfig, engine_index: int, *, colocated: bool) -> list[str]:
    """``python -m sglang.launch_server ...`` for launched server ``engine_index``.

    Colocated servers see every GPU of the fleet and pick theirs with ``--base-gpu-id`` (an index into their
    ``CUDA_VISIBLE_DEVICES``): a CUDA-IPC handle can only be opened by a process that sees the exporter's GPU.
    Disaggregated servers are fenced to their own GPUs by ``CUDA_VISIBLE_DEVICES`` and start at index 0.
    """
    python = config.python_executable or sys.executable
    port = str(config.base_port + engine_index)
    command = [python, "-m", "sglang.launch_server", "--model-path", config.model_path]
    command += ["--tp-size", str(config.tp_size), "--host", config.host, "--port", port]
    command += ["--mem-fraction-static", repr(config.mem_fraction_static), "--dtype", config.dtype]
    if colocated:
        visible = _visible_gpus(config)
        command += ["--base-gpu-id", str(visible.index(engine_gpu_groups(config)[engine_index][0]))]
    if config.enable_memory_saver:
        command.append("--enable-memory-saver")
    if config.skip_tokenizer_init:
        command.append("--skip-tokenizer-init")
    if config.random_seed is not None:
        command += ["--random-seed", str(config.random_seed)]
    if config.enable_deterministic_inference:
        command.append("--enable-deterministic-inference")
    return command + list(config.extra_server_args)


def build_server_env(
    config: SGLangConfig,
    engine_index: int,
    base_env: Mapping[str, str],
    *,
    colocated: bool,
    fence_gpus: bool = True,
) -> dict[str, str]:
    """The server's environment: ``base_env``, ``CUDA_VISIBLE_DEVICES`` (see build_server_command; with
    ``fence_gpus=False`` the one in ``base_env`` is kept: a Ray actor's, set by Ray), log-probs before
    top-p/top-k renormalisation and temperature (``SGLANG_RETURN_ORIGINAL_LOGPROB``, read in SGLang's
    ``srt/layers/sampler.py``: what the trainer recomputes for ``rollout/logp_diff``), with the memory saver a
    ``/health`` that does not generate (:data:`HEALTH_GENERATION_ENV`), then ``extra_server_env``."""
    env = {**base_env, ORIGINAL_LOGPROB_ENV: "1"}
    if fence_gpus:
        gpus = _visible_gpus(config) if colocated else engine_gpu_groups(config)[engine_index]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    if config.enable_memory_saver:
        env[HEALTH_GENERATION_ENV] = "0"
    return {**env, **config.extra_server_env}


def _visible_gpus(config: SGLangConfig) -> list[int]:
    return sorted({gpu for group in engine_gpu_groups(config) for gpu in group})


def build_router_command(
    config: SGLangConfig, worker_urls: Sequence[str], metrics_port: int | None = None
) -> list[str]:
    """``python -m sglang_router.launch_router --worker-urls ...`` in front of ``worker_urls``. ``metrics_port``:
    its Prometheus exporter's port (sglang_router's default, 29000, is one fixed port per host: a second router on
    the host — another replica's, another run's — would die on it).

    With the memory saver the router runs no health checks (``--disable-health-check``; 0.3.2 otherwise polls
    every worker's ``/health`` each 60 s, which in 0.5.23 generates a token on an idle server: on released
    weights or KV cache, or between the flush and the release). A dead server then shows as failed requests,
    which the trainer's supervisor handles."""
    python = config.python_executable or sys.executable
    metrics = ["--prometheus-port", str(metrics_port)] if metrics_port else []
    health = ["--disable-health-check"] if config.enable_memory_saver else []
    return [
        python, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls,
        "--host", config.host, "--port", str(config.router_port), "--policy", config.router_policy, *metrics,
        *health,
    ]  # fmt: skip


# ----- /generate -----------------------------------------------------------------------------------------
def sample_seed(seed: int, prompt_position: int, sample_index: int) -> int:
    """A distinct, reproducible ``sampling_seed`` per (prompt, sample): splitmix64, kept in [0, 2**31)."""
    state = (seed * 0x9E3779B97F4A7C15 + prompt_position * 0xBF58476D1CE4E5B9 + sample_index) & (2**64 - 1)
    state ^= state >> 30
    state = (state * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    state ^= state >> 27
    state = (state * 0x94D049BB133111EB) & (2**64 - 1)
    state ^= state >> 31
    return state & (2**31 - 1)


def generate_payload(
    prompt_ids: Sequence[int], params: SamplingParams, *, seed: int | None
) -> dict[str, Any]:
    """One ``GenerateReqInput`` for ONE sample of one prompt (the engine expands ``n``; see why there).

    ``logprob_start_len=-1`` asks for the log-probs of the generated tokens only, not of the prompt.
    """
    sampling: dict[str, Any] = {
        "n": 1,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "max_new_tokens": params.max_new_tokens,
    }
    if params.stop_token_ids:
        sampling["stop_token_ids"] = list(params.stop_token_ids)
    if seed is not None:
        sampling["sampling_seed"] = seed  # honoured by servers started with --enable-deterministic-inference
    return {
        "input_ids": list(prompt_ids),
        "sampling_params": sampling,
        "return_logprob": True,
        "logprob_start_len": -1,
        "stream": False,
    }


@dataclass(frozen=True)
class GenerateOutput:
    output_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[float] | None
    text: str | None


def parse_generate_response(body: Any) -> list[GenerateOutput]:
    """Outputs of a /generate answer: one dict per sample, or a list of them (batched input or ``n`` > 1)."""
    items = body if isinstance(body, list) else [body]
    if not items:
        raise SGLangServerError("malformed /generate response: an empty list")
    return [_parse_one_output(item) for item in items]


def _parse_one_output(item: Any) -> GenerateOutput:
    if not isinstance(item, dict) or not isinstance(item.get("meta_info"), dict):
        raise SGLangServerError(f"malformed /generate response (no meta_info object): {snippet(repr(item))}")
    meta = item["meta_info"]
    finish_reason = _parse_finish_reason(meta.get("finish_reason"), item)
    pairs = _parse_token_logprobs(meta.get("output_token_logprobs"), item)
    output_ids = item.get("output_ids")
    if output_ids is None and pairs is None:
        raise SGLangServerError(
            "malformed /generate response: neither output_ids nor output_token_logprobs: "
            + snippet(repr(item))
        )
    if output_ids is not None:
        if not isinstance(output_ids, list) or not all(_is_int(token) for token in output_ids):
            raise SGLangServerError(
                f"malformed /generate response: output_ids is not a list of ints: {snippet(repr(item))}"
            )
        if pairs is not None and [token for _, token in pairs] != output_ids:
            raise SGLangServerError(
                "malformed /generate response: output_token_logprobs and output_ids disagree "
                f"({len(pairs)} vs {len(output_ids)} tokens): {snippet(repr(item))}"
            )
    else:
        output_ids = [
            token for _, token in pairs
        ]  # older servers: token ids only inside the log-prob triples
    logprobs = None if pairs is None else [logprob for logprob, _ in pairs]
    text = item.get("text") if isinstance(item.get("text"), str) else None
    return GenerateOutput(list(output_ids), finish_reason, logprobs, text)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_finish_reason(raw: Any, item: Any) -> FinishReason:
    """``{"type": "stop"|"length"|"abort", ...}`` (older servers and the OpenAI API: a bare string)."""
    kind = raw.get("type") if isinstance(raw, dict) else raw
    if kind in ("stop", "length"):
        return kind
    if kind == "abort":
        message = raw.get("message", "") if isinstance(raw, dict) else ""
        raise SGLangServerError(
            f"SGLang aborted the request ({message or 'no message'}); this happens when the server runs out "
            "of KV cache, the prompt exceeds the context length, or requests are aborted by a weight update"
        )
    raise SGLangServerError(
        f"malformed /generate response: finish_reason {raw!r} is not stop/length/abort: {snippet(repr(item))}"
    )


def _parse_token_logprobs(raw: Any, item: Any) -> list[tuple[float, int]] | None:
    """``[[logprob, token_id, text_or_null], ...]`` → [(logprob, token_id)]; ``None`` when absent."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise SGLangServerError(
            f"malformed /generate response: output_token_logprobs is not a list: {snippet(repr(item))}"
        )
    pairs = []
    for entry in raw:
        ok = isinstance(entry, (list, tuple)) and len(entry) >= 2 and isinstance(entry[0], (int, float))
        if not ok or not _is_int(entry[1]):
            raise SGLangServerError(
                f"malformed /generate response: output_token_logprobs entry {entry!r} is not "
                f"[logprob, token_id, ...]: {snippet(repr(item))}"
            )
        pairs.append((float(entry[0]), int(entry[1])))
    return pairs


# ----- weight and memory endpoints -----------------------------------------------------------------------
def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as /update_weights_from_distributed spells it (the server does ``getattr(torch, name)``)."""
    return str(dtype).removeprefix("torch.")


def update_weights_from_tensor_payload(
    serialized_per_tp_rank: Sequence[str], *, flush_cache: bool = False
) -> dict:
    """``UpdateWeightsFromTensorReqInput`` for one flattened bucket: entry ``r`` is read by TP rank ``r``."""
    return {
        "serialized_named_tensors": list(serialized_per_tp_rank),
        "load_format": "flattened_bucket",
        "flush_cache": flush_cache,
    }


def init_weights_update_group_payload(
    *,
    master_address: str,
    master_port: int,
    rank_offset: int,
    world_size: int,
    backend: str = "nccl",
    group_name: str = WEIGHT_UPDATE_GROUP,
) -> dict:
    """``InitWeightsUpdateGroupReqInput``: the server's TP rank ``r`` joins as rank ``rank_offset + r``
    (``backend``: nccl between GPUs, gloo between CPU processes)."""
    return {
        "master_address": master_address,
        "master_port": master_port,
        "rank_offset": rank_offset,
        "world_size": world_size,
        "group_name": group_name,
        "backend": backend,
    }


def update_weights_from_distributed_payload(
    named_tensors: Sequence[tuple[str, torch.Tensor]],
    *,
    group_name: str = WEIGHT_UPDATE_GROUP,
    flush_cache: bool = False,
) -> dict:
    """``UpdateWeightsFromDistributedReqInput``: the server receives the tensors by broadcast, in order."""
    return {
        "names": [name for name, _ in named_tensors],
        "dtypes": [dtype_name(tensor.dtype) for _, tensor in named_tensors],
        "shapes": [list(tensor.shape) for _, tensor in named_tensors],
        "group_name": group_name,
        "flush_cache": flush_cache,
    }


def begin_weight_update_payload() -> dict:
    """``BeginWeightUpdateReqInput``: open the session for every runner (target and draft models)."""
    return {"selector": "all"}


def end_weight_update_payload() -> dict:
    """``EndWeightUpdateReqInput`` has no fields of its own."""
    return {}


SESSION_ALREADY_OPEN = "already open"  # in 0.5.23's refusal of a second /begin_weight_update


def destroy_weights_update_group_payload(group_name: str = WEIGHT_UPDATE_GROUP) -> dict:
    return {"group_name": group_name}


GROUP_MISSING = "does not exist"  # in 0.5.23's answer to destroying a group it does not have


def new_weight_update_group_name() -> str:
    """A name for ONE weight-update group, never reused. A server keeps a group until told to destroy it, and
    torch refuses a second group of the same name: with a fixed name, a server that missed the destroy (a failed
    sync, a trainer that crashed) would refuse every later ``/init_weights_update_group``."""
    return f"{WEIGHT_UPDATE_GROUP}_{os.getpid()}_{uuid.uuid4().hex[:12]}"


# The memory saver's state is written into the server's weight version (``/update_weight_version``, read back by
# ``/model_info``): it lives as long as the server does, a restarted server starts without it, and a new trainer
# attached to the server reads it. SGLang itself reports no released regions.
RELEASED_MARK = "+spin_megatron.released="


def memory_stamp(base_version: str, released: Iterable[str]) -> str:
    """The weight version that records ``released`` regions on top of the server's own ``base_version``."""
    tags = sorted(set(released))
    return f"{base_version}{RELEASED_MARK}{','.join(tags)}" if tags else base_version


def parse_memory_stamp(version: Any) -> tuple[str, set[str]]:
    """``(server's own version, released regions)`` of a weight version written by :func:`memory_stamp`."""
    version = version if isinstance(version, str) else "default"
    base, marked, tags = version.partition(RELEASED_MARK)
    return base, {tag for tag in tags.split(",") if tag in MEMORY_TAGS} if marked else set()


def update_weight_version_payload(version: str) -> dict:
    """``UpdateWeightVersionReqInput``; nothing runs while the trainer changes it, so nothing is aborted."""
    return {"new_version": version, "abort_all_requests": False}


def memory_payload(tags: Sequence[str]) -> dict:
    """Body of /release_memory_occupation and /resume_memory_occupation."""
    unknown = set(tags) - set(MEMORY_TAGS)
    assert not unknown, f"unknown SGLang memory tags {sorted(unknown)}"
    return {"tags": list(tags)}


def engine_rank_offsets(num_engines: int, tp_size: int) -> tuple[list[int], int]:
    """Disaggregated NCCL group: the trainer is rank 0, server ``i``'s TP ranks start at ``1 + i*tp_size``."""
    return [1 + i * tp_size for i in range(num_engines)], 1 + num_engines * tp_size


def check_success_response(endpoint: str, url: str, body: Any) -> None:
    """Weight endpoints answer ``{"success": bool, "message": str}``; anything else is an error."""
    if not isinstance(body, dict) or not isinstance(body.get("success"), bool):
        raise SGLangServerError(
            f"{url}{endpoint}: malformed response (expected success/message): {snippet(repr(body))}"
        )
    if not body["success"]:
        raise SGLangServerError(f"{url}{endpoint} failed: {snippet(str(body.get('message', '')))}")
