"""``spin-plot RUN_DIR [--out DIR] [--keys ...]``: PNG curves from ``RUN_DIR/metrics.jsonl``.

Without ``--keys`` it draws the standard panels (loss, rewards, margins, accuracies, score, validation, grad norm,
lr, response length, rollout log-prob gap, timings), skipping metrics the run did not log, and ``overview.png``:
the curves to check first on one page. With ``--keys`` it draws
one PNG per metric matching the given names or shell patterns (``"time/*"``).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import sys
from pathlib import Path

PROG = "spin-plot"
# (file stem, title, metric keys drawn on the same axes); "time/*" expands to every timing metric.
PANELS = (
    ("loss", "DPO loss", ("loss",)),
    ("rewards", "implicit rewards", ("rewards/chosen", "rewards/rejected")),
    ("margins", "reward margin (chosen - rejected)", ("rewards/margins",)),
    ("accuracies", "reward accuracy", ("rewards/accuracies",)),
    ("score", "rollout score (reward fn)", ("reward/score_mean",)),
    ("val_accuracy", "validation accuracy", ("val/accuracy",)),
    ("val_gold_nll", "validation gold NLL", ("val/gold_nll",)),
    ("grad_norm", "gradient norm", ("grad_norm",)),
    ("lr", "learning rate", ("lr",)),
    ("response_length", "mean response length (tokens)", ("response_length/mean",)),
    ("logp_diff", "rollout vs trainer log-prob gap", ("rollout/logp_diff",)),
    ("time", "seconds per phase", ("time/*",)),
)
# The curves a user checks first, on one page (overview.png): is it learning, is the data giving pairs, is the
# engine in sync with the trainer.
OVERVIEW = (
    "loss",
    "margins",
    "accuracies",
    "score",
    "val_accuracy",
    "val_gold_nll",
    "logp_diff",
    "grad_norm",
)
Series = dict[str, tuple[list[int], list[float]]]


def read_series(path: Path) -> Series:
    """metric -> (steps, values), one value per step (the last one logged wins, as after a resume).

    null (a non-finite value) becomes NaN, drawn as a gap. A line that is not JSON (a torn last line of a killed
    run) is reported on stderr and skipped.
    """
    by_key: dict[str, dict[int, float]] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record.pop("step"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            print(f"{PROG}: skipping {path}:{lineno}: not a metrics line", file=sys.stderr)
            continue
        for key, value in record.items():
            if value is None or isinstance(value, (int, float)):
                by_key.setdefault(key, {})[step] = math.nan if value is None else float(value)
    return {key: (sorted(points), [points[s] for s in sorted(points)]) for key, points in by_key.items()}


def _expand(patterns, series: Series) -> list[str]:
    keys = []
    for pattern in patterns:
        keys.extend(k for k in sorted(series) if fnmatch.fnmatchcase(k, pattern) and k not in keys)
    return keys


def _draw_axes(ax, title: str, keys: list[str], series: Series) -> None:
    for key in keys:
        steps, values = series[key]
        sparse = len(steps) < 30  # validation every k steps: show the points, not just a line
        ax.plot(steps, values, label=key, marker="o" if sparse else None, markersize=3, linewidth=1.2)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    if len(keys) > 1:
        ax.legend(fontsize=7)


def _draw(out_path: Path, title: str, keys: list[str], series: Series) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        _draw_axes(ax, title, keys, series)
        fig.tight_layout()
        fig.savefig(out_path)
    finally:
        plt.close(fig)


def _draw_overview(out_path: Path, panels: list[tuple[str, list[str]]], series: Series) -> None:
    import matplotlib.pyplot as plt

    rows = math.ceil(len(panels) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(11, 2.8 * rows), dpi=100, squeeze=False)
    try:
        for ax, (title, keys) in zip(axes.flat, panels):
            _draw_axes(ax, title, keys, series)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out_path)
    finally:
        plt.close(fig)


def plot_run(run_dir: Path, out_dir: Path | None = None, keys: list[str] | None = None) -> list[Path]:
    """Write the PNGs and return their paths (nothing for metrics the run did not log)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (and none on a cluster node)
    series = read_series(run_dir / "metrics.jsonl")
    out_dir = out_dir or run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    if keys:
        panels = [(key.replace("/", "_"), key, (key,)) for key in _expand(keys, series)]
    else:
        panels = PANELS
    written, overview = [], []
    for stem, title, patterns in panels:
        present = _expand(patterns, series)
        if present:
            written.append(out_dir / f"{stem}.png")
            _draw(written[-1], title, present, series)
            if not keys and stem in OVERVIEW:
                overview.append((title, present))
    if overview:  # first in the list: the page to open
        written.insert(0, out_dir / "overview.png")
        _draw_overview(written[0], overview, series)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Plot the curves of a spin-train run (metrics.jsonl)."
    )
    parser.add_argument("run_dir", type=Path, help="the run's output directory (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="where the PNGs go (default: RUN_DIR/plots)")
    parser.add_argument(
        "--keys",
        nargs="+",
        default=None,
        help='metrics to plot, one PNG each; shell patterns allowed ("time/*")',
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    metrics_file = args.run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        print(
            f"{PROG}: error: {metrics_file} does not exist; pass the output directory of a run",
            file=sys.stderr,
        )
        return 2
    written = plot_run(args.run_dir, args.out, args.keys)
    if not written:
        wanted = " ".join(args.keys) if args.keys else "any standard metric"
        print(
            f"{PROG}: error: {metrics_file} has no values for {wanted}; see its keys or pass --keys",
            file=sys.stderr,
        )
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
