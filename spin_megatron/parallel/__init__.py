"""Process groups, CPU shims, local multi-process launch and weight export."""

from spin_megatron.parallel.state import (
    ParallelGroups,
    destroy_parallel,
    init_parallel,
    launched_by_torchrun,
    validate_parallel_sizes,
)

__all__ = [
    "ParallelGroups",
    "destroy_parallel",
    "init_parallel",
    "launched_by_torchrun",
    "validate_parallel_sizes",
]
