"""GSM8K answer extraction, numeric equality, the GSM8K reward, the reward registry and ``score_samples``."""

import itertools
import json
import math
import re
import sys

import pytest

from spin_megatron.algorithm import rewards
from spin_megatron.algorithm.rewards import (
    extract_answer,
    get_reward_fn,
    gold_answer,
    gsm8k_reward,
    make_gsm8k_reward,
    numbers_equal,
    register_reward,
    score_samples,
)
from spin_megatron.errors import ConfigError
from spin_megatron.types import Sample

ROW = {
    "question": "Natalia sold 48 clips in April and half as many in May. How many?",
    "answer": "48+24=72\n#### 72",
}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("#### 72", "72"),
        ("so the total is\n#### 1,234", "1234"),
        ("#### -5", "-5"),
        ("#### $1,000.50", "1000.5"),
        ("#### 18.00", "18"),
        ("#### 72 clips, not 5", "72"),  # the marked answer wins over later numbers
        ("#### 3\nsecond try\n#### 4", "4"),  # the last marked answer wins
        ("The answer is 42.", "42"),
        ("The answer is $1,200", "1200"),
        ("Final answer: -3.25", "-3.25"),
        ("\\boxed{17} and then 3 more words", "17"),
        ("so the cost is \\boxed{\\$1,234}", "1234"),
        ("She had 12 apples and ate 3, so 9 were left.", "9"),
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.", "24"),
        ("It grew by 50%", "50"),
        ("He earns $10.00 per hour", "10"),
        ("It is 15 km away", "15"),
        ("The temperature is -7 degrees", "-7"),
        ("5-3 = 2", "2"),
        ("pages 3-5", "5"),  # a dash between numbers is a range/subtraction, not a sign
        ("1,2,3", "3"),  # commas not in groups of three separate numbers
        ("0.5 of them", "0.5"),
        ("-0", "0"),
        ("no numbers here", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_answer_flexible(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("#### 72", "72"),
        ("work\n#### 1,234", "1234"),
        ("####-8", "-8"),
        ("The answer is 42", None),
        ("\\boxed{42}", None),
        ("48/2 = 24", None),
        ("#### none", None),
    ],
)
def test_extract_answer_strict(text, expected):
    assert extract_answer(text, mode="strict") == expected


def test_extract_answer_rejects_unknown_mode():
    with pytest.raises(ConfigError, match="strict, flexible.*'loose'"):
        extract_answer("#### 1", mode="loose")


@pytest.mark.parametrize(
    "a, b",
    [
        ("18", "18.0"),
        ("18.00", "18"),
        ("1,000", "1000"),
        ("$5", "5"),
        (18, "18.0"),
        ("-3", -3.0),
        ("50%", 50),
        ("7.", "7"),
        (0.5, "0.50"),
    ],
)
def test_numbers_equal(a, b):
    assert numbers_equal(a, b) and numbers_equal(b, a)


@pytest.mark.parametrize(
    "a, b",
    [
        ("18", "19"),
        ("abc", "abc"),
        (None, "1"),
        (None, None),
        ("nan", "nan"),
        ("inf", "inf"),
        (math.nan, math.nan),
        ("", ""),
        ([], 1),
        ({}, {}),
        ("1 000", "1000"),
        (True, 1),
        ("--1", "1"),
    ],
)
def test_numbers_equal_is_false_for_garbage_and_never_raises(a, b):
    assert not numbers_equal(a, b)


def test_gold_answer_from_row_sample_and_text():
    assert gold_answer(ROW) == "72"
    assert (
        gold_answer(Sample(prompt_id=0, prompt_ids=[1], response_ids=[2], finish_reason="stop", metadata=ROW))
        == "72"
    )
    assert gold_answer("a\n#### 1,080") == "1080"


def test_gold_answer_errors_name_the_problem():
    with pytest.raises(ConfigError, match="'answer' field.*keys \\['question'\\]"):
        gold_answer({"question": "q"})
    with pytest.raises(ValueError, match="no '#### <number>' line"):
        gold_answer({"answer": "the answer is 5"})


def test_gsm8k_reward_scores_correctness():
    assert gsm8k_reward("q", "48 + 24 = 72\n#### 72", ROW) == 1.0
    assert gsm8k_reward("q", "The answer is 72.", ROW) == 1.0
    assert gsm8k_reward("q", "#### 72.00", ROW) == 1.0
    assert gsm8k_reward("q", "#### 71", ROW) == 0.0
    assert gsm8k_reward("q", "I do not know", ROW) == 0.0


def test_strict_reward_needs_the_hash_line():
    strict = make_gsm8k_reward(mode="strict")
    assert strict("q", "The answer is 72", ROW) == 0.0
    assert strict("q", "so\n#### 72", ROW) == 1.0


def test_format_reward_bonus():
    reward = make_gsm8k_reward(format_reward=0.1)
    assert reward("q", "48+24=72\n#### 72", ROW) == pytest.approx(1.1)
    assert reward("q", "48+24=70\n#### 70", ROW) == pytest.approx(0.1)
    assert reward("q", "The answer is 72", ROW) == 1.0  # right, but not in the GSM8K format
    assert reward("q", "the total #### 72 I think", ROW) == 1.0  # marker not on a line of its own


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(format_reward=-0.1),
        dict(format_reward=1.0),
        dict(format_reward=math.nan),
        dict(format_reward="0.1"),
        dict(mode="lenient"),
    ],
)
def test_make_gsm8k_reward_rejects_bad_options(kwargs):
    with pytest.raises(ConfigError, match="reward\\.(format_reward|mode)"):
        make_gsm8k_reward(**kwargs)


# ---------------------------------------------------------------------------------------------- registry


def test_registered_short_names():
    assert get_reward_fn("gsm8k") is gsm8k_reward
    assert {"gsm8k", "gsm8k_strict", "gsm8k_format"} <= set(rewards.registered_rewards())
    assert get_reward_fn("gsm8k_strict")("q", "The answer is 72", ROW) == 0.0
    assert get_reward_fn("gsm8k_format")("q", "#### 72", ROW) == pytest.approx(1.1)


def test_unknown_name_lists_the_choices():
    with pytest.raises(ConfigError) as info:
        get_reward_fn("gsm9k")
    message = str(info.value)
    assert len(message.splitlines()) == 1
    for fragment in ("'gsm9k'", "gsm8k", "gsm8k_strict", "package.module:function"):
        assert fragment in message


def test_register_reward(monkeypatch):
    monkeypatch.setattr(rewards, "_REGISTRY", dict(rewards._REGISTRY))

    @register_reward("always_half")
    def always_half(prompt, response, sample):
        return 0.5

    assert get_reward_fn("always_half") is always_half
    with pytest.raises(ValueError, match="already registered"):
        register_reward("always_half")(lambda prompt, response, sample: 0.0)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = "spin_user_rewards_for_test"
    (tmp_path / f"{name}.py").write_text(
        "def length_reward(prompt, response, sample):\n    return float(len(response))\n\nNOT_A_FUNCTION = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


@pytest.mark.parametrize("separator", [":", "."])
def test_dotted_path_imports_a_user_function(user_module, separator):
    fn = get_reward_fn(f"{user_module}{separator}length_reward")
    assert fn("p", "abc", {}) == 3.0


def test_callable_passes_through():
    def fn(prompt, response, sample):
        return 1.0

    assert get_reward_fn(fn) is fn


@pytest.mark.parametrize(
    "suffix, fragment",
    [(":missing", "has no attribute 'missing'"), (":NOT_A_FUNCTION", "is a int, not a callable")],
)
def test_dotted_path_errors(user_module, suffix, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        get_reward_fn(user_module + suffix)


def test_dotted_path_to_missing_module():
    with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg_xyz.rewards'"):
        get_reward_fn("no_such_pkg_xyz.rewards:fn")
    with pytest.raises(ConfigError, match="not a dotted path"):
        get_reward_fn(":fn")


# ---------------------------------------------------------------------------------------------- score_samples


def _decode(ids):
    return " ".join(map(str, ids))


def _samples():
    return [
        Sample(
            prompt_id=7,
            prompt_ids=[1, 2],
            response_ids=[7, 2],
            finish_reason="stop",
            sample_index=0,
            metadata={"answer": "#### 72"},
        ),
        Sample(
            prompt_id=7,
            prompt_ids=[1, 2],
            response_ids=[9],
            finish_reason="stop",
            sample_index=1,
            response_text="#### 72",
            metadata={"answer": "#### 72"},
        ),
    ]


def test_score_samples_fills_rewards():
    samples = _samples()
    assert score_samples(samples, gsm8k_reward, decode=_decode) == [0.0, 1.0]  # "7 2" -> 2; text "#### 72"
    assert [sample.reward for sample in samples] == [0.0, 1.0]


def test_score_samples_rows_and_prompt_text():
    seen = []

    def record(prompt, response, sample):
        seen.append((prompt, response, sample["answer"]))
        return 1

    samples = _samples()
    assert score_samples(samples, record, decode=_decode, rows={7: {"answer": "gold"}}) == [1.0, 1.0]
    assert seen == [("1 2", "7 2", "gold"), ("1 2", "#### 72", "gold")]
    assert isinstance(samples[0].reward, float)
    with pytest.raises(ValueError, match="no dataset row for prompt id 7"):
        score_samples(_samples(), record, decode=_decode, rows={8: {}})


@pytest.mark.parametrize("bad", [math.nan, math.inf, "1.0", None])
def test_score_samples_rejects_bad_reward_values(bad):
    with pytest.raises(ValueError, match="prompt 7, sample 0"):
        score_samples(_samples(), lambda prompt, response, sample: bad, decode=_decode)


# ---------------------------------------------------------------------------------------------- real GSM8K


def _rows(path, limit=None):
    with path.open() as f:
        return [json.loads(line) for line in itertools.islice(f, limit)]


def test_gold_answers_of_real_lines_are_numbers(gsm8k_dir):
    for row in _rows(gsm8k_dir / "train.jsonl", limit=200):
        gold = gold_answer(row)
        assert re.fullmatch(r"-?\d+(\.\d+)?", gold), (gold, row["answer"][-40:])
        assert numbers_equal(gold, row["answer"].rsplit("####", 1)[1])


@pytest.mark.parametrize("split", ["train", "test"])
def test_gold_solutions_score_one(gsm8k_dir, split):
    for row in _rows(gsm8k_dir / f"{split}.jsonl"):
        assert gsm8k_reward(row["question"], row["answer"], row) == 1.0, row["answer"][-60:]


def test_real_lines_wrong_and_strict(gsm8k_dir):
    rows = _rows(gsm8k_dir / "train.jsonl", limit=200)
    strict = get_reward_fn("gsm8k_strict")
    flexible_hits = 0
    for row in rows:
        body, gold = row["answer"].rsplit("####", 1)
        wrong = f"{body}#### {int(gold.replace(',', '')) + 1}"
        assert gsm8k_reward(row["question"], wrong, row) == 0.0
        assert strict(row["question"], body, row) == 0.0  # the worked solution without its "####" line
        flexible_hits += gsm8k_reward(row["question"], body, row)
    # Without "####", flexible falls back to the last number, which is the result in most GSM8K solutions.
    assert flexible_hits >= 0.9 * len(rows)


# ------------------------------------------------------------------------------------ verl's GSM8K rule

# What verl 0.5.0's strict GSM8K scorer (compute_score, format_score=0, score=1) says of each response, and what
# our flexible "gsm8k" and our "gsm8k_strict" say, side by side: (case, response, gold solution, verl, gsm8k,
# gsm8k_strict). "72\n#### 72" is the gold unless a case gives its own.
PAD = "x" * 300  # pushes text before it out of the last 300 characters verl searches
VERL_CASES = [
    ("marker", "So 48 + 24 = 72.\n#### 72", None, 1, 1, 1),
    ("no space after ####", "####72", None, 0, 1, 1),
    ("two spaces after ####", "####  72", None, 0, 1, 1),
    ("dollar sign", "#### $72", None, 0, 1, 1),
    ("trailing period", "#### 72.", None, 0, 1, 1),
    ("decimal zeros", "#### 72.00", None, 0, 1, 1),
    ("leading zero", "#### 072", None, 0, 1, 1),
    ("words after the number", "#### 72 clips", None, 1, 1, 1),
    ("trailing comma", "#### 72,", None, 1, 1, 1),
    ("thousands comma vs plain gold", "#### 1,000", "#### 1000", 1, 1, 1),
    ("plain vs comma gold", "#### 1000", "#### 1,000", 1, 1, 1),
    ("misplaced comma", "#### 1,2", "#### 12", 1, 0, 0),  # verl drops every comma; we read "1" then ",2"
    ("negative", "#### -5", "#### -5", 1, 1, 1),
    ("negative zero", "#### -0", "#### 0", 0, 1, 1),
    ("wrong number", "#### 71", None, 0, 0, 0),
    ("no marker", "The answer is 72", None, 0, 1, 0),
    ("no marker, last number", "48 + 24 = 72", None, 0, 1, 0),
    ("several markers, last right", "#### 71\nno wait\n#### 72", None, 1, 1, 1),
    ("several markers, last wrong", "#### 72\nno wait\n#### 71", None, 0, 0, 0),
    ("marker beyond the last 300 chars", "#### 72\n" + PAD, None, 0, 1, 1),
    ("marker inside the last 300 chars", PAD + "\n#### 72", None, 1, 1, 1),
    ("marker cut by the 300-char window", "#### 72" + "x" * 296, None, 0, 1, 1),
    ("empty response", "", None, 0, 0, 0),
]
_VERL_RUN_CHARS = set("0123456789.,")


def _verl_restated(response: str, solution: str) -> float:
    """verl's strict rule written out by hand (no regex), to check ours against an independent statement."""

    def runs(text):  # every "#### " + optional "-" + a non-empty run of digits/./, (left to right)
        found, start = [], text.find("#### ")
        while start != -1:
            end = begin = start + 5
            if text[end : end + 1] == "-":
                end += 1
            run_end = end
            while run_end < len(text) and text[run_end] in _VERL_RUN_CHARS:
                run_end += 1
            if run_end > end:
                found.append(text[begin:run_end].replace(",", ""))
                start = text.find("#### ", run_end)
            else:
                start = text.find("#### ", start + 1)
        return found

    answers = runs(response[-300:] if len(response) > 300 else response)
    return 1.0 if answers and answers[-1] == runs(solution)[0] else 0.0


@pytest.mark.parametrize(
    "response, solution, verl, flexible, strict",
    [case[1:] for case in VERL_CASES],
    ids=[case[0] for case in VERL_CASES],
)
def test_gsm8k_verl_table(response, solution, verl, flexible, strict):
    row = {"answer": solution or "72\n#### 72"}
    assert _verl_restated(response, row["answer"]) == verl  # the table says what verl says
    assert get_reward_fn("gsm8k_verl")("q", response, row) == verl
    assert get_reward_fn("gsm8k")("q", response, row) == flexible
    assert get_reward_fn("gsm8k_strict")("q", response, row) == strict


def test_gsm8k_verl_window_is_300_chars():
    assert rewards.VERL_TAIL_CHARS == 300
    assert rewards.verl_extract_answer("#### 72" + "x" * 293) == "72"  # exactly 300 characters
    assert rewards.verl_extract_answer("#### 72" + "x" * 294) is None  # the "#" falls out of the window


def test_gsm8k_verl_needs_the_answer_field():
    with pytest.raises(ConfigError, match="'answer' field"):
        get_reward_fn("gsm8k_verl")("q", "#### 72", {"question": "q"})
    with pytest.raises(ValueError, match="no '#### <number>'"):
        get_reward_fn("gsm8k_verl")("q", "#### 72", {"answer": "72"})


@pytest.mark.parametrize("split", ["train", "test"])
def test_gold_solutions_score_one_under_verl(gsm8k_dir, split):
    gsm8k_verl = get_reward_fn("gsm8k_verl")
    for row in _rows(gsm8k_dir / f"{split}.jsonl"):
        assert gsm8k_verl(row["question"], row["answer"], row) == 1.0, row["answer"][-60:]
        assert _verl_restated(row["answer"], row["answer"]) == 1.0


def test_score_samples_metric_fns_score_the_same_text():
    seen = []

    def record(prompt, response, sample):
        seen.append(response)
        return 0.5

    samples = _samples()
    rewards_ = score_samples(
        samples,
        gsm8k_reward,
        decode=_decode,
        metric_fns={"gsm8k_verl": get_reward_fn("gsm8k_verl"), "rec": record},
    )
    assert rewards_ == [0.0, 1.0]  # the pairing reward is untouched by the metrics
    assert [s.metric_rewards for s in samples] == [
        {"gsm8k_verl": 0.0, "rec": 0.5},
        {"gsm8k_verl": 1.0, "rec": 0.5},
    ]
    assert seen == ["7 2", "#### 72"]
    with pytest.raises(ValueError, match="non-finite"):
        score_samples(_samples(), gsm8k_reward, decode=_decode, metric_fns={"bad": lambda p, r, s: math.nan})
