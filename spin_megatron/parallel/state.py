"""Process groups: initialise from the ``torchrun`` environment and hand the groups out explicitly.

Megatron-Core's ``parallel_state`` builds the groups (rank order tp-cp-ep-dp-pp: TP ranks are adjacent, then
data-parallel replicas, then pipeline stages). Mixture-of-experts layers have a grid of their own inside each
pipeline stage (expert-TP, then EP, then expert-DP): EP is carved out of the TP × DP ranks, so ``ep × etp`` must
divide ``tp × dp``. Everything in this project below the entry points receives a
:class:`ParallelGroups` instead of reading that global state, so tests can build groups and call functions
directly.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from spin_megatron.errors import ConfigError
from spin_megatron.parallel.cpu_shims import apply_cpu_shims


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups of one rank and its coordinates in the TP × DP × PP grid."""

    pgs: object  # megatron.core.process_groups_config.ProcessGroupCollection (tp, pp, dp, embd, ...)
    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    ep_rank: int = 0
    ep_size: int = 1
    etp_rank: int = 0  # expert tensor parallel: how each expert's weights are split
    etp_size: int = 1
    vp_size: int = 1  # virtual pipeline stages (model chunks) per pipeline rank: interleaved 1F1B when > 1
    cp_rank: int = 0  # context parallel: each packed sequence split over cp_size ranks of a replica
    cp_size: int = 1
    replica_group: object = None  # every rank of this data-parallel replica (tp×cp×pp); None: pgs.mp (cp = 1)

    @property
    def ep(self) -> dist.ProcessGroup:
        return self.pgs.ep

    @property
    def etp(self) -> dist.ProcessGroup:
        return self.pgs.expt_tp

    @property
    def tp(self) -> dist.ProcessGroup:
        return self.pgs.tp

    @property
    def pp(self) -> dist.ProcessGroup:
        return self.pgs.pp

    @property
    def dp(self) -> dist.ProcessGroup:
        return self.pgs.dp

    @property
    def cp(self) -> dist.ProcessGroup:
        return self.pgs.cp

    @property
    def replica(self) -> dist.ProcessGroup:
        """The ranks that hold one copy of the model and train on the same data: TP × CP × PP. With context
        parallelism that is more than Megatron's model-parallel group (TP × PP): CP ranks hold the same weights."""
        return self.replica_group if self.replica_group is not None else self.pgs.mp

    @property
    def is_first_stage(self) -> bool:
        """This rank holds the embedding (with interleaving: in its first model chunk)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """This rank holds the output layer and computes the losses (with interleaving: in its last chunk)."""
        return self.pp_rank == self.pp_size - 1

    @property
    def device(self) -> torch.device:
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )


def validate_parallel_sizes(
    world_size: int, tp: int, pp: int, ep: int = 1, etp: int | None = None, vpp: int = 1, cp: int = 1
) -> int:
    """Check the TP/PP/CP (and expert EP/ETP) sizes against the world size; return the data-parallel size."""
    sizes = (("parallel.tp", tp), ("parallel.pp", pp), ("parallel.ep", ep), ("parallel.vpp", vpp))
    sizes += (("parallel.cp", cp),)
    for key, value in sizes + ((("parallel.etp", etp),) if etp is not None else ()):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    if world_size % (tp * pp) != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by tp×pp = {tp}×{pp} = {tp * pp}: launch a multiple of "
            f"{tp * pp} processes (torchrun --nproc_per_node) or change parallel.tp / parallel.pp"
        )
    if world_size % (tp * pp * cp) != 0:  # context parallel: cp ranks of each replica share a sequence
        raise ConfigError(
            f"world size {world_size} is not divisible by tp×pp×cp = {tp}×{pp}×{cp} = {tp * pp * cp}: launch a "
            f"multiple of {tp * pp * cp} processes or change parallel.cp"
        )
    if vpp > 1 and pp == 1:
        raise ConfigError(
            f"parallel.vpp={vpp} interleaves pipeline stages, but parallel.pp=1: set pp > 1 or vpp=1"
        )
    dp = world_size // (tp * pp * cp)
    from spin_megatron.models.arch import check_expert_grid  # (models imports this module)

    check_expert_grid(tp, dp, ep, tp if etp is None else etp)
    return dp


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _init_process_group(timeout_minutes: int) -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if launched_by_torchrun():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    else:
        # Plain `python ...`: a world of one process; an in-memory store (no port to pick and race for).
        dist.init_process_group(
            backend=backend, store=dist.HashStore(), world_size=1, rank=0, timeout=timeout
        )


def init_parallel(
    tp: int = 1,
    pp: int = 1,
    *,
    ep: int = 1,
    etp: int | None = None,
    vpp: int = 1,
    cp: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> ParallelGroups:
    """Initialise torch.distributed (gloo on CPU, nccl on CUDA) and Megatron's TP/PP/DP (and EP/ETP) groups.
    ``vpp``: model chunks per pipeline rank (interleaved schedule); recorded in the groups, no group of its own.
    ``cp``: context-parallel size (each replica's sequences split over cp ranks; data-parallel = world/(tp·pp·cp)).

    Works under ``torchrun`` (reads RANK/WORLD_SIZE/MASTER_ADDR/...) and in a plain single process.
    Calling it again with the same sizes returns the existing groups.
    """
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    apply_cpu_shims()
    world_size = (
        int(os.environ.get("WORLD_SIZE", "1")) if not dist.is_initialized() else dist.get_world_size()
    )
    validate_parallel_sizes(world_size, tp, pp, ep, etp, vpp, cp=cp)
    etp = tp if etp is None else etp
    if not dist.is_initialized():
        _init_process_group(timeout_minutes)
    if parallel_state.model_parallel_is_initialized() and _current_sizes() != (tp, pp, ep, etp, cp):
        parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
            context_parallel_size=cp,
            distributed_timeout_minutes=timeout_minutes,
        )
    torch.manual_seed(seed)
    # The named RNG states of Megatron's tracker ("model-parallel-rng", expert-parallel): sequence parallelism draws
    # the embedding dropout inside tracker.fork(), which raises without them. On the CPU the tracker swaps no
    # state (shim 5 in cpu_shims: no CUDA generator), so forked draws come from torch's CPU generator; the models
    # trained here have no dropout (hidden_dropout = attention_dropout = 0), so no draw is ever taken.
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    return ParallelGroups(
        pgs=pgs,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp_rank=pgs.tp.rank(),
        tp_size=pgs.tp.size(),
        pp_rank=pgs.pp.rank(),
        pp_size=pgs.pp.size(),
        dp_rank=pgs.dp.rank(),
        dp_size=pgs.dp.size(),
        ep_rank=pgs.ep.rank(),
        ep_size=pgs.ep.size(),
        etp_rank=pgs.expt_tp.rank(),
        etp_size=pgs.expt_tp.size(),
        vp_size=vpp,
        cp_rank=pgs.cp.rank(),
        cp_size=pgs.cp.size(),
        replica_group=_replica_group(pgs.dp.rank()) if cp > 1 else None,
    )


def _replica_group(dp_rank: int) -> dist.ProcessGroup:
    """The group of the ranks sharing this data-parallel index (one model replica: TP × CP × PP). Collective:
    every rank creates every replica's group, in the same order."""
    owners = [None] * dist.get_world_size()
    dist.all_gather_object(owners, dp_rank)
    mine = None
    for replica in sorted(set(owners)):
        group = dist.new_group([r for r, owner in enumerate(owners) if owner == replica])
        if replica == dp_rank:
            mine = group
    return mine


def _current_sizes() -> tuple[int, int, int, int, int]:
    from megatron.core import parallel_state as ps

    return (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_expert_model_parallel_world_size(),
        ps.get_expert_tensor_parallel_world_size(),
        ps.get_context_parallel_world_size(),
    )


def destroy_parallel() -> None:
    """Tear down Megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
