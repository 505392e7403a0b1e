"""Thin wrappers over Megatron-Core's pipeline schedules (``get_forward_backward_func``), groups passed in."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from spin_megatron.models.chunks import chunks_of
from spin_megatron.parallel.state import ParallelGroups


def run_schedule(
    model: torch.nn.Module,
    groups: ParallelGroups,
    forward_step: Callable,
    microbatches: Iterable,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool,
):
    """Run Megatron's forward(/backward) schedule over ``microbatches`` on this rank's stage.

    ``forward_step(batch, model) -> (output, loss_func | None)``: ``model`` is the chunk being run. Returns what
    the schedule returns (the loss functions' reduced outputs, or raw outputs when ``loss_func`` is None) on the
    last stage, [] elsewhere. With model chunks (interleaving) every chunk walks the micro-batches in order, and
    their number must be a multiple of the pipeline size (:func:`interleaved_microbatch_multiple`).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
    from megatron.core.utils import get_model_config

    chunks = chunks_of(model)
    microbatches = list(microbatches)

    def step(data_iterator, step_model):
        return forward_step(next(data_iterator), step_model)

    interleaved = len(chunks) > 1
    func = get_forward_backward_func(pp_size=groups.pp_size, vp_size=len(chunks) if interleaved else None)
    return func(
        forward_step_func=step,
        data_iterator=[iter(microbatches) for _ in chunks] if interleaved else iter(microbatches),
        model=chunks if interleaved else chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        p2p_communicator=P2PCommunicator(pp_group=groups.pp, config=get_model_config(chunks[0])),
        pg_collection=groups.pgs,
    )


def interleaved_microbatch_multiple(groups: ParallelGroups) -> int:
    """The interleaved schedule runs a multiple of ``pp`` micro-batches (its micro-batch groups are ``pp`` long:
    Megatron's ``microbatch_group_size_per_vp_stage``); 1 without interleaving."""
    return groups.pp_size if groups.vp_size > 1 else 1


def gather_vocab(logits: torch.Tensor, groups: ParallelGroups, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits from vocab-parallel ones (tests and verification only: the loss never does this)."""
    if groups.tp_size > 1:
        parts = [torch.empty_like(logits) for _ in range(groups.tp_size)]
        dist.all_gather(parts, logits.contiguous(), group=groups.tp)
        logits = torch.cat(parts, dim=-1)
    return logits[..., :vocab_size]


@torch.no_grad()
def forward_logits(model: torch.nn.Module, groups: ParallelGroups, input_ids: torch.Tensor, vocab_size: int):
    """Full-vocabulary logits ``[b, s, vocab_size]`` on the last pipeline stage (None on other stages). With
    model chunks each row is a micro-batch, repeated up to a multiple of the pipeline size."""
    input_ids = input_ids.to(groups.device)
    interleaved = len(chunks_of(model)) > 1
    rows = list(input_ids.split(1)) if interleaved else [input_ids]
    padded = rows + rows[-1:] * (-len(rows) % interleaved_microbatch_multiple(groups))

    def forward_step(ids, step_model):
        batch, seq = ids.shape
        position_ids = torch.arange(seq, device=ids.device).expand(batch, seq)
        return step_model(ids, position_ids, None), None

    was_training = model.training
    model.eval()
    try:
        outputs = run_schedule(
            model,
            groups,
            forward_step,
            padded,
            num_microbatches=len(padded),
            seq_length=input_ids.shape[1],
            micro_batch_size=rows[0].shape[0],
            forward_only=True,
        )
    finally:
        model.train(was_training)
    if not groups.is_last_stage:
        return None
    return gather_vocab(torch.cat(outputs[: len(rows)]), groups, vocab_size)
