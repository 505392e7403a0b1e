"""Megatron logits == transformers logits at TP2, PP2 and TP2×PP2 (gloo, separate processes), and the streamed
export reproduces every HF tensor bit-exactly with each pipeline stage exporting only its own layers."""

import json

import pytest

from tests.helpers import run_ranks

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)])
def test_parity_and_export(tp, pp, tiny_qwen2, tiny_llama, tmp_path):
    out = tmp_path / "report.json"
    assert (
        run_ranks(
            tp * pp, "tests.workers.parity", "--tp", tp, "--pp", pp, "--out", out, tiny_qwen2, tiny_llama
        )
        == 0
    )
    report = json.loads(out.read_text())
    for hf_dir, result in report.items():
        ranks = result["ranks"]
        errors = [r["rel_err"] for r in ranks if r["rel_err"] is not None]
        assert len(errors) == 1 and errors[0] <= 1e-5, (hf_dir, errors)
        assert all(not r["mismatched"] for r in ranks), hf_dir
        # TP ranks of a stage see the same gathered tensors; different stages export disjoint sets.
        by_stage = {}
        for r in ranks:
            by_stage.setdefault(r["pp_rank"], []).append(r["exported"])
        stage_sets = []
        for lists in by_stage.values():
            assert all(lst == lists[0] for lst in lists)
            stage_sets.append(set(lists[0]))
        assert sum(len(s) for s in stage_sets) == len(set().union(*stage_sets))
        assert sorted(set().union(*stage_sets)) == result["expected"]
