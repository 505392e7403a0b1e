"""``optim.*``, ``parallel.*``, ``trainer.*``, ``logging.*``, ``cluster.*``."""

from __future__ import annotations

from dataclasses import dataclass, field

from spin_megatron.config.common import (
    _choice,
    _positive,
)
from spin_megatron.errors import ConfigError


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 5e-7  # peak learning rate
    min_lr: float = 0.0  # floor of the decay
    lr_warmup_steps: int = 0  # linear warmup from 0
    lr_decay_style: str = "constant"  # constant | linear | cosine (over trainer.total_steps)
    weight_decay: float = 0.0  # decoupled (AdamW)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global gradient-norm clip; 0: off
    use_distributed_optimizer: bool = True  # shard optimizer state over data-parallel ranks

    def __post_init__(self):
        _positive("optim.lr", self.lr)
        _positive("optim.min_lr", self.min_lr, zero_ok=True)
        _positive("optim.lr_warmup_steps", self.lr_warmup_steps, zero_ok=True)
        _choice("optim.lr_decay_style", self.lr_decay_style, ("constant", "linear", "cosine"))
        _positive("optim.clip_grad", self.clip_grad, zero_ok=True)


@dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size; data-parallel = world size / (tp·pp·cp)
    activation_recompute: bool = False  # recompute each layer in backward (full, uniform): activations ÷ ~L
    ep: int = 1  # expert-parallel size (MoE): a layer's experts split over ep of a stage's tp×dp ranks
    etp: int | None = None  # expert tensor-parallel size (each expert split etp ways); null: = tp
    moe_token_dispatcher: str = "alltoall"  # routed tokens to their experts' ranks: alltoall | allgather
    # virtual pipeline stages per pipeline rank (interleaved 1F1B): each rank holds vpp model chunks of
    # layers/(pp·vpp) layers, which shrinks the pipeline bubble vpp-fold; 1: plain 1F1B
    vpp: int = 1
    # context parallel: each packed sequence padded to a multiple of 2·cp and split over cp ranks (rank r holds
    # chunks r and 2·cp−1−r, TE's load-balanced layout): activations ÷ cp, for long responses
    cp: int = 1

    def __post_init__(self):
        _positive("parallel.tp", self.tp)
        _positive("parallel.pp", self.pp)
        _positive("parallel.vpp", self.vpp)
        _positive("parallel.cp", self.cp)
        if self.vpp > 1 and self.pp == 1:
            raise ConfigError(
                f"parallel.vpp={self.vpp} interleaves pipeline stages, but parallel.pp=1: set parallel.pp > 1 "
                "or parallel.vpp=1"
            )
        _positive("parallel.ep", self.ep)
        if self.etp is not None:
            _positive("parallel.etp", self.etp)
        _choice("parallel.moe_token_dispatcher", self.moe_token_dispatcher, ("alltoall", "allgather"))
        _check_scaling_features(self)

    # Megatron's scaling features (issue 24). Nulls are resolved by the properties below (or, for the overlaps, by
    # parallel/ddp.py from the device), never written back: Hydra builds the schema's defaults from an instance.
    # sequence parallelism: the residual stream between the tensor-parallel regions (norms, residual adds,
    # dropout) split along the sequence over the TP ranks: those activations ÷ tp; null: on when tp > 1
    sequence_parallel: bool | None = None
    # activation recomputation in backward: none | full (each layer keeps only its input) | selective (only
    # recompute_modules); parallel.activation_recompute=true is recompute=full
    recompute: str = "none"
    # recompute=selective: core_attn | mlp (dense MLPs) | moe (MoE layers) | moe_act, layernorm (both need TE);
    # null: [core_attn] (Megatron's and verl's default)
    recompute_modules: list[str] | None = None
    # overlap the data-parallel gradient reduce-scatter with the backward / the distributed optimizer's parameter
    # all-gather with the next forward (parallel/ddp.py); null: on with CUDA, off on the CPU
    overlap_grad_reduce: bool | None = None
    overlap_param_gather: bool | None = None
    # parameters per DDP communication bucket (Megatron's --ddp-bucket-size); null: max(40M, 1M·DP) when
    # overlapping (Megatron-LM's default), else one bucket
    ddp_bucket_size: int | None = None

    @property
    def sequence_parallel_enabled(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel

    @property
    def recompute_granularity(self) -> str | None:
        """Megatron's ``recompute_granularity``: None, "full" or "selective"."""
        if self.activation_recompute:
            return "full"
        return None if self.recompute == "none" else self.recompute

    @property
    def selective_modules(self) -> list[str]:
        return list(self.recompute_modules or ["core_attn"]) if self.recompute == "selective" else []


RECOMPUTE_MODULES = ("core_attn", "mlp", "moe", "moe_act", "layernorm")
TE_RECOMPUTE_MODULES = ("moe_act", "layernorm")  # Megatron recomputes these through TE only


def _check_scaling_features(par: ParallelConfig) -> None:
    _choice("parallel.recompute", par.recompute, ("none", "full", "selective"))
    if par.activation_recompute and par.recompute == "selective":
        raise ConfigError(
            "parallel.activation_recompute=true means parallel.recompute=full, but parallel.recompute=selective: "
            "remove parallel.activation_recompute"
        )
    if par.recompute_modules is not None:
        if par.recompute != "selective":
            raise ConfigError(
                f"parallel.recompute_modules applies to parallel.recompute=selective (got recompute={par.recompute}):"
                " set parallel.recompute=selective or remove parallel.recompute_modules"
            )
        if not par.recompute_modules:
            raise ConfigError(
                "parallel.recompute_modules is empty: name at least one module, or recompute=none"
            )
        for module in par.recompute_modules:
            _choice("parallel.recompute_modules", module, RECOMPUTE_MODULES)
    if par.sequence_parallel and par.tp == 1:
        raise ConfigError(
            "parallel.sequence_parallel=true splits the sequence over the tensor-parallel ranks, but parallel.tp=1:"
            " set parallel.tp > 1 or remove parallel.sequence_parallel"
        )
    if par.ddp_bucket_size is not None:
        _positive("parallel.ddp_bucket_size", par.ddp_bucket_size)


@dataclass(kw_only=True)
class TrainerConfig:
    total_steps: int = 100  # rollout steps (each: generate prompts_per_step prompts, then train on them)
    prompts_per_step: int = 32  # global batch of prompts per rollout step (divided over data-parallel ranks)
    # prompts per optimizer step (verl's ppo_mini_batch_size): the rollout batch is trained in
    # prompts_per_step / mini_batch_size optimizer steps; None: one step on the whole batch
    mini_batch_size: int | None = None
    update_epochs: int = 1  # passes over the rollout batch (verl's ppo_epochs)
    micro_batch_tokens: int = 4096  # token budget of one packed micro-batch (pairs are never split)
    ref_update_freq: int = 0  # k > 0: reference ← policy every k rollout steps (a SPIN iteration); 0: never
    # TRL's sync_ref_model: reference ← policy every k OPTIMIZER steps instead (0: off; not with ref_update_freq)
    ref_model_sync_steps: int = 0
    ref_model_mixup_alpha: float = 1.0  # refresh: ref ← α·policy + (1−α)·ref (TR-DPO); 1: a hard copy
    # every refresh (a new SPIN iteration) starts a fresh Adam (moments, step) and LR schedule (warm-up, then the
    # decay over one iteration: ref_update_freq × mini_batches × update_epochs optimizer steps), as uclaml/SPIN's
    # runs per iteration do; false: one optimizer and one schedule across the whole run
    reset_optimizer_on_refresh: bool = False
    # after generation, a mini-batch's pairs are re-split over the data-parallel replicas by tokens (Karmarkar-
    # Karp), not kept where their prompts were sampled; the loss is the mean over the mini-batch either way
    balance_dp: bool = True
    save_freq: int = 0  # checkpoint every k steps (and always at the end); 0: only at the end
    test_freq: int = 0  # validate every k steps (and at the start and end); 0: never
    keep_last_n: int = 2  # complete checkpoints to keep; 0: all
    output_dir: str = "runs/spin"  # run directory: metrics, checkpoints, plots, HF export
    resume: str = "auto"  # auto (latest complete checkpoint in output_dir) | never | a checkpoint path
    seed: int = 1234  # model init, sampling and dropout seed
    export_hf: bool = True  # write the final policy as an HF folder to <output_dir>/hf
    max_consecutive_skips: int = 3  # stop (with a checkpoint) after this many NaN/Inf-skipped steps in a row
    logprob_chunk_tokens: int = 256  # tokens per chunk of the fp32 log-prob pass ([chunk, V/TP] buffer)
    # fused_head: the output layer applied chunk-wise to response positions only, no [T, V/TP] logits;
    # logits: full logits, then TE's parallel cross-entropy (GPU) or a chunked fp32 pass
    logprob_impl: str = "fused_head"
    device: str = "auto"  # auto: CUDA when available, else CPU | cuda: stop at start if CUDA is missing

    def __post_init__(self):
        for key in ("total_steps", "prompts_per_step", "micro_batch_tokens", "logprob_chunk_tokens"):
            _positive(f"trainer.{key}", getattr(self, key))
        _positive("trainer.max_consecutive_skips", self.max_consecutive_skips)
        _choice("trainer.logprob_impl", self.logprob_impl, ("logits", "fused_head"))
        _choice("trainer.device", self.device, ("auto", "cuda"))
        for key in ("ref_update_freq", "ref_model_sync_steps", "save_freq", "test_freq", "keep_last_n"):
            _positive(f"trainer.{key}", getattr(self, key), zero_ok=True)
        _positive("trainer.update_epochs", self.update_epochs)
        if self.mini_batch_size is not None:
            _positive("trainer.mini_batch_size", self.mini_batch_size)
        if self.prompts_per_step % self.mini_batch_prompts:
            raise ConfigError(
                f"trainer.mini_batch_size={self.mini_batch_size} must divide trainer.prompts_per_step="
                f"{self.prompts_per_step} (each optimizer step trains on an equal share of the rollout batch)"
            )
        if not 0.0 < self.ref_model_mixup_alpha <= 1.0:
            raise ConfigError(
                f"trainer.ref_model_mixup_alpha must be in (0, 1], got {self.ref_model_mixup_alpha}"
            )
        if self.reset_optimizer_on_refresh and not (
            self.ref_update_freq and self.ref_model_mixup_alpha == 1.0
        ):
            raise ConfigError(
                "trainer.reset_optimizer_on_refresh starts each SPIN iteration afresh, and iterations are hard "
                "refreshes every trainer.ref_update_freq rollout steps: set ref_update_freq > 0 (with "
                "ref_model_mixup_alpha=1 and no ref_model_sync_steps), or remove reset_optimizer_on_refresh"
            )
        if self.ref_update_freq and self.ref_model_sync_steps:
            raise ConfigError(
                "trainer.ref_update_freq (rollout steps) and trainer.ref_model_sync_steps (optimizer steps) both "
                "set the reference refresh: set one of them to 0"
            )
        if not self.output_dir:
            raise ConfigError("trainer.output_dir must be a directory path")

    @property
    def mini_batch_prompts(self) -> int:
        """Prompts per optimizer step (``mini_batch_size``, else the whole rollout batch)."""
        return self.mini_batch_size or self.prompts_per_step

    @property
    def mini_batches(self) -> int:
        return self.prompts_per_step // self.mini_batch_prompts

    @property
    def updates_per_rollout(self) -> int:
        """Optimizer steps taken on one rollout batch: mini-batches × epochs."""
        return self.mini_batches * self.update_epochs


@dataclass(kw_only=True)
class WandbConfig:
    mode: str = "disabled"  # disabled | offline | online
    project: str = "spin-megatron"
    entity: str | None = None
    name: str | None = None  # run name (default: the output directory's name)

    def __post_init__(self):
        _choice("logging.wandb.mode", self.mode, ("disabled", "offline", "online"))


@dataclass(kw_only=True)
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress_bar: bool = True  # console progress bar with the main metrics
    log_every: int = 1  # console line every k steps (metrics.jsonl gets every step)

    def __post_init__(self):
        _positive("logging.log_every", self.log_every)


@dataclass(kw_only=True)
class ClusterConfig:
    """The machines a run is planned for (``spin-plan``, and the trainer's memory check at start)."""

    nodes: int = 1  # machines
    gpus_per_node: int = 8  # GPUs per machine
    gpu_memory_gb: float = 80.0  # memory of one GPU in GB (2^30 bytes)
    memory_headroom: float = 0.1  # fraction kept free for the CUDA context and fragmentation
    placement: str = "colocated"  # colocated (rollout on the training GPUs) | disaggregated
    rollout_gpus: int = 0  # disaggregated: GPUs given to the SGLang engines (not training)
    check_at_start: bool = True  # the trainer refuses to start (on GPU) when the plan does not fit

    def __post_init__(self):
        _positive("cluster.nodes", self.nodes)
        _positive("cluster.gpus_per_node", self.gpus_per_node)
        _positive("cluster.gpu_memory_gb", self.gpu_memory_gb)
        if not 0.0 <= self.memory_headroom < 1.0:
            raise ConfigError(f"cluster.memory_headroom must be in [0, 1), got {self.memory_headroom!r}")
        _choice("cluster.placement", self.placement, ("colocated", "disaggregated"))
        _positive("cluster.rollout_gpus", self.rollout_gpus, zero_ok=True)
        total = self.nodes * self.gpus_per_node
        if self.placement == "colocated" and self.rollout_gpus:
            raise ConfigError(
                f"cluster.rollout_gpus={self.rollout_gpus} needs cluster.placement=disaggregated "
                "(colocated engines share the training GPUs): set it to 0 or change the placement"
            )
        if self.placement == "disaggregated" and not 0 < self.rollout_gpus < total:
            raise ConfigError(
                f"cluster.rollout_gpus must be in [1, {total - 1}] with cluster.placement=disaggregated "
                f"({self.nodes} × {self.gpus_per_node} GPUs), got {self.rollout_gpus}"
            )
