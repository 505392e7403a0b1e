"""Fixes for Megatron-Core 0.16.1 bugs that this trainer's defaults reach, applied once (CPU and GPU) by
:func:`apply_megatron_fixes`. Each names the upstream fix; drop it when the pinned Megatron-Core has that fix.

Fix 1 — the distributed optimizer's ``fully_reshardable`` checkpoint (``checkpoint.py`` saves in it so a run
resumes at any layout) with more than one DDP bucket, i.e. whenever the gradient reduce-scatter is overlapped
(``parallel.overlap_grad_reduce``, on by default on GPU). ``get_parameter_state_dp_zero`` packs the gathered state
bucket after bucket with each bucket's end padding stripped, but ``sharded_param_state_fully_reshardable`` slices
it with ``param_index_map``'s offsets, which still count that padding: every parameter past the first bucket is
saved from (and loaded into) the wrong place, the overshoot zero-padded with a warning ("param range exceeds
unpadded buffer ... data corruption"). A resume then starts from corrupted weights and Adam moments (measured: grad
norm 689 instead of 21 on the tiny model, tests/test_scaling.py). Fixed upstream by NVIDIA/Megatron-LM#5077
(after 0.16.1), the same way: the offsets are rebased onto the unpadded packing while that method runs.
"""

from __future__ import annotations

import contextlib
import functools

_APPLIED = False


@contextlib.contextmanager
def _unpadded_param_offsets(buffers):
    """Each buffer's ``param_index_map`` with offsets counted without the end padding of earlier buckets."""
    kept = [buffer.param_index_map for buffer in buffers]
    try:
        for buffer in buffers:
            stripped, before = 0, []
            for bucket in buffer.buckets:
                before.append(stripped)
                stripped += bucket.grad_data.numel() - bucket.numel_unpadded
            buffer.param_index_map = {
                param: (start - before[bucket], end - before[bucket], bucket)
                for param, (start, end, bucket) in buffer.param_index_map.items()
            }
        yield
    finally:
        for buffer, index_map in zip(buffers, kept):
            buffer.param_index_map = index_map


def _rebased(method):
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        with _unpadded_param_offsets(self.buffers):
            return method(self, *args, **kwargs)

    return wrapped


def apply_megatron_fixes() -> None:
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    DistributedOptimizer.sharded_param_state_fully_reshardable = _rebased(
        DistributedOptimizer.sharded_param_state_fully_reshardable
    )
    _APPLIED = True
