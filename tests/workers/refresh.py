"""The reference refresh schedule, driven step by step in one process (DP=1, in-process hf engine).

``ref_model_sync_steps=3`` with 2 mini-batches × 2 epochs (4 optimizer steps per rollout step): refreshes land
inside steps, after optimizer steps 3 and 6 (TRL's ``global_step % 3 == 0``).
- hard (α = 1): the update right after a refresh sees reference == policy: its DPO loss is exactly log 2 (the
  reference log-probs are recomputed for the mini-batches after a refresh inside a step).
- soft (α = 0.5): validation puts the policy into the engine (the reference is not the policy), and the next
  step puts the mixed reference back before it samples.
Prints one JSON line per check for tests/test_spin_semantics.py.
"""

from __future__ import annotations

import json
import math
import sys

import torch

import spin_megatron.training.updates as updates_module
from spin_megatron.parallel import init_parallel
from spin_megatron.parallel.dpo_step import METRIC_SUMS
from spin_megatron.parallel.weight_export import export_hf_weights
from spin_megatron.train import load_config, prepare_data
from spin_megatron.training.trainer import SPINTrainer

COMMON = [
    "experiment=tiny_cpu", "logging.progress_bar=false", "trainer.ref_update_freq=0",
    "trainer.ref_model_sync_steps=3", "trainer.mini_batch_size=2", "trainer.update_epochs=2",
    "trainer.test_freq=100", "data.val_max_prompts=2", "trainer.save_freq=0", "trainer.export_hf=false",
]  # fmt: skip


def build(root: str, name: str, *overrides: str) -> SPINTrainer:
    cfg = load_config([*COMMON, f"trainer.output_dir={root}/{name}", *overrides])
    return SPINTrainer(cfg, init_parallel(1, 1, seed=cfg.trainer.seed), prepare_data(cfg))


def engine_holds(trainer: SPINTrainer, model) -> bool:
    """Whether the hf engine's weights are exactly ``model``'s (HF names)."""
    held = trainer.engine.engine.model.state_dict()
    exported = dict(export_hf_weights(model, trainer.mapping, trainer.groups))
    return all(torch.equal(held[name], tensor.to(held[name].dtype)) for name, tensor in exported.items())


def hard(root: str) -> dict:
    trainer = build(root, "hard")
    updates, refreshes = [], []
    real_train_step, real_refresh = updates_module.train_step, trainer._refresh_reference

    def train_step(*args, **kwargs):
        sums, norm, updated = real_train_step(*args, **kwargs)
        pairs, loss = (float(sums[METRIC_SUMS.index(k)]) for k in ("pairs", "loss"))
        updates.append({"before": int(trainer.policy.scheduler.num_steps), "loss": loss / pairs})
        return sums, norm, updated

    def refresh():
        refreshes.append(int(trainer.policy.scheduler.num_steps))
        real_refresh()

    updates_module.train_step, trainer._refresh_reference = train_step, refresh
    try:
        for _ in range(2):
            trainer.step += 1
            trainer.train_one_step()
    finally:
        updates_module.train_step = real_train_step
    return {"refreshed_after": refreshes, "updates": updates, "log2": math.log(2)}


def soft(root: str) -> dict:
    trainer = build(root, "soft", "trainer.ref_model_mixup_alpha=0.5")
    trainer.step += 1
    trainer.train_one_step()  # a soft refresh after optimizer step 3, then the mixed reference is synced
    after_step = engine_holds(trainer, trainer.reference)
    trainer._validate()  # validation measures the policy: it must be in the engine
    during_validation = engine_holds(trainer, trainer.policy.model)
    trainer.step += 1
    trainer.train_one_step()  # samples from the reference again: it is put back first (and refreshed at 6)
    return {"after_step": after_step, "validation": during_validation,
            "after_next_step": engine_holds(trainer, trainer.reference)}  # fmt: skip


if __name__ == "__main__":
    root = sys.argv[1]
    print(json.dumps({"hard": hard(root), "soft": soft(root)}), flush=True)
