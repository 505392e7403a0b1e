"""The model chunks of one pipeline rank under interleaved pipelining (virtual pipeline stages, ``parallel.vpp``).

With ``vpp`` chunks per rank the layers are cut into ``pp·vpp`` virtual stages; rank ``r`` holds the virtual
stages ``r, r + pp, r + 2·pp, …`` as its chunks ``0, 1, …`` (Megatron's layout: ``vp_stage`` = the chunk index).
The embedding lives in chunk 0 of pipeline rank 0, the final norm and output layer in the last chunk of the last
rank. Megatron's schedules, DDP and optimizer take the chunks as a list; :class:`ModelChunks` holds that list as
one module, so what treats a model as a whole (``train()``/``eval()``, ``parameters()``, ``requires_grad_``) works
unchanged, and :func:`chunks_of` gives the list to what must see the chunks (schedule, export, checkpoints).
Without interleaving a model is its own single chunk: nothing is wrapped.
"""

from __future__ import annotations

import torch


class ModelChunks(torch.nn.Module):
    """``vpp`` model chunks of one pipeline rank, in chunk (= layer) order."""

    def __init__(self, chunks: list[torch.nn.Module]):
        super().__init__()
        self.chunks = torch.nn.ModuleList(chunks)

    @property
    def config(self):
        """Megatron's TransformerConfig: one object shared by all chunks (the schedule reads chunk 0's)."""
        return self.chunks[0].config

    def zero_grad_buffer(self) -> None:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()

    def forward(self, *args, **kwargs):
        raise TypeError("model chunks run through the pipeline schedule (run_schedule), one chunk at a time")


def chunks_of(model: torch.nn.Module | list) -> list[torch.nn.Module]:
    """The chunks of ``model`` in order: a ModelChunks' list, a list as given, else ``[model]``."""
    if isinstance(model, ModelChunks):
        return list(model.chunks)
    if isinstance(model, (list, tuple)):
        return list(model)
    return [model]


def as_model(chunks: list[torch.nn.Module]) -> torch.nn.Module:
    """One module for ``chunks``: the chunk itself when there is one, else :class:`ModelChunks`."""
    return chunks[0] if len(chunks) == 1 else ModelChunks(chunks)
