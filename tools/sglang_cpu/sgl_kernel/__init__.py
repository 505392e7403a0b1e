"""A stand-in for SGLang's CPU kernel package ``sgl_kernel``, for running a real SGLang 0.5.23 server on a CPU
without AMX (tests and CI only; never on a GPU machine, where the real package is installed).

The CPU kernel build's source is not on PyPI. On this path SGLang calls exactly one of its functions,
``assign_req_to_token_pool_cpu`` (``sglang/srt/mem_cache/allocation.py``), written here in plain torch. Other
names are imported from ``sgl_kernel`` at import time but not called without AMX: they resolve to a function
that raises, naming itself, if it ever is called, so a new code path fails loudly instead of computing garbage.
"""

from __future__ import annotations

import torch

IS_STAND_IN = True  # tests check this to know they run against the stand-in, not the kernel build


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """``req_to_token[req_pool_indices[i], start[i]:end[i]] = `` the next ``end[i] - start[i]`` entries of
    ``out_cache_loc`` (consumed in order over i): the KV-cache slots of each request's new tokens."""
    del pool_len  # the row length; a tensor row already knows it
    consumed = 0
    starts, ends, rows = start_offset.tolist(), end_offset.tolist(), req_pool_indices.tolist()
    for row, start, end in zip(rows, starts, ends):
        count = end - start
        if count <= 0:
            continue
        req_to_token[row, start:end] = out_cache_loc[consumed : consumed + count].to(req_to_token.dtype)
        consumed += count


def _not_available(name: str):
    def missing(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not provided by the CPU test stand-in (tools/sglang_cpu/sgl_kernel); "
            "this SGLang code path needs the real CPU kernel build"
        )

    missing.__name__ = name
    return missing


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _not_available(name)
