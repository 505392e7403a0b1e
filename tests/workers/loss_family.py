"""One DPO ``train_step`` of the Megatron policy over packed micro-batches, as the trainer runs it (reference
pass, aot batch terms, update), returning the gradient the optimizer received under HF parameter names.

Imported by test_loss_family_packed (DP=1, in process) and run as a rank worker (DP=2): every rank builds the
same pairs and trains on its share; rank 0 saves each loss type's gradient and grad norm with ``torch.save``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from spin_megatron.config import (
    AlgorithmConfig,
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RolloutConfig,
    TrainerConfig,
)
from spin_megatron.models.builder import build_gpt_model, expose_hidden_states
from spin_megatron.models.hf_io import HFReader
from spin_megatron.models.mapping import mapping_for
from spin_megatron.models.weights import load_hf_weights, stage_parameters
from spin_megatron.parallel.dpo_step import compute_reference_logps, prepare_batch_terms, train_step
from spin_megatron.parallel.packing import ScoredSequence, pack_items
from spin_megatron.training.policy import build_policy, resolve_model_source
from spin_megatron.training.updates import dpo_settings

TOKEN_BUDGET = 64  # a pair is 10–36 tokens: every step spreads over several micro-batches


def make_pairs(num_pairs: int, vocab_size: int, seed: int = 0) -> list[list[ScoredSequence]]:
    """Random (chosen, rejected) pairs sharing a prompt; response lengths differ, either one being longer."""
    gen = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(1, vocab_size, (n,), generator=gen).tolist()

    items = []
    for _ in range(num_pairs):
        prompt = tokens(int(torch.randint(3, 7, (), generator=gen)))
        lengths = torch.randint(2, 12, (2,), generator=gen).tolist()
        if lengths[0] == lengths[1]:
            lengths[1] += 3
        items.append([ScoredSequence(prompt, tokens(n)) for n in lengths])
    return items


def loss_config(hf_dir: str, *, logprob_impl: str = "fused_head", **algorithm) -> Config:
    return Config(
        model=ModelConfig(hf_path=str(hf_dir)),
        data=DataConfig(train_files=[], val_files=[]),
        rollout=RolloutConfig(engine="replay", replay_path="unused", n=1),
        algorithm=AlgorithmConfig(mode="spin", **algorithm),
        # a replicated optimizer: every rank's grad buffer holds the whole reduced gradient
        optim=OptimConfig(use_distributed_optimizer=False),
        trainer=TrainerConfig(test_freq=0, logprob_impl=logprob_impl, logprob_chunk_tokens=16),
    )


class GradCapture:
    """The optimizer, recording the gradient it is handed (before clipping scales it in place)."""

    def __init__(self, optimizer, model, mapping):
        self.optimizer, self.model, self.mapping = optimizer, model, mapping
        self.grads: dict[str, torch.Tensor] = {}

    def zero_grad(self):
        self.optimizer.zero_grad()

    def step(self):
        self.grads = hf_gradients(self.model, self.mapping)
        return self.optimizer.step()


def hf_gradients(model, mapping) -> dict[str, torch.Tensor]:
    """The reduced gradient (Megatron DDP's ``main_grad``) of each parameter, mapped to HF names and shapes.
    The mapping is linear (splits and concatenations), so it maps gradients as it maps weights; the output
    layer's padded vocabulary rows are kept under ``<name>:padding`` (they must stay zero)."""
    grads = {}
    for name, param in stage_parameters(model):
        grad = param.main_grad.detach().clone()
        if name in ("output_layer.weight", "embedding.word_embeddings.weight"):
            grads[f"{name}:padding"] = grad[mapping.arch.vocab_size :]
        grads.update(mapping.to_hf(name, [grad]))
    return grads


def build_reference_model(ref_dir: str, source, groups, *, fused_head: bool):
    """A frozen Megatron model holding ``ref_dir``'s weights (a different model than the policy's start, so
    that the log-ratios — and so the losses' pairings — are not all zero)."""
    model = build_gpt_model(
        source.arch, groups, padded_vocab_size=source.padded_vocab_size, perform_initialization=False
    )
    load_hf_weights(model, HFReader(ref_dir), mapping_for(source.arch, source.padded_vocab_size), groups)
    model.requires_grad_(False)
    model.eval()
    if fused_head:
        expose_hidden_states(model)
    return model


def run_step(cfg: Config, ref_dir: str, groups, items, *, global_pairs: int, global_chosen_tokens: int):
    """A fresh policy, one trainer update on ``items`` (this rank's pairs). Returns (HF-named gradient, grad
    norm, number of micro-batches)."""
    source = resolve_model_source(cfg, groups, groups.tp_size)
    policy = build_policy(cfg, source, groups)
    settings = dpo_settings(cfg, source.arch.vocab_size)
    reference = build_reference_model(ref_dir, source, groups, fused_head=settings.fused_head)
    batches = pack_items(items, token_budget=TOKEN_BUDGET)
    compute_reference_logps(reference, groups, batches, settings)
    prepare_batch_terms(policy.model, groups, batches, settings)
    optimizer = GradCapture(
        policy.optimizer, policy.model, mapping_for(source.arch, source.padded_vocab_size)
    )
    _, grad_norm, updated = train_step(
        policy.model,
        optimizer,
        groups,
        batches,
        settings,
        global_pairs=global_pairs,
        global_chosen_tokens=global_chosen_tokens,
    )
    assert updated
    return optimizer.grads, float(grad_norm), len(batches)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--ref-dir", required=True)
    parser.add_argument("--num-pairs", type=int, required=True)
    parser.add_argument(
        "--rank0-pairs", type=int, required=True, help="pairs [0, k) on rank 0, the rest on 1"
    )
    parser.add_argument("--loss", action="append", required=True, help="loss_type:beta:label_smoothing")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from spin_megatron.models.arch import load_arch
    from spin_megatron.parallel import destroy_parallel, init_parallel

    groups = init_parallel(1, 1)
    assert groups.dp_size == 2, groups.dp_size
    items = make_pairs(args.num_pairs, load_arch(args.hf_dir).vocab_size)
    mine = items[: args.rank0_pairs] if groups.dp_rank == 0 else items[args.rank0_pairs :]
    chosen_tokens = sum(len(item[0].response_ids) for item in items)
    report = {}
    for spec in args.loss:
        loss_type, beta, smoothing = spec.split(":")
        cfg = loss_config(
            args.hf_dir, loss_type=loss_type, beta=float(beta), label_smoothing=float(smoothing)
        )
        grads, norm, micro_batches = run_step(
            cfg, args.ref_dir, groups, mine, global_pairs=len(items), global_chosen_tokens=chosen_tokens
        )
        counts = [None] * groups.dp_size
        dist.all_gather_object(counts, micro_batches)
        report[spec] = {"grads": grads, "grad_norm": norm, "micro_batches": counts}
    if groups.rank == 0:
        torch.save(report, args.out)
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
