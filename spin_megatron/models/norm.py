"""RMSNorm for Megatron's local layer spec (no TransformerEngine), usable with sequence parallelism.

Megatron's own torch fallback (``transformer/torch_norm.py``, ``WrappedTorchNorm``) refuses
``sequence_parallel``. With sequence parallelism the residual stream between the tensor-parallel regions is split
along the sequence over the TP ranks, so each rank's norm weight sees only its own tokens and its gradient is a
partial sum: Megatron's ``finalize_model_grads`` (``_allreduce_non_tensor_model_parallel_grads``) all-reduces it
over TP when the weight carries ``sequence_parallel=True``, as TE's norms mark theirs. The forward is torch's
``RMSNorm``, so the numerics are those of the fallback.
"""

from __future__ import annotations

import torch

from spin_megatron.errors import ConfigError


class RMSNorm(torch.nn.RMSNorm):
    """A norm of the residual stream (layer norms, final norm): its weight is marked ``sequence_parallel`` when
    the model is built with sequence parallelism."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization != "RMSNorm":
            raise ConfigError(f"normalization {config.normalization!r}: only RMSNorm models are supported")
        super().__init__(normalized_shape=hidden_size, eps=eps)
        self.weight.sequence_parallel = self.marks_sequence_parallel and bool(config.sequence_parallel)

    marks_sequence_parallel = True


class HeadRMSNorm(RMSNorm):
    """Qwen3's QK-norm over one head's channels: it runs after the QKV projection has gathered the sequence, on
    this rank's heads, so it is never sequence-split (its gradient is summed over TP by Megatron's
    ``qk_layernorm`` rule in ``finalize_model_grads``, with or without sequence parallelism)."""

    marks_sequence_parallel = False
