"""Rows of a dataset split: local .jsonl/.json/.parquet files, or a hub dataset by name and split, through
`datasets`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import datasets
import pyarrow

from spin_megatron.errors import ConfigError, MissingPathError

JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


def _read_json_rows(path: Path) -> list[dict]:
    """Rows of a JSON Lines file (or of a .json file holding one list of objects), checked line by line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err
        numbered = [(i + 1, row) for i, row in enumerate(rows)]
        where = "item"
    else:
        numbered = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((lineno, json.loads(line)))
            except json.JSONDecodeError as err:
                raise ConfigError(
                    f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})"
                ) from err
        where = "line"
    for number, row in numbered:
        if not isinstance(row, dict):
            raise ConfigError(
                f"{path}:{where} {number}: expected a JSON object per row, got {type(row).__name__}"
            )
    return [row for _, row in numbered]


def _load_file(path: Path) -> datasets.Dataset:
    if path.suffix in JSON_SUFFIXES:
        rows = _read_json_rows(path)
        if not rows:
            raise ConfigError(f"{path}: no rows; point the data files at a non-empty dataset")
        try:
            return datasets.Dataset.from_list(rows)
        except (ValueError, TypeError) as err:  # pyarrow's ArrowInvalid/ArrowTypeError derive from these
            raise ConfigError(f"{path}: rows do not share one schema ({_first_line(err)})") from err
        except OverflowError as err:  # an integer beyond 64 bits
            raise ConfigError(f"{path}: a number does not fit in 64 bits ({_first_line(err)})") from err
    try:
        return datasets.load_dataset("parquet", data_files=[str(path)], split="train")
    except (datasets.exceptions.DatasetGenerationError, pyarrow.ArrowException) as err:
        raise ConfigError(
            f"{path}: not a readable parquet file ({_first_line(err.__cause__ or err)})"
        ) from err


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


def load_rows(
    files: Sequence[str],
    *,
    hub_dataset: str,
    hub_config: str | None,
    split: str,
    setting: str = "data.train_files",
) -> datasets.Dataset:
    """The raw rows of ``files`` (concatenated in order) or, when ``files`` is empty, of the hub dataset.

    ``setting`` is the config key the files came from; error messages name it.
    """
    if not files:
        try:
            return datasets.load_dataset(hub_dataset, hub_config, split=split)
        except Exception as err:  # offline, unknown name, gated, ...: all mean "give local files"
            raise ConfigError(
                f"no local files were given ({setting} is empty) and hub dataset {hub_dataset!r} "
                f"({hub_config}, split {split}) could not be loaded ({type(err).__name__}: {_first_line(err)}); "
                f"set {setting} to local .jsonl/.parquet files"
            ) from err
    parts = []
    for name in files:
        path = Path(name).expanduser()
        if path.suffix not in JSON_SUFFIXES + PARQUET_SUFFIXES:
            raise ConfigError(
                f"{setting}: {name} has an unsupported extension; use .jsonl, .json or .parquet"
            )
        if not path.is_file():
            raise MissingPathError(f"data file {name} does not exist; fix {setting}")
        parts.append(_load_file(path))
    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as err:
        raise ConfigError(
            f"{setting}: the files do not share one set of columns ({_first_line(err)})"
        ) from err
