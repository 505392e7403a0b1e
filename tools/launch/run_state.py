"""Is the run these Hydra overrides describe finished? Used by ``spin.sbatch`` to decide on a requeue.

    python tools/launch/run_state.py experiment=qwen2.5_3b_gsm8k trainer.output_dir=runs/q3b

Prints one line — ``finished|unfinished <step> <total_steps> <output_dir>`` — where ``step`` is that of the
latest complete checkpoint in ``trainer.output_dir`` (0 without one). Exit code 0 either way, 2 (one line on
stderr) if the overrides do not compose into a valid configuration.
"""

from __future__ import annotations

import sys

from spin_megatron.errors import UserError
from spin_megatron.train import load_config
from spin_megatron.training.checkpoint import find_latest, read_trainer_state


def run_state(overrides: list[str]) -> tuple[bool, int, int, str]:
    """(finished, latest checkpoint step, total steps, output dir) of the configured run."""
    cfg = load_config(overrides)
    latest = find_latest(cfg.trainer.output_dir)
    step = int(read_trainer_state(latest)["step"]) if latest is not None else 0
    total = cfg.trainer.total_steps
    return step >= total, step, total, cfg.trainer.output_dir


def main(argv: list[str] | None = None) -> int:
    try:
        finished, step, total, output_dir = run_state(list(sys.argv[1:] if argv is None else argv))
    except UserError as exc:
        print(f"run_state: error: {exc}", file=sys.stderr)
        return 2
    print(f"{'finished' if finished else 'unfinished'} {step} {total} {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
