"""Context parallelism: the THD splitter (TE's load-balanced layout, sequences padded to 2·CP, targets and sequence
ids kept aligned, global positions) as pure functions; in one launch of two gloo processes, a tiny Qwen2 at CP=2
against CP=1 in float64 (per-token log-probs, loss and gradients on both log-prob paths), two trainer DPO steps
at CP2 against DP2, and a bit-exact resume at CP2 (tests/workers/context_parallel.py).

The trainer-level checks (spin-train at CP2 and TP2×CP2 against TP1) are in test_trainer_e2e's layout test;
configuration mistakes in test_train_config."""

import json

import pytest
import torch

from spin_megatron.models.tiny import make_tiny_hf_model
from spin_megatron.parallel.batching import IGNORE_INDEX
from spin_megatron.parallel.context_parallel import (
    gathered_order,
    partition_indices,
    row_length,
    split_for_cp,
    split_micro_batch,
)
from spin_megatron.parallel.packing import ScoredSequence, pack_items
from tests.helpers import run_ranks


def test_partition_is_tes_load_balanced_layout():
    # two segments of 8 and 4 tokens, CP=2: chunks of 2 and 1; rank r holds chunks r and 3 − r of each
    assert partition_indices([0, 8, 12], 2, 0).tolist() == [0, 1, 6, 7, 8, 11]
    assert partition_indices([0, 8, 12], 2, 1).tolist() == [2, 3, 4, 5, 9, 10]
    gathered = torch.cat([partition_indices([0, 8, 12], 2, r) for r in range(2)])
    assert torch.equal(gathered[gathered_order((0, 8, 12), 2)], torch.arange(12))


def _batch():
    gen = torch.Generator().manual_seed(0)
    lengths = [(3, 2), (5, 1), (1, 6), (4, 4)]  # prompt, response
    sequences = []
    for prompt, response in lengths:
        ids = torch.randint(1, 50, (prompt + response,), generator=gen).tolist()
        logps = torch.rand(response, generator=gen).neg().tolist()
        sequences.append(ScoredSequence(ids[:prompt], ids[prompt:], logps))
    return pack_items([sequences[:2], sequences[2:]], token_budget=100)[0]


@pytest.mark.parametrize("cp_size, row_multiple", [(2, 1), (3, 1), (2, 2)])
def test_split_keeps_every_token_once_with_its_target_sequence_and_global_position(cp_size, row_multiple):
    batch = _batch()
    length = row_length(batch, cp_size, row_multiple)
    assert length % (2 * cp_size * row_multiple) == 0
    parts = [split_micro_batch(batch, cp_size, r, length) for r in range(cp_size)]
    source = parts[0].extras["cp_source"]
    assert all(torch.equal(p.extras["cp_source"], source) for p in parts)  # every rank knows every layout
    held = source[source >= 0]
    assert sorted(held.tolist()) == list(range(batch.input_ids.shape[1]))  # each token exactly once
    bounds = parts[0].cu_seqlens.tolist()
    assert bounds[-1] == length and all((b - a) % (2 * cp_size) == 0 for a, b in zip(bounds, bounds[1:]))
    for rank, part in enumerate(parts):
        assert part.input_ids.shape[1] * cp_size == length and part.input_ids.shape[1] % row_multiple == 0
        mine, known = source[rank], source[rank] >= 0
        for name in ("input_ids", "targets", "position_ids", "engine_logprobs"):
            ours, full = getattr(part, name).reshape(-1), getattr(batch, name).reshape(-1)
            torch.testing.assert_close(ours[known], full[mine[known]], equal_nan=True, msg=name)
        assert torch.equal(part.sequence_index[known], batch.sequence_index[mine[known]])
        # added tokens are never scored
        assert (part.targets.reshape(-1)[~known] == IGNORE_INDEX).all()
        assert (part.sequence_index[~known] == -1).all()
        # positions are global within each padded segment: what Megatron's packed RoPE gives chunk r / 2CP−1−r
        order = partition_indices(bounds, cp_size, rank)
        starts = torch.tensor(bounds[:-1])
        segment = torch.bucketize(order, torch.tensor(bounds[1:]), right=True)
        assert torch.equal(part.position_ids.reshape(-1), order - starts[segment])
        assert part.num_pairs == batch.num_pairs and torch.equal(
            part.response_lengths, batch.response_lengths
        )


def test_micro_batches_share_one_row_length():
    batch = _batch()
    short = pack_items([[ScoredSequence([1, 2], [3])]], token_budget=100)[0]
    length = split_for_cp([batch, short], 2, 1)
    assert {int(b.extras["cp_local"].cu_seqlens[-1]) for b in (batch, short)} == {length}
    assert length == row_length(batch, 2)


@pytest.mark.dist
def test_cp2_equals_cp1_and_resumes_bit_exactly(tiny_qwen2, tmp_path):
    reference = make_tiny_hf_model(tmp_path / "reference", "qwen2", seed=9)
    out = tmp_path / "report.json"
    args = ["--cp", 2, "--ref-dir", reference, "--out", out, tiny_qwen2]
    assert run_ranks(2, "tests.workers.context_parallel", *args) == 0
    ranks = json.loads(out.read_text())
    assert sorted(r["logits"]["cp_rank"] for r in ranks) == [0, 1]
    for report in ranks:
        # float64: the logits path's gradients equal CP=1's to rounding; the log-prob kernels compute in fp32
        for path, grad_limit in (("logits", 1e-12), ("fused_head", 1e-6)):
            result = report[path]
            assert result["dp_size"] == 1 and result["row_length"] % 4 == 0, result
            assert result["logps"] <= 1e-6 and result["loss"] <= 1e-9 and result["grad"] <= grad_limit, result
    steps = ranks[0]["steps"]
    for variant in (
        "",
        "_ld_wpo",
    ):  # the trainer's DPO step: CP2 (one replica) vs DP2 (the pairs split in two)
        for step in range(2):
            for key in ("loss", "grad_norm"):
                got, expected = steps["cp2" + variant][step][key], steps["dp2" + variant][step][key]
                assert got == pytest.approx(expected, rel=1e-5), (variant, step, key)
    assert steps["dp2_ld_wpo"][0]["loss"] != pytest.approx(steps["dp2"][0]["loss"], rel=1e-3)  # another loss
    assert steps["dp2"][1]["loss"] != pytest.approx(steps["dp2"][0]["loss"], rel=1e-3)  # step 1 changed them
    resume = steps["resume"]
    assert resume["resumed"] == resume["straight"] and resume["same_weights"], resume


def test_te_attention_in_fp32_is_refused_with_context_parallelism(monkeypatch):
    """TE's unfused attention (its only fp32 backend for packed sequences) has no context parallelism."""
    from spin_megatron.compose import load_config, model_arch
    from spin_megatron.errors import ConfigError
    from spin_megatron.models import builder
    from spin_megatron.parallel.context_parallel import check_context_parallel

    monkeypatch.setattr(builder, "default_use_te", lambda dtype: True)  # as on a GPU with TE ≥ 2.11
    cfg = load_config(["experiment=tiny_cpu", "parallel.cp=2"])
    with pytest.raises(ConfigError, match="parallel.cp=2 with model.dtype=fp32: TransformerEngine's"):
        check_context_parallel(cfg, model_arch(cfg))
    check_context_parallel(
        load_config(["experiment=tiny_cpu", "parallel.cp=2", "model.dtype=bf16"]), model_arch(cfg)
    )
