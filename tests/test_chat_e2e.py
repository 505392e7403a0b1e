"""spin-train on conversations (data.messages_key=messages, the README's command) at DP=2 on the UltraChat-shaped
file in tests/data: SPIN learns toward the last assistant turns and resumes bit-exactly with its data read from
the tokenization cache; online mode ranks samples with a reward model and validates on the conversations' gold."""

import json
import shutil

import pytest

from tests.helpers import REPO, assert_same_hf_export, run_ranks

pytestmark = [pytest.mark.e2e, pytest.mark.dist]

DATA = REPO / "tests" / "data" / "ultrachat_tiny" / "data"
CHAT = ["experiment=tiny_cpu", "logging.progress_bar=false", "data.messages_key=messages", "algorithm.reward=none",
        f"data.train_files=[{DATA / 'train_sft.jsonl'}]", f"data.val_files=[{DATA / 'test_sft.jsonl'}]"]  # fmt: skip
SPIN = ["trainer.total_steps=4", "trainer.save_freq=2", "trainer.keep_last_n=0", "trainer.test_freq=2"]


def _train(*overrides):
    assert run_ranks(2, "spin_megatron.train", *CHAT, *map(str, overrides), timeout_s=600) == 0


def _metrics(run_dir) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def spin_run(tmp_path_factory):
    """One 4-step SPIN run at DP=2 (checkpoints at steps 2 and 4), shared by the tests below."""
    root = tmp_path_factory.mktemp("chat_spin")
    _train(f"trainer.output_dir={root / 'full'}", f"data.cache_dir={root / 'cache'}", *SPIN)
    yield root
    shutil.rmtree(root, ignore_errors=True)  # checkpoints of a 151k-vocabulary model: ~0.7 GB


def test_spin_on_conversations_learns_the_last_assistant_turns(spin_run):
    metrics = _metrics(spin_run / "full")
    assert sorted(metrics) == [0, 1, 2, 3, 4]
    # chosen = the conversation's last assistant turn: it becomes more likely, on held-out conversations too
    assert metrics[4]["val/gold_nll"] < metrics[2]["val/gold_nll"] < metrics[0]["val/gold_nll"]
    assert metrics[2]["rewards/accuracies"] > 0 and metrics[2]["rewards/margins"] > 0
    assert all(metrics[s]["pairs/kept"] == 4 for s in (1, 2, 3, 4))  # 4 prompts per step over 2 replicas
    assert all(metrics[s]["rollout/logp_diff"] < 1e-4 for s in (1, 2, 3, 4))  # engine == trainer
    # no rule and no reward model: nothing scores the samples, so no accuracy or score is reported
    assert not any(key in m for m in metrics.values() for key in ("val/accuracy", "reward/accuracy"))
    assert sorted(p.name.split("-")[0] for p in (spin_run / "cache").iterdir() if p.is_dir()) == [
        "train",
        "val",
    ]


def test_resume_reads_the_cache_and_is_bit_exact(spin_run, capfd):
    cache = sorted((p.name, p.stat().st_mtime_ns) for p in (spin_run / "cache").iterdir())
    resumed = spin_run / "resumed"
    _train(f"trainer.output_dir={resumed}", f"data.cache_dir={spin_run / 'cache'}", *SPIN,
           f"trainer.resume={spin_run / 'full' / 'checkpoints' / 'step_0000002'}")  # fmt: skip
    out = capfd.readouterr().out
    assert "train data: 24/26 conversations kept" in out and "2 malformed dropped" in out
    assert "from the cache" in out
    assert (
        sorted((p.name, p.stat().st_mtime_ns) for p in (spin_run / "cache").iterdir()) == cache
    )  # not rebuilt
    full, again = _metrics(spin_run / "full"), _metrics(resumed)
    assert sorted(again) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "rewards/margins", "grad_norm", "logps/chosen", "logps/rejected", "val/gold_nll"):
            if key in full[step]:
                assert again[step][key] == full[step][key], (step, key)
    assert_same_hf_export(spin_run / "full", resumed)


def test_online_mode_on_conversations_with_a_reward_model(tmp_path, qwen_tokenizer_dir):
    from tests.reward_models import make_random_reward_model

    reward_model = make_random_reward_model(tmp_path / "rm", qwen_tokenizer_dir)
    run = tmp_path / "online"
    _train("algorithm.mode=online", "rollout.n=2", f"reward_model.path={reward_model}", "trainer.total_steps=2",
           "trainer.test_freq=2", "trainer.save_freq=0", "trainer.export_hf=false", f"trainer.output_dir={run}",
           f"data.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    metrics = _metrics(run)
    assert all(metrics[s]["pairs/kept"] > 0 and "reward/model_mean" in metrics[s] for s in (1, 2))
    # validation: the reward model scores the greedy answers; the conversations' last turns give the gold NLL
    assert "val/score_mean" in metrics[2] and "val/gold_nll" in metrics[2]
    assert "val/accuracy" not in metrics[2]  # no rule reward: no rule-based accuracy
