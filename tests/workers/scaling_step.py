"""Rank worker for test_scaling: two DPO optimizer steps of a tiny Qwen3 (QK-norm) at several layouts of
Megatron's scaling features, one after another in the same two processes, as the trainer runs them (reference
pass, packed micro-batches, Megatron DDP with the distributed optimizer).

``--layout NAME`` picks one of LAYOUTS (parallel-section overrides; the rest of the config is the same). Each
layout records the loss and grad norm of both steps (the same global pairs, split over the data-parallel ranks).
``--resume NAME``: that layout also checkpoints after the first step and resumes a fresh policy from it; the
second step must repeat bit for bit, weights included. Rank 0 writes everything with ``torch.save``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from spin_megatron.config import OptimConfig, ParallelConfig
from spin_megatron.models.builder import build_gpt_model, expose_hidden_states
from spin_megatron.models.hf_io import HFReader
from spin_megatron.models.mapping import mapping_for
from spin_megatron.models.weights import load_hf_weights, stage_parameters
from spin_megatron.parallel import destroy_parallel, init_parallel
from spin_megatron.parallel.collectives import sum_over_world
from spin_megatron.parallel.ddp import finish_param_gather
from spin_megatron.parallel.dpo_step import METRIC_SUMS, compute_reference_logps, train_step
from spin_megatron.parallel.packing import pack_items
from spin_megatron.training.checkpoint import load_checkpoint, save_checkpoint
from spin_megatron.training.policy import build_policy, parallel_build_settings, resolve_model_source
from spin_megatron.training.updates import dpo_settings
from tests.workers.loss_family import TOKEN_BUDGET, loss_config, make_pairs

PAIRS_PER_STEP = 6
OVERLAP = dict(overlap_grad_reduce=True, overlap_param_gather=True, ddp_bucket_size=2000)  # several buckets
LAYOUTS = {  # name: (ParallelConfig fields, trainer.logprob_impl)
    "tp1": (dict(tp=1), "fused_head"),
    "tp2_no_sp": (dict(tp=2, sequence_parallel=False), "fused_head"),
    "tp2_sp": (dict(tp=2), "fused_head"),  # sequence parallelism: the default at tp > 1
    "tp2_sp_logits": (dict(tp=2), "logits"),
    "dp2_overlap": (dict(tp=1, **OVERLAP), "fused_head"),
    "tp2_sp_overlap": (dict(tp=2, **OVERLAP), "fused_head"),  # dp 1: the hooks are wired, nothing to reduce
    "full": (dict(tp=1, recompute="full"), "fused_head"),
    "selective": (dict(tp=1, recompute="selective", recompute_modules=["core_attn", "mlp"]), "fused_head"),
}


def _config(hf_dir, name: str):
    parallel, logprob_impl = LAYOUTS[name]
    cfg = loss_config(hf_dir, logprob_impl=logprob_impl, loss_type="sigmoid", beta=0.5)
    # a larger eps keeps Adam's first update Lipschitz in the gradient (see test_trainer_e2e)
    cfg.optim = OptimConfig(lr=1e-3, adam_eps=1e-3, use_distributed_optimizer=True)
    cfg.parallel = ParallelConfig(**parallel)
    return cfg


def _reference(cfg, ref_dir, source, groups, fused_head):
    """A frozen model of ``ref_dir``'s weights (another model than the policy's start: the log-ratios are not all
    zero) with the policy's layout, sequence parallelism included (as policy.build_reference)."""
    model = build_gpt_model(
        source.arch, groups, padded_vocab_size=source.padded_vocab_size, perform_initialization=False,
        **parallel_build_settings(cfg),
    )  # fmt: skip
    load_hf_weights(model, HFReader(ref_dir), mapping_for(source.arch, source.padded_vocab_size), groups)
    model.requires_grad_(False)
    model.eval()
    if fused_head:
        expose_hidden_states(model)
    return model


class _Setup:
    def __init__(self, cfg, ref_dir, groups):
        self.cfg, self.groups = cfg, groups
        self.source = resolve_model_source(cfg, groups, groups.tp_size)
        self.policy = build_policy(cfg, self.source, groups)
        self.settings = dpo_settings(cfg, self.source.arch.vocab_size)
        self.reference = _reference(cfg, ref_dir, self.source, groups, self.settings.fused_head)

    def step(self, pairs):
        """One optimizer step on ``pairs`` (the global mini-batch; this rank trains its share)."""
        g = self.groups
        batches = pack_items(pairs[g.dp_rank :: g.dp_size], token_budget=TOKEN_BUDGET)
        compute_reference_logps(self.reference, g, batches, self.settings)
        sums, grad_norm, updated = train_step(
            self.policy.model, self.policy.optimizer, g, batches, self.settings, global_pairs=len(pairs),
            global_chosen_tokens=sum(len(p[0].response_ids) for p in pairs),
        )  # fmt: skip
        assert updated
        on_last = g.is_last_stage and g.tp_rank == 0
        total = sum_over_world(dict(zip(METRIC_SUMS, sums.tolist())), METRIC_SUMS, g, contribute=on_last)
        self.policy.scheduler.step(1)
        return {"loss": total["loss"] / len(pairs), "grad_norm": float(grad_norm)}

    def weights(self) -> dict[str, torch.Tensor]:
        finish_param_gather(self.policy.model)  # as the trainer does before it reads the weights
        return {n: p.detach().clone() for n, p in stage_parameters(self.policy.model)}

    def save(self, ckpt_dir):
        finish_param_gather(self.policy.model)
        state = {
            "scheduler": self.policy.scheduler.state_dict(),
            "model_signature": self.source.arch.signature(),
        }
        return save_checkpoint(ckpt_dir, 1, self.policy, self.reference, self.groups, state)


def _built(model) -> dict:
    """What the policy was really built with (the layouts must not pass by switching a feature off)."""
    config, ddp = model.config, model.ddp_config
    return {
        "sequence_parallel": config.sequence_parallel,
        "marked_norms": sum(getattr(p, "sequence_parallel", False) for p in model.parameters()),
        "recompute": (config.recompute_granularity, config.recompute_modules),
        "overlap": (ddp.overlap_grad_reduce, ddp.overlap_param_gather),
        "buckets": len(model.bucket_groups),
    }


def _resume(args, cfg, groups, items):
    """Step 1, checkpoint, step 2; then a fresh policy loads the checkpoint and takes step 2 again."""
    first = _Setup(cfg, args.ref_dir, groups)
    first.step(items[:PAIRS_PER_STEP])
    path = first.save(f"{args.ckpt_dir}/{cfg.parallel.tp}_{cfg.parallel.overlap_grad_reduce}")
    straight = first.step(items[PAIRS_PER_STEP:])
    resumed = _Setup(cfg, args.ref_dir, groups)
    load_checkpoint(
        path, resumed.policy, resumed.reference, groups, model_signature=resumed.source.arch.signature()
    )
    again = resumed.step(items[PAIRS_PER_STEP:])
    a, b = first.weights(), resumed.weights()
    same = torch.tensor([float(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))])
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return {"straight": straight, "resumed": again, "same_weights": bool(same.item())}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--ref-dir", required=True)
    parser.add_argument("--layout", action="append", required=True, choices=sorted(LAYOUTS))
    parser.add_argument("--resume", action="append", default=[], choices=sorted(LAYOUTS))
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    items = make_pairs(2 * PAIRS_PER_STEP, args.vocab_size, seed=5)
    report = {}
    for name in args.layout:
        cfg = _config(args.hf_dir, name)
        groups = init_parallel(cfg.parallel.tp, cfg.parallel.pp)
        setup = _Setup(cfg, args.ref_dir, groups)
        steps = [setup.step(items[:PAIRS_PER_STEP]), setup.step(items[PAIRS_PER_STEP:])]
        report[name] = {"steps": steps, "dp": groups.dp_size, "built": _built(setup.policy.model)}
        if name in args.resume:
            report[name]["resume"] = _resume(args, cfg, groups, items)
    if dist.get_rank() == 0:
        torch.save(report, args.out)
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
