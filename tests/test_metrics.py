import json
import math

import pytest

from spin_megatron.config import LoggingConfig, WandbConfig
from spin_megatron.training.metrics import (
    METRICS_FILE,
    WANDB_ID_FILE,
    MetricsLogger,
    Timer,
    format_console_line,
)


def quiet(**overrides) -> LoggingConfig:
    return LoggingConfig(**{"progress_bar": False, **overrides})


def read_lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def test_every_log_is_one_json_line_with_the_step(tmp_path):
    with MetricsLogger(tmp_path, quiet(), run_config={}, enabled=True) as logger:
        logger.log(1, {"loss": 0.69, "pairs/count": 4})
        assert len(read_lines(tmp_path)) == 1  # flushed per line, readable while the run goes on
        logger.log(2, {"loss": 0.5, "rewards/accuracies": 1.0})
    assert read_lines(tmp_path) == [
        {"step": 1, "loss": 0.69, "pairs/count": 4},
        {"step": 2, "loss": 0.5, "rewards/accuracies": 1.0},
    ]


def test_non_finite_values_are_null_in_jsonl_but_shown_on_the_console(tmp_path, capsys):
    np = pytest.importorskip("numpy")
    with MetricsLogger(tmp_path, quiet(log_every=10), run_config={}, enabled=True) as logger:
        logger.log(3, {"loss": float("nan"), "grad_norm": np.float32("inf"), "lr": 1e-6})
    assert read_lines(tmp_path) == [{"step": 3, "loss": None, "grad_norm": None, "lr": 1e-6}]
    out = capsys.readouterr().out  # step 3 is off the log_every grid: printed because something is non-finite
    assert "loss nan" in out and "gnorm inf" in out


def test_console_line_every_log_every_steps(tmp_path, capsys):
    with MetricsLogger(tmp_path, quiet(log_every=2), run_config={}, enabled=True, total_steps=4) as logger:
        for step in range(1, 5):
            logger.log(step, {"loss": 0.1 * step, "time/step": 1.5})
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["step 2/4 | loss 0.2 | s/step 1.5", "step 4/4 | loss 0.4 | s/step 1.5"]
    assert format_console_line(7, {"rewards/margins": 0.00012}) == "step 7 | margin 1.200e-04"


def test_resume_drops_steps_after_the_checkpoint_and_a_torn_line(tmp_path):
    with MetricsLogger(tmp_path, quiet(), run_config={}, enabled=True) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": float(step)})
    with open(tmp_path / METRICS_FILE, "a") as handle:
        handle.write('{"step": 6, "lo')  # the killed run's last, unfinished line
    with MetricsLogger(tmp_path, quiet(), run_config={}, enabled=True, resume_step=3) as logger:
        assert [line["step"] for line in read_lines(tmp_path)] == [1, 2, 3]
        logger.log(4, {"loss": 40.0})
        assert logger.truncate_after(10) == 0
    assert [(line["step"], line["loss"]) for line in read_lines(tmp_path)] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
    ]


def test_appending_after_a_torn_line_starts_a_new_line(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    with MetricsLogger(tmp_path, quiet(), run_config={}, enabled=True) as logger:
        logger.log(2, {"loss": 2.0})
    assert (tmp_path / METRICS_FILE).read_text().splitlines()[-1] == '{"step": 2, "loss": 2.0}'


def test_disabled_logger_and_disabled_wandb_write_nothing_extra(tmp_path):
    off = MetricsLogger(tmp_path / "rank1", quiet(), run_config={}, enabled=False)
    off.log(1, {"loss": 1.0})
    off.finish()
    assert not (tmp_path / "rank1").exists()
    with MetricsLogger(
        tmp_path / "rank0", LoggingConfig(), run_config={}, enabled=True, total_steps=2
    ) as logger:
        logger.log(1, {"loss": 1.0})
    assert sorted(p.name for p in (tmp_path / "rank0").iterdir()) == [METRICS_FILE]  # no wandb/, no id file


def test_offline_wandb_runs_without_network_and_records_its_run_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = quiet(wandb=WandbConfig(mode="offline", project="spin-test"))
    with MetricsLogger(tmp_path, cfg, run_config={"algorithm": {"beta": 0.1}}, enabled=True) as logger:
        logger.log(1, {"loss": 0.7, "val/accuracy": math.nan})
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(run_id)
    assert any(runs[0].glob("*.wandb"))
    assert read_lines(tmp_path) == [{"step": 1, "loss": 0.7, "val/accuracy": None}]


def test_timer_sums_phases_until_pop():
    calls = []
    timer = Timer(synchronize=lambda: calls.append(1))
    for _ in range(2):
        with timer("rollout"):
            pass
    with pytest.raises(RuntimeError), timer("train"):
        raise RuntimeError("boom")  # a failing phase is still timed
    times = timer.pop()
    assert set(times) == {"time/rollout", "time/train"} and all(t >= 0 for t in times.values())
    assert len(calls) == 6 and timer.pop() == {}


def test_a_step_without_pairs_says_why_instead_of_nan():
    metrics = {"loss": float("nan"), "rewards/accuracies": float("nan"), "grad_norm": float("nan"),
               "reward/score_mean": 0.0, "rollout/logp_diff": 4e-7, "pairs/kept": 0.0, "pairs/dropped_ties": 4.0,
               "pairs/all_wrong": 3.0, "pairs/all_correct": 1.0, "pairs/excluded_truncated": 2.0}  # fmt: skip
    line = format_console_line(3, metrics, total_steps=6)
    assert line == (
        "step 3/6 | no pairs: 4 prompts tied (3 all wrong, 1 all correct); 2 truncated samples excluded | "
        "score 0 | logp_diff 4.000e-07"
    )
    assert "no pairs" not in format_console_line(3, {**metrics, "pairs/kept": 2.0, "loss": 0.5})
