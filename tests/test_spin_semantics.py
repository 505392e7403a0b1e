"""SPIN that a run can trust: optimizer mini-batches and epochs per rollout batch, the preflight that refuses a
reference equal to the policy at every update, SPIN's opponent (samples from the reference, bit-exact resume in
the middle of an iteration), the TR-DPO soft refresh, the optimizer defaults of the seed presets."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spin_megatron.algorithm.experience import sampling_seed
from spin_megatron.compose import CONF_DIR
from spin_megatron.data import PromptExample
from spin_megatron.train import load_config, main
from spin_megatron.training.minibatch import mini_batch_shares, mini_batches
from tests.helpers import REPO, assert_same_hf_export

PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def _error(capsys, *overrides):
    code = main(list(overrides))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_passes_preflight(preset):
    cfg = load_config([f"experiment={preset}"])  # raises ConfigError where the preflight refuses a preset
    t = cfg.trainer
    if t.ref_update_freq == 1:  # refreshed every step: only several optimizer steps per batch anchor anything
        assert t.updates_per_rollout > 1


def test_gsm8k_presets_have_their_documented_shape():
    for preset in ("qwen2.5_3b_gsm8k", "qwen2.5_0.5b_gsm8k"):
        cfg = load_config([f"experiment={preset}"])
        assert cfg.trainer.prompts_per_step == 256 and cfg.trainer.mini_batch_prompts == 64
        assert cfg.trainer.mini_batches == 4 and cfg.trainer.updates_per_rollout == 4
        # the seed warmed up over 15 rollout steps; the schedule here counts optimizer steps (4 per rollout step)
        assert (
            cfg.optim.lr_warmup_steps == 15 * cfg.trainer.updates_per_rollout
            and cfg.optim.weight_decay == 0.01
        )
        assert cfg.algorithm.reward == "gsm8k_verl" and cfg.algorithm.reward_metrics == ["gsm8k"]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["trainer.ref_update_freq=1"], "trains against a reference equal to the policy"),
        (
            ["trainer.ref_update_freq=0", "trainer.ref_model_sync_steps=1"],
            "copies the policy into the reference",
        ),
        (["trainer.ref_model_sync_steps=3"], "both set the reference refresh"),
        (["trainer.mini_batch_size=3"], "must divide trainer.prompts_per_step=4"),
        (["trainer.update_epochs=0"], "trainer.update_epochs must be > 0"),
        (["trainer.ref_model_mixup_alpha=0"], "trainer.ref_model_mixup_alpha must be in (0, 1]"),
        (["trainer.ref_model_mixup_alpha=0.5", "model.dtype=bf16"], "needs model.dtype=fp32"),
        (["trainer.ref_model_mixup_alpha=0.5", "trainer.ref_update_freq=0"], "but no refresh is set"),
        (["rollout.sync_every=2"], "rollout.sync_every applies to algorithm.sample_from=policy"),
        (["algorithm.sample_from=opponent"], "algorithm.sample_from='opponent' is not allowed"),
        (["algorithm.loss_type=exo_pair"], "needs algorithm.label_smoothing > 0"),
        (["algorithm.loss_type=hinge", "algorithm.label_smoothing=0.1"], "label_smoothing applies to"),
        (["algorithm.loss_type=aot", "algorithm.use_weighting=true"], "turn one of them off"),
        (["algorithm.ld_alpha=2"], "algorithm.ld_alpha must be in [0, 1]"),
        # issue 22 C11: samples no pair uses, a key the mode ignores; C12: a reset needs iterations
        (["rollout.n=2"], "but spin mode pairs only algorithm.pairs_per_prompt=1 of them"),
        (["algorithm.mode=online", "algorithm.pairs_per_prompt=2"], "applies to algorithm.mode=spin"),
        (
            ["trainer.reset_optimizer_on_refresh=true", "trainer.ref_update_freq=0"],
            "starts each SPIN iteration",
        ),
        (["trainer.reset_optimizer_on_refresh=true", "trainer.ref_model_mixup_alpha=0.5"], "hard refreshes"),
    ],
)
def test_mistakes_are_refused_in_one_line(capsys, tmp_path, overrides, fragment):
    out = tmp_path / "run"
    assert fragment in _error(capsys, "experiment=tiny_cpu", f"trainer.output_dir={out}", *overrides)
    assert not out.exists()  # refused before anything is written


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.ref_update_freq=1", "trainer.mini_batch_size=2"],  # 2 optimizer steps per batch
        ["trainer.ref_update_freq=1", "trainer.update_epochs=2"],
        ["trainer.ref_update_freq=1", "trainer.ref_model_mixup_alpha=0.5"],  # TR-DPO: never a plain copy
        ["trainer.ref_update_freq=1", "algorithm.reference_free=true"],
    ],
)
def test_anchored_configurations_pass(overrides):
    load_config(["experiment=tiny_cpu", *overrides])


def test_what_a_run_does_unsaid_is_said_once_at_start():
    from spin_megatron.train import run_notes

    cfg = load_config(["experiment=tiny_cpu", "trainer.ref_update_freq=0", "trainer.prompts_per_step=4"])
    notes = run_notes(cfg, num_train=10)
    assert any("each epoch's last 2 of 10 prompts make no full batch" in n for n in notes)
    assert any("the whole run is ONE SPIN iteration" in n for n in notes)
    assert run_notes(load_config(["experiment=tiny_cpu"]), num_train=8) == []


def test_defaults_follow_the_mode_and_the_loss():
    spin = load_config(["experiment=tiny_cpu"]).algorithm
    online = load_config(["experiment=tiny_cpu", "algorithm.mode=online", "rollout.n=2"]).algorithm
    # rollout.n: online pairs best vs worst of 2; spin generates only the samples it pairs with the gold
    assert load_config(["experiment=tiny_cpu", "algorithm.mode=online"]).rollout.n == 2
    assert load_config(["experiment=tiny_cpu"]).rollout.n == 1
    assert load_config(["experiment=tiny_cpu", "algorithm.pairs_per_prompt=3"]).rollout.n == 3
    assert spin.sample_from is None and spin.sampler == "reference" and online.sampler == "policy"
    assert load_config(["experiment=tiny_cpu", "algorithm.sample_from=policy"]).algorithm.sampler == "policy"
    assert not spin.length_normalized
    assert load_config(["experiment=tiny_cpu", "algorithm.loss_type=ipo"]).algorithm.length_normalized
    assert not load_config(
        ["experiment=tiny_cpu", "algorithm.loss_type=ipo", "algorithm.length_normalize=false"]
    ).algorithm.length_normalized
    alias = load_config(["experiment=tiny_cpu", "algorithm.loss_type=aot_unpaired"]).algorithm
    assert alias.canonical_loss == "aot_pair"


# ------------------------------------------------------------------------------------------------ mini-batches


def _examples(ids):
    return [PromptExample(prompt_id=i, prompt_ids=[1], gold_ids=[2], row={}) for i in ids]


def test_mini_batches_are_the_same_prompts_at_any_dp_size():
    batch = _examples([7, 3, 9, 1, 5, 2, 8, 4])  # the global rollout batch, in sampler order
    expected = [{7, 3}, {9, 1}, {5, 2}, {8, 4}]  # 4 contiguous mini-batches of 2 prompts
    for dp in (1, 2, 3):
        shares = [mini_batch_shares(batch, r, dp, 4) for r in range(dp)]
        for k in range(4):
            assert {ex.prompt_id for rank in shares for ex in rank[k]} == expected[k], (dp, k)
    # DP=3: replica 2 holds no prompt of any mini-batch here (2 prompts per mini-batch): placeholders, no error
    assert all(share == [] for share in mini_batch_shares(batch, 2, 3, 4))


def test_mini_batches_group_pairs_by_their_prompt():
    shares = mini_batch_shares(_examples([7, 3, 9, 1, 5, 2, 8, 4]), 0, 1, 4)
    item_prompts = [1, 1, 2, 3, 4, 5, 7, 8, 9]  # pairs sorted by prompt id; prompt 1 has two
    items = [f"pair-{p}-{i}" for i, p in enumerate(item_prompts)]
    chunks = mini_batches(items, item_prompts, shares)
    assert chunks == [["pair-3-3", "pair-7-6"], ["pair-1-0", "pair-1-1", "pair-9-8"], ["pair-2-2", "pair-5-5"],
                      ["pair-4-4", "pair-8-7"]]  # fmt: skip
    assert mini_batches([], [], shares) == [[], [], [], []]
    with pytest.raises(KeyError):
        mini_batches(["x"], [99], shares)  # a pair whose prompt is not in this replica's batch


def test_replicas_and_steps_sample_with_distinct_seeds():
    from types import SimpleNamespace

    cfg = load_config(["experiment=tiny_cpu"])
    seeds = {sampling_seed(cfg, step, SimpleNamespace(dp_rank=r)) for step in range(1, 50) for r in range(8)}
    assert len(seeds) == 49 * 8  # no two (step, replica) draw with the same seed
    assert (
        sampling_seed(cfg, 3, SimpleNamespace(dp_rank=0)) == cfg.trainer.seed + 7919 * 3
    )  # replica 0 unchanged


# ------------------------------------------------------------------------------------------------ refresh


def test_soft_refresh_mixes_and_hard_refresh_copies():
    from types import SimpleNamespace

    from spin_megatron.training.policy import refresh_reference

    torch.manual_seed(0)
    policy, reference = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    refresh_reference(reference, SimpleNamespace(model=policy), alpha=0.25)
    for name, value in reference.state_dict().items():
        expected = 0.25 * policy.state_dict()[name] + 0.75 * before[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-7)
    refresh_reference(reference, SimpleNamespace(model=policy))
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in reference.state_dict().items())


def test_weight_decay_spares_biases_and_norm_weights(tmp_path):
    """Megatron's rule (AdamW): weight decay on matrices only; biases (Qwen2's QKV) and norm weights are exempt."""
    code = f"""
import json
from spin_megatron.parallel import init_parallel
from spin_megatron.training.policy import build_policy, resolve_model_source
from spin_megatron.train import load_config
cfg = load_config(["experiment=tiny_cpu", "optim.weight_decay=0.01", "trainer.output_dir={tmp_path}",
                   "optim.use_distributed_optimizer=false"])  # (its groups hold flat shards, not parameters)
groups = init_parallel(1, 1)
source = resolve_model_source(cfg, groups, 1)
policy = build_policy(cfg, source, groups)
names = {{id(p): n for n, p in policy.model.named_parameters()}}
groups_seen = []
for group in policy.optimizer.param_groups:
    for p in group["params"]:
        groups_seen.append((names.get(id(p), "?"), group["weight_decay"], tuple(p.shape)))
print(json.dumps(groups_seen))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert rows and all(name != "?" for name, _, _ in rows)
    for name, wd, shape in rows:
        exempt = len(shape) == 1 or name.endswith(".bias")
        assert wd == (0.0 if exempt else 0.01), (name, wd, shape)
    assert any(wd == 0.0 for _, wd, _ in rows) and any(wd == 0.01 for _, wd, _ in rows)


# ------------------------------------------------------------------------------------------------ end to end


def _train(out: Path, *overrides):
    args = ["experiment=tiny_cpu", "logging.progress_bar=false", f"trainer.output_dir={out}", *overrides]
    result = subprocess.run(
        [sys.executable, "-m", "spin_megatron.train", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.e2e
def test_seed_shape_is_anchored_after_the_first_mini_batch(tmp_path):
    """The seed presets' shape at tiny scale: online DPO, 2 samples per prompt, reference refreshed every rollout
    step, 4 mini-batches per batch (synthetic task: a reward the tiny model can separate, tests/synthetic_task.py).
    The first update of a step sees reference == policy (its margins are exactly 0); the three after it do not,
    so the step's mean margin, accuracy and KL are not 0. With one update per batch the preflight refuses it."""
    from transformers import AutoTokenizer

    from tests.synthetic_task import make_char_tokenizer, make_prompt_file

    tokenizer = make_char_tokenizer(tmp_path / "tokenizer")
    prompts = make_prompt_file(tmp_path / "prompts.jsonl", n=32)
    metrics = _train(
        tmp_path / "run",
        "algorithm.mode=online",
        "rollout.n=2",
        "algorithm.tie_policy=keep",  # a tiny model's two samples may tie; keep every prompt's pair
        "algorithm.reward=tests.synthetic_task:sevens",
        "algorithm.reward_metrics=[gsm8k_verl]",
        f"model.tiny.vocab_size={len(AutoTokenizer.from_pretrained(tokenizer))}",
        f"model.tokenizer_path={tokenizer}",
        f"data.train_files={prompts}",
        f"data.val_files={prompts}",
        "data.instruction=''",
        "rollout.max_new_tokens=8",
        "trainer.prompts_per_step=8",
        "trainer.mini_batch_size=2",
        "trainer.ref_update_freq=1",
        "trainer.total_steps=2",
        "trainer.test_freq=0",
        "trainer.save_freq=0",
        "trainer.export_hf=false",
        "optim.lr_warmup_steps=3",
    )
    for step in (1, 2):
        m = metrics[step]
        assert m["train/updates"] == 4 and m["train/zero_pair_updates"] == 0, m
        assert abs(m["rewards/margins"]) > 1e-4 and m["rewards/accuracies"] > 0, m
        assert m["loss"] != pytest.approx(math.log(2), abs=1e-6)
        for key in (
            "logits/chosen",
            "logits/rejected",
            "mean_token_accuracy",
            "entropy",
            "objective/entropy",
        ):
            assert math.isfinite(m[key]), key
        assert m["objective/entropy"] > 0 and m["entropy"] > 0 and 0 <= m["mean_token_accuracy"] <= 1
        assert m["reward/gsm8k_verl/accuracy"] == 0.0  # logged beside reward/accuracy, never paired on
        assert 0.0 <= m["val/contain_eos_token"] <= 1.0
    # online: the policy samples; objective/kl is taken on the first update only, where π == the sampler == ref
    assert metrics[1]["objective/kl"] == pytest.approx(0.0, abs=1e-4)
    # the schedule counts optimizer steps: 3 warm-up steps are over inside the first rollout step
    assert metrics[1]["lr"] == pytest.approx(1e-3)


@pytest.mark.e2e
def test_opponent_samples_and_mid_iteration_resume_is_bit_exact(tmp_path):
    """spin + sample_from=reference (the default): the engine holds the opponent p_θt for the whole iteration
    (its log-probs agree with the reference's, not the moving policy's), and a run stopped in the middle of an
    iteration resumes sampling from the same weights: metrics and final weights equal an uninterrupted run (DP=1,
    5 prompts at 4 per step: the resume also crosses epoch boundaries).
    sample_from=policy really samples from other weights: the same at step 1 (reference == policy), not after."""
    from tests.test_epoch_boundaries import ROWS

    five = (
        tmp_path / "five.jsonl"
    )  # 5 prompts, 4 per step: every step a new epoch (a batch never repeats one)
    five.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    common = [
        "trainer.ref_update_freq=3",
        "trainer.mini_batch_size=2",
        "trainer.test_freq=0",
        "trainer.save_freq=2",
        f"data.train_files=[{five}]",
    ]
    full = _train(
        tmp_path / "full", "trainer.total_steps=4", f"rollout.dump_path={tmp_path / 'ref.jsonl'}", *common
    )
    for step in range(1, 5):
        assert full[step]["rollout/logp_diff"] < 1e-4, (step, full[step]["rollout/logp_diff"])
    _train(tmp_path / "split", "trainer.total_steps=2", *common)
    split = _train(
        tmp_path / "split", "trainer.total_steps=4", *common
    )  # resumes at step 2, inside iteration 1
    for step in (3, 4):
        for key in ("loss", "rewards/margins", "grad_norm", "objective/kl", "rollout/logp_diff"):
            assert split[step][key] == full[step][key], (step, key)

    assert_same_hf_export(tmp_path / "full", tmp_path / "split")

    policy = _train(tmp_path / "policy", "algorithm.sample_from=policy", "trainer.total_steps=3",
                    "trainer.export_hf=false", f"rollout.dump_path={tmp_path / 'pol.jsonl'}", *common)  # fmt: skip
    assert all(policy[step]["rollout/logp_diff"] < 1e-4 for step in (1, 2, 3))  # synced every step

    def dumped(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return {s: [r["response_ids"] for r in rows if r["step"] == s] for s in (1, 2, 3)}

    ref, pol = dumped(tmp_path / "ref.jsonl"), dumped(tmp_path / "pol.jsonl")
    assert ref[1] == pol[1]
    assert ref[2] != pol[2] and ref[3] != pol[3]


@pytest.mark.e2e
@pytest.mark.dist
def test_soft_refresh_in_optimizer_steps_at_dp2_resumes_bit_exactly(tmp_path):
    """DP=2, 2 mini-batches × 2 epochs (4 updates per rollout step), TRL's ref_model_sync_steps=3 with a soft
    (TR-DPO) mix, so refreshes land inside steps; the opponent samples, validation puts the policy in the engine
    and the next step the opponent back. The engine's log-probs agree with the reference that sampled at every
    step, and 4 steps equal 2 + resume + 2 (metrics and final weights)."""
    from tests.helpers import run_ranks

    common = [
        "experiment=tiny_cpu", "logging.progress_bar=false", "trainer.ref_update_freq=0",
        "trainer.ref_model_sync_steps=3", "trainer.ref_model_mixup_alpha=0.5", "trainer.mini_batch_size=2",
        "trainer.update_epochs=2", "trainer.test_freq=2", "trainer.save_freq=2",
    ]  # fmt: skip

    def train(out, steps):
        assert run_ranks(2, "spin_megatron.train", *common, f"trainer.output_dir={out}",
                         f"trainer.total_steps={steps}", timeout_s=900) == 0  # fmt: skip
        return {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}

    full = train(tmp_path / "full", 4)
    for step in range(1, 5):
        assert full[step]["train/updates"] == 4, full[step]
        assert full[step]["rollout/logp_diff"] < 1e-4, (step, full[step]["rollout/logp_diff"])
    assert "val/accuracy" in full[2] and "val/accuracy" in full[4]
    train(tmp_path / "split", 2)
    split = train(tmp_path / "split", 4)
    for step in (3, 4):
        for key in ("loss", "rewards/margins", "grad_norm", "objective/kl", "val/gold_nll"):
            if key in full[step]:
                assert split[step][key] == full[step][key], (step, key)

    assert_same_hf_export(tmp_path / "full", tmp_path / "split")


@pytest.mark.e2e
def test_refresh_schedule_ref_recompute_and_engine_model_inside_steps(tmp_path):
    """tests/workers/refresh.py drives the trainer step by step (issue 22 D14–16: each was a one-line bug that the
    run-vs-resumed-run comparison above cannot see, since both runs carry it). ref_model_sync_steps=3, 4 updates
    per rollout step: refreshes after optimizer steps 3 and 6, as TRL's global_step % 3 == 0; after a hard one the
    next update's loss is log 2 (reference log-probs recomputed: reference == policy); after a soft one,
    validation finds the policy in the engine and the next step the mixed reference."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.workers.refresh", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checks = json.loads(result.stdout.strip().splitlines()[-1])
    hard, soft = checks["hard"], checks["soft"]
    assert hard["refreshed_after"] == [3, 6]
    assert [u["before"] for u in hard["updates"]] == list(range(8))
    for update in hard["updates"]:
        if update["before"] in (0, 3, 6):  # the first update, and the ones right after a refresh
            assert update["loss"] == pytest.approx(hard["log2"], abs=1e-6), update
        else:
            assert abs(update["loss"] - hard["log2"]) > 1e-3, update
    assert soft == {"after_step": True, "validation": True, "after_next_step": True}
