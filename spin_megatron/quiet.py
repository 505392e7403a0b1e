"""Library messages a user cannot act on, kept off the console at their source (our own warnings stay).

Each entry names who emits it and why it says nothing to a user of this trainer. Applied by the entry points
(``spin-train``, ``spin-convert``) on every rank, before the libraries are used.
"""

from __future__ import annotations

import warnings

import torch

KNOWN_NOISE = (
    # Megatron-Core 0.16.1 calls these torch.distributed APIs (deprecated in torch 2.13); nothing to change here
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
    # Megatron's optimizer zero_grad touches .grad of the distributed optimizer's main-parameter shards (views)
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed"),
)
# advice about CUDA streams that means nothing without CUDA (on a GPU it stays: it is actionable there)
CPU_ONLY_NOISE = ((UserWarning, r"When using async grad allreduce it is recommended to set the environment"),)


def silence_library_noise() -> None:
    for category, message in KNOWN_NOISE + (() if torch.cuda.is_available() else CPU_ONLY_NOISE):
        warnings.filterwarnings("ignore", message=message, category=category)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars of the tiny model and the HF export
