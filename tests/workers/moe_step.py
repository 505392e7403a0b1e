"""Rank worker for test_moe_training: DPO updates of a tiny Qwen3-MoE (or Qwen3) at several layouts, one after
another in the same processes, as the trainer runs them (reference pass, packed micro-batches, Megatron DDP, the
distributed optimizer — chained over dense and expert parameters with its expert-data-parallel groups).

Per ``--layout tp.pp.ep.etp.dispatcher.aux`` (etp 0: as tp; aux: moe_aux_loss_coeff; a ``@dense`` suffix: the
Qwen3 model of ``--dense-dir`` instead, as its own reference) two optimizer steps (two mini-batches of the same
global pairs, split over the data-parallel ranks) record the loss, grad norm and MoE aux-loss sums of each, and
the gradient of the replicated QK-norm weights before the first update. With
``--resume-layout`` one layout also checkpoints after the first step and resumes a fresh policy from it: the
second step must repeat bit for bit; ``--reshard-layout`` (listed after it) loads that checkpoint at its layout. Rank 0 writes everything with ``torch.save``.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from spin_megatron.parallel.dpo_step import METRIC_SUMS, compute_reference_logps, train_step
from spin_megatron.parallel.packing import pack_items
from spin_megatron.training.checkpoint import load_checkpoint, save_checkpoint
from spin_megatron.training.policy import build_policy, moe_build_settings, resolve_model_source
from spin_megatron.training.updates import dpo_settings
from tests.workers.loss_family import TOKEN_BUDGET, loss_config, make_pairs

PAIRS_PER_STEP = 6


def _config(hf_dir, layout: str):
    tp, pp, ep, etp, dispatcher, aux = layout.split(".")[:5] + [
        layout.split(".", 5)[5].removesuffix("@dense")
    ]
    cfg = loss_config(hf_dir, loss_type="sigmoid", beta=0.5)
    # a larger eps keeps Adam's first update Lipschitz in the gradient (see test_trainer_e2e): equal weights
    # after step 1 then mean equal gradients, not equal signs of last-bit noise
    cfg.optim = OptimConfig(lr=1e-3, adam_eps=1e-3, use_distributed_optimizer=True)
    cfg.parallel = ParallelConfig(
        tp=int(tp), pp=int(pp), ep=int(ep), etp=int(etp) or None, moe_token_dispatcher=dispatcher
    )
    cfg.model = dataclasses.replace(cfg.model, moe_aux_loss_coeff=float(aux))
    return cfg


def _reference(cfg, ref_dir, source, groups, fused_head):
    model = build_gpt_model(
        source.arch, groups, padded_vocab_size=source.padded_vocab_size, perform_initialization=False,
        **moe_build_settings(cfg, source.arch),
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

    def step(self, pairs, norms=None):
        """One optimizer step on ``pairs`` (the global mini-batch; this rank trains its share)."""
        g = self.groups
        mine = pairs[g.dp_rank :: g.dp_size]
        batches = pack_items(mine, token_budget=TOKEN_BUDGET)
        compute_reference_logps(self.reference, g, batches, self.settings)
        optimizer = _NormCapture(self.policy, norms) if norms is not None else self.policy.optimizer
        sums, grad_norm, updated = train_step(
            self.policy.model, optimizer, g, batches, self.settings, global_pairs=len(pairs),
            global_chosen_tokens=sum(len(p[0].response_ids) for p in pairs),
        )  # fmt: skip
        assert updated
        on_last = g.is_last_stage and g.tp_rank == 0
        total = sum_over_world(dict(zip(METRIC_SUMS, sums.tolist())), METRIC_SUMS, g, contribute=on_last)
        self.policy.scheduler.step(1)
        return {
            "loss": total["loss"] / len(pairs),
            "grad_norm": float(grad_norm),
            "aux_sum": total["moe/load_balancing_loss/sum"],
            "aux_terms": total["moe/load_balancing_loss/terms"],
        }

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in stage_parameters(self.policy.model)}


class _NormCapture:
    """The optimizer, recording the replicated QK-norm gradients it is handed (Megatron's summed main_grad)."""

    def __init__(self, policy, out: dict):
        self.optimizer, self.model, self.out = policy.optimizer, policy.model, out

    def zero_grad(self):
        self.optimizer.zero_grad()

    def step(self):
        for name, param in stage_parameters(self.model):
            if "q_layernorm" in name or "k_layernorm" in name:
                self.out[name] = param.main_grad.detach().clone()
        return self.optimizer.step()


def _gather_norm_grads(norms: dict, groups) -> dict:
    everyone = [None] * groups.world_size
    dist.all_gather_object(everyone, norms if groups.tp_rank == 0 and groups.dp_rank == 0 else {})
    return {k: v for part in everyone for k, v in part.items()}


def run_layout(args, layout, items, report):
    dense = layout.endswith("@dense")
    cfg = _config(args.dense_dir if dense else args.hf_dir, layout)
    # a replicated optimizer: main_grad then holds the whole reduced gradient on every rank (the distributed
    # optimizer reduce-scatters it: each rank holds its shard's part only)
    cfg.optim.use_distributed_optimizer = not dense
    p = cfg.parallel
    groups = init_parallel(p.tp, p.pp, ep=p.ep, etp=p.etp)
    setup = _Setup(cfg, args.dense_dir if dense else args.ref_dir, groups)
    norms = {}
    steps = [setup.step(items[:PAIRS_PER_STEP], norms), setup.step(items[PAIRS_PER_STEP:])]
    report[layout] = {"steps": steps, "norm_grads": _gather_norm_grads(norms, groups), "dp": groups.dp_size}
    if layout == args.resume_layout:
        report["resume"] = _resume(args, cfg, groups, items)
    if layout == args.reshard_layout:  # the checkpoint written at --resume-layout, loaded at this layout
        resumed = _Setup(cfg, args.ref_dir, groups)
        sig = resumed.source.arch.signature()
        load_checkpoint(args.ckpt_dir + "/checkpoints/step_0000001", resumed.policy, resumed.reference, groups,
                        model_signature=sig)  # fmt: skip
        report["reshard"] = resumed.step(items[PAIRS_PER_STEP:])


def _resume(args, cfg, groups, items):
    """Step 1, checkpoint, step 2; then a fresh policy loads the checkpoint and takes step 2 again."""
    first = _Setup(cfg, args.ref_dir, groups)
    first.step(items[:PAIRS_PER_STEP])
    state = {
        "scheduler": first.policy.scheduler.state_dict(),
        "model_signature": first.source.arch.signature(),
    }
    path = save_checkpoint(args.ckpt_dir, 1, first.policy, first.reference, groups, state)
    straight = first.step(items[PAIRS_PER_STEP:])
    resumed = _Setup(cfg, args.ref_dir, groups)
    load_checkpoint(
        path, resumed.policy, resumed.reference, groups, model_signature=resumed.source.arch.signature()
    )
    again = resumed.step(items[PAIRS_PER_STEP:])
    a, b = first.weights(), resumed.weights()
    same = torch.tensor([float(all(torch.equal(a[k], b[k]) for k in a))])
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return {"straight": straight, "resumed": again, "same_weights": bool(same.item())}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--ref-dir", required=True)
    parser.add_argument("--layout", action="append", required=True, help="tp.pp.ep.etp.dispatcher.aux")
    parser.add_argument("--dense-dir", default=None, help="a Qwen3 model for the @dense layouts")
    parser.add_argument("--resume-layout", default=None)
    parser.add_argument("--ckpt-dir", default=None)
    parser.add_argument("--reshard-layout", default=None, help="load --resume-layout's checkpoint here")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    items = make_pairs(2 * PAIRS_PER_STEP, args.vocab_size, seed=3)
    report = {}
    for layout in args.layout:
        run_layout(args, layout, items, report)
    if dist.get_rank() == 0:
        torch.save(report, args.out)
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
