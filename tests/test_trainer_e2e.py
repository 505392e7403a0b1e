"""spin-train end to end on the tiny CPU preset: learning signals, reference refresh, bit-exact resume, and the
same first update at TP1, TP2+SP, PP2, DP2 (balanced, overlapped), selective recompute, interleaved PP2×VPP2 /
PP4×VPP2, CP2 and TP2×CP2 (samples replayed from a dump so every layout sees the same pairs)."""

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, run_ranks

pytestmark = pytest.mark.e2e


def _train(*overrides, nprocs: int = 1):
    args = ["experiment=tiny_cpu", "logging.progress_bar=false", *map(str, overrides)]
    if nprocs > 1:
        assert run_ranks(nprocs, "spin_megatron.train", *args, timeout_s=600) == 0
        return
    result = subprocess.run(
        [sys.executable, "-m", "spin_megatron.train", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def _metrics(run_dir):
    return {m["step"]: m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _weights(run_dir):
    tensors = {}
    for path in sorted((run_dir / "hf").glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def test_spin_run_learns_refreshes_the_reference_and_resumes_bit_exactly(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    common = ["trainer.save_freq=3", "trainer.test_freq=3", "trainer.ref_update_freq=2"]
    _train(f"trainer.output_dir={full}", "trainer.total_steps=6", *common)
    metrics = _metrics(full)
    # SPIN: the gold response becomes more likely; held-out gold NLL falls; pairs are ranked right more often.
    assert metrics[6]["val/gold_nll"] < metrics[3]["val/gold_nll"] < metrics[0]["val/gold_nll"]
    assert metrics[2]["rewards/accuracies"] > metrics[1]["rewards/accuracies"]
    # policy == reference right after a refresh (steps 1, 3, 5 start from one): DPO loss is exactly log 2
    for step in (1, 3, 5):
        assert math.isclose(metrics[step]["loss"], math.log(2), abs_tol=1e-6), (step, metrics[step]["loss"])
    assert all(
        metrics[s]["rollout/logp_diff"] < 1e-4 for s in range(1, 7)
    )  # engine == trainer after each sync
    for key in ("rewards/margins", "logps/chosen", "pairs/kept", "time/generate", "perf/tokens_per_s", "lr"):
        assert key in metrics[4]
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["step_0000003", "step_0000006"]

    _train(f"trainer.output_dir={split}", "trainer.total_steps=3", *common)
    _train(f"trainer.output_dir={split}", "trainer.total_steps=6", *common)  # resume=auto from step 3
    resumed = _metrics(split)
    assert sorted(resumed) == sorted(metrics)  # no duplicated or missing lines
    for step in (4, 5, 6):
        for key in ("loss", "rewards/margins", "grad_norm", "val/gold_nll"):
            if key in metrics[step]:
                assert resumed[step][key] == metrics[step][key], (step, key)
    a, b = _weights(full), _weights(split)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)

    from transformers import AutoModelForCausalLM, AutoTokenizer  # the export is a usable HF folder

    AutoTokenizer.from_pretrained(full / "hf")
    assert AutoModelForCausalLM.from_pretrained(full / "hf").config.num_hidden_layers == 2


OVERLAP = ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"]
OVERLAP += ["parallel.ddp_bucket_size=1000000"]


@pytest.mark.dist
def test_first_update_is_the_same_across_layouts_recompute_and_logprob_paths(tmp_path):
    # Adam's first step is lr·g/(|g|+eps): for the odd element with |g| ~ eps it turns the last-bit differences of
    # a TP/DP reduction order into lr-sized ones. A larger eps keeps the update Lipschitz in g (≤ lr/eps = 1), so
    # equal weights really mean equal gradients.
    # two mini-batches × two epochs: each of the 4 updates is the exact mean over its mini-batch's pairs at any
    # layout (at DP=2 a mini-batch holds two prompts of each replica). 8 layers: PP4×VPP2 has one per model chunk
    base = ["trainer.total_steps=1", "trainer.test_freq=0", "trainer.keep_last_n=1", "optim.adam_eps=1e-3",
            "model.tiny.num_hidden_layers=8", "trainer.prompts_per_step=8", "trainer.mini_batch_size=4",
            "trainer.update_epochs=2"]  # fmt: skip
    reference_run = tmp_path / "tp1"
    dump = reference_run / "rollouts.jsonl"
    _train(f"trainer.output_dir={reference_run}", f"rollout.dump_path={dump}", *base)
    expected_loss, expected_norm = (_metrics(reference_run)[1][k] for k in ("loss", "grad_norm"))
    expected = _weights(reference_run)
    replay = ["rollout.engine=replay", f"rollout.replay_path={dump}", *base]
    layouts = {
        "tp2": (["parallel.tp=2"], 2),  # sequence parallelism: on by default at tp > 1
        "pp2": (["parallel.pp=2"], 2),
        # trainer.balance_dp (the default): the pairs re-split over the replicas by tokens; with both DDP overlaps
        # (~10 buckets: the tiny model's vocabulary is Qwen2.5's)
        "dp2": (OVERLAP, 2),
        "selective": (["parallel.recompute=selective", "parallel.recompute_modules=[core_attn,mlp]"], 1),
        # full recompute, the logits path at TP2 with SP, DP2 overlapped without balancing: tests/test_scaling.py
        # interleaved pipelines, one pair per micro-batch (every pair exceeds the budget): 4 a mini-batch, so at
        # PP2×VPP2 the schedule has a steady 1F1B phase, where Megatron's default batched p2p exchange pairs the
        # wrong tensors (with it here: loss 0.356 vs 0.250, grad norm 1696 vs 0.84; test_interleaved_pipeline.py)
        "pp2_vpp2": (["parallel.pp=2", "parallel.vpp=2", "trainer.micro_batch_tokens=1"], 2),
        "pp4_vpp2": (["parallel.pp=4", "parallel.vpp=2", "trainer.micro_batch_tokens=1"], 4),
        # context parallel: every sequence split over 2 ranks of one replica (the engine on CP rank 0); with TP2
        # sequence parallelism too (each CP rank's row split over TP)
        "cp2": (["parallel.cp=2"], 2),
        "tp2_cp2": (["parallel.tp=2", "parallel.cp=2"], 4),
    }
    for name, (layout, nprocs) in layouts.items():
        run = tmp_path / name
        _train(f"trainer.output_dir={run}", *replay, *layout, nprocs=nprocs)
        metrics = _metrics(run)[1]
        assert abs(metrics["loss"] - expected_loss) <= 1e-5, name
        assert abs(metrics["grad_norm"] - expected_norm) <= 1e-5 * expected_norm, name
        if name == "dp2":
            spread = metrics["perf/dp_token_spread/before"], metrics["perf/dp_token_spread/after"]
            assert 1.0 <= spread[1] <= spread[0], spread
        weights = _weights(run)
        assert sorted(weights) == sorted(expected)
        worst = max((weights[k] - expected[k]).abs().max().item() for k in expected)
        assert worst <= 1e-5, (name, worst)
        shutil.rmtree(run)  # 12 runs' checkpoints would hold ~3 GB
