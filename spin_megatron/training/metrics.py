"""Metric sinks: ``<output_dir>/metrics.jsonl`` (always, every step), a console line and progress bar, and wandb.

Only rank 0 writes: other ranks build the logger with ``enabled=False`` and every call is a no-op, so the trainer
calls it unconditionally. Metric names follow TRL (``rewards/chosen``, ``rewards/margins``, ...).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from spin_megatron.config import LoggingConfig

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id.txt"  # the run id, so a resumed run continues the same wandb run
# (metric, console label) in console order; metrics not listed still go to jsonl and wandb.
CONSOLE_METRICS = (
    ("loss", "loss"),
    ("rewards/accuracies", "acc"),
    ("rewards/margins", "margin"),
    ("reward/score_mean", "score"),
    ("val/accuracy", "val_acc"),
    ("val/gold_nll", "val_nll"),
    ("grad_norm", "gnorm"),
    ("lr", "lr"),
    ("response_length/mean", "resp_len"),
    ("rollout/logp_diff", "logp_diff"),
    ("time/step", "s/step"),
)
BAR_METRICS = ("loss", "rewards/accuracies", "reward/score_mean")


def _as_number(key: str, value: Any) -> int | float | bool:
    if isinstance(value, (bool, numbers.Integral)):
        return value if isinstance(value, bool) else int(value)
    try:
        return float(value)  # python/numpy floats, 0-d tensors and arrays
    except (TypeError, ValueError) as err:
        raise TypeError(f"metric {key!r} is not a number: {value!r}") from err


def _json_safe(value: int | float | bool) -> int | float | bool | None:
    """JSON has no NaN/Infinity: non-finite values become null (the console still shows them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value: int | float | bool) -> str:
    if isinstance(value, float):
        return f"{value:.3e}" if value != 0 and math.isfinite(value) and abs(value) < 1e-3 else f"{value:.4g}"
    return str(value)


# the metrics of an update: on a step without pairs they are NaN, and the console says why instead
UPDATE_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "grad_norm")


def no_pair_reason(metrics: Mapping[str, Any]) -> str | None:
    """``no pairs: 4 prompts tied (4 all wrong)`` when a training step built no pair, else None."""
    if "pairs/kept" not in metrics or metrics["pairs/kept"]:
        return None
    parts = []
    if metrics.get("pairs/dropped_ties"):
        tied = f"{metrics['pairs/dropped_ties']:g} prompts tied"
        detail = [f"{metrics[k]:g} {what}" for k, what in (("pairs/all_wrong", "all wrong"),
                  ("pairs/all_correct", "all correct")) if metrics.get(k)]  # fmt: skip
        parts.append(tied + (f" ({', '.join(detail)})" if detail else ""))
    if metrics.get("pairs/excluded_truncated"):
        parts.append(f"{metrics['pairs/excluded_truncated']:g} truncated samples excluded")
    if metrics.get("pairs/dropped_too_few"):
        parts.append(f"{metrics['pairs/dropped_too_few']:g} prompts with too few samples")
    return "no pairs: " + ("; ".join(parts) if parts else "no samples")


def format_console_line(step: int, metrics: Mapping[str, Any], total_steps: int | None = None) -> str:
    """``step 12/100 | loss 0.6931 | acc 0.5 | ...`` with the key metrics present (nan/inf shown as such); a
    step that built no pair shows why in place of its (NaN) update metrics."""
    head = f"step {step}" + (f"/{total_steps}" if total_steps else "")
    reason = no_pair_reason(metrics)
    skip = UPDATE_METRICS if reason else ()
    parts = [
        f"{label} {_fmt(metrics[key])}"
        for key, label in CONSOLE_METRICS
        if key in metrics and key not in skip
    ]
    return " | ".join([head, *([reason] if reason else []), *parts])


def _ends_with_torn_line(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) != b"\n"


class MetricsLogger:
    """Writes every ``log(step, metrics)`` to jsonl (flushed per line), console, progress bar and wandb.

    ``resume_step``: the step a resumed run restarts from; lines with a larger step (written after the
    checkpoint by the interrupted run) are dropped first so the file never holds a step twice.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        cfg: LoggingConfig,
        *,
        run_config: dict,
        enabled: bool,
        total_steps: int | None = None,
        resume_step: int | None = None,
    ):
        self.cfg = cfg
        self.enabled = enabled
        self.total_steps = total_steps
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE
        self._file = None
        self._bar = None
        self._wandb_run = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self.truncate_after(resume_step)
        torn = _ends_with_torn_line(self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # closed in finish()
        if torn:  # a killed run's unfinished last line must not swallow our first one
            self._file.write("\n")
        if cfg.progress_bar:
            # disable=None: no bar when stderr is not a terminal (batch logs get the console lines only)
            self._bar = tqdm(
                total=total_steps,
                initial=resume_step or 0,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                disable=None,
            )
        if cfg.wandb.mode != "disabled":
            self._wandb_run = self._init_wandb(run_config)

    def _init_wandb(self, run_config: dict):
        import wandb  # only here: importing it costs a second and the disabled mode never needs it

        id_file = self.output_dir / WANDB_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)  # wandb ids: [a-z0-9], unique per project
            id_file.write_text(run_id + "\n")
        wcfg = self.cfg.wandb
        return wandb.init(
            mode=wcfg.mode,
            project=wcfg.project,
            entity=wcfg.entity,
            name=wcfg.name or self.output_dir.resolve().name,
            id=run_id,
            dir=str(self.output_dir),
            config=run_config,
            resume="allow",
        )

    def truncate_after(self, step: int) -> int:
        """Drop the lines with a step > ``step`` (and a torn last line from a crash); returns how many."""
        if not self.enabled or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                keep = json.loads(line)["step"] <= step
            except (json.JSONDecodeError, KeyError, TypeError):
                keep = False  # only a line the killed process did not finish writing looks like this
            if keep:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            reopen = self._file is not None
            if reopen:
                self._file.close()
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
            os.replace(tmp, self.path)
            if reopen:
                self._file = open(self.path, "a", encoding="utf-8")
        return dropped

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        assert "step" not in metrics, "the step is an argument of log(), not a metric"
        values = {key: _as_number(key, value) for key, value in metrics.items()}
        record = {"step": int(step), **{key: _json_safe(value) for key, value in values.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        self._console(step, values)
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=int(step))

    def _console(self, step: int, values: Mapping[str, Any]) -> None:
        if self._bar is not None:
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
            shown = {
                label: _fmt(values[key])
                for key, label in CONSOLE_METRICS
                if key in BAR_METRICS and key in values
            }
            if shown:
                self._bar.set_postfix(shown, refresh=False)
        non_finite = any(isinstance(v, float) and not math.isfinite(v) for v in values.values())
        validation = any(key.startswith("val/") for key in values)
        if step % self.cfg.log_every == 0 or non_finite or validation:
            line = format_console_line(step, values, self.total_steps)
            if self._bar is not None:
                tqdm.write(line)
            else:
                print(line, flush=True)

    def finish(self) -> None:
        """Close the file, the bar and the wandb run (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


class Timer:
    """Wall-clock per phase: ``with timer("rollout"): ...`` then ``metrics.update(timer.pop())`` gives
    ``{"time/rollout": seconds, ...}`` (repeated phases within a step add up).

    ``synchronize`` (e.g. ``torch.cuda.synchronize``) runs at both ends so asynchronous GPU work is counted in
    the phase that launched it.
    """

    def __init__(self, synchronize: Callable[[], None] | None = None):
        self.synchronize = synchronize
        self._seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.synchronize is not None:
            self.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize is not None:
                self.synchronize()
            self._seconds[f"time/{phase}"] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        """The accumulated times since the last pop, and a reset."""
        seconds, self._seconds = dict(self._seconds), defaultdict(float)
        return seconds
