"""Preference labels from a reward model (reward_model.*): the in-process transformers backend scores as
transformers does, the pairs follow the model's ranking, rule and model combine as configured, a pairwise judge
plugs in, bad reward models fail in one line before anything starts, and online mode runs end to end with a tiny
reward model choosing the pairs."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from spin_megatron.algorithm.experience import make_pairs
from spin_megatron.algorithm.pairs import build_online_pairs
from spin_megatron.errors import ConfigError
from spin_megatron.reward_model import RewardModelConfig, RewardModelError, RewardModelScoring, load_judge
from spin_megatron.reward_model.hf import HFRewardModel
from spin_megatron.types import Sample
from tests.helpers import REPO
from tests.reward_models import make_random_reward_model, make_sevens_reward_model
from tests.synthetic_task import make_char_tokenizer, make_prompt_file, sevens

PROMPT = [{"role": "user", "content": "count 1 2 3"}]


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    return make_char_tokenizer(tmp_path_factory.mktemp("char") / "tokenizer")


@pytest.fixture(scope="module")
def sevens_rm(tmp_path_factory, char_tokenizer):
    return make_sevens_reward_model(tmp_path_factory.mktemp("sevens_rm"), char_tokenizer)


def _conversations(responses):
    return [[*PROMPT, {"role": "assistant", "content": r}] for r in responses]


def _one_by_one(path, conversations):
    """transformers' own scores, one unpadded conversation per forward."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    scores = []
    with torch.inference_mode():
        for conversation in conversations:
            ids = tokenizer.apply_chat_template(conversation, tokenize=False)
            ids = tokenizer(ids, add_special_tokens=False, return_tensors="pt")["input_ids"]
            scores.append(float(model(input_ids=ids).logits[0, 0]))
    return scores


def _sample(prompt_id, index, response_ids, reward=None, text=None):
    return Sample(prompt_id=prompt_id, sample_index=index, prompt_ids=[1, 2], response_ids=response_ids,
                  finish_reason="stop", reward=reward, response_text=text)  # fmt: skip


# ----------------------------------------------------------------------------------------------- hf backend
@pytest.mark.parametrize("tokenizer", ["char", "qwen"])
def test_batched_scores_equal_transformers_one_by_one(
    tmp_path, char_tokenizer, qwen_tokenizer_dir, tokenizer
):
    """Sorted by length, right-padded micro-batches of 3 (and a cut-off max_length) give transformers' scores."""
    source = char_tokenizer if tokenizer == "char" else qwen_tokenizer_dir
    path = make_random_reward_model(tmp_path / "rm", source)
    responses = [
        "7",
        "the answer is 12",
        "a much longer answer, with words and 3 digits 456",
        "",
        "ok\nok",
        "x" * 40,
    ]
    conversations = _conversations(responses)
    expected = _one_by_one(path, conversations)
    model = HFRewardModel(str(path), micro_batch_size=3)
    assert model.score(conversations) == pytest.approx(expected, abs=1e-5)
    # a pad id that is also the template's last token (eos as pad) must not move the pooled position
    model._pad = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.score(conversations) == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 4) for s in expected)) == len(expected)  # distinct: a mix-up would show


def test_a_conversation_over_max_length_keeps_its_end(tmp_path, char_tokenizer, capfd):
    path = make_random_reward_model(tmp_path / "rm", char_tokenizer)
    model = HFRewardModel(str(path), max_length=16, micro_batch_size=2)
    long, short = _conversations(["y" * 50, "hi"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(tokenizer.apply_chat_template([long], tokenize=False), add_special_tokens=False)[
        "input_ids"
    ]
    assert model.score([long, short])[0] == pytest.approx(model.score_ids([ids[0][-16:]])[0], abs=1e-6)
    assert model.cuts.truncated == 1 and "cut to their last max_length tokens" in capfd.readouterr().err


def test_the_hand_set_model_ranks_by_sevens(sevens_rm):
    scores = HFRewardModel(str(sevens_rm)).score(_conversations(["aaaa", "a7aa", "77aa", "7777"]))
    assert scores == sorted(scores) and len(set(scores)) == 4


# ------------------------------------------------------------------------------------- pairs and combining
def test_pairs_are_the_models_best_and_worst(sevens_rm):
    """Equal-length responses: the model's order is the count of 7s; the pair is its best vs its worst, whatever
    the (here inverted) rule said."""
    scoring = RewardModelScoring(
        RewardModelConfig(path=str(sevens_rm)),
        HFRewardModel(str(sevens_rm)),
        lambda row: PROMPT,
        has_rule=True,
    )
    texts = {0: ["a7aa", "7777", "aaaa", "77a7"], 1: ["77aa", "7a7a"]}
    samples = [
        _sample(p, i, [10 + i], reward=-t.count("7"), text=t)
        for p, ts in texts.items()
        for i, t in enumerate(ts)
    ]
    scoring.apply(samples, {0: {}, 1: {}}, lambda s: s.response_text)
    assert [s.rule_reward for s in samples[:4]] == [-1, -4, 0, -3]
    pairs, stats = build_online_pairs(samples)
    assert (pairs[0].chosen_sample_index, pairs[0].rejected_sample_index) == (1, 2)  # 7777 vs aaaa
    assert stats.dropped_ties == 1  # prompt 1: two 7s each, same positions count: a tie under the model


def _fixed(scores):
    class Fixed:
        def score(self, conversations):
            return [scores[c[-1]["content"]] for c in conversations]

    return Fixed()


@pytest.mark.parametrize(
    ("combine", "margin", "expected"),
    [
        ("model", 0.0, (2, 0)),  # the model alone: c (0.9) vs a (0.1)
        ("rule_then_model", 0.0, (1, 2)),  # the rule first: b and a correct, the model prefers b; c is wrong
        ("weighted", 0.0, (1, 2)),  # 1·rule + 1·model: a 1.1, b 1.5, c 0.9
        ("model", 0.85, None),  # best − worst model score 0.8 ≤ margin: a near-tie, dropped
    ],
)
def test_combine_modes_and_margin(combine, margin, expected):
    cfg = RewardModelConfig(path="unused", combine=combine, margin=margin)
    scoring = RewardModelScoring(
        cfg, _fixed({"a": 0.1, "b": 0.5, "c": 0.9}), lambda row: PROMPT, has_rule=True
    )
    samples = [
        _sample(0, i, [i], reward=r, text=t) for i, (t, r) in enumerate([("a", 1.0), ("b", 1.0), ("c", 0.0)])
    ]
    scoring.apply(samples, {0: {}}, lambda s: s.response_text)
    pairs, stats = build_online_pairs(samples, margin=margin)
    got = (pairs[0].chosen_sample_index, pairs[0].rejected_sample_index) if pairs else None
    assert got == expected and stats.dropped_ties == (expected is None)


def test_rule_then_model_margin_applies_to_the_model_within_a_rule_tie():
    cfg = RewardModelConfig(path="unused", combine="rule_then_model", margin=0.5)
    scoring = RewardModelScoring(cfg, _fixed({"a": 0.1, "b": 0.5}), lambda row: PROMPT, has_rule=True)
    samples = [_sample(0, 0, [0], reward=1.0, text="a"), _sample(0, 1, [1], reward=1.0, text="b")]
    scoring.apply(samples, {0: {}}, lambda s: s.response_text)
    assert build_online_pairs(samples, margin=0.5)[1].dropped_ties == 1  # 0.4 ≤ 0.5
    assert build_online_pairs(samples, margin=0.3)[0][0].chosen_sample_index == 1


def test_logged_parts_and_their_agreement():
    from spin_megatron.algorithm.step_metrics import _reward_model_metrics
    from spin_megatron.config import AlgorithmConfig

    scoring = RewardModelScoring(RewardModelConfig(path="unused"), _fixed({"a": 0.2, "b": 0.6, "c": 0.4}),
                                 lambda row: PROMPT, has_rule=True)  # fmt: skip
    samples = [
        _sample(0, i, [i], reward=r, text=t) for i, (t, r) in enumerate([("a", 0.0), ("b", 1.0), ("c", 1.0)])
    ]
    scoring.apply(samples, {0: {}}, lambda s: s.response_text)
    sums = make_pairs(samples, [], AlgorithmConfig(mode="online")).sums
    metrics = _reward_model_metrics(sums)
    # the rule tells (a, b) and (a, c) apart; the model orders both the same way; (b, c) is a rule tie
    assert metrics == pytest.approx(
        {"reward/model_mean": 0.4, "reward/rule_mean": 2 / 3, "reward/rule_model_agreement": 1.0}
    )


def test_non_finite_model_scores_are_refused():
    scoring = RewardModelScoring(RewardModelConfig(path="unused"), _fixed({"a": float("nan")}), lambda row: PROMPT,
                                 has_rule=False)  # fmt: skip
    with pytest.raises(RewardModelError, match="not a finite number"):
        scoring.apply([_sample(0, 0, [0], text="a")], {0: {}}, lambda s: s.response_text)


# ------------------------------------------------------------------------------------------------ the judge
def test_a_pairwise_judge_decides_the_pair():
    cfg = RewardModelConfig(backend="judge", judge="tests.reward_models:sevens_judge")
    scoring = RewardModelScoring(cfg, load_judge(cfg), lambda row: PROMPT, has_rule=False)
    samples = [_sample(0, 1, [1], text="77"), _sample(0, 0, [0], text="7a"), _sample(1, 0, [2], text="7"),
               _sample(1, 1, [3], text="7")]  # fmt: skip
    scoring.apply(samples, {0: {}, 1: {}}, lambda s: s.response_text)
    assert [s.model_reward for s in samples] == [1.0, 0.0, 0.5, 0.5]
    pairs, stats = build_online_pairs(samples)
    assert (pairs[0].chosen_sample_index, stats.dropped_ties) == (1, 1)
    with pytest.raises(RewardModelError, match="set rollout.n=2"):
        scoring.apply([_sample(0, i, [i], text="7") for i in range(3)], {0: {}}, lambda s: s.response_text)


# -------------------------------------------------------------------------------------------- config, preflight
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["reward_model.path=/x", "algorithm.mode=spin"], "algorithm.mode=spin ranks nothing"),
        (["algorithm.reward=none"], "algorithm.reward=none leaves nothing to rank"),
        (["reward_model.path=/x", "algorithm.reward=none", "reward_model.combine=weighted"], "combine=model"),
        (["reward_model.backend=judge", "reward_model.judge=a.b:c", "rollout.n=4"], "set rollout.n=2"),
        (
            [
                "reward_model.backend=judge",
                "reward_model.judge=a.b:c",
                "rollout.n=2",
                "algorithm.reward=none",
                "trainer.test_freq=5",
            ],
            "trainer.test_freq=0",
        ),  # fmt: skip
        (["reward_model.backend=sglang"], "reward_model.path is needed"),
        (["reward_model.path=/x", "reward_model.combine=best"], "reward_model.combine must be one of"),
        (["reward_model.path=/x", "reward_model.margin=-1"], "reward_model.margin must be a finite number"),
        (["algorithm.mode=spin", "data.answer_key=null"], "data.answer_key is null"),
    ],
)
def test_config_refusals(overrides, message):
    from spin_megatron.compose import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(["experiment=tiny_cpu", "algorithm.mode=online", *overrides])  # (rollout.n: online's 2)


def _spin_train(*overrides, timeout=600):
    return subprocess.run([sys.executable, "-m", "spin_megatron.train", *overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def _break(path, change):
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda p: _break(p, lambda c: c.update(num_labels=3, id2label={i: str(i) for i in range(3)})),
         "head has num_labels=3, not one scalar"),
        (lambda p: _break(p, lambda c: c.update(architectures=["Qwen2ForCausalLM"])), "has no classification head"),
        (lambda p: _edit_tokenizer(p, None), "has no chat template"),
        (lambda p: _edit_tokenizer(p, "{{ messages[0]['nope'].upper() }}"), "cannot render"),
        (lambda p: (p / "config.json").unlink(), "has no config.json"),
    ],
)  # fmt: skip
def test_a_bad_reward_model_fails_in_one_line_before_anything_starts(
    tmp_path, char_tokenizer, breakage, message
):
    path = make_random_reward_model(tmp_path / "rm", char_tokenizer)
    breakage(path)
    result = _spin_train("experiment=tiny_cpu", "algorithm.mode=online", "rollout.n=2", f"reward_model.path={path}",
                         f"trainer.output_dir={tmp_path / 'run'}", timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("spin-train: error: reward_model") and message in last, result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def _edit_tokenizer(path, template):
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    if template is not None:
        config["chat_template"] = template
    config_file.write_text(json.dumps(config))
    for extra in path.glob("chat_template.*"):
        extra.unlink()


def test_the_planner_counts_the_reward_model(tmp_path, char_tokenizer):
    from spin_megatron.compose import load_config
    from spin_megatron.plan import resolve_arch
    from spin_megatron.planning.counting import reward_model_params
    from spin_megatron.planning.memory import estimate

    path = make_random_reward_model(tmp_path / "rm", char_tokenizer, hidden=64)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    assert reward_model_params(config) == sum(p.numel() for p in model.parameters())
    base = ["experiment=tiny_cpu", "algorithm.mode=online", "rollout.n=2"]
    without = load_config(base)
    with_rm = load_config([*base, f"reward_model.path={path}", "reward_model.micro_batch_size=2",
                           "reward_model.max_length=128"])  # fmt: skip
    arch = resolve_arch(without)[0]
    a, b = (estimate(c, arch, world_size=1).training_peak for c in (without, with_rm))
    forward = 2 * 128 * (4 * 64 + 2 * 128) * 4
    assert b - a == reward_model_params(config) * 4 + forward


# --------------------------------------------------------------------------------------------- end to end
@pytest.mark.e2e
@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_online_mode_with_a_reward_model_choosing_the_pairs(tmp_path, char_tokenizer, sevens_rm, overlap):
    """spin-train, online, the hand-set reward model deciding, the 7s rule logged beside it: every sample's
    model score is the reward model's own score of its conversation, the logged means are those of the samples,
    and the model orders the samples the rule tells apart nearly always as the rule does."""
    vocab = len(AutoTokenizer.from_pretrained(char_tokenizer))
    prompts = make_prompt_file(tmp_path / "prompts.jsonl", n=16)
    run, dump = tmp_path / "run", tmp_path / "dump.jsonl"
    result = _spin_train(
        "experiment=tiny_cpu", "logging.progress_bar=false", "algorithm.mode=online", "rollout.n=4",
        "algorithm.reward=tests.synthetic_task:sevens", f"reward_model.path={sevens_rm}", "reward_model.micro_batch_size=5",
        f"model.tiny.vocab_size={vocab}", f"model.tokenizer_path={char_tokenizer}", f"data.train_files=[{prompts}]",
        f"data.val_files=[{prompts}]", "data.instruction=''", "rollout.max_new_tokens=8", "trainer.total_steps=3",
        "trainer.prompts_per_step=4", "trainer.ref_update_freq=2", "trainer.test_freq=0", "trainer.save_freq=0",
        "trainer.export_hf=false", f"rollout.dump_path={dump}", f"trainer.output_dir={run}",
        # overlap: the reward model scores the next batch in the prefetch thread while this one trains
        *(["rollout.max_staleness=1", "rollout.hf_process=separate", "rollout.hf_threads=1"] if overlap else []),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(records) == 3 * 4 * 4
    rows = {i: json.loads(line) for i, line in enumerate(prompts.read_text().splitlines())}
    tokenizer = AutoTokenizer.from_pretrained(char_tokenizer)
    texts = [tokenizer.decode(r["response_ids"], skip_special_tokens=True) for r in records]
    conversations = [[{"role": "user", "content": rows[r["prompt_id"]]["question"]}, {"role": "assistant", "content": t}]
                     for r, t in zip(records, texts)]  # fmt: skip
    assert [r["model_reward"] for r in records] == pytest.approx(
        _one_by_one(sevens_rm, conversations), abs=1e-5
    )
    for r, t in zip(records, texts):
        assert r["reward"] == r["model_reward"] and r["rule_reward"] == pytest.approx(sevens("", t, {}))
    for step in (1, 2, 3):
        mine = [r for r in records if r["step"] == step]
        m = metrics[step - 1]
        assert m["reward/model_mean"] == pytest.approx(
            statistics.mean(r["model_reward"] for r in mine), abs=1e-6
        )
        assert m["reward/rule_mean"] == pytest.approx(
            statistics.mean(r["rule_reward"] for r in mine), abs=1e-6
        )
        assert m["reward/score_mean"] == pytest.approx(m["reward/model_mean"], abs=1e-6)
    assert [m["rollout/staleness"] for m in metrics] == ([0, 1, 1] if overlap else [0, 0, 0])
    agreement = [
        m["reward/rule_model_agreement"]
        for m in metrics
        if m["reward/rule_model_agreement"] == m["reward/rule_model_agreement"]
    ]
    assert agreement and min(agreement) >= 0.75, agreement


@pytest.mark.e2e
def test_chat_prompts_without_answers_or_rule_the_model_alone_decides(tmp_path, char_tokenizer, sevens_rm):
    """data.answer_key=null, algorithm.reward=none: prompts only, the reward model ranks the samples and scores
    validation's greedy answers; no rule parts, no gold NLL."""
    vocab = len(AutoTokenizer.from_pretrained(char_tokenizer))
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say 7 and {i}"}) + "\n" for i in range(8)))
    run = tmp_path / "run"
    result = _spin_train(
        "experiment=tiny_cpu", "logging.progress_bar=false", "algorithm.mode=online", "rollout.n=2",
        "algorithm.reward=none", f"reward_model.path={sevens_rm}", "data.answer_key=null", "data.prompt_key=prompt",
        f"model.tiny.vocab_size={vocab}", f"model.tokenizer_path={char_tokenizer}", f"data.train_files=[{prompts}]",
        f"data.val_files=[{prompts}]", "data.val_max_prompts=4", "data.instruction=''", "rollout.max_new_tokens=6",
        "trainer.total_steps=2", "trainer.prompts_per_step=4", "trainer.ref_update_freq=2", "trainer.test_freq=2",
        "trainer.save_freq=0", "trainer.export_hf=false", f"trainer.output_dir={run}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]
    assert last["reward/score_mean"] == pytest.approx(last["reward/model_mean"])
    assert "reward/rule_mean" not in last and "val/gold_nll" not in last
    # every prompt holds a 7, so the model scores every greedy answer above 0 (unscored would count 0)
    assert last["val/score_mean"] > 0.0
