"""The few patches Megatron-Core 0.16 needs to run on a machine without CUDA (four, one for recompute, four for
mixture-of-experts layers).

Applied once, only when ``torch.cuda.is_available()`` is false, by :func:`apply_cpu_shims`. Each shim names the
Megatron code that needs it. On a CUDA machine nothing here is touched.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means a CUDA ordinal in torch's factory functions and ``Tensor.to``.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Shim 2: ``device="cuda"`` in tensor factories, ``.to("cuda")`` and ``.cuda()`` land on the CPU.

    Needed by ``pipeline_parallel/schedules.py`` (``torch.zeros(..., device="cuda")`` for the loss accumulator),
    ``distributed/param_and_grad_buffer.py`` and ``tensor_parallel/random.py``.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _tensor_type_reporting_cuda(self, dtype=None, non_blocking=False, **kwargs):
    """Shim 4: ``Tensor.type()`` with no argument reports the CUDA type name.

    ``optimizer/distrib_optimizer.py`` and ``optimizer/clip_grads.py`` assert that parameters are
    ``torch.cuda.*Tensor``.
    """
    if dtype is None:
        name = _ORIGINAL_TENSOR_TYPE(self)
        return _CUDA_TYPE_NAMES.get(name, name)
    return _ORIGINAL_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


_ORIGINAL_TENSOR_TYPE = torch.Tensor.type


class _HostStream:
    """Shim 7: a stand-in for ``torch.cuda.Stream`` / its events. The alltoall token dispatcher
    (``moe/token_dispatcher.py``: ``MoEAlltoAllTokenDispatcher.__init__`` and ``_maybe_dtoh_and_synchronize``)
    creates a side stream for its device-to-host copies; on the CPU every copy is already synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        pass

    def record_event(self, event=None):
        return self

    def synchronize(self) -> None:
        pass


_HOST_STREAM = _HostStream()


def _split_sizes_as_ints(all_to_all):
    """Shim 8: the alltoall dispatcher passes its split sizes as tensors (numpy arrays after a device-to-host
    copy on GPU); gloo's ``all_to_all_single`` accepts only lists of Python ints."""

    def wrapped(group, input_, output_split_sizes=None, input_split_sizes=None):
        def as_ints(sizes):
            return None if sizes is None else [int(x) for x in sizes]

        return all_to_all(group, input_, as_ints(output_split_sizes), as_ints(input_split_sizes))

    return wrapped


def _uneven_first_dim_collectives(mappings) -> None:
    """Shim 9: with expert tensor parallelism (ETP > 1) and sequence parallelism, the alltoall dispatcher gathers
    and reduce-scatters token blocks of different sizes over the expert-TP group
    (``tensor_parallel/mappings.py``: ``_gather_along_first_dim`` / ``_reduce_scatter_along_first_dim`` with split
    sizes, a list ``all_gather`` / ``reduce_scatter``); gloo needs equal sizes and has no list reduce-scatter. The
    same results through a padded all-gather, and an all-reduce of which each rank keeps its block."""
    import torch.distributed as dist

    gather, scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_blocks(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        padded = input_.new_zeros((max(sizes), *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    def scatter_blocks(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return scatter(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(n) for n in input_split_sizes]
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        start = sum(sizes[: group.rank()])
        return total[start : start + sizes[group.rank()]].clone()

    mappings._gather_along_first_dim = gather_blocks
    mappings._reduce_scatter_along_first_dim = scatter_blocks


def _apply_moe_shims() -> None:
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # Shim 6: without TE, moe_utils.py never defines te_general_gemm, yet the router GEMM (RouterGatingLinear,
    # moe_utils.py:1192) tests `te_general_gemm is not None` -> NameError. None selects its torch.mm path.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    torch.cuda.Stream = _HostStream
    torch.cuda.current_stream = lambda device=None: _HOST_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    token_dispatcher.all_to_all = _split_sizes_as_ints(token_dispatcher.all_to_all)
    _uneven_first_dim_collectives(mappings)


def apply_cpu_shims() -> bool:
    """Apply the shims if CUDA is absent. Returns True if they are (now or already) active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    # Shim 1: Megatron uses torch.cuda.current_device() as a device (global memory buffer in parallel_state.py,
    # RoPE inv_freq in rotary_pos_embedding.py, DDP buffers, the checkpoint saver).
    torch.cuda.current_device = lambda: "cpu"
    # Shim 3: pipeline p2p (p2p_communication.py) and async checkpoint preload call torch.cuda.synchronize().
    torch.cuda.synchronize = lambda device=None: None
    torch.Tensor.type = _tensor_type_reporting_cuda
    # Shim 5: activation recomputation (tensor_parallel/random.py CheckpointFunction) saves and restores the CUDA
    # RNG state around the recomputed forward; without CUDA there is no such state to keep.
    no_state = lambda device="cuda": torch.empty(0, dtype=torch.uint8)  # noqa: E731
    torch.cuda.get_rng_state = torch.cuda.random.get_rng_state = no_state
    torch.cuda.set_rng_state = torch.cuda.random.set_rng_state = lambda new_state, device="cuda": None
    _apply_moe_shims()
    # The mode stays on the torch-function stack for the life of the process.
    _CudaToCpuMode().__enter__()
    _APPLIED = True
    return True
