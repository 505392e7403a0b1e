"""The ``sglang`` rollout engine: SGLang HTTP servers launched (or attached to) by the trainer.

Generation posts one ``/generate`` request per SAMPLE rather than one per prompt with SGLang's ``n``: every
sample then gets its own ``sampling_seed`` (with ``n`` > 1 one request carries one seed, and seeded samples of
a prompt would all be identical), its own finish reason and log-probs without relying on the server's ordering
of ``n`` outputs, and the load spreads evenly. The prompt is still prefilled once per server: all its samples
go to the same server, whose radix cache shares the prefix. At most ``max_inflight_requests`` requests are in
flight.

Weight sync: the first bucket of a sync opens a weight-update session on every server
(``/begin_weight_update``), ``finish_weight_update`` closes it (``/end_weight_update``) and then flushes the
prefix cache. A failure in between aborts the session (closed on every server that still answers) and
raises; the trainer's supervisor then restarts the servers and syncs again, so no server keeps serving a
half-updated model.

Lifecycle (colocated, memory saver): ``sleep(release_weights=...)`` releases the KV cache, and the weights
too when a sync follows (SGLang keeps no CPU copy of released weights: a resume without a sync would serve
garbage); ``update_weights`` resumes the weights; ``wake()`` resumes whatever is still released. The trainer
wakes the engine at the end of every step, so every path that generates finds it awake. What is released is
tracked per server and kept on the servers (``memory.py``): a failure on one server, a new engine attached to the
same servers and a server restarted under us all leave it right.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import socket
import sys
import time
from collections.abc import Hashable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import torch

from spin_megatron.errors import ConfigError
from spin_megatron.rollout.protocol import SamplingParams
from spin_megatron.rollout.sglang.config import SGLangConfig, engine_gpu_groups, resolve_sync_mode
from spin_megatron.rollout.sglang.memory import ServerMemory
from spin_megatron.rollout.sglang.protocol import (
    MEMORY_TAGS,
    SESSION_ALREADY_OPEN,
    GenerateOutput,
    SGLangServerError,
    begin_weight_update_payload,
    end_weight_update_payload,
    generate_payload,
    parse_generate_response,
    sample_seed,
    snippet,
)
from spin_megatron.rollout.sglang.server import HttpClient, ServerFleet, post_to_all
from spin_megatron.rollout.sglang.weights import (
    ColocatedWeightSync,
    DisaggregatedWeightSync,
    transport_device,
)
from spin_megatron.types import Sample

FLUSH_RETRY_S = 0.2


def current_trainer_gpus() -> list[int] | None:
    """Physical id of this process's CUDA device (through CUDA_VISIBLE_DEVICES), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    visible = [
        entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()
    ]
    if visible and all(entry.isdigit() for entry in visible):
        return [int(visible[index])]
    return [index]  # no (or UUID-style) CUDA_VISIBLE_DEVICES: indices are physical, or unknowable


class SGLangEngine:
    """A :class:`~spin_megatron.rollout.protocol.RolloutEngine` backed by SGLang servers."""

    def __init__(self, config: SGLangConfig, *, trainer_gpu_ids: Sequence[int] | None = None):
        config.check_server_source()
        self.config = config
        if trainer_gpu_ids is None:
            trainer_gpu_ids = current_trainer_gpus()
        self.sync_mode = resolve_sync_mode(config, trainer_gpu_ids)
        if self.sync_mode == "colocated" and config.tp_size > 1 and transport_device().type == "cuda":
            raise ConfigError(
                f"rollout.sglang.tp_size={config.tp_size} with colocated weight sync is not supported: every "
                "TP rank of a server would map the engine rank's one GPU buffer and copy across GPUs, while "
                "SGLang expects each rank's tensors on that rank's own GPU; use tp_size=1 with more "
                "num_engines, or sync_mode=disaggregated"
            )
        self._client = HttpClient(timeout_s=config.request_timeout_s, pool_size=config.max_inflight_requests)
        fleet_class = ServerFleet
        if config.launcher == "ray":
            from spin_megatron.rollout.sglang.ray import RayServerFleet as fleet_class
        self._fleet = fleet_class(config, colocated=self.sync_mode == "colocated", client=self._client)
        self._client.describe_failure = self._fleet.describe_failure
        self._fleet.start()
        self._generate_pool = ThreadPoolExecutor(
            config.max_inflight_requests, thread_name_prefix="sglang-generate"
        )
        # One weight/memory request per server at a time, plus room for any a failed call left running.
        self._admin_pool = ThreadPoolExecutor(2 * len(self.urls), thread_name_prefix="sglang-admin")
        if self.sync_mode == "colocated":
            # launched servers: each (server, TP rank) reads a buffer on its own GPU; attached: GPUs unknown
            groups = engine_gpu_groups(config) if config.launches_servers else None
            self._weights = ColocatedWeightSync(
                self._client, self._admin_pool, self.urls, config.tp_size, groups
            )
        else:
            self._weights = DisaggregatedWeightSync(
                self._client, self._admin_pool, self.urls, config.tp_size,
                master_address=config.weight_sync_master_address or self._default_master_address(),
                master_port=config.weight_sync_master_port, timeout_s=config.request_timeout_s,
            )  # fmt: skip
        self._memory = ServerMemory(self._client, self._admin_pool, self.urls)
        self._in_session = False  # a weight-update session is open on the servers
        self._sessions_supported: bool | None = None  # False: servers older than the session endpoints
        self._next_server = 0
        self._closed = False
        atexit.register(self.shutdown)
        if config.enable_memory_saver:
            try:
                self._memory.load()  # what an earlier trainer left released on these servers
            except BaseException:
                self.shutdown()
                raise

    @property
    def urls(self) -> list[str]:
        """The servers themselves: weight and memory calls go to each of them, never via the router."""
        return self._fleet.urls

    @property
    def log_dir(self) -> Path | None:
        """Where launched servers log (``None`` when attached and no log was written)."""
        return self._fleet.log_dir

    def __enter__(self) -> SGLangEngine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    # ----- generation -------------------------------------------------------------------------------------
    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, prompt_keys: list[Hashable] | None = None
    ) -> list[Sample]:
        """``params.n`` samples per prompt, prompt by prompt, ``sample_index`` 0..n-1 inside each."""
        self._check_open()
        asleep = self._memory.asleep()
        if asleep:
            raise RuntimeError(
                f"SGLang servers are asleep (memory released: {asleep}): call wake() before generate()"
            )
        keys = list(range(len(prompt_ids))) if prompt_keys is None else list(prompt_keys)
        if len(keys) != len(prompt_ids):
            raise ValueError(f"got {len(prompt_ids)} prompts but {len(keys)} prompt_keys")
        for position, ids in enumerate(prompt_ids):
            if len(ids) == 0:
                raise ValueError(f"prompt {keys[position]!r} has no tokens")
        targets = self._fleet.generate_urls
        first, self._next_server = self._next_server, (self._next_server + len(prompt_ids)) % len(targets)
        jobs: list[tuple[int, int, Future]] = []
        for position, ids in enumerate(prompt_ids):
            url = targets[(first + position) % len(targets)]  # all samples of a prompt share a radix cache
            for index in range(params.n):
                seed = None if params.seed is None else sample_seed(params.seed, position, index)
                future = self._generate_pool.submit(
                    self._generate_one, url, generate_payload(ids, params, seed=seed)
                )
                jobs.append((position, index, future))
        outputs = _results([future for _, _, future in jobs])
        return [
            Sample(
                prompt_id=keys[position],
                prompt_ids=list(prompt_ids[position]),
                response_ids=out.output_ids,
                finish_reason=out.finish_reason,
                sample_index=index,
                logprobs=out.logprobs,
                response_text=out.text,
            )
            for (position, index, _), out in zip(jobs, outputs, strict=True)
        ]

    def _generate_one(self, url: str, payload: dict) -> GenerateOutput:
        body = self._client.post_json(url, "/generate", payload)
        try:
            outputs = parse_generate_response(body)
        except SGLangServerError as exc:
            raise SGLangServerError(f"{url}/generate: {exc}") from exc
        if len(outputs) != 1:
            raise SGLangServerError(
                f"{url}/generate: asked for one sample, got {len(outputs)}: {snippet(repr(body))}"
            )
        return outputs[0]

    # ----- weights ----------------------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load one bucket of HF-named full tensors into every server (the first bucket opens the session)."""
        self._check_open()
        named = list(named_tensors)
        if not named:
            return
        try:
            self._memory.resume(["weights"])  # where released; the KV cache stays released until wake()
            if not self._in_session:
                self._begin_session()
            self._weights.push(named)
        except BaseException:
            self.abort_weight_update()
            raise

    def finish_weight_update(self) -> None:
        """End of a sync: close the session, then flush the prefix cache (old weights' KV entries must not be
        reused). A released KV cache was flushed by the release itself and has served nothing since."""
        self._check_open()
        try:
            if self._in_session:
                self._end_session()
            self._flush_caches([url for url in self.urls if "kv_cache" not in self._memory.released[url]])
        except BaseException:
            self.abort_weight_update()
            raise
        self._weights.finish()

    def abort_weight_update(self) -> None:
        """After a failed sync: drop the weight-update group (ours first: a server blocked in a broadcast from us
        is released by it) and close the session on every server that still answers (errors are reported, not
        raised: the caller is already handling the failure)."""
        if isinstance(self._weights, DisaggregatedWeightSync):
            self._weights.drop_group()
        if self._in_session:
            self._in_session = False
            for url in self.urls:
                try:
                    self._client.post_json(url, "/end_weight_update", end_weight_update_payload())
                except SGLangServerError as exc:
                    print(
                        f"sglang: closing the weight-update session of {url} failed: {exc}", file=sys.stderr
                    )
        self._weights.finish()

    def _begin_session(self) -> None:
        """POST /begin_weight_update everywhere. Servers that predate sessions (404) take updates without one;
        a session left open by an earlier, failed sync of this trainer is closed and opened anew."""
        if self._sessions_supported is False:
            return
        responses = [self._client.request("POST", url, "/begin_weight_update", begin_weight_update_payload())
                     for url in self.urls]  # fmt: skip
        if all(r.status_code == 404 for r in responses):
            self._sessions_supported = False
            print("sglang: the servers have no /begin_weight_update (SGLang < 0.5.23): updating without a "
                  "session", file=sys.stderr)  # fmt: skip
            return
        self._in_session = True  # from here on a failure must close what was opened
        for url, response in zip(self.urls, responses, strict=True):
            if response.status_code == 400 and SESSION_ALREADY_OPEN in response.text:
                self._client.post_json(url, "/end_weight_update", end_weight_update_payload())
                response = self._client.request(
                    "POST", url, "/begin_weight_update", begin_weight_update_payload()
                )
            if response.status_code != 200:
                raise SGLangServerError(
                    f"{url}/begin_weight_update answered HTTP {response.status_code}: {snippet(response.text)}"
                )
        self._sessions_supported = True

    def _end_session(self) -> None:
        self._post_all("/end_weight_update", end_weight_update_payload())
        self._in_session = False

    # ----- memory -----------------------------------------------------------------------------------------
    def sleep(self, *, release_weights: bool = True) -> None:
        """Release the KV cache, and the weights when ``release_weights`` (only when a weight sync follows:
        SGLang does not back released weights up). Memory-saver servers only; others keep their memory."""
        self._check_open()
        if not self.config.enable_memory_saver:
            return
        tags = [tag for tag in MEMORY_TAGS if tag != "weights" or release_weights]
        # SGLang refuses to release memory while requests are still queued
        self._flush_caches([url for url in self.urls if set(tags) - self._memory.released[url]])
        self._memory.release(tags)

    def wake(self) -> None:
        self._check_open()
        self._memory.resume(["weights", "kv_cache"])

    def _post_all(self, endpoint: str, payload: dict) -> None:
        post_to_all(self._client, self._admin_pool, self.urls, endpoint, [payload] * len(self.urls))

    def _flush_caches(self, urls: list[str]) -> None:
        """POST /flush_cache to ``urls``; SGLang answers 400 while requests run, so retry until idle."""
        for url in urls:
            deadline = time.monotonic() + self.config.request_timeout_s
            while True:
                response = self._client.request("POST", url, "/flush_cache")
                if response.status_code == 200:
                    break
                if response.status_code != 400 or time.monotonic() > deadline:
                    raise SGLangServerError(
                        f"{url}/flush_cache answered HTTP {response.status_code}: {snippet(response.text)}"
                    )
                time.sleep(FLUSH_RETRY_S)

    # ----- shutdown ---------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Leave the weight-update group, stop every process this engine started. Idempotent; quiet and safe
        after any failure (it also runs at exit)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        self._generate_pool.shutdown(wait=False, cancel_futures=True)
        try:
            # Servers we launched are about to stop: telling them to leave the group first would be wasted.
            self._weights.close(notify_servers=not self.config.launches_servers)
        finally:
            self._admin_pool.shutdown(wait=False, cancel_futures=True)
            self._fleet.shutdown()

    def _default_master_address(self) -> str:
        """Where the servers reach the trainer's end of the weight-update group: the Ray node's address under
        Ray; 127.0.0.1 when every server is on this host's loopback; otherwise this host's address on the
        route to the first server (a connected UDP socket sends nothing). Not ``gethostbyname(gethostname())``:
        that is 127.0.1.1 on many Debian/Ubuntu hosts, unreachable from other nodes."""
        if self.config.launcher == "ray":
            import ray

            return ray.util.get_node_ip_address()
        hosts = {urlparse(url).hostname or "" for url in self.urls}
        if all(_is_loopback(host) for host in hosts):
            return "127.0.0.1"
        target = sorted(host for host in hosts if not _is_loopback(host))[0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((target, 9))
            return probe.getsockname()[0]

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this SGLangEngine was shut down; create a new one")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: resolved by the route lookup


def _results(futures: list[Future]) -> list:
    """Results in order; on the first failure the requests not started yet are cancelled, then it raises."""
    try:
        return [future.result() for future in futures]
    except BaseException:
        for future in futures:
            future.cancel()
        raise
