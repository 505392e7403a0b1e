"""Rank worker for test_context_parallel, two parts in one launch; rank 0 writes a JSON report.

1. Model level, in float64: a tiny Qwen2 on packed micro-batches at CP=1 (each rank alone), then at CP=2 (the
   splitter, SDPACoreAttention's all-gather of keys/values, Megatron's packed RoPE at global positions, the token
   gather of both log-prob paths); per-token log-probs, a DPO-like loss and every parameter's gradient (summed over
   CP) compared.
2. Trainer level (``--ref-dir``): two DPO optimizer steps as the trainer runs them (reference pass, Megatron DDP,
   distributed optimizer) at DP2 and at CP2 (tests/workers/scaling_step.py's set-up), and at CP2 a checkpoint after
   the first step that a fresh policy resumes from: the second step must repeat bit for bit, weights included.
"""

import argparse
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from spin_megatron.models import build_gpt_model, load_arch
from spin_megatron.models.builder import expose_hidden_states
from spin_megatron.models.hf_io import HFReader
from spin_megatron.models.mapping import mapping_for
from spin_megatron.models.weights import load_hf_weights
from spin_megatron.parallel import destroy_parallel, init_parallel
from spin_megatron.parallel.context_parallel import local_part, split_for_cp
from spin_megatron.parallel.dpo_step import DPOSettings
from spin_megatron.parallel.forward import forward_batch, head_weight, token_logprobs
from spin_megatron.parallel.packing import ScoredSequence, pack_items, sequence_sums

# (prompt, response) lengths: none a multiple of 4 (= 2·CP), a 1-token response, a long one
DTYPE = torch.float64  # exact up to float64 rounding: a wrong token, position or mask cannot hide
PAIRS = [((5, 3), (5, 6)), ((2, 7), (2, 1)), ((9, 2), (9, 11)), ((3, 6), (3, 5))]


def micro_batches(vocab: int):
    gen = torch.Generator().manual_seed(3)

    def seq(prompt, response):
        ids = torch.randint(0, vocab, (prompt + response,), generator=gen).tolist()
        return ScoredSequence(ids[:prompt], ids[prompt:])

    items = [[seq(*chosen), seq(*rejected)] for chosen, rejected in PAIRS]
    # two micro-batches of different lengths: the CP split pads both to one row length
    return pack_items(items, token_budget=60)


def run(model, groups, batches, settings):
    """Per-token log-probs of every micro-batch, and the loss; gradients accumulate in the model."""
    logps, loss = [], 0.0
    for batch in batches:
        output = forward_batch(local_part(batch), model)
        weight = head_weight(model) if settings.fused_head else None
        token_logps = token_logprobs(output, batch, groups, settings, weight=weight)
        sums = sequence_sums(token_logps, batch)
        batch_loss = -F.logsigmoid(0.5 * (sums[0::2] - sums[1::2])).sum() + 0.01 * token_logps.pow(2).sum()
        batch_loss.backward()
        logps.append(token_logps.detach())
        loss += batch_loss.item()
    return torch.cat(logps, dim=1), loss


def case(hf_dir, groups, fused_head: bool):
    arch = load_arch(hf_dir)
    mapping = mapping_for(arch, arch.padded_vocab_size(groups.tp_size))
    model = build_gpt_model(
        arch, groups, dtype=DTYPE, perform_initialization=False, calculate_per_token_loss=True
    )
    load_hf_weights(model, HFReader(hf_dir), mapping, groups)
    if fused_head:
        expose_hidden_states(model)
    settings = DPOSettings(beta=0.1, vocab_size=arch.vocab_size, chunk_tokens=16, fused_head=fused_head)
    batches = micro_batches(arch.vocab_size)
    length = None
    if groups.cp_size > 1:
        length = split_for_cp(batches, groups.cp_size, groups.cp_rank)
    logps, loss = run(model, groups, batches, settings)
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        if groups.cp_size > 1:  # CP ranks hold the same weights: their gradients add up (Megatron: DP×CP)
            dist.all_reduce(grad, group=groups.cp)
        grads[name] = grad
    return {"logps": logps, "loss": loss, "grads": grads, "length": length}


# the per-position losses: LD-DPO weighs each token by where it lies in its response, WPO each pair by the
# policy's per-token probabilities; both see the gathered micro-batch at CP
VARIANTS = {
    "": dict(loss_type="sigmoid"),
    "_ld_wpo": dict(loss_type="sigmoid", ld_alpha=0.5, use_weighting=True),
}


def trainer_steps(args):
    """Loss and grad norm of two DPO steps at DP2 and CP2 (each loss variant), and the CP2 resume (see the module
    docstring)."""
    from spin_megatron.config import OptimConfig, ParallelConfig
    from tests.workers.loss_family import loss_config, make_pairs
    from tests.workers.scaling_step import PAIRS_PER_STEP, _resume, _Setup

    items = make_pairs(2 * PAIRS_PER_STEP, 200, seed=5)
    out = {}
    for layout, cp in (("dp2", 1), ("cp2", 2)):
        groups = init_parallel(1, 1, cp=cp)
        for variant, algorithm in VARIANTS.items():
            cfg = loss_config(args.hf_dir, beta=0.5, **algorithm)
            cfg.optim = OptimConfig(lr=1e-3, adam_eps=1e-3, use_distributed_optimizer=True)
            cfg.parallel = ParallelConfig(cp=cp)
            setup = _Setup(cfg, args.ref_dir, groups)
            out[layout + variant] = [setup.step(items[:PAIRS_PER_STEP]), setup.step(items[PAIRS_PER_STEP:])]
            if cp > 1 and not variant:
                args.ckpt_dir = f"{args.out}.ckpt"
                out["resume"] = _resume(args, cfg, groups, items)
    return out


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--cp", type=int, default=2)
    parser.add_argument("--ref-dir", help="a second tiny Qwen2: the reference of the trainer-level part")
    parser.add_argument("--out", required=True)
    parser.add_argument("hf_dir")
    args = parser.parse_args()
    paths = {"logits": False, "fused_head": True}
    groups = init_parallel(args.tp, 1)
    plain = {path: case(args.hf_dir, groups, fused) for path, fused in paths.items()}
    groups = init_parallel(args.tp, 1, cp=args.cp)
    report = {}
    for path, fused_head in paths.items():
        split, plain_case = case(args.hf_dir, groups, fused_head), plain[path]
        report[path] = {
            "logps": rel(split["logps"], plain_case["logps"]),
            "loss": abs(split["loss"] - plain_case["loss"]) / abs(plain_case["loss"]),
            "grad": max(rel(split["grads"][k], plain_case["grads"][k]) for k in plain_case["grads"]),
            "row_length": split["length"],
            "cp_rank": groups.cp_rank,
            "dp_size": groups.dp_size,
        }
    if args.ref_dir:
        report["steps"] = trainer_steps(args)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f)
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
