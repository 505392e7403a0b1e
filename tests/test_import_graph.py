"""The entry points (spin-train's train.py, spin-plan's plan.py) sit on top: nothing below them imports them,
so neither the trainer nor the planner can form an import circle through the other."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "spin_megatron"
ENTRY_POINTS = {"spin_megatron.train", "spin_megatron.plan", "spin_megatron.convert"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):  # lazy imports inside functions count too
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_module_imports_an_entry_point():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        module = "spin_megatron." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        bad = (_imports(path) & ENTRY_POINTS) - {module}
        if bad:
            offenders[module] = sorted(bad)
    assert offenders == {}
