"""Train–rollout agreement: how far the engine's log-probs of its own samples are from the trainer's.

After a weight sync both should score the sampled tokens identically (up to kernels and dtype); a jump in
``rollout/logp_diff`` is the signature of a broken or stale sync.
"""

from __future__ import annotations

import torch

from spin_megatron.types import Sample


def logprob_agreement(samples: list[Sample], trainer_logps: list[torch.Tensor]) -> dict[str, float]:
    """Mean and max |logp_trainer − logp_engine| over all sampled tokens of samples that carry engine log-probs."""
    if len(samples) != len(trainer_logps):
        raise ValueError(f"{len(samples)} samples but {len(trainer_logps)} trainer log-prob rows")
    diffs = []
    for sample, ours in zip(samples, trainer_logps):
        if sample.logprobs is None:
            continue
        if len(sample.logprobs) != ours.numel():
            raise ValueError(
                f"prompt {sample.prompt_id!r} sample {sample.sample_index}: engine gave {len(sample.logprobs)} "
                f"log-probs for {ours.numel()} trainer-scored tokens"
            )
        diffs.append((ours.detach().float().cpu() - torch.tensor(sample.logprobs, dtype=torch.float32)).abs())
    if not diffs:
        return {}
    flat = torch.cat(diffs)
    return {"rollout/logp_diff": flat.mean().item(), "rollout/logp_diff_max": flat.max().item()}
