"""GSM8K answer extraction and scoring, and the registry that maps a config name to a reward function.

A reward function has the signature ``reward_fn(prompt: str, response: str, sample: Mapping) -> float`` where
``sample`` is the dataset row of the prompt (for GSM8K: ``{"question": ..., "answer": "... #### 72"}``).
``get_reward_fn`` accepts a registered short name or a dotted path ``"package.module:function"`` to a user
function with that signature.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from spin_megatron.errors import ConfigError
from spin_megatron.types import Sample

RewardFn = Callable[[str, str, Mapping[str, Any]], float]

EXTRACT_MODES = ("strict", "flexible")

# A number as GSM8K writes it: optional sign and "$", thousands commas only in groups of three (so a list
# "1,2,3" reads as three numbers, not 123), optional decimals. A "-" right after a word, digit or ")" is a
# subtraction ("48-24"), not a sign. A trailing "." is sentence punctuation and is never part of the number.
_NUM = r"(?:(?<![\w)])-)?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
_NUMBER = re.compile(_NUM)
_HASH_ANSWER = re.compile(rf"####\s*({_NUM})")
_BOXED = re.compile(rf"\\boxed\{{\s*(?:\\\$)?\s*({_NUM})")
_ANSWER_IS = re.compile(rf"answer\s*(?:is|:)\s*[:=]?\s*(?:\\\$)?\s*({_NUM})", re.IGNORECASE)
# The format bonus wants the answer on its own "#### <number>" line, as the GSM8K solutions end.
_ANSWER_LINE = re.compile(rf"^[ \t]*####[ \t]*{_NUM}[ \t]*\.?[ \t]*$", re.MULTILINE)


def _to_decimal(value: object) -> Decimal | None:
    """A finite Decimal from a number or a numeric string ("$1,000", "50%", "18."), else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, numbers.Real):
        text = repr(float(value)) if isinstance(value, float) else str(value)
    elif isinstance(value, str):
        text = value.strip().replace(",", "").replace("$", "").rstrip("%.").strip()
    else:
        return None
    try:
        parsed = Decimal(text)
    except InvalidOperation:  # not a number at all: that is exactly the "no" answer numbers_equal gives
        return None
    return parsed if parsed.is_finite() else None


def normalize_number(text: str) -> str | None:
    """Canonical string of a numeric string: no commas/"$", integers without ".0", decimals without trailing 0s."""
    value = _to_decimal(text)
    if value is None:
        return None
    if value == value.to_integral_value():
        return str(int(value))  # also turns "-0" into "0"
    return format(value.normalize(), "f")


def _last(pattern: re.Pattern[str], text: str) -> str | None:
    matches = pattern.findall(text)
    return normalize_number(matches[-1]) if matches else None


def extract_answer(text: str | None, *, mode: str = "flexible") -> str | None:
    """The final numeric answer of ``text`` as a normalised string, or None when there is none.

    ``strict`` accepts only the GSM8K ``#### <number>`` form (the last one wins). ``flexible`` uses that form
    when present, else ``\\boxed{N}``, else "the answer is N" / "answer: N", else the last number in the text.
    """
    if mode not in EXTRACT_MODES:
        raise ConfigError(f"reward extraction mode must be one of {', '.join(EXTRACT_MODES)}; got {mode!r}")
    if text is None:
        return None
    marked = _last(_HASH_ANSWER, text)
    if marked is not None or mode == "strict":
        return marked
    for pattern in (_BOXED, _ANSWER_IS, _NUMBER):
        found = _last(pattern, text)
        if found is not None:
            return found
    return None


def numbers_equal(a: object, b: object) -> bool:
    """Numeric equality of two numbers or numeric strings ("18" == "18.00", "1,000" == 1000); garbage is False."""
    left, right = _to_decimal(a), _to_decimal(b)
    return left is not None and right is not None and left == right


def gold_answer(sample_or_row: Sample | Mapping[str, Any] | str) -> str:
    """The gold number of a GSM8K row: from a row mapping, a :class:`Sample`'s metadata, or the answer text."""
    solution = _solution_text(sample_or_row)
    gold = extract_answer(solution, mode="strict")
    if gold is None:
        raise ValueError(f"gold answer has no '#### <number>' line (GSM8K format): ...{solution[-120:]!r}")
    return gold


def _solution_text(sample_or_row: Sample | Mapping[str, Any] | str) -> str:
    """The GSM8K solution text (``row["answer"]``) of a row mapping, a :class:`Sample`'s metadata, or itself."""
    if isinstance(sample_or_row, Sample):
        sample_or_row = sample_or_row.metadata
    if isinstance(sample_or_row, Mapping):
        if "answer" not in sample_or_row:
            raise ConfigError(
                "the GSM8K reward needs the dataset row's 'answer' field (a solution ending in '#### <number>'); "
                f"the row has keys {sorted(map(str, sample_or_row))}: point the data config at a GSM8K-style set"
            )
        sample_or_row = sample_or_row["answer"]
    if not isinstance(sample_or_row, str):
        raise TypeError(f"gold_answer expects a row mapping, a Sample or a string, got {type(sample_or_row)}")
    return sample_or_row


def has_answer_line(response: str) -> bool:
    """Whether ``response`` contains a well-formed ``#### <number>`` line (what the format bonus rewards)."""
    return _ANSWER_LINE.search(response) is not None


def make_gsm8k_reward(*, mode: str = "flexible", format_reward: float = 0.0) -> RewardFn:
    """A GSM8K reward: 1.0 for the right final number, plus ``format_reward`` for a ``#### <number>`` line.

    The correctness part is 0/1 so a pair builder's ``correct_threshold=1.0`` still separates right from
    wrong when a bonus is added (right: 1 + bonus, wrong: at most the bonus, which must be below 1).
    """
    if mode not in EXTRACT_MODES:
        raise ConfigError(f"reward.mode must be one of {', '.join(EXTRACT_MODES)}; got {mode!r}")
    if not isinstance(format_reward, numbers.Real) or not 0.0 <= format_reward < 1.0:
        raise ConfigError(
            f"reward.format_reward must be a number in [0, 1) (e.g. 0.1); got {format_reward!r}"
        )
    bonus = float(format_reward)

    def gsm8k_reward(prompt: str, response: str, sample: Mapping[str, Any]) -> float:
        correct = numbers_equal(extract_answer(response, mode=mode), gold_answer(sample))
        return float(correct) + (bonus if bonus and has_answer_line(response) else 0.0)

    gsm8k_reward.__qualname__ = f"gsm8k_reward[mode={mode}, format_reward={bonus}]"
    return gsm8k_reward


# ----------------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make ``fn`` available to ``get_reward_fn(name)`` (and so to the config's reward name)."""

    def decorator(fn: RewardFn) -> RewardFn:
        if _REGISTRY.get(name, fn) is not fn:
            raise ValueError(
                f"reward name {name!r} is already registered to {_REGISTRY[name]!r}; pick another"
            )
        _REGISTRY[name] = fn
        return fn

    return decorator


def registered_rewards() -> list[str]:
    return sorted(_REGISTRY)


def get_reward_fn(name: str | RewardFn) -> RewardFn:
    """A reward function from a registered name, a dotted path ``"pkg.mod:fn"`` / ``"pkg.mod.fn"``, or itself."""
    if callable(name):
        return name
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    if isinstance(name, str) and ("." in name or ":" in name):
        return _import_reward(name)
    raise ConfigError(
        f"unknown reward function {name!r}: use a registered name ({', '.join(registered_rewards())}) or a "
        "dotted path 'package.module:function' to a reward_fn(prompt, response, sample) -> float"
    )


def _import_reward(path: str) -> RewardFn:
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(
            f"reward function {path!r} is not a dotted path of the form 'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"reward function {path!r}: cannot import module {module_name!r} ({err}); check the path and that "
            "the module is installed or on PYTHONPATH"
        ) from err
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"reward function {path!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ConfigError(f"reward function {path!r} is a {type(fn).__name__}, not a callable reward_fn")
    return fn


gsm8k_reward = register_reward("gsm8k")(make_gsm8k_reward())
gsm8k_reward.__qualname__ = gsm8k_reward.__name__ = "gsm8k_reward"
register_reward("gsm8k_strict")(make_gsm8k_reward(mode="strict"))
register_reward("gsm8k_format")(make_gsm8k_reward(format_reward=0.1))
register_reward("gsm8k_strict_format")(make_gsm8k_reward(mode="strict", format_reward=0.1))


# ------------------------------------------------------------------------------------ verl's GSM8K rule

# The seed project scored GSM8K with verl's rule (verl 0.5.0, ``verl/utils/reward_score/gsm8k.py``,
# ``compute_score`` with method="strict", format_score=0, score=1). Restated: only the last 300 characters of
# the response are searched; an answer is "####", ONE space, an optional "-", then a run of digits, "." and ","
# (so "####72", "#### $72" and "####  72" have none); the last one found wins; its commas are removed and it is
# compared with the gold as a STRING ("72.00", "72." and "072" are not "72"). The gold is the first such run in
# the dataset's solution, commas removed (verl's examples/data_preprocess/gsm8k.py).
VERL_TAIL_CHARS = 300
_VERL_ANSWER = re.compile(r"#### (-?[0-9.,]+)")


def verl_gold_answer(solution: str) -> str:
    """The gold string verl's GSM8K preprocessing stores: the first ``#### <run>`` of ``solution``, no commas."""
    found = _VERL_ANSWER.search(solution)
    if found is None:
        raise ValueError(f"gold answer has no '#### <number>' (verl's GSM8K format): ...{solution[-120:]!r}")
    return found.group(1).replace(",", "")


def verl_extract_answer(response: str) -> str | None:
    """verl's strict GSM8K answer of ``response`` (last ``#### <run>`` in its last 300 characters), or None."""
    found = _VERL_ANSWER.findall(response[-VERL_TAIL_CHARS:])
    return found[-1].replace(",", "") if found else None


@register_reward("gsm8k_verl")
def gsm8k_verl(prompt: str, response: str, sample: Mapping[str, Any]) -> float:
    """1.0 when verl's strict GSM8K rule accepts ``response`` for the row's gold answer, else 0.0."""
    return float(verl_extract_answer(response) == verl_gold_answer(_solution_text(sample)))


# ----------------------------------------------------------------------------------------------- scoring


def score_samples(
    samples: Sequence[Sample],
    reward_fn: RewardFn | None,
    *,
    decode: Callable[[list[int]], str],
    rows: Mapping[Hashable, Mapping[str, Any]] | None = None,
    metric_fns: Mapping[str, RewardFn] | None = None,
) -> list[float]:
    """Set every ``sample.reward`` in place and return the rewards in input order (``reward_fn`` None: no rule
    reward, ``algorithm.reward=none``; the metrics are still scored and the rewards left as they are).

    The response text is ``sample.response_text`` when the engine filled it, else ``decode(response_ids)``.
    The dataset row is ``rows[sample.prompt_id]`` when ``rows`` is given, else ``sample.metadata``.
    ``metric_fns`` (name → reward function) score the same text and row into ``sample.metric_rewards[name]``,
    for logging only.
    """
    prompt_texts: dict[Hashable, str] = {}
    rewards = []
    for sample in samples:
        if sample.prompt_id not in prompt_texts:  # n samples share a prompt: decode it once
            prompt_texts[sample.prompt_id] = decode(sample.prompt_ids)
        response = sample.response_text if sample.response_text is not None else decode(sample.response_ids)
        if rows is None:
            row = sample.metadata
        elif sample.prompt_id in rows:
            row = rows[sample.prompt_id]
        else:
            raise ValueError(
                f"no dataset row for prompt id {sample.prompt_id!r}: `rows` must cover every prompt"
            )
        if reward_fn is not None:
            reward = reward_fn(prompt_texts[sample.prompt_id], response, row)
            sample.reward = _checked_reward(reward, reward_fn, sample)
        rewards.append(sample.reward)
        for name, metric_fn in (metric_fns or {}).items():
            metric = metric_fn(prompt_texts[sample.prompt_id], response, row)
            sample.metric_rewards[name] = _checked_reward(metric, metric_fn, sample)
    return rewards


def _checked_reward(reward: object, reward_fn: RewardFn, sample: Sample) -> float:
    # A NaN or a string would otherwise flow into pair ranking, where NaN compares False to everything and
    # silently picks an arbitrary chosen/rejected.
    name = getattr(reward_fn, "__qualname__", repr(reward_fn))
    where = f"prompt {sample.prompt_id!r}, sample {sample.sample_index}"
    if not isinstance(reward, numbers.Real):
        raise ValueError(
            f"reward function {name} returned {reward!r} ({type(reward).__name__}) for {where}; "
            "it must return a float"
        )
    if not math.isfinite(reward):
        raise ValueError(f"reward function {name} returned a non-finite reward {reward!r} for {where}")
    return float(reward)
