"""Rank worker for test_weight_sync: perturb a Megatron model, sync it into an hf engine on the replica's first
rank, and compare the engine with the Megatron model (logits, and log-probs of the engine's own samples)."""

import argparse
import json
import sys
import zlib

import torch
import torch.distributed as dist

from spin_megatron.algorithm.logprob import vocab_parallel_logprobs
from spin_megatron.models import build_gpt_model, load_arch
from spin_megatron.models.hf_io import HFReader
from spin_megatron.models.mapping import mapping_for
from spin_megatron.models.weights import load_hf_weights, stage_parameters
from spin_megatron.parallel import destroy_parallel, init_parallel
from spin_megatron.parallel.batching import response_logps, scoring_batch
from spin_megatron.parallel.schedule import forward_logits, run_schedule
from spin_megatron.parallel.weight_sync import engine_rank, sync_weights
from spin_megatron.rollout.agreement import logprob_agreement
from spin_megatron.rollout.hf_engine import HFEngine
from spin_megatron.rollout.protocol import SamplingParams

TEMPERATURE = 0.7


@torch.no_grad()
def perturb(model, mapping, groups):
    for name, param in stage_parameters(model):
        seed = zlib.crc32(name.encode()) + (groups.tp_rank if mapping.is_tp_sharded(name) else 0)
        param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)


@torch.no_grad()
def trainer_token_logps(model, groups, ids, targets, vocab_size):
    """Per-token log-probs at the sampling temperature from the vocab-parallel logits (last stage), else None."""
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    out = run_schedule(
        model,
        groups,
        lambda b, m: (m(b, positions, None), None),
        [ids],
        num_microbatches=1,
        seq_length=ids.shape[1],
        micro_batch_size=ids.shape[0],
        forward_only=True,
    )
    if not groups.is_last_stage:
        return None
    return vocab_parallel_logprobs(
        out[0], targets, tp_group=groups.tp, temperature=TEMPERATURE, vocab_size=vocab_size
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--pp", type=int, required=True)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    groups = init_parallel(args.tp, args.pp)
    arch = load_arch(args.hf_dir)
    mapping = mapping_for(arch, arch.padded_vocab_size(groups.tp_size))
    model = build_gpt_model(arch, groups, perform_initialization=False).eval()
    load_hf_weights(model, HFReader(args.hf_dir), mapping, groups)
    perturb(model, mapping, groups)

    on_engine_rank = groups.rank == engine_rank(groups)
    engine = HFEngine.from_pretrained(args.hf_dir) if on_engine_rank else None
    ids = torch.randint(0, arch.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    before = engine.model(ids).logits.detach() if engine else None
    stats = sync_weights(model, mapping, groups, engine, bucket_bytes=96 << 10)  # many small buckets
    megatron = forward_logits(model, groups, ids, arch.vocab_size)
    gathered = [None] * groups.world_size
    dist.all_gather_object(gathered, megatron if groups.tp_rank == 0 else None)
    megatron = next(x for x in gathered if x is not None)

    samples = (
        engine.generate(
            [[1, 2, 3], [4, 5, 6, 7, 8]],
            SamplingParams(n=2, temperature=TEMPERATURE, max_new_tokens=12, seed=1),
        )
        if engine
        else None
    )
    box = [samples]
    dist.broadcast_object_list(box, src=engine_rank(groups))
    samples = box[0]
    ids2, targets = scoring_batch([s.prompt_ids for s in samples], [s.response_ids for s in samples])
    logps = trainer_token_logps(model, groups, ids2, targets, arch.vocab_size)
    gathered = [None] * groups.world_size
    dist.all_gather_object(gathered, response_logps(logps, targets) if logps is not None else None)
    ours = next(x for x in gathered if x is not None)

    if on_engine_rank:
        after = engine.model(ids).logits.detach()
        report = {
            "rel_err_after": ((after - megatron).abs().max() / megatron.abs().max()).item(),
            "changed_by_sync": ((after - before).abs().max() / before.abs().max()).item(),
            "agreement": logprob_agreement(samples, ours),
            "stats": vars(stats),
        }
        with open(args.out, "w") as f:
            json.dump(report, f)
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
