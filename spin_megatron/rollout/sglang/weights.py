"""Weight sync into SGLang servers, one bucket of HF-named full tensors at a time, inside a weight-update
session (``/begin_weight_update`` … ``/end_weight_update``, required since SGLang 0.5.23: the update
endpoints answer HTTP 400 outside one).

Two modes, each with a GPU and a CPU transport chosen by where the tensors live, so the same client code runs
on both (the CPU transports are what the test suite drives against a real SGLang server on CPU):

- Colocated (the servers share the trainer's devices): each bucket is packed into flat tensors, pickled with
  torch's ``ForkingPickler`` (CUDA: an IPC handle naming the GPU by UUID; CPU: a shared-memory file under the
  ``file_system`` sharing strategy) and posted to ``/update_weights_from_tensor`` with
  ``load_format="flattened_bucket"``. SGLang's TP rank ``r`` deserializes entry ``r`` of the payload, and only
  that one: a handle deserialized twice breaks the producer's CUDA-IPC refcounting, so every (server, TP rank)
  gets a payload serialized for it alone.
- Disaggregated (the servers have their own devices): the trainer and every server TP rank form a process
  group (trainer = rank 0; NCCL on GPU, gloo on CPU) through ``/init_weights_update_group``; for each bucket the
  trainer posts names, dtypes and shapes to ``/update_weights_from_distributed`` and broadcasts the tensors in
  that order. The POST returns once the server has received them, so it runs in a thread while this one
  broadcasts.

SGLang is not imported here: the payloads use only types SGLang's restricted unpickler accepts (torch tensors,
``types.SimpleNamespace`` for the bucket metadata), and the process group is created by
:func:`new_weight_update_group`, the same rendezvous SGLang's ``init_custom_process_group`` performs.
"""

from __future__ import annotations

import base64
import io
import os
import sys
import types
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler

import torch
import torch.distributed as dist
from torch.multiprocessing import reductions

from spin_megatron.rollout.sglang.buckets import FlatBucket, pack_flat_buckets
from spin_megatron.rollout.sglang.protocol import (
    GROUP_MISSING,
    WEIGHT_UPDATE_GROUP,
    SGLangServerError,
    check_success_response,
    destroy_weights_update_group_payload,
    engine_rank_offsets,
    init_weights_update_group_payload,
    new_weight_update_group_name,
    snippet,
    update_weights_from_distributed_payload,
    update_weights_from_tensor_payload,
)
from spin_megatron.rollout.sglang.server import HttpClient, collect_all, post_to_all, submit_to_all

# Index of the device in the argument tuple torch's reduce_tensor returns for a CUDA tensor (torch ≥ 2.0);
# SGLang's consumer-side patch reads a GPU UUID string or an index at the same place.
_CUDA_DEVICE_ARG = 6


def transport_device() -> torch.device:
    """Where the tensors of a sync travel from: this rank's GPU, or the CPU on machines without CUDA."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _on_device(named: Sequence[tuple[str, torch.Tensor]], device: torch.device):
    return [(name, tensor.detach().to(device).contiguous()) for name, tensor in named]


# ----- colocated ------------------------------------------------------------------------------------------
def _reduce_tensor_naming_gpu_by_uuid(tensor: torch.Tensor):
    """torch's reduction, with a CUDA tensor's device index replaced by its GPU's UUID: a server whose
    CUDA_VISIBLE_DEVICES numbers the GPUs differently from the trainer still opens the right one."""
    rebuild, args = reductions.reduce_tensor(tensor)
    if tensor.is_cuda:
        uuid = str(torch.cuda.get_device_properties(args[_CUDA_DEVICE_ARG]).uuid)
        args = (*args[:_CUDA_DEVICE_ARG], uuid, *args[_CUDA_DEVICE_ARG + 1 :])
    return rebuild, args


def serialize_for_one_consumer(obj) -> str:
    """One base64 pickle of ``obj`` for ONE consumer process (what SGLang's ``MultiprocessingSerializer``
    decodes). Each call shares the tensors anew, so each consumer holds its own handle."""
    buffer = io.BytesIO()
    pickler = ForkingPickler(buffer)
    pickler.dispatch_table[torch.Tensor] = _reduce_tensor_naming_gpu_by_uuid
    pickler.dump(obj)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def flattened_bucket_object(bucket: FlatBucket) -> dict:
    """What SGLang's ``flattened_bucket`` loader reads: the flat tensor and, per weight, an object with
    ``name, shape, dtype, start_idx, end_idx, numel`` (``SimpleNamespace`` is on its unpickler's allow-list)."""
    metadata = [
        types.SimpleNamespace(
            name=e.name, shape=e.shape, dtype=e.dtype, start_idx=e.start_idx, end_idx=e.end_idx, numel=e.numel
        )
        for e in bucket.entries
    ]
    return {"flattened_tensor": bucket.flat, "metadata": metadata}


def use_file_system_sharing() -> None:
    """CPU tensors reach another process only as shared-memory files: with torch's default file-descriptor
    passing the server cannot receive the descriptors over HTTP and rejects (then dies on) the payload."""
    if torch.multiprocessing.get_sharing_strategy() != "file_system":
        torch.multiprocessing.set_sharing_strategy("file_system")


def consumer_devices(
    gpu_groups: Sequence[Sequence[int]] | None, num_servers: int, tp_size: int, engine_device: torch.device
) -> list[list[torch.device]]:
    """Where the trainer puts the buffer each (server, TP rank) reads: that rank's own GPU.

    SGLang 0.5.23 rebuilds a CUDA-IPC tensor on the exporter's GPU and its flattened-bucket loader
    (``model_runner_components/weight_updater.py`` → ``FlattenedTensorBucket.reconstruct_tensors`` →
    ``load_weights``) does not move it: a server on another GPU would copy every weight across GPUs and keep a
    CUDA context on the engine rank's GPU for good. ``gpu_groups``: the physical GPUs of each launched server's
    TP ranks (None for attached servers, whose GPUs are unknown: the engine rank's GPU serves them all, as it
    does any GPU this process cannot see)."""
    fallback = [[engine_device] * tp_size for _ in range(num_servers)]
    if engine_device.type != "cuda" or gpu_groups is None:
        return fallback
    visible = [e.strip() for e in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if e.strip()]
    count = torch.cuda.device_count()

    def local(gpu: int) -> torch.device:
        if visible:
            index = visible.index(str(gpu)) if str(gpu) in visible else -1
        else:
            index = gpu if gpu < count else -1
        return torch.device("cuda", index) if index >= 0 else engine_device

    return [[local(gpu) for gpu in group] for group in gpu_groups]


class ColocatedWeightSync:
    """``/update_weights_from_tensor`` with one payload per (server, TP rank), each from a buffer on the GPU
    of that rank (:func:`consumer_devices`)."""

    def __init__(
        self,
        client: HttpClient,
        pool: ThreadPoolExecutor,
        urls: Sequence[str],
        tp_size: int,
        gpu_groups: Sequence[Sequence[int]] | None = None,
    ):
        self.client, self.pool, self.urls, self.tp_size = client, pool, list(urls), tp_size
        self.device = transport_device()
        self.devices = consumer_devices(gpu_groups, len(self.urls), tp_size, self.device)
        if self.device.type == "cpu":
            use_file_system_sharing()
        # Buffers of the last bucket outlive its acknowledgement: SGLang answers once it has *enqueued* its
        # copies, so they stay referenced until the next bucket (or the end of the sync).
        self._retained: list[FlatBucket] = []

    def push(self, named: Sequence[tuple[str, torch.Tensor]]) -> None:
        buckets = pack_flat_buckets(_on_device(named, self.device))
        copies = [self._copies(bucket) for bucket in buckets]
        if (
            self.device.type == "cuda"
        ):  # the servers read these buffers on their own streams, in other processes
            for device in {d for server in self.devices for d in server}:
                torch.cuda.synchronize(device)
        for on_device in copies:
            payloads = [
                update_weights_from_tensor_payload(
                    [serialize_for_one_consumer(flattened_bucket_object(on_device[d])) for d in server]
                )
                for server in self.devices
            ]
            endpoint = "/update_weights_from_tensor"
            post_to_all(self.client, self.pool, self.urls, endpoint, payloads, check_success_response)
        self._retained = [bucket for on_device in copies for bucket in on_device.values()]

    def _copies(self, bucket: FlatBucket) -> dict[torch.device, FlatBucket]:
        """The bucket on every consumer GPU (the engine rank's own: the bucket itself)."""
        wanted = {d for server in self.devices for d in server}
        return {
            d: bucket if d == self.device else FlatBucket(bucket.flat.to(d), bucket.entries) for d in wanted
        }

    def finish(self) -> None:
        self._retained = []

    def close(self, notify_servers: bool) -> None:
        self._retained = []


# ----- disaggregated --------------------------------------------------------------------------------------
def host_weight_update_store(master_address: str, master_port: int, world_size: int, timeout_s: float):
    """The weight-update group's TCP store, hosted by the trainer (rank 0) and bound before any server is told
    the port. ``master_port=0`` lets the OS choose a free one (read back as ``store.port``): nothing picks a
    port, lets it go and hopes it is still free when the store binds it."""
    return dist.TCPStore(
        master_address, master_port, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )  # fmt: skip


def new_weight_update_group(
    *, backend: str, master_address: str, master_port: int, world_size: int, rank: int, timeout_s: float,
    store=None, group_name: str = WEIGHT_UPDATE_GROUP,
):  # fmt: skip
    """A process group of the trainer and the servers, beside (not replacing) the trainer's default group.

    The rendezvous is the one SGLang's ``init_custom_process_group`` performs on the servers' side: a TCP
    store at ``master_address:master_port`` (rank 0, the trainer, hosts it: pass the one from
    :func:`host_weight_update_store`), keys under the group name as prefix. torch has no public API for a group
    outside the default world, hence its internal helper (SGLang, verl and slime use the same one)."""
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

    timeout = timedelta(seconds=timeout_s)
    if store is None:  # a joining rank (or a trainer that did not host the store itself)
        store, rank, world_size = next(
            dist.rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout)
        )
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), PrefixStore(group_name, store),
        group_name=group_name, timeout=timeout,
    )  # fmt: skip
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


# How long each server gets to drop a group (after a failure, at shutdown): a dead or stuck server must not hold up
# the trainer; a group it keeps is never used again (names are not reused).
DESTROY_TIMEOUT_S = 15.0


class DisaggregatedWeightSync:
    """``/update_weights_from_distributed`` over a trainer + servers group (NCCL on GPU, gloo on CPU).

    Every group has a name of its own (:func:`new_weight_update_group_name`). From the moment the servers are
    asked to join one it may exist on their side, whatever happened on ours: after a failed sync and at close
    they are asked to destroy it (one that has it no longer answers "does not exist", which is fine). A server
    that never heard the destroy (a trainer killed mid-sync) keeps a dead group, but the next group's new name
    cannot collide with it."""

    def __init__(
        self,
        client: HttpClient,
        pool: ThreadPoolExecutor,
        urls: Sequence[str],
        tp_size: int,
        *,
        master_address: str,
        master_port: int,
        timeout_s: float,
    ):
        self.client, self.pool, self.urls, self.tp_size = client, pool, list(urls), tp_size
        self.master_address, self.master_port, self.timeout_s = master_address, master_port, timeout_s
        self.device = transport_device()
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self._group = None  # our end of the group
        self.server_group: str | None = (
            None  # the group the servers were asked to form and not yet to destroy
        )

    def _connect(self) -> None:
        """Both sides block in the rendezvous, so the servers are asked to join before the trainer does."""
        offsets, world_size = engine_rank_offsets(len(self.urls), self.tp_size)
        store = self._host_store(world_size)
        port, name = store.port, new_weight_update_group_name()
        payloads = [
            init_weights_update_group_payload(
                master_address=self.master_address, master_port=port, rank_offset=offset,
                world_size=world_size, backend=self.backend, group_name=name,
            )
            for offset in offsets
        ]  # fmt: skip
        self.server_group = name
        futures = submit_to_all(self.client, self.pool, self.urls, "/init_weights_update_group", payloads)
        try:
            group = new_weight_update_group(
                backend=self.backend, master_address=self.master_address, master_port=port,
                world_size=world_size, rank=0, timeout_s=self.timeout_s, store=store, group_name=name,
            )  # fmt: skip
        except Exception as exc:
            # The servers' answers say why they did not join (unreachable address, taken port, ...).
            try:
                collect_all(self.urls, futures, "/init_weights_update_group", check_success_response)
            except SGLangServerError as server_error:
                raise SGLangServerError(f"weight-update group did not form: {server_error}") from exc
            raise
        try:
            collect_all(self.urls, futures, "/init_weights_update_group", check_success_response)
        except BaseException:
            _destroy_local(group)
            raise
        self._group = group

    def _host_store(self, world_size: int):
        try:
            return host_weight_update_store(self.master_address, self.master_port, world_size, self.timeout_s)
        except (
            RuntimeError,
            OSError,
        ) as exc:  # DistNetworkError: the port is taken or the address is not ours
            raise SGLangServerError(
                f"cannot host the weight-update rendezvous on {self.master_address}:{self.master_port or 'any'} "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}): set "
                "rollout.sglang.weight_sync_master_address to an address of this host the servers reach, and "
                "rollout.sglang.weight_sync_master_port=0 (a free port) or a free one"
            ) from exc

    def push(self, named: Sequence[tuple[str, torch.Tensor]]) -> None:
        if self._group is None:
            self._connect()
        tensors = _on_device(named, self.device)
        payload = update_weights_from_distributed_payload(tensors, group_name=self.server_group)
        endpoint = "/update_weights_from_distributed"
        futures = submit_to_all(self.client, self.pool, self.urls, endpoint, [payload] * len(self.urls))
        for _, tensor in tensors:  # the order of `names`: each server receives them in that order
            dist.broadcast(tensor, src=0, group=self._group)
        collect_all(self.urls, futures, endpoint, check_success_response)

    def finish(self) -> None:
        """Nothing is retained: the servers acknowledge only after receiving every broadcast."""

    def drop_group(self) -> None:
        """After a failed sync: tear down our end first (over gloo that also ends a server's pending receive),
        then ask the servers to destroy theirs, so that the next sync forms a new group. Failures are reported,
        not raised: the caller is already handling the sync's own."""
        group, self._group = self._group, None
        error = _destroy_local(group)
        if error:
            print(f"sglang: tearing down the broken weight-update group: {error}", file=sys.stderr)
        for error in self._destroy_on_servers(DESTROY_TIMEOUT_S):
            print(f"sglang: {error}", file=sys.stderr)

    def close(self, notify_servers: bool) -> None:
        """At shutdown, whatever happened before: never raises, prints nothing. ``notify_servers``: ask the
        servers to destroy the group (attached servers outlive us; launched ones are about to stop)."""
        if notify_servers:
            self._destroy_on_servers(DESTROY_TIMEOUT_S)
        self.server_group = None
        group, self._group = self._group, None
        _destroy_local(group)

    def _destroy_on_servers(self, timeout_s: float) -> list[str]:
        """POST /destroy_weights_update_group for :attr:`server_group` to every server; what failed."""
        name, self.server_group = self.server_group, None
        if name is None:
            return []
        payload, endpoint = destroy_weights_update_group_payload(name), "/destroy_weights_update_group"
        futures = [
            self.pool.submit(self.client.request, "POST", url, endpoint, payload, timeout_s=timeout_s)
            for url in self.urls
        ]
        errors = []
        for url, future in zip(self.urls, futures, strict=True):
            try:
                response = future.result()
            except SGLangServerError as exc:
                errors.append(f"could not remove weight-update group {name} from {url}: {exc}")
                continue
            if response.status_code != 200 and GROUP_MISSING not in response.text:
                errors.append(
                    f"{url}{endpoint} answered HTTP {response.status_code}: {snippet(response.text)}"
                )
        return errors


def _destroy_local(group) -> str | None:
    """Destroy our end of a group; one destroyed already (a failed run's teardown destroys every group with
    ``destroy_process_group()``) is left alone. Returns what went wrong, if anything."""
    from torch.distributed.distributed_c10d import _world

    if group is None or group not in _world.pg_map:
        return None
    try:
        dist.destroy_process_group(group)
    except Exception as exc:  # a group whose peers died may fail to tear down; it is gone either way
        return f"{type(exc).__name__}: {exc}"
    return None
