"""Running the model over packed micro-batches, at any layout: the forward of one micro-batch, the output-layer
weight of a stage, per-token log-probs (vocab-parallel logits or the fused head; gathered over CP), and the
schedule call that pads the micro-batches as the layout needs (EP alignment, interleaved-PP count, SP row
length, CP split). The losses in ``dpo_step.py`` are ``loss_func`` s of :func:`run_packed`."""

from __future__ import annotations

from functools import partial

import torch

from spin_megatron.algorithm.logprob import fused_head_logprobs, vocab_parallel_logprobs
from spin_megatron.models.chunks import chunks_of
from spin_megatron.models.weights import unwrap
from spin_megatron.parallel.batching import IGNORE_INDEX
from spin_megatron.parallel.context_parallel import gather_tokens, local_part, split_for_cp
from spin_megatron.parallel.packing import (
    PackedMicroBatch,
    align_micro_batches,
    pad_lengths_to_multiple,
    pad_micro_batch_count,
)
from spin_megatron.parallel.schedule import interleaved_microbatch_multiple, run_schedule


def forward_batch(batch: PackedMicroBatch, model, *, keep_dtype: bool = False):
    """The model's output for one micro-batch. ``keep_dtype``: a bf16 policy (Float16Module) returns its output
    in bf16 instead of upcasting it to fp32. Both log-prob paths ask for it: the fused head casts hidden states
    back to the head's dtype, and the logits path upcasts chunk by chunk (chunked) or inside its kernel (TE), so the
    upcast would only cost memory — a [T, V] fp32 copy of the logits and its gradient — and is exact either way."""
    kwargs = {"packed_seq_params": batch.packed_seq_params()}
    if _is_moe(model):  # padding stays out of the routers' load-balancing loss
        kwargs["padding_mask"] = _padding_mask(batch, model)
    if keep_dtype and _is_float16_wrapped(model):
        kwargs["fp32_output"] = False
    return model(batch.input_ids, batch.position_ids, None, **kwargs)


def _padding_mask(batch: PackedMicroBatch, model) -> torch.Tensor:
    """The MoE routers' padding mask ``[1, T]``. With sequence parallelism Megatron-Core 0.16.1 splits it over the
    TP ranks on the first pipeline stage only (``GPTModel.forward``, in its embedding branch); a later stage's
    routers would get the whole row against their share of the tokens, so it is split here for them, as the first
    stage does."""
    mask = batch.padding_mask()
    gpt = unwrap(model)
    if gpt.pre_process or not gpt.config.sequence_parallel:
        return mask
    from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

    return scatter_to_sequence_parallel_region(mask.transpose(0, 1).contiguous()).transpose(0, 1).contiguous()


def _sequence_parallel(model) -> bool:
    from megatron.core.utils import get_model_config

    return bool(get_model_config(chunks_of(model)[0]).sequence_parallel)


def _is_moe(model) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "num_moe_experts", None))


def _is_float16_wrapped(model) -> bool:
    from megatron.core.transformer.module import Float16Module

    while not isinstance(model, Float16Module) and hasattr(model, "module"):
        model = model.module
    return isinstance(model, Float16Module)


def token_logprobs(output, batch, groups, settings, temperature: float = 1.0, weight=None, stats=()):
    """Per-token log-probs ``[1, T]`` of ``batch`` (and, with ``stats``, the detached per-token statistics) from
    this rank's model output. Context parallel: computed on this CP rank's tokens, then gathered over CP into the
    full micro-batch's layout, so the losses and metrics see what they see at CP=1."""
    part = local_part(batch)
    result = _local_token_logps(output, part, groups, settings, temperature, weight, stats)
    if part is batch:
        return result
    logps, values = result if stats else (result, {})
    gather = partial(gather_tokens, part=part, group=groups.cp, full_shape=batch.targets.shape)
    return (gather(logps), {k: gather(v) for k, v in values.items()}) if stats else gather(logps)


def _local_token_logps(output, batch, groups, settings, temperature: float = 1.0, weight=None, stats=()):
    """Per-token log-probs from vocab-parallel logits, or (fused head) from hidden states and the head weight.
    With ``stats`` (names of logprob.TOKEN_STATS): ``(log-probs, {name: detached per-token values})``."""
    if settings.fused_head:
        # Only the scored (response) positions go through the output layer: prompts and padding cost nothing.
        targets = batch.targets.reshape(-1)
        scored = torch.nonzero(targets != IGNORE_INDEX).squeeze(1)
        hidden = output.reshape(-1, output.shape[-1]).index_select(0, scored)
        picked = fused_head_logprobs(
            hidden,
            weight,
            targets.index_select(0, scored),
            tp_group=groups.tp,
            temperature=temperature,
            vocab_size=settings.vocab_size,
            chunk_tokens=settings.chunk_tokens,
            stats=stats,
        )
        picked, values = picked if stats else (picked, {})

        def spread(x):
            full = torch.zeros(targets.shape, dtype=x.dtype, device=x.device)
            return full.index_copy(0, scored, x).view(batch.targets.shape)

        logps = spread(picked)
        return (logps, {k: spread(v) for k, v in values.items()}) if stats else logps
    return vocab_parallel_logprobs(
        output,
        batch.targets,
        tp_group=groups.tp,
        vocab_size=settings.vocab_size,
        chunk_tokens=settings.chunk_tokens,
        temperature=temperature,
        stats=stats,
    )


def settings_fused(loss_for_batch) -> bool:
    settings = getattr(loss_for_batch, "keywords", {}).get("settings")
    return bool(settings is not None and settings.fused_head)


def head_weight(model):
    """The (vocab-parallel) output-layer weight of this stage, tied or not."""
    # Not shared_embedding_or_output_weight() alone: on a stage that holds the embedding it returns the INPUT
    # embedding even when the head is untied (Qwen2.5-7B, Llama), and the log-probs would be computed with it.
    model = unwrap(model)
    head = getattr(model, "output_layer", None)
    if head is not None and getattr(head, "weight", None) is not None:
        return head.weight  # untied, or the last stage's copy of a tied head
    return model.shared_embedding_or_output_weight()


def run_packed(model, groups, batches, loss_for_batch, *, forward_only: bool):
    if groups.ep_size > 1:  # MoE token dispatch is a collective across the replicas: same micro-batch shapes
        align_micro_batches(batches, groups.dp)
    pad_micro_batch_count(batches, interleaved_microbatch_multiple(groups))
    if _sequence_parallel(model):  # rows are split along the sequence over the TP ranks
        pad_lengths_to_multiple(batches, groups.tp_size)
    seq_length = batches[0].input_ids.shape[1]
    if groups.cp_size > 1:  # the model runs on this CP rank's part; the loss sees the whole micro-batch
        row_multiple = groups.tp_size if _sequence_parallel(model) else 1
        seq_length = split_for_cp(batches, groups.cp_size, groups.cp_rank, row_multiple)

    def forward_step(batch, step_model):
        fused = settings_fused(loss_for_batch)
        weight = head_weight(step_model) if fused else None
        output = forward_batch(local_part(batch), step_model, keep_dtype=True)
        return output, partial(loss_for_batch, batch, weight=weight)

    return run_schedule(
        model,
        groups,
        forward_step,
        batches,
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=1,
        forward_only=forward_only,
    )
