"""Checkpoints at any point of a run: one written before the first optimizer step (an online run whose first
batches give no pair) saves, resumes, and leaves the next updates bit-identical to a run that never saved."""

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

# One process (gloo, world size 1): for each optimizer flavour, four policies from the same weights take the
# same two optimizer steps on the same gradients: one never saved, one saved before its first step, one loaded
# from that checkpoint, one saved between its two steps (a save must not touch a stepped Adam's state). Their
# weights must be equal bit for bit.
SCRIPT = r"""
import sys, torch
from spin_megatron.training.checkpoint import load_checkpoint, save_checkpoint
from spin_megatron.parallel import init_parallel
from spin_megatron.training.policy import build_policy, build_reference, resolve_model_source
from spin_megatron.train import load_config

def two_steps(policy, save_between=None):
    for k in range(2):
        if k == 1 and save_between is not None:
            save_between()
        g = torch.Generator().manual_seed(k)
        for p in policy.model.parameters():
            p.main_grad.copy_(torch.randn(p.shape, generator=g))
        assert policy.optimizer.step()[0]
    return {n: p.detach().clone() for n, p in policy.model.named_parameters()}

def main(root):
    groups = init_parallel(1, 1)
    for name, extra in (("distributed_fp32", []),
                        ("plain_bf16", ["optim.use_distributed_optimizer=false", "model.dtype=bf16"])):
        out = f"{root}/{name}"
        cfg = load_config(["experiment=tiny_cpu", f"trainer.output_dir={out}", "optim.weight_decay=0.1", *extra])
        source = resolve_model_source(cfg, groups, 1)
        sig = source.arch.signature()

        def build():
            policy = build_policy(cfg, source, groups)
            return policy, build_reference(cfg, source, groups, policy)

        never = two_steps(build()[0])
        policy, reference = build()
        save_checkpoint(out, 0, policy, reference, groups,
                        {"scheduler": policy.scheduler.state_dict(), "model_signature": sig})
        saved = two_steps(policy)
        policy, reference = build()
        load_checkpoint(f"{out}/checkpoints/step_0000000", policy, reference, groups, model_signature=sig)
        loaded = two_steps(policy)
        policy, reference = build()
        between = two_steps(policy, lambda: save_checkpoint(out, 1, policy, reference, groups,
                            {"scheduler": policy.scheduler.state_dict(), "model_signature": sig}))
        for key in never:
            assert torch.equal(never[key], saved[key]), (name, "saved", key)
            assert torch.equal(never[key], loaded[key]), (name, "loaded", key)
            assert torch.equal(never[key], between[key]), (name, "saved between", key)
        print("ok", name, len(never), flush=True)

if __name__ == "__main__":
    main(sys.argv[1])
"""


@pytest.mark.dist
def test_checkpoint_before_the_first_optimizer_step_saves_resumes_and_changes_nothing(tmp_path):
    script = tmp_path / "fresh_optimizer.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's package, whatever is installed
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ok ") == 2, result.stdout


def test_reset_state_makes_the_next_step_a_first_step():
    """trainer.reset_optimizer_on_refresh: after reset_state, Adam continues exactly as a new Adam would from the
    same weights (moments and step zeroed in place, the weights untouched)."""
    from types import SimpleNamespace

    import torch

    from spin_megatron.training.optim_state import reset_state

    def adam(params):
        return torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)

    def steps(opt, params, seeds):
        for seed in seeds:
            for p in params:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed))
            opt.step()

    torch.manual_seed(0)
    used = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = adam(used)
    steps(opt, used, [0, 1, 2])
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in used]
    reset_state(SimpleNamespace(optimizer=opt))
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in opt.state.values())
    steps(opt, used, [3, 4])
    steps(adam(fresh), fresh, [3, 4])
    assert all(torch.equal(a, b) for a, b in zip(used, fresh))
