"""The documentation points at things that exist: every relative link (and its #anchor), every `make` target,
console script, `experiment=` preset and repository path named in README.md and docs/*.md, and the configuration
reference in docs/training.md against the schema in spin_megatron/config/ (every key, its default).

Pure file reading: no subprocess, well under a second.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
LOG = REPO / "docs" / "LOG.md"  # the lab notebook: dated entries name what existed then; not checked


def _pages() -> list[Path]:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    return [page for page in pages if page != LOG]


def _base(page: Path) -> Path:
    """Where the page's relative links start: its folder."""
    return page.parent


def _ids(page: Path) -> list[str]:
    return [str(page.relative_to(REPO))]


PAGES = _pages()
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _code(text: str) -> list[str]:
    """Inline code spans and fenced blocks: where commands are written."""
    blocks = FENCE.findall(text)
    rest = FENCE.sub("", text)
    return blocks + CODE_SPAN.findall(rest)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", lambda m: "_" if m.group() == "_" else "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            slug = _slug(match.group(1))
            count = seen.get(slug, 0)
            anchors.add(slug if count == 0 else f"{slug}-{count}")
            seen[slug] = count + 1
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_at_existing_files_and_anchors(page):
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (_base(page) / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def _make_targets() -> set[str]:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", makefile, re.M))
    for phony in re.findall(r"^\.PHONY:(.*)$", makefile, re.M):
        targets.update(phony.split())
    return targets


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_make_target_named_exists(page):
    targets = _make_targets()
    named = set()
    for code in _code(page.read_text(encoding="utf-8")):
        named.update(re.findall(r"(?:^|[\s;&|(])make\s+(?:-\S+\s+)*([a-z][a-z0-9_-]*)(?![\w=])", code, re.M))
    assert named <= targets, (
        f"{page.relative_to(REPO)} names make targets the Makefile lacks: {named - targets}"
    )


def test_the_docs_name_some_make_targets_and_the_check_sees_them():
    assert {"demo", "test"} <= _make_targets()
    assert "demo" in re.findall(r"make\s+(\w+)", " ".join(_code("run `make demo` first")))


def _scripts() -> tuple[set[str], str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return set(project["scripts"]), project["name"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_console_script_named_exists(page):
    scripts, project = _scripts()
    named = set(
        re.findall(r"(?<![\w/.<-])(spin-[a-z][a-z-]*[a-z])(?![\w<>\[-])", page.read_text(encoding="utf-8"))
    )
    unknown = named - scripts - {project}
    assert not unknown, f"{page.relative_to(REPO)} names console scripts pyproject.toml lacks: {unknown}"
    assert {"spin-train", "spin-convert", "spin-plot", "spin-plan"} <= scripts


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_experiment_preset_named_exists(page):
    named = {
        m.rstrip(".") for m in re.findall(r"experiment=([A-Za-z0-9_.]+)", page.read_text(encoding="utf-8"))
    }
    missing = {name for name in named if not (REPO / "conf" / "experiment" / f"{name}.yaml").is_file()}
    assert not missing, f"{page.relative_to(REPO)} names presets conf/experiment/ lacks: {missing}"


ROOTS = ("spin_megatron/", "tests/", "tools/", "bench/", "conf/", "docs/", ".ci/")
SUBPACKAGE = re.compile(
    r"^(models|parallel|rollout|reward_model|data|algorithm|training|planning)/[\w/]*\w\.py$"
)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_repository_path_named_exists(page):
    """`tests/test_x.py::test_name`, `spin_megatron/...`, `tools/...`: the file (and the test function) exist;
    `parallel/ddp.py`-style names are read under spin_megatron/."""
    missing = []
    for span in CODE_SPAN.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        path, _, test = span.partition("::")
        if re.search(r"[\s<>*{}$]", path):
            continue
        if path.startswith(ROOTS):
            file = REPO / path
        elif SUBPACKAGE.match(path):
            file = REPO / "spin_megatron" / path
        else:
            continue
        if not file.exists():
            missing.append(span)
        elif test and f"def {test.split('[')[0]}(" not in file.read_text(encoding="utf-8"):
            missing.append(span)
    assert not missing, f"{page.relative_to(REPO)} names paths or tests that do not exist: {missing}"


# ---------------------------------------------------------------- the configuration reference in training.md
ROW = re.compile(r"^\| `([a-z_]+(?:\.[a-z_0-9]+)+)` \| (.*?) \| (.*) \|$")


def _schema_defaults() -> dict[str, object]:
    """Every leaf key of the schema (``section.key``, nested sections flattened) and its default."""
    from spin_megatron.config import Config

    leaves: dict[str, object] = {}

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            key = f"{prefix}.{f.name}" if prefix else f.name
            nested = [
                a for a in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(a)
            ]
            if dataclasses.is_dataclass(default):
                walk(type(default), key)
                continue
            if prefix:
                leaves[key] = default
            if nested:  # an optional section (model.tiny): the key itself and its fields
                walk(nested[0], key)

    walk(Config, "")
    return leaves


def _documented() -> dict[str, str]:
    text = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    reference = text.split("## Configuration reference", 1)[1]
    rows = {}
    for line in reference.splitlines():
        match = ROW.match(line)
        if match:
            assert match.group(1) not in rows, f"{match.group(1)} is documented twice"
            rows[match.group(1)] = match.group(2)
    return rows


def _same(cell: str, default) -> bool:
    """A default written as one code span is compared; plain prose (a computed default) is not."""
    match = re.fullmatch(r"`([^`]*)`", cell)
    if match is None:
        return True
    text = match.group(1)
    if default is None or isinstance(default, bool):
        return text == {None: "null", True: "true", False: "false"}[default]
    if isinstance(default, (int, float)):
        try:
            return float(text) == float(default)
        except ValueError:
            return False
    if isinstance(default, str):
        return text == (default or '""')
    if isinstance(default, (list, tuple)):
        return text == "[" + ", ".join(map(str, default)) + "]"
    if isinstance(default, dict):
        return text == "{" + ", ".join(f"{k}: {v}" for k, v in default.items()) + "}"
    return text == str(default)


def test_the_configuration_reference_lists_every_key_with_its_default():
    schema, documented = _schema_defaults(), _documented()
    missing = sorted(set(schema) - set(documented))
    unknown = sorted(set(documented) - set(schema))
    wrong = sorted(f"{key}: docs {documented[key]}, schema {schema[key]!r}" for key in set(schema) & set(documented)
                   if not _same(documented[key], schema[key]))  # fmt: skip
    assert not missing, f"add to docs/training.md's configuration reference: {missing}"
    assert not unknown, f"docs/training.md documents keys the schema lacks: {unknown}"
    assert not wrong, f"docs/training.md gives other defaults than spin_megatron/config/: {wrong}"


def _logged_metric_names() -> set[str]:
    """The names a training step and a validation log, from the functions that make them, fed counters of 1."""
    from collections import defaultdict

    from spin_megatron.algorithm.experience import ROLLOUT_SUMS
    from spin_megatron.algorithm.step_metrics import step_metrics
    from spin_megatron.training.validation import _GEN_KEYS, _NLL_KEYS, _val_metrics

    rollout = {key: 1.0 for key in ROLLOUT_SUMS} | {"reward/<name>/correct": 1.0}
    dpo = defaultdict(lambda: 1.0, {"moe/load_balancing_loss/terms": 1.0})
    counts = {"tokens": 1.0, "dp_token_spread/before": 1.0, "dp_token_spread/after": 1.0}
    phases = set()
    for module in (REPO / "spin_megatron").rglob("*.py"):
        if module.name == "metrics.py":  # (it defines the Timer: its docstring's example)
            continue
        text = module.read_text(encoding="utf-8")
        phases.update(re.findall(r'timer\("(\w+)"\)', text))
        phases.update(re.findall(r'metrics\["time/(\w+)"\]', text))  # set beside the timers (time/step)
    times = {f"time/{phase}": 1.0 for phase in phases}
    names = set(step_metrics(rollout, dpo, counts, grad_norm=1.0, lr=1.0, times=times, skipped_steps=0))
    names |= set(_val_metrics(dict.fromkeys(_GEN_KEYS, 1.0), dict.fromkeys(_NLL_KEYS, 1.0)))
    return names


def test_the_metric_table_names_everything_the_trainer_logs():
    text = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    table = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    documented = set(CODE_SPAN.findall(table))
    missing = sorted(_logged_metric_names() - documented)
    assert not missing, f"docs/training.md's metric table lacks: {missing}"
