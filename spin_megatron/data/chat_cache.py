"""Loading a split of conversations (``data.messages_key``): rows from local files or a hub dataset, tokenized
with a batched ``datasets.map`` over worker processes, cached on disk and read back memory-mapped.

The cache (``data.cache_dir``) holds one folder per (files or hub dataset, tokenizer, chat template, data.*
settings that change the tokens); the next start and a resume load it instead of tokenizing again. Ranks of one
run share it: the first one builds it under a file lock, the others wait and load it. The examples read their
token ids from the memory-mapped table when the sampler hands them out, so 200k conversations cost no Python
lists at start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow
import pyarrow.compute as pc

from spin_megatron.config import DataConfig
from spin_megatron.data import DataStats, PromptExample, gold_terminator, load_rows
from spin_megatron.data.chat import (
    ADDED_COLUMNS,
    CUT_TURNS,
    DROPPED,
    GOLD_CUT,
    GOLD_IDS,
    OVERLONG,
    PROMPT_IDS,
    ConversationEncoder,
)
from spin_megatron.errors import ConfigError

CACHE_FORMAT = 1  # bump when the encoding or the columns change: older caches are then not used
_ROWS_PER_WORKER = 2000  # fewer rows than this per worker process: not worth starting one


# ---------------------------------------------------------------------------------------------------- rows


def read_rows(files: list[str], cfg: DataConfig, split: str, setting: str, scratch: Path | None = None):
    """The rows of ``files`` (converted to Arrow files under ``scratch`` by ``datasets``, memory-mapped; None:
    its own cache) or, with no files, of the hub dataset. A file ``datasets`` cannot read goes through
    :func:`spin_megatron.data.load_rows`, which names the file and line at fault (or reads it after all)."""
    if not files:
        return load_rows(
            [], hub_dataset=cfg.hub_dataset, hub_config=cfg.hub_config, split=split, setting=setting
        )
    parts = [_read_file(name, split, setting, scratch) for name in files]
    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as err:
        raise ConfigError(f"{setting}: the files do not share one set of columns ({err})") from err


def _read_file(name: str, split: str, setting: str, scratch: Path | None) -> datasets.Dataset:
    path = Path(name).expanduser()
    builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
    if builder is not None and path.is_file():
        try:  # Arrow's reader, block by block to disk: 200k conversations never sit in memory as objects
            rows = datasets.load_dataset(builder, data_files=[str(path)], split="train", cache_dir=scratch)
            if len(rows):
                return rows
        except (datasets.exceptions.DatasetGenerationError, pyarrow.ArrowException, ValueError):
            pass  # malformed or mixed rows: the careful reader below reports them (or unifies their schema)
    return load_rows([name], hub_dataset="", hub_config=None, split=split, setting=setting)


# ---------------------------------------------------------------------------------------------------- cache key


def _tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = [tokenizer.all_special_tokens, sorted(getattr(tokenizer, "added_tokens_encoder", {}).items())]
    return hashlib.sha256((vocab + json.dumps(special) + str(tokenizer.chat_template)).encode()).hexdigest()


def cache_key(source: dict, tokenizer, cfg: DataConfig, terminator: list[int]) -> str:
    """Digest of what the tokens depend on: the rows' source, the tokenizer and template, the settings."""
    settings = {
        key: getattr(cfg, key)
        for key in ("messages_key", "system_prompt", "max_prompt_tokens", "overlong_prompts", "max_gold_tokens",
                    "bad_rows")
    }  # fmt: skip
    parts = [CACHE_FORMAT, source, _tokenizer_digest(tokenizer), terminator, settings]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _file_source(files: list[str]) -> dict:
    """Files by absolute path, size and modification time: an edited or replaced file is a new source."""
    stats = [(str(Path(f).resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    return {"files": stats}


# ---------------------------------------------------------------------------------------------------- examples


class _Columns:
    """The token columns and the raw columns of a tokenized table, for random access by row."""

    def __init__(self, table: pyarrow.Table):
        self.prompt_ids = table.column(PROMPT_IDS)
        self.gold_ids = table.column(GOLD_IDS)
        self.raw = {name: table.column(name) for name in table.column_names if name not in ADDED_COLUMNS}


class ChatExample:
    """A :class:`~spin_megatron.data.PromptExample` whose fields are read from the (memory-mapped) tokenized
    table on access. Pickled, it becomes a plain PromptExample."""

    __slots__ = ("_columns", "prompt_id")

    def __init__(self, columns: _Columns, prompt_id: int):
        self._columns, self.prompt_id = columns, prompt_id

    @property
    def prompt_ids(self) -> list[int]:
        return self._columns.prompt_ids[self.prompt_id].as_py()

    @property
    def gold_ids(self) -> list[int]:
        return self._columns.gold_ids[self.prompt_id].as_py()

    @property
    def row(self) -> dict:
        return {name: column[self.prompt_id].as_py() for name, column in self._columns.raw.items()}

    def materialize(self) -> PromptExample:
        return PromptExample(self.prompt_id, self.prompt_ids, self.gold_ids, self.row)

    def __reduce__(self):
        example = self.materialize()
        return PromptExample, (example.prompt_id, example.prompt_ids, example.gold_ids, example.row)

    def __repr__(self) -> str:
        return f"ChatExample(prompt_id={self.prompt_id})"


@dataclass
class ChatDataStats(DataStats):
    dropped_bad: int = 0  # malformed conversations dropped (data.bad_rows=drop)
    first_bad: str = ""  # the first of them: 'row N: why'
    cached: bool = False  # loaded from data.cache_dir

    def summary(self, split_name: str) -> str:
        bad = f", {self.dropped_bad} malformed dropped (first: {self.first_bad})" if self.dropped_bad else ""
        source = " from the cache" if self.cached else ""
        return (
            f"{split_name}: {self.kept}/{self.total} conversations kept, {self.dropped_overlong} dropped and "
            f"{self.truncated} shortened by turns as overlong{bad}, {self.gold_truncated} gold responses "
            f"truncated, longest prompt {self.max_prompt_tokens} tokens ({self.seconds:.2f}s{source})"
        )


def _stats(table: pyarrow.Table) -> tuple[np.ndarray, ChatDataStats]:
    """The kept row indices and the counts, from the tokenized table's columns (vectorised)."""
    dropped = table.column(DROPPED)
    kept_mask = pc.equal(dropped, "").to_numpy(zero_copy_only=False)
    kept = np.flatnonzero(kept_mask)
    overlong = pc.equal(dropped, OVERLONG).to_numpy(zero_copy_only=False)
    stats = ChatDataStats(total=table.num_rows, kept=len(kept), dropped_overlong=int(overlong.sum()))
    bad = np.flatnonzero(~kept_mask & ~overlong)
    stats.dropped_bad = len(bad)
    if len(bad):
        stats.first_bad = f"row {bad[0]} {dropped[int(bad[0])].as_py()}"
    stats.truncated = int(pc.sum(pc.greater(table.column(CUT_TURNS), 0)).as_py() or 0)
    stats.gold_truncated = int(pc.sum(pc.cast(table.column(GOLD_CUT), pyarrow.int64())).as_py() or 0)
    lengths = pc.list_value_length(table.column(PROMPT_IDS))
    stats.max_prompt_tokens = int(pc.max(lengths).as_py() or 0)
    return kept, stats


# ---------------------------------------------------------------------------------------------------- build


def _workers(cfg: DataConfig, rows: int) -> int | None:
    wanted = cfg.tokenize_workers or min(os.cpu_count() or 1, 8)
    workers = max(1, min(wanted, rows // _ROWS_PER_WORKER))
    return workers if workers > 1 else None


def tokenize_rows(
    rows: datasets.Dataset, tokenizer, cfg: DataConfig, *, split_name: str, key: str, out: Path | None = None
) -> datasets.Dataset:
    """``rows`` with the token columns added (chat_data.ADDED_COLUMNS), by a batched map over workers, written
    to ``out`` (one file per worker: ``out`` with a ``_0000N_of_0000W`` suffix) or where ``datasets`` puts it."""
    if cfg.messages_key not in rows.column_names:
        raise ConfigError(
            f"field {cfg.messages_key!r} is missing in {split_name}; its rows have keys {rows.column_names}; "
            "set data.messages_key to one of them"
        )
    if len(rows) == 0:
        raise ConfigError(f"{split_name} has no rows")
    encoder = ConversationEncoder(tokenizer, cfg, gold_terminator(tokenizer, cfg), split_name)
    ids = datasets.Sequence(datasets.Value("int32"))
    features = datasets.Features(
        {**rows.features, PROMPT_IDS: ids, GOLD_IDS: ids, DROPPED: datasets.Value("string"),
         CUT_TURNS: datasets.Value("int32"), GOLD_CUT: datasets.Value("bool")}
    )  # fmt: skip
    workers = _workers(cfg, len(rows))
    with _spawned_workers(workers):
        return rows.map(
            encoder,
            with_indices=True,
            input_columns=[cfg.messages_key],
            batched=True,
            batch_size=500,
            features=features,
            num_proc=workers,
            new_fingerprint=key,
            cache_file_name=None if out is None else str(out),
            desc=f"tokenizing {split_name}",
        )


@contextmanager
def _spawned_workers(workers: int | None):
    """``datasets.map(num_proc=N)`` starts its pool (and a Manager) with ``multiprocess``'s default context: fork on
    Linux. A fork of a process that runs threads (the tokenizer's Rust pool, torch's OpenMP pool, a launcher's or a
    test runner's I/O thread) can copy a lock some thread holds into the child, which then waits for it forever
    and the map with it (huggingface/tokenizers#1391, huggingface/datasets#5094; a CI run of the suite hung so).
    The workers start by spawn instead: a fresh interpreter each, given the shard and the encoder by pickle."""
    if not workers:
        yield
        return
    import multiprocess

    previous = multiprocess.get_start_method(allow_none=True)
    multiprocess.set_start_method("spawn", force=True)
    try:
        yield
    finally:
        multiprocess.set_start_method(previous, force=True)


def _build_cached(folder: Path, build) -> tuple[datasets.Dataset, bool]:
    """The tokenized dataset in ``folder`` and whether it was there: else ``build(partial)`` writes it into a
    partial folder, which then becomes ``folder`` (under a lock, so the ranks of a run build it once)."""
    from filelock import FileLock

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder) + ".lock")
        lock.acquire()
    except OSError as err:
        raise ConfigError(
            f"data.cache_dir={folder.parent} cannot be written ({err.strerror or err}); set data.cache_dir to a "
            "writable folder, or null to tokenize at every start"
        ) from None
    try:
        found = folder.is_dir()
        if not found:
            for stale in folder.parent.glob(f"{folder.name}.partial-*"):  # a build that was killed
                shutil.rmtree(stale, ignore_errors=True)
            partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
            try:
                _write_partial(partial, build)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
            os.replace(partial, folder)
    finally:
        lock.release()
    shards = json.loads((folder / "shards.json").read_text())
    parts = [datasets.Dataset.from_file(str(folder / name)) for name in shards]
    return (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)), found


def _write_partial(partial: Path, build) -> None:
    dataset = build(partial)
    names = sorted({Path(f["filename"]).name for f in dataset.cache_files})
    assert names and all((partial / name).is_file() for name in names), dataset.cache_files
    shutil.rmtree(partial / "rows", ignore_errors=True)  # the rows as Arrow files: the shards hold them too
    (partial / "shards.json").write_text(json.dumps(names))


def load_chat_split(cfg: DataConfig, tokenizer, split: str) -> tuple[list[ChatExample], ChatDataStats]:
    """``split`` = "train" | "val": the conversations of that split as examples, and their stats."""
    started = time.perf_counter()
    files = cfg.train_files if split == "train" else cfg.val_files
    hub_split = cfg.train_split if split == "train" else cfg.val_split
    setting = f"data.{split}_files"
    where = ", ".join(map(str, files)) if files else f"hub {cfg.hub_dataset}:{hub_split}"
    split_name = f"{split} data ({where})"
    rows = None
    if files:
        source = _file_source(files)
    else:  # the hub copy is already cached by `datasets`; its fingerprint names the downloaded version
        rows = read_rows([], cfg, hub_split, setting)
        source = {"hub": [cfg.hub_dataset, cfg.hub_config, hub_split, rows._fingerprint]}
    key = cache_key(source, tokenizer, cfg, gold_terminator(tokenizer, cfg))

    def build(partial: Path | None = None) -> datasets.Dataset:
        scratch = None if partial is None else partial / "rows"
        loaded = rows if rows is not None else read_rows(files, cfg, hub_split, setting, scratch)
        out = None if partial is None else partial / "tokenized.arrow"
        return tokenize_rows(loaded, tokenizer, cfg, split_name=split_name, key=key, out=out)

    if cfg.cache_dir:
        dataset, cached = _build_cached(Path(cfg.cache_dir).expanduser() / f"{split}-{key}", build)
    else:
        dataset, cached = build(), False
    table = dataset.data.table
    kept, stats = _stats(table)
    if not len(kept):
        raise ConfigError(
            f"no conversation of {split_name} is usable ({stats.dropped_overlong} longer than "
            f"data.max_prompt_tokens={cfg.max_prompt_tokens}, {stats.dropped_bad} malformed, e.g. {stats.first_bad}); "
            "check data.messages_key, raise data.max_prompt_tokens or set data.overlong_prompts=left_truncate"
        )
    columns = _Columns(table)
    if split == "val" and cfg.val_max_prompts is not None:
        kept = kept[: cfg.val_max_prompts]
    examples = [ChatExample(columns, int(index)) for index in kept]
    stats.cached, stats.seconds = cached, time.perf_counter() - started
    return examples, stats
