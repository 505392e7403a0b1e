"""Rank worker for test_plan's multi-rank memory probes: one rank of ``tests.test_plan._probe_worker``."""

import sys

from tests.test_plan import _probe_worker

if __name__ == "__main__":
    _probe_worker(sys.argv[1])
