"""The suite's own scheduling: `make test` runs `pytest -n 2 --dist loadgroup`, and each test file is one
xdist group (tests/conftest.py), so a module's fixtures (a trained run, a real SGLang fleet, a Slurm cluster) are
built once and the files that start Ray or Slurm daemons ("cluster") never run side by side. pytest 9.2 builds a
node id from a structured id that pytest-xdist 3.8's loadgroup does not rewrite: the groups were silently dropped,
every module's tests spread over both workers and their fixtures were built twice (pyproject.toml pins pytest
below 9.2 for it). This test fails whenever the groups do not reach the scheduler."""

import os

import pytest


def test_each_file_is_one_xdist_group_for_the_scheduler(request):
    if os.environ.get("PYTEST_XDIST_WORKER") is None or request.config.getvalue("dist") != "no":
        pytest.skip("only meaningful on a pytest-xdist worker (`make test`)")
    if not request.config.getvalue("loadgroup"):
        pytest.skip("not run with --dist loadgroup")
    # xdist's worker appends '@<group>' to the node id; its scheduler sends a group to one worker by that suffix
    assert request.node.nodeid.endswith("@test_suite_groups"), (
        f"{request.node.nodeid}: the xdist group did not reach the scheduler (pytest {pytest.__version__}); "
        "see this file's docstring"
    )
