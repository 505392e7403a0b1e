"""Megatron logits == transformers logits at TP2, PP2 and TP2×PP2 (gloo, separate processes), and the streamed
export reproduces every HF tensor bit-exactly with each pipeline stage exporting only its own layers. Qwen3-MoE:
the same at EP2, EP4, TP2×EP2 (expert-TP 2 and 1) and PP2×EP2 with both token dispatchers, in one launch of four
processes, and every rank holds the experts ``ep_rank · E/EP + i``."""

import json

import pytest

from tests.helpers import run_ranks

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)])
def test_parity_and_export(tp, pp, tiny_qwen2, tiny_llama, tiny_qwen3, tiny_qwen3_moe_mixed, tmp_path):
    out = tmp_path / "report.json"
    models = [tiny_qwen2, tiny_llama] + ([tiny_qwen3] if (tp, pp) == (2, 2) else [])
    # PP2 also as PP2×VPP2 in the same processes: the 4-layer models (one layer per model chunk), the untied
    # Qwen2 and the tied Qwen3-MoE with a dense layer (embedding in chunk 0 of stage 0, its tied copy in chunk 1
    # of stage 1)
    vpp, models = (2, [*models, tiny_qwen3_moe_mixed]) if (tp, pp) == (1, 2) else (1, models)
    args = ("--tp", tp, "--pp", pp, "--vpp", vpp, "--out", out)
    assert run_ranks(tp * pp, "tests.workers.parity", *args, *models) == 0
    report = json.loads(out.read_text())
    assert len(report) == len(models) + (2 if vpp > 1 else 0)
    assert all(f"vpp2:{m}" in report for m in (tiny_qwen2, tiny_qwen3_moe_mixed)) or vpp == 1
    _check_report(report, replicas=1)


# tp.pp.ep.etp.dispatcher (etp 0: as tp, Megatron's default) — all with 4 processes (data-parallel 4 or 2)
MOE_LAYOUTS = (
    "1.1.2.0.alltoall",
    "1.1.4.0.allgather",
    "2.1.2.0.alltoall",
    "2.1.2.1.allgather",
    "1.2.2.0.alltoall",
)


def test_moe_parity_export_and_expert_numbering(tiny_qwen3_moe, tiny_qwen3_moe_mixed, tmp_path):
    out = tmp_path / "report.json"
    layouts = [arg for layout in MOE_LAYOUTS for arg in ("--layout", layout)]
    assert (
        run_ranks(4, "tests.workers.parity", *layouts, "--out", out, tiny_qwen3_moe, tiny_qwen3_moe_mixed)
        == 0
    )
    report = json.loads(out.read_text())
    assert len(report) == 2 * len(MOE_LAYOUTS)
    for key, result in report.items():
        tp, pp, ep = (int(x) for x in key.split(".")[:3])
        _check_report({key: result}, replicas=4 // (tp * pp))
        experts = 8 if key.endswith("mixed") else 4
        for r in result["ranks"]:  # Megatron's local experts are the global ones the mapping assumes
            per_rank = experts // ep
            want = list(range(r["ep_rank"] * per_rank, (r["ep_rank"] + 1) * per_rank))
            assert r["experts"] and all(layer == want for layer in r["experts"]), (key, r["rank"])


def _check_report(report, replicas):
    for hf_dir, result in report.items():
        ranks = result["ranks"]
        errors = [r["rel_err"] for r in ranks if r["rel_err"] is not None]
        assert len(errors) == replicas and max(errors) <= 1e-5, (hf_dir, errors)
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
