import json

from spin_megatron.plot import main, read_series

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, steps: int = 12):
    lines = []
    for step in range(1, steps + 1):
        line = {
            "step": step,
            "loss": 0.7 - 0.02 * step,
            "rewards/chosen": 0.01 * step,
            "rewards/rejected": -0.01 * step,
            "rewards/margins": 0.02 * step,
            "rewards/accuracies": min(1.0, 0.5 + 0.05 * step),
            "reward/score_mean": 0.3,
            "grad_norm": None if step == 4 else 1.0,  # a non-finite value, logged as null
            "time/rollout": 2.0,
            "time/train": 1.0,
        }
        lines.append(line)
        if step % 5 == 0:
            lines.append({"step": step, "val/accuracy": 0.4 + 0.01 * step, "val/gold_nll": 1.2})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in lines) + '{"step": 13, "lo'
    )
    return run_dir


def test_writes_pngs_of_the_logged_curves_and_skips_absent_ones(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    assert main([str(run)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[0].endswith("/overview.png")  # the one page to open first, printed first
    names = sorted(p.split("/")[-1] for p in printed)
    assert names == sorted(
        f"{stem}.png"
        for stem in (
            "overview",
            "loss",
            "rewards",
            "margins",
            "accuracies",
            "score",
            "val_accuracy",
            "val_gold_nll",
            "grad_norm",
            "time",
        )
    )  # no lr / response_length / logp_diff: the run did not log them
    for path in printed:
        assert path.startswith(str(run / "plots")) and open(path, "rb").read(8) == PNG_MAGIC


def test_keys_and_out_dir(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    assert main([str(run), "--out", str(tmp_path / "figs"), "--keys", "time/*", "loss"]) == 0
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [
        "loss.png",
        "time_rollout.png",
        "time_train.png",
    ]
    assert main([str(run), "--keys", "no/such_metric"]) == 1
    assert "no values for no/such_metric" in capsys.readouterr().err


def test_series_keeps_sparse_validation_and_nulls(tmp_path):
    series = read_series(write_run(tmp_path / "run") / "metrics.jsonl")
    assert series["val/accuracy"][0] == [5, 10]
    steps, values = series["grad_norm"]
    assert steps == list(range(1, 13)) and values[3] != values[3]  # NaN gap at step 4


def test_missing_metrics_file_is_a_one_line_error(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and err.startswith("spin-plot: error:") and "metrics.jsonl does not exist" in err
    )
