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


PURE_MATH = ("spin_megatron.algorithm.pairs", "spin_megatron.algorithm.rewards")


def _module_file(module: str) -> Path | None:
    parts = module.split(".")[1:]
    candidate = PACKAGE.joinpath(*parts)
    for path in (candidate.with_suffix(".py"), candidate / "__init__.py"):
        if path.is_file():
            return path
    return None


def _project_imports(module: str) -> set[str]:
    """The spin_megatron modules ``module`` imports, with the packages each import runs first."""
    path = _module_file(module)
    if path is None:
        return set()
    found = set()
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "spin_megatron":
            found.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    return found


def _reachable(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for imported in _project_imports(todo.pop()) - seen:
            seen.add(imported)
            todo.append(imported)
    return seen


def test_pairs_and_rewards_import_no_engine_module():
    # Pure maths over Sample records: importing a rollout module would drag in the engines (and through
    # rollout/__init__, Megatron's process groups). Sample lives in spin_megatron.types.
    offenders = {
        module: sorted(m for m in _reachable(module) if m.startswith("spin_megatron.rollout"))
        for module in PURE_MATH
    }
    assert offenders == {module: [] for module in PURE_MATH}


def test_the_import_walk_sees_an_engine_import():
    # The check above must be able to fail: the engine protocol reaches the rollout package.
    assert "spin_megatron.rollout" in _reachable("spin_megatron.algorithm.experience")


def _modules_in(package: str) -> list[str]:
    root = PACKAGE / package.removeprefix("spin_megatron.").replace(".", "/")
    return [
        "spin_megatron." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts) for p in root.rglob("*.py")
    ]


def test_the_package_tree_is_layered_as_the_readme_draws_it():
    """data/ sits at the bottom (config and errors only); the training loop (training/) is used by the entry points
    only; every top-level module is an entry point or a shared leaf (config, types, errors, ports, ...)."""
    data_imports = {m for module in _modules_in("spin_megatron.data") for m in _project_imports(module)}
    assert {m for m in data_imports if not m.startswith(("spin_megatron.data", "spin_megatron.config",
            "spin_megatron.errors"))} == set()  # fmt: skip
    outside = [p for p in PACKAGE.rglob("*.py") if "training" not in p.relative_to(PACKAGE).parts]
    users = {
        "spin_megatron." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
        for p in outside
        if any(name.startswith("spin_megatron.training") for name in _imports(p))
    }
    assert users <= ENTRY_POINTS
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top <= {"__init__", "train", "plan", "convert", "plot", "compose", "errors", "types", "ports", "quiet",
                   "faults"}, top  # fmt: skip


def test_old_pickles_of_prompt_examples_still_load():
    """Checkpoints pickle prompt examples (the overlap's prefetched batch) by their class path: the one of
    checkpoints written before data/ was a package, ``spin_megatron.data.PromptExample``, still resolves."""
    import pickle

    from spin_megatron.data import PromptExample

    new = pickle.dumps(PromptExample(prompt_id=3, prompt_ids=[1], gold_ids=[2], row={}), protocol=0)
    assert b"spin_megatron.data.prompts\n" in new
    old = new.replace(b"spin_megatron.data.prompts\n", b"spin_megatron.data\n")  # as the old module wrote it
    assert pickle.loads(old).prompt_id == 3
