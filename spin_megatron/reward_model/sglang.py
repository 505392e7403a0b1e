"""The SGLang-served reward model (``reward_model.backend=sglang``): scalar reward models such as
Skywork-Reward-Llama-3.1-8B served by ``python -m sglang.launch_server --is-embedding``, launched here or attached
to by URL.

The wire format is SGLang's native ``POST /classify`` (SGLang 0.5.23: ``srt/entrypoints/http_server.py``,
``classify_request``), which takes an ``EmbeddingReqInput`` (``srt/managers/io_struct.py``) and answers, for a
batch of ``input_ids``, a list ``[{"embedding": [score, ...], "meta_info": {...}}, ...]`` in request order.
``embedding`` is the model's raw head output at the LAST token (``Pooler(PoolingType.LAST, normalize=False)``,
then ``tensor.tolist()``): no softmax, no sigmoid — for a ``num_labels=1`` head, one float, transformers'
``AutoModelForSequenceClassification`` logit. (The OpenAI-style ``/v1/classify`` softmaxes over the labels, which
turns a one-label head into 1.0 for everything: not used.)

Conversations are rendered client-side with the reward model's own tokenizer and chat template and sent as token
ids, so the template is ours (the servers may run with ``--skip-tokenizer-init``). A conversation longer than
``max_length`` tokens keeps its last ``max_length`` (as with the hf backend). Micro-batches of ``micro_batch_size`` conversations go round-robin to
the servers, at most ``max_inflight_requests`` at once; neighbouring conversations (the samples of one prompt)
share a request and thus a server, whose radix cache prefills their common prompt once.

A Qwen2/Qwen3ForSequenceClassification checkpoint without ``score.bias`` is refused before launch (SGLang 0.5.23
would add a random constant to its scores, different per server; see ``sglang_checkpoint.py``), with the fix
(:func:`~spin_megatron.reward_model.sglang_checkpoint.add_zero_score_bias`). Servers, HTTP and health come from the rollout engine's plumbing
(``spin_megatron.rollout.sglang.server``).
"""

from __future__ import annotations

import atexit
import math
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from spin_megatron.errors import ConfigError
from spin_megatron.ports import wait_port_free
from spin_megatron.reward_model.base import (
    Conversation,
    RewardModelError,
    TruncationCount,
    load_chat_template,
)
from spin_megatron.reward_model.config import RewardSGLangConfig
from spin_megatron.reward_model.sglang_checkpoint import missing_head_bias
from spin_megatron.rollout.sglang.config import SGLangConfig
from spin_megatron.rollout.sglang.protocol import (
    SGLangServerError,
    build_server_command,
    build_server_env,
    snippet,
)
from spin_megatron.rollout.sglang.server import (
    PORT_RELEASE_WAIT_S,
    HttpClient,
    ManagedProcess,
    PortTakenError,
    wait_until_healthy,
)

_KEY = "reward_model.sglang"
CLASSIFY = "/classify"
# --is-embedding: serve the model's pooled head output on /classify. 0.5.23 already treats the reward and
# sequence-classification architectures as non-generative (configs/model_config.py, is_generation_model), but
# a checkpoint whose architecture it does not list would otherwise come up as a generation server.
REWARD_SERVER_FLAGS = ("--is-embedding",)
# Architectures SGLang 0.5.23 serves with a scalar head (srt/models/*): llama_reward.py, qwen2_rm.py,
# qwen2_classification.py, qwen3_rm.py, qwen3_classification.py, gemma2_reward.py, internlm2_reward.py
REWARD_ARCHITECTURES = (
    "LlamaForSequenceClassification",
    "LlamaForSequenceClassificationWithNormal_Weights",
    "Qwen2ForRewardModel",
    "Qwen2ForSequenceClassification",
    "Qwen3ForRewardModel",
    "Qwen3ForSequenceClassification",
    "Gemma2ForSequenceClassification",
    "InternLM2ForRewardModel",
)


# ----- command lines (the rollout engine's, plus the reward-model flags) ----------------------------------
def _as_server_config(model_path: str, config: RewardSGLangConfig) -> SGLangConfig:
    return SGLangConfig(
        model_path=model_path, num_engines=config.num_engines, tp_size=config.tp_size, gpu_ids=config.gpu_ids,
        host=config.host, base_port=config.base_port, mem_fraction_static=config.mem_fraction_static,
        dtype=config.dtype, skip_tokenizer_init=config.skip_tokenizer_init, random_seed=config.random_seed,
        extra_server_args=(*REWARD_SERVER_FLAGS, *config.extra_server_args),
        extra_server_env=config.extra_server_env, python_executable=config.python_executable,
    )  # fmt: skip


def build_reward_server_command(model_path: str, config: RewardSGLangConfig, index: int) -> list[str]:
    """``python -m sglang.launch_server --model-path MODEL ... --is-embedding ...`` for reward server ``index``
    (on its own GPUs, ``CUDA_VISIBLE_DEVICES`` from :func:`build_reward_server_env`)."""
    return build_server_command(_as_server_config(model_path, config), index, colocated=False)


def build_reward_server_env(
    model_path: str, config: RewardSGLangConfig, index: int, base_env: Mapping[str, str]
) -> dict[str, str]:
    return build_server_env(_as_server_config(model_path, config), index, base_env, colocated=False)


def launch_reward_servers(
    model_path: str, config: RewardSGLangConfig, client: HttpClient
) -> dict[str, ManagedProcess]:
    """Launch ``config.num_engines`` reward servers and wait until every one answers /health; {url: process}.
    On any failure, stops what was started and raises (:class:`PortTakenError` for a taken port,
    :class:`RewardModelError` for a server that dies or never becomes healthy, with its log tail)."""
    urls = config.server_urls()
    for index in range(len(urls)):
        port = config.base_port + index
        if not wait_port_free(config.host, port, timeout_s=PORT_RELEASE_WAIT_S):
            raise PortTakenError(
                f"reward model server {index}: port {port} on {config.host} is in use; stop whatever listens "
                f"there, or set {_KEY}.base_port to the first of {len(urls)} free consecutive ports"
            )
    log_dir = Path(config.log_dir or tempfile.mkdtemp(prefix="spin_reward_sglang_logs_"))
    processes: dict[str, ManagedProcess] = {}
    try:
        for index, url in enumerate(urls):
            command = build_reward_server_command(model_path, config, index)
            env = build_reward_server_env(model_path, config, index, os.environ)
            log = log_dir / f"reward_server_{index}.log"
            processes[url] = ManagedProcess(f"SGLang reward model server {index}", command, env, log)
        for url, process in processes.items():
            try:
                wait_until_healthy(
                    client,
                    url,
                    timeout_s=config.health_timeout_s,
                    process=process,
                    what="reward model server",
                )
            except SGLangServerError as exc:
                message = str(exc).replace("rollout.sglang.health_timeout_s", f"{_KEY}.health_timeout_s")
                raise RewardModelError(message) from exc
    except BaseException:
        for process in processes.values():
            process.terminate()
        raise
    return processes


# ----- rendering, requests, responses (pure) --------------------------------------------------------------
def render_conversation_ids(
    tokenizer, conversation: Conversation, chat_template: str | None = None
) -> list[int]:
    """The reward model's token ids of one conversation: rendered by its chat template (``chat_template``
    overrides the tokenizer's own), then tokenized WITHOUT adding special tokens (the template writes them;
    transformers' ``apply_chat_template(tokenize=True)`` does the same)."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False, chat_template=chat_template)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_conversation(index: int, conversation: Any) -> None:
    """A list of ``{"role", "content"}`` messages ending with the assistant's response, or ValueError."""
    ok = isinstance(conversation, list) and conversation and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in conversation
    )  # fmt: skip
    if not ok:
        raise ValueError(
            f"conversation {index} is not a non-empty list of {{'role': str, 'content': str}} messages: "
            f"{snippet(repr(conversation), 200)}"
        )
    if conversation[-1]["role"] != "assistant":
        raise ValueError(
            f"conversation {index} ends with a {conversation[-1]['role']!r} message; a reward model scores the "
            "assistant's response, so the conversation must end with it"
        )


def classify_payload(batch_ids: Sequence[Sequence[int]]) -> dict[str, Any]:
    """An ``EmbeddingReqInput`` for a batch (always a list of lists, so the answer is always a list)."""
    return {"input_ids": [[int(token) for token in ids] for ids in batch_ids]}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_classify_response(body: Any, expected: int, where: str) -> list[float]:
    """The scalar score of each of ``expected`` conversations from a /classify answer, or RewardModelError
    (one line, naming ``where``, the server and endpoint)."""

    def malformed(why: str) -> RewardModelError:
        return RewardModelError(
            f"{where}: malformed /classify response ({why}): {_line(snippet(repr(body), 200))}"
        )

    if not isinstance(body, list) or len(body) != expected:  # a batch request is always answered by a list
        count = len(body) if isinstance(body, list) else type(body).__name__
        raise malformed(f"expected a list of {expected} results, got {count}")
    scores = []
    for item in body:
        if not isinstance(item, dict) or "embedding" not in item:
            finish = item.get("meta_info", {}).get("finish_reason") if isinstance(item, dict) else None
            if isinstance(finish, dict) and finish.get("type") == "abort":
                raise RewardModelError(
                    f"{where}: SGLang aborted the request: {_line(str(finish.get('message')))}"
                )
            raise malformed("a result without 'embedding'")
        embedding = item["embedding"]
        if not isinstance(embedding, list) or not all(_is_number(v) for v in embedding):
            raise malformed("'embedding' is not a list of numbers")
        if len(embedding) != 1:
            raise RewardModelError(
                f"{where}: the served model returns {len(embedding)} values per conversation, not one scalar: "
                "it is an embedding or multi-label model, not a reward model (a *ForSequenceClassification / "
                "*ForRewardModel checkpoint with num_labels=1)"
            )
        value = float(embedding[0])
        if not math.isfinite(value):
            raise RewardModelError(f"{where}: the reward model returned a non-finite score ({value})")
        scores.append(value)
    return scores


def _line(text: str) -> str:
    return " ".join(text.split())


# ----- the scorer -----------------------------------------------------------------------------------------
class SGLangRewardModel:
    """A :class:`~spin_megatron.reward_model.base.RewardScorer` backed by SGLang reward-model servers."""

    def __init__(
        self,
        path: str,
        *,
        config: RewardSGLangConfig | None = None,
        tokenizer_path: str | None = None,
        chat_template: str | None = None,
        max_length: int = 4096,
        micro_batch_size: int = 8,
        tokenizer=None,
    ):
        """``path``: the reward model (launched servers load it; its tokenizer renders, unless
        ``tokenizer_path`` or an already loaded ``tokenizer`` is given). ``chat_template``: a Jinja string or a
        ``.jinja`` file overriding the tokenizer's template."""
        self.config = config or RewardSGLangConfig()
        if max_length < 1 or micro_batch_size < 1:
            raise ConfigError(
                f"max_length and micro_batch_size must be ≥ 1; got {max_length}, {micro_batch_size}"
            )
        self.max_length, self.micro_batch_size = max_length, micro_batch_size
        self.cuts = TruncationCount(max_length)
        self.chat_template = load_chat_template(chat_template)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path)
        if self.chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"the reward model's tokenizer ({tokenizer_path or path}) has no chat template; give one with "
                "reward_model.chat_template (a Jinja string or a .jinja file)"
            )
        self.tokenizer = tokenizer
        why = missing_head_bias(path) if path else None
        if why and self.config.launches_servers:
            raise ConfigError(why)
        if why:  # attached servers may load a fixed copy; we cannot tell
            print(f"warning: {why}", file=sys.stderr, flush=True)
        self.urls = self.config.server_urls()
        inflight = self.config.max_inflight_requests
        self._client = HttpClient(timeout_s=self.config.timeout_s, pool_size=inflight)
        self._pool = ThreadPoolExecutor(max_workers=inflight, thread_name_prefix="reward_sglang")
        self._processes: dict[str, ManagedProcess] = {}
        self._next_url = 0
        self._closed = False
        if self.config.launches_servers:
            if not path:
                raise ConfigError("reward_model.path is needed to launch reward model servers (or give urls)")
            try:
                self._processes = launch_reward_servers(path, self.config, self._client)
            except BaseException:
                self._pool.shutdown(wait=False)
                raise
        atexit.register(self.shutdown)

    def __enter__(self) -> SGLangRewardModel:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def encode(self, conversations: Sequence[Conversation]) -> list[list[int]]:
        """Token ids of every conversation (ValueError for a malformed one); one over ``max_length`` keeps its
        last ``max_length`` tokens, as with the hf backend (warned once)."""
        rows, cut = [], 0
        for index, conversation in enumerate(conversations):
            check_conversation(index, conversation)
            ids = render_conversation_ids(self.tokenizer, conversation, self.chat_template)
            cut += len(ids) > self.max_length
            rows.append(ids[-self.max_length :])
        self.cuts.add(cut)
        return rows

    def score(self, conversations: list[Conversation]) -> list[float]:
        return self.score_ids(self.encode(conversations))

    def score_ids(self, ids: Sequence[Sequence[int]]) -> list[float]:
        """Scores of tokenized conversations, in their order: micro-batches round-robin over the servers, all in
        flight at once (up to ``max_inflight_requests``); every request is waited for before an error is raised."""
        if self._closed:
            raise RewardModelError("the SGLang reward model was used after shutdown()")
        starts = range(0, len(ids), self.micro_batch_size)
        jobs = []
        for offset, start in enumerate(starts):
            batch = ids[start : start + self.micro_batch_size]
            url = self.urls[(self._next_url + offset) % len(self.urls)]
            jobs.append((start, batch, self._pool.submit(self._classify, url, batch)))
        self._next_url = (self._next_url + len(jobs)) % len(self.urls)
        scores: list[float] = [0.0] * len(ids)
        errors: list[RewardModelError] = []
        for start, batch, future in jobs:
            try:
                scores[start : start + len(batch)] = future.result()
            except RewardModelError as exc:
                errors.append(exc)
        if errors:
            more = f" (and {len(errors) - 1} more request(s) failed)" if len(errors) > 1 else ""
            raise RewardModelError(f"{errors[0]}{more}") from errors[0]
        return scores

    def _classify(self, url: str, batch: Sequence[Sequence[int]]) -> list[float]:
        try:
            body = self._client.post_json(url, CLASSIFY, classify_payload(batch))
        except SGLangServerError as exc:
            raise RewardModelError(self._describe(url, exc)) from exc
        return parse_classify_response(body, len(batch), where=f"reward model server {url}{CLASSIFY}")

    def _describe(self, url: str, exc: SGLangServerError) -> str:
        """One line: what failed at ``url``, and whether the server we launched there has exited."""
        if isinstance(exc.__cause__, requests.Timeout):
            message = (
                f"reward model server {url}{CLASSIFY}: no answer within {self.config.timeout_s:g} s (raise "
                f"{_KEY}.timeout_s if the server is just slow, or lower reward_model.micro_batch_size)"
            )
        else:
            message = f"reward model server: {_line(str(exc))}"
        process = self._processes.get(url)
        if process is not None and process.exit_code() is not None:
            message += (
                f" (the launched server exited with code {process.exit_code()}; log: {process.log_path})"
            )
        return message

    def shutdown(self) -> None:
        """Stop the servers this scorer launched (attached ones keep running). Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in self._processes.values():
            process.terminate()
        self._processes.clear()


def build_sglang_reward_model(cfg) -> SGLangRewardModel:
    """``reward_model.backend=sglang``: the scorer from ``reward_model.*`` (``path``, ``tokenizer_path``,
    ``chat_template``, ``max_length``, ``micro_batch_size``) and its ``sglang`` section (a
    :class:`RewardSGLangConfig`, a mapping of its fields, or absent: the defaults)."""
    section = getattr(cfg, "sglang", None)
    if section is None:
        section = RewardSGLangConfig()
    elif isinstance(section, Mapping):
        section = RewardSGLangConfig(**section)
    return SGLangRewardModel(
        cfg.path,
        config=section,
        tokenizer_path=cfg.tokenizer_path,
        chat_template=cfg.chat_template,
        max_length=cfg.max_length,
        micro_batch_size=cfg.micro_batch_size,
    )
