"""Rank worker for test_interleaved_pipeline: two DPO optimizer steps of a tiny 4-layer model with tied embeddings,
as the trainer runs them (reference pass, packed micro-batches, Megatron DDP per model chunk, the distributed
optimizer over all chunks), at several layouts one after another in the same two processes:

- ``dp2`` (plain: one stage), ``pp2`` (plain 1F1B), ``pp2_vpp2`` (interleaved, one layer per model chunk);
- ``pp2_vpp2_batched``: the same with Megatron's default ``batch_p2p_comm=True`` (and no overlapped p2p) — what
  the trainer must not run: it shows that the comparison sees the wrong exchange at PP=2;
- ``--resume``: at PP2×VPP2, step 1, checkpoint, step 2; a fresh policy loads the checkpoint and takes step 2
  again (bit for bit, weights included), and the same checkpoint is loaded at ``pp2`` and ``dp2`` (resharded
  from model chunks: step 2's loss and grad norm as at PP2×VPP2).

Each step has enough micro-batches (one or two pairs each) for the interleaved schedule's steady 1F1B phase, where
the forward and backward exchanges of a stage go to the same peer at PP=2. Rank 0 writes the report.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from spin_megatron.config import OptimConfig, ParallelConfig
from spin_megatron.models.weights import stage_parameters
from spin_megatron.parallel import destroy_parallel, init_parallel
from spin_megatron.parallel.collectives import sum_over_world
from spin_megatron.parallel.dpo_step import METRIC_SUMS, compute_reference_logps, train_step
from spin_megatron.parallel.packing import pack_items
from spin_megatron.training.checkpoint import load_checkpoint, save_checkpoint
from spin_megatron.training.policy import build_policy, resolve_model_source
from spin_megatron.training.updates import dpo_settings
from tests.workers.loss_family import build_reference_model, loss_config, make_pairs

PAIRS_PER_STEP = 7
TOKEN_BUDGET = 32  # a pair is 10–36 tokens: mostly one pair per micro-batch, ≥ 5 micro-batches a step
LAYOUTS = {
    "dp2": dict(pp=1),
    "pp2": dict(pp=2),
    "pp2_vpp2": dict(pp=2, vpp=2),
    "pp2_vpp2_batched": dict(pp=2, vpp=2),
}


class Setup:
    def __init__(self, args, name: str):
        cfg = loss_config(args.hf_dir, loss_type="sigmoid", beta=0.5)
        # a larger eps keeps Adam's first update Lipschitz in the gradient (see test_trainer_e2e)
        cfg.optim = OptimConfig(lr=1e-3, adam_eps=1e-3, use_distributed_optimizer=True)
        cfg.parallel = ParallelConfig(**LAYOUTS[name])
        p = cfg.parallel
        self.groups = g = init_parallel(p.tp, p.pp, vpp=p.vpp)
        self.source = resolve_model_source(cfg, g, g.tp_size)
        self.policy = build_policy(cfg, self.source, g)
        self.settings = dpo_settings(cfg, self.source.arch.vocab_size)
        self.reference = build_reference_model(
            args.ref_dir, self.source, g, fused_head=self.settings.fused_head
        )
        if name.endswith("_batched"):  # Megatron's default exchange (the schedule reads the shared config)
            self.policy.model.config.batch_p2p_comm, self.policy.model.config.overlap_p2p_comm = True, False

    def step(self, pairs) -> dict:
        g = self.groups
        batches = pack_items(pairs[g.dp_rank :: g.dp_size], token_budget=TOKEN_BUDGET)
        packed = len(batches)  # the interleaved schedule adds placeholders up to a multiple of PP
        compute_reference_logps(self.reference, g, batches, self.settings)
        sums, grad_norm, updated = train_step(
            self.policy.model, self.policy.optimizer, g, batches, self.settings, global_pairs=len(pairs),
            global_chosen_tokens=sum(len(p[0].response_ids) for p in pairs),
        )  # fmt: skip
        assert updated
        on_last = g.is_last_stage and g.tp_rank == 0
        total = sum_over_world(dict(zip(METRIC_SUMS, sums.tolist())), METRIC_SUMS, g, contribute=on_last)
        self.policy.scheduler.step(1)
        counts = {"packed": packed, "micro_batches": len(batches)}
        return {"loss": total["loss"] / len(pairs), "grad_norm": float(grad_norm), **counts}

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in stage_parameters(self.policy.model)}


def resume(args, items) -> dict:
    first, steps = Setup(args, "pp2_vpp2"), (items[:PAIRS_PER_STEP], items[PAIRS_PER_STEP:])
    first.step(steps[0])
    state = {
        "scheduler": first.policy.scheduler.state_dict(),
        "model_signature": first.source.arch.signature(),
    }
    path = save_checkpoint(args.ckpt_dir, 1, first.policy, first.reference, first.groups, state)
    report = {"straight": first.step(steps[1])}
    for name in ("pp2_vpp2", "pp2", "dp2"):
        again = Setup(args, name)
        signature = again.source.arch.signature()
        load_checkpoint(path, again.policy, again.reference, again.groups, model_signature=signature)
        report[name] = again.step(steps[1])
        if name == "pp2_vpp2":
            a, b = first.weights(), again.weights()
            same = torch.tensor([float(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))])
            dist.all_reduce(same, op=dist.ReduceOp.MIN)
            report["same_weights"] = bool(same.item())
    return report


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--ref-dir", required=True)
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    items = make_pairs(2 * PAIRS_PER_STEP, args.vocab_size, seed=7)
    report = {}
    for name in LAYOUTS:
        setup = Setup(args, name)
        report[name] = [setup.step(items[:PAIRS_PER_STEP]), setup.step(items[PAIRS_PER_STEP:])]
    report["resume"] = resume(args, items)
    if dist.get_rank() == 0:
        torch.save(report, args.out)
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
