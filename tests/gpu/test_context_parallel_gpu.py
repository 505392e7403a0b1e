"""GPU: context parallelism with TransformerEngine. Our THD split is TE's own partition
(``tex.thd_get_partitioned_indices``), the layout TE's context-parallel attention expects; and spin-train at CP2
(TE attention over the CP group, bf16) gives the first update of one GPU. Skipped without CUDA / TE (two GPUs
for the training run); run with `make gpu-smoke`."""

import json
import subprocess
import sys

import pytest
import torch

from spin_megatron.models import te_available
from spin_megatron.parallel.context_parallel import partition_indices, te_partition_indices
from tests.helpers import REPO, missing, run_ranks

pytestmark = pytest.mark.gpu

# packed rows: sequences of lengths that are multiples of 2·CP (the padding segment last)
ROWS = {2: [[0, 8, 12, 28, 32], [0, 4, 100, 104]], 4: [[0, 16, 24, 64], [0, 8, 16]]}


@pytest.mark.parametrize("cp_size", [2, 4])
def test_our_split_is_tes_partition(cp_size):
    if not te_available():
        missing("te", "TransformerEngine is not installed")
    for bounds in ROWS[cp_size]:
        for rank in range(cp_size):
            theirs = te_partition_indices(bounds, cp_size, rank)
            assert torch.equal(theirs, partition_indices(bounds, cp_size, rank)), (bounds, rank)


def _train(out, *overrides, nprocs=1):
    args = ["experiment=tiny_cpu", "model.dtype=bf16", "trainer.total_steps=1", "trainer.test_freq=0",
            "logging.progress_bar=false", f"trainer.output_dir={out}", *overrides]  # fmt: skip
    if nprocs > 1:
        assert run_ranks(nprocs, "spin_megatron.train", *args, timeout_s=900) == 0
    else:
        result = subprocess.run([sys.executable, "-m", "spin_megatron.train", *args], capture_output=True,
                                text=True, cwd=REPO, timeout=900)  # fmt: skip
        assert result.returncode == 0, result.stderr[-4000:]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m for m in map(json.loads, lines)}[1]


def test_cp2_with_te_attention_trains_like_one_gpu(tmp_path):
    if not te_available():
        missing("te", "TransformerEngine is not installed")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    dump = tmp_path / "one" / "rollouts.jsonl"
    one = _train(tmp_path / "one", f"rollout.dump_path={dump}")
    replay = ["rollout.engine=replay", f"rollout.replay_path={dump}"]
    split = _train(tmp_path / "cp2", *replay, "parallel.cp=2", nprocs=2)
    # bf16 with TE's attention kernels: the first update agrees to bf16 precision
    assert split["loss"] == pytest.approx(one["loss"], abs=2e-2)
    assert split["grad_norm"] == pytest.approx(one["grad_norm"], rel=5e-2)
