"""Thin wrappers over Megatron-Core's pipeline schedules (``get_forward_backward_func``), groups passed in."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

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

    ``forward_step(batch, model) -> (output, loss_func | None)``. Returns what the schedule returns (the loss
    functions' reduced outputs, or raw outputs when ``loss_func`` is None) on the last stage, [] elsewhere.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
    from megatron.core.utils import get_model_config

    iterator = iter(microbatches)

    def step(data_iterator, step_model):
        return forward_step(next(data_iterator), step_model)

    func = get_forward_backward_func(pp_size=groups.pp_size)
    return func(
        forward_step_func=step,
        data_iterator=iterator,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        p2p_communicator=P2PCommunicator(pp_group=groups.pp, config=get_model_config(model)),
        pg_collection=groups.pgs,
    )


def gather_vocab(logits: torch.Tensor, groups: ParallelGroups, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits from vocab-parallel ones (tests and verification only: the loss never does this)."""
    if groups.tp_size > 1:
        parts = [torch.empty_like(logits) for _ in range(groups.tp_size)]
        dist.all_gather(parts, logits.contiguous(), group=groups.tp)
        logits = torch.cat(parts, dim=-1)
    return logits[..., :vocab_size]


@torch.no_grad()
def forward_logits(model: torch.nn.Module, groups: ParallelGroups, input_ids: torch.Tensor, vocab_size: int):
    """Full-vocabulary logits ``[b, s, vocab_size]`` on the last pipeline stage (None on other stages)."""
    input_ids = input_ids.to(groups.device)
    batch, seq = input_ids.shape
    position_ids = torch.arange(seq, device=input_ids.device).expand(batch, seq)

    def forward_step(ids, step_model):
        return step_model(ids, position_ids, None), None

    was_training = model.training
    model.eval()
    try:
        outputs = run_schedule(
            model,
            groups,
            forward_step,
            [input_ids],
            num_microbatches=1,
            seq_length=seq,
            micro_batch_size=batch,
            forward_only=True,
        )
    finally:
        model.train(was_training)
    if not groups.is_last_stage:
        return None
    return gather_vocab(outputs[0], groups, vocab_size)
