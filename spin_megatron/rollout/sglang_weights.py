"""Weight sync into SGLang servers, one bucket of HF-named full tensors at a time. GPU-only: SGLang is
imported lazily, inside the calls that need it.

- Colocated (the servers share the trainer's GPUs): each bucket is packed into one flat tensor per dtype, its
  CUDA-IPC handle is pickled with SGLang's ``MultiprocessingSerializer`` and posted to
  ``/update_weights_from_tensor`` with ``load_format="flattened_bucket"``; the server copies straight out of
  the trainer's memory. (slime's Megatron → SGLang path and verl's colocated SGLang path work the same way.)
- Disaggregated (the servers have their own GPUs): the trainer and every server TP rank form a fresh NCCL
  group (trainer = rank 0) through ``/init_weights_update_group``; for each bucket the trainer posts the
  names, dtypes and shapes to ``/update_weights_from_distributed`` and broadcasts the tensors in that order.
  The POST only returns once the server has received them, so it runs in a thread while this one broadcasts.
"""

from __future__ import annotations

import importlib
import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import torch

from spin_megatron.errors import ConfigError
from spin_megatron.rollout.sglang_buckets import FlatBucket, pack_flat_buckets, to_sglang_bucket
from spin_megatron.rollout.sglang_protocol import (
    WEIGHT_UPDATE_GROUP,
    check_success_response,
    destroy_weights_update_group_payload,
    engine_rank_offsets,
    init_weights_update_group_payload,
    update_weights_from_distributed_payload,
    update_weights_from_tensor_payload,
)
from spin_megatron.rollout.sglang_server import HttpClient, collect_all, post_to_all, submit_to_all


def _to_current_gpu(named: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    if not torch.cuda.is_available():
        raise RuntimeError(
            "SGLang weight sync moves tensors over CUDA (IPC or NCCL), but CUDA is not available"
        )
    device = torch.device("cuda", torch.cuda.current_device())
    return [(name, tensor.detach().to(device).contiguous()) for name, tensor in named]


class ColocatedWeightSync:
    def __init__(self, client: HttpClient, pool: ThreadPoolExecutor, urls: Sequence[str], tp_size: int):
        self.client, self.pool, self.urls, self.tp_size = client, pool, list(urls), tp_size
        # Buffers of the last bucket outlive its acknowledgement: SGLang answers once it has *enqueued* its
        # copies, so they stay referenced until the next bucket (or the cache flush that ends the sync).
        self._retained: list[FlatBucket] = []

    def push(self, named: Sequence[tuple[str, torch.Tensor]]) -> None:
        serializer = _ipc_serializer()
        buckets = pack_flat_buckets(_to_current_gpu(named))
        # The server reads these buffers on its own CUDA stream, in another process: finish writing them.
        torch.cuda.current_stream().synchronize()
        for bucket in buckets:
            blob = serializer.serialize(to_sglang_bucket(bucket), output_str=True)
            # Every TP rank of a server maps the same full tensors and takes its own shard while loading.
            payloads = [update_weights_from_tensor_payload([blob] * self.tp_size)] * len(self.urls)
            endpoint = "/update_weights_from_tensor"
            post_to_all(self.client, self.pool, self.urls, endpoint, payloads, check_success_response)
        self._retained = buckets

    def finish(self) -> None:
        self._retained = []

    def close(self, notify_servers: bool) -> None:
        self._retained = []


def _ipc_serializer():
    try:
        from sglang.srt.utils import MultiprocessingSerializer
    except ImportError as exc:
        raise ConfigError(
            "rollout.sglang.sync_mode=colocated pickles CUDA-IPC handles with SGLang's "
            "MultiprocessingSerializer, so SGLang must be importable in the trainer process (pip install "
            "'spin-megatron[gpu]'); or use rollout.sglang.sync_mode=disaggregated"
        ) from exc
    _patch_torch_reductions()
    return MultiprocessingSerializer


def _patch_torch_reductions() -> None:
    """SGLang's patch makes a CUDA-IPC handle name its GPU by UUID, so a server whose CUDA_VISIBLE_DEVICES
    numbers the GPUs differently still opens the right one. Recent releases apply it inside ``serialize``;
    older ones expect the producer to (its home moved between releases, hence the search)."""
    for module_name in ("sglang.srt.utils.patch_torch", "sglang.srt.patch_torch"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue  # not this release's location; try the next
        module.monkey_patch_torch_reductions()
        return


class DisaggregatedWeightSync:
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
        self._group = None

    def _connect(self) -> None:
        """Both sides block in the rendezvous, so the servers are asked to join before the trainer does."""
        offsets, world_size = engine_rank_offsets(len(self.urls), self.tp_size)
        port = self.master_port or _free_port()
        payloads = [
            init_weights_update_group_payload(
                master_address=self.master_address,
                master_port=port,
                rank_offset=offset,
                world_size=world_size,
            )
            for offset in offsets
        ]
        futures = submit_to_all(self.client, self.pool, self.urls, "/init_weights_update_group", payloads)
        group = _trainer_group(self.master_address, port, world_size, self.timeout_s)
        try:
            collect_all(self.urls, futures, "/init_weights_update_group", check_success_response)
        except BaseException:
            torch.distributed.destroy_process_group(group)
            raise
        self._group = group

    def push(self, named: Sequence[tuple[str, torch.Tensor]]) -> None:
        if self._group is None:
            self._connect()
        tensors = _to_current_gpu(named)
        payload = update_weights_from_distributed_payload(tensors)
        endpoint = "/update_weights_from_distributed"
        futures = submit_to_all(self.client, self.pool, self.urls, endpoint, [payload] * len(self.urls))
        for _, tensor in tensors:  # the order of `names`: each server receives them in that order
            torch.distributed.broadcast(tensor, src=0, group=self._group)
        collect_all(self.urls, futures, endpoint, check_success_response)

    def finish(self) -> None:
        """Nothing is retained: the servers acknowledge only after receiving every broadcast."""

    def close(self, notify_servers: bool) -> None:
        if self._group is None:
            return
        group, self._group = self._group, None
        try:
            if notify_servers:
                payloads = [destroy_weights_update_group_payload()] * len(self.urls)
                endpoint = "/destroy_weights_update_group"
                post_to_all(self.client, self.pool, self.urls, endpoint, payloads, check_success_response)
        finally:
            torch.distributed.destroy_process_group(group)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _trainer_group(master_address: str, master_port: int, world_size: int, timeout_s: float):
    """The trainer's end of the weight-update group, created with SGLang's own helper so that the rendezvous
    (TCP store, key prefix, group name) is exactly what the servers' ``init_weights_update_group`` expects,
    and without touching the trainer's default process group."""
    try:
        from sglang.srt.utils import init_custom_process_group
    except ImportError as exc:
        raise ConfigError(
            "rollout.sglang.sync_mode=disaggregated joins SGLang's NCCL weight-update group with SGLang's "
            "init_custom_process_group, so SGLang must be importable in the trainer process "
            "(pip install 'spin-megatron[gpu]')"
        ) from exc
    return init_custom_process_group(
        backend="nccl",
        init_method=f"tcp://{master_address}:{master_port}",
        world_size=world_size,
        rank=0,
        group_name=WEIGHT_UPDATE_GROUP,
        timeout=timedelta(seconds=timeout_s),
    )
