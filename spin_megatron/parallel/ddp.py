"""Megatron DDP's communication settings: overlapped gradient reduce-scatter and parameter all-gather.

``parallel.overlap_grad_reduce``: each bucket of ``parallel.ddp_bucket_size`` parameters starts its gradient
reduce-scatter (all-reduce without the distributed optimizer) asynchronously as soon as the backward of the last
micro-batch has produced all of its gradients, while the backward goes on through the earlier layers;
``finalize_model_grads`` waits for them. ``parallel.overlap_param_gather`` (distributed optimizer only): the
optimizer step no longer all-gathers the updated parameter shards; each bucket's all-gather is dispatched at the
next forward, and a forward pre-hook on every module waits for the bucket of its own parameters. Both default to
on where the trainer runs on CUDA (NCCL overlaps with compute there) and off on the CPU, where gloo's collectives
run on the same cores as the compute (both are tested on CPU: identical losses and gradients).

Parameters are read outside a forward pass — weight sync to the rollout engine, the reference refresh, checkpoints,
the HF export — so after an optimizer step with ``overlap_param_gather`` :func:`finish_param_gather` must run
first: until the next forward, a rank holds the updated values of its own shard only.
"""

from __future__ import annotations

from spin_megatron.errors import ConfigError

# Megatron-LM's default when overlapping (training/training.py): max(40M, 1M·DP) parameters per bucket
_DEFAULT_BUCKET, _DEFAULT_BUCKET_PER_DP = 40_000_000, 1_000_000


def overlap_settings(parallel, *, distributed_optimizer: bool, cuda: bool) -> tuple[bool, bool]:
    """``(overlap_grad_reduce, overlap_param_gather)``: the config's, or (null) on with CUDA. The parameter
    all-gather exists only with the distributed optimizer: without it, null is off and true is an error."""
    grad = cuda if parallel.overlap_grad_reduce is None else parallel.overlap_grad_reduce
    param = parallel.overlap_param_gather
    if param and not distributed_optimizer:
        raise ConfigError(
            "parallel.overlap_param_gather overlaps the distributed optimizer's parameter all-gather, but "
            "optim.use_distributed_optimizer=false (no all-gather): set one of them the other way"
        )
    if param is None:
        param = cuda and distributed_optimizer
    return grad, param


def bucket_size(parallel, *, overlap: bool, dp_size: int) -> int | None:
    """Parameters per DDP bucket: ``parallel.ddp_bucket_size``; null: Megatron-LM's default when overlapping, else
    None (one bucket per buffer: nothing to overlap)."""
    if parallel.ddp_bucket_size is not None or not overlap:
        return parallel.ddp_bucket_size
    return max(_DEFAULT_BUCKET, _DEFAULT_BUCKET_PER_DP * dp_size)


def ddp_config(parallel, *, distributed_optimizer: bool, cuda: bool, dp_size: int):
    """Megatron's ``DistributedDataParallelConfig`` for the policy."""
    from megatron.core.distributed import DistributedDataParallelConfig

    grad, param = overlap_settings(parallel, distributed_optimizer=distributed_optimizer, cuda=cuda)
    bucket = bucket_size(parallel, overlap=grad or param, dp_size=dp_size)
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=grad,
        overlap_param_gather=param,
        # model chunks (interleaving): the schedule dispatches each chunk's all-gather before its first forward
        # (param_sync_func); one chunk: each bucket's wait dispatches the next bucket's all-gather (aligned, every
        # bucket would be dispatched only when first needed: no overlap)
        align_param_gather=param and getattr(parallel, "vpp", 1) > 1,
        use_distributed_optimizer=distributed_optimizer,
        bucket_size=bucket,  # None: one bucket per buffer (nothing to overlap)
    )


def attach_sync_hooks(config, chunks: list) -> None:
    """Hand the DDP hooks to Megatron's forward-backward schedules, as Megatron-LM's training loop does:
    ``no_sync`` (no reduction before the last micro-batch), and with overlap the per-chunk ``start_grad_sync`` /
    ``start_param_sync`` that the pipeline schedules call as each model chunk finishes its last backward / before
    its first forward. ``chunks``: the DDP-wrapped model chunks (one without interleaving)."""
    ddp = chunks[0].ddp_config
    one = len(chunks) == 1
    config.no_sync_func = chunks[0].no_sync if one else [c.no_sync for c in chunks]
    if ddp.overlap_grad_reduce:
        config.grad_sync_func = chunks[0].start_grad_sync if one else [c.start_grad_sync for c in chunks]
    if ddp.overlap_param_gather and ddp.align_param_gather:
        config.param_sync_func = chunks[0].start_param_sync if one else [c.start_param_sync for c in chunks]


def finish_param_gather(model) -> None:
    """Complete the parameter all-gather that ``overlap_param_gather`` defers to the next forward pass, so the
    parameters can be read (weight sync, reference refresh, checkpoint, export). A no-op without it. ``model``: the
    DDP-wrapped policy (or its model chunks)."""
    from spin_megatron.models.chunks import chunks_of

    for chunk in chunks_of(model):
        if getattr(chunk, "use_forward_hook", False):
            chunk.start_param_sync(force_sync=True)
