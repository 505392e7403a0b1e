"""Turning token sequences into model inputs: right-padded batches with per-token targets."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def scoring_batch(
    prompts: list[list[int]],
    responses: list[list[int]],
    *,
    pad_token_id: int = 0,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, targets)`` of shape ``[B, L]`` for scoring ``responses`` given ``prompts``.

    ``targets[b, t]`` is the token that position ``t`` predicts (``input_ids[b, t+1]``) when that token belongs
    to the response, else ``ignore_index`` — so per-token log-probs line up with the response tokens.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    targets = torch.full((len(prompts), width), ignore_index, dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        if not prompt:
            raise ValueError(f"sequence {row} has an empty prompt")
        seq = torch.tensor(prompt + response, dtype=torch.long)
        ids[row, : len(seq)] = seq
        targets[row, len(prompt) - 1 : len(seq) - 1] = torch.tensor(response, dtype=torch.long)
    return ids, targets


def response_logps(
    token_logps: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> list[torch.Tensor]:
    """Per-row log-probs of the response tokens only (the positions whose target is not ignored)."""
    return [row[t != ignore_index] for row, t in zip(token_logps, targets)]
