"""The configuration schema: one dataclass per section, registered with Hydra's ConfigStore.

YAML presets in ``conf/`` contain only what differs from these defaults. Every field is validated in
``__post_init__`` with a :class:`ConfigError` naming the key and the allowed values, before any process group
starts (Hydra itself rejects unknown keys and wrong types).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spin_megatron.errors import ConfigError
from spin_megatron.reward_model.config import RewardModelConfig
from spin_megatron.rollout.sglang.config import SGLangConfig

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The team's data folder (tokenizer, GSM8K): ``$SPIN_SHARED_DATA``, else ``../shared/data`` beside the
    checkout. Read at each call, so a GPU machine that carries the data elsewhere finds it without the hub."""
    return Path(os.environ.get("SPIN_SHARED_DATA", REPO.parent / "shared" / "data"))


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


def _positive(key: str, value, *, zero_ok: bool = False) -> None:
    ok = value >= 0 if zero_ok else value > 0
    if not ok:
        raise ConfigError(f"{key} must be {'≥ 0' if zero_ok else '> 0'}, got {value!r}")


def _default_files(split: str) -> list[str]:
    path = shared_data_dir() / "gsm8k" / f"{split}.jsonl"
    return [str(path)] if path.is_file() else []


def default_tokenizer() -> str:
    path = shared_data_dir() / "qwen2.5-tokenizer"
    return str(path) if (path / "vocab.json").is_file() else "Qwen/Qwen2.5-0.5B-Instruct"


@dataclass(kw_only=True)
class TinyModelConfig:
    """A random-weight model created at start (demo, tests): Qwen2/Llama/Qwen3/Qwen3-MoE shape, real tokenizer."""

    architecture: str = "qwen2"  # qwen2 | llama | qwen3 | qwen3_moe
    hidden_size: int = 64  # width of the residual stream
    intermediate_size: int = 128  # SwiGLU width
    num_hidden_layers: int = 2  # transformer layers
    num_attention_heads: int = 4  # query heads
    num_key_value_heads: int = 2  # KV heads (GQA)
    vocab_size: int = 151936  # embedding rows; Qwen2.5's vocabulary by default
    tie_word_embeddings: bool = True  # share embedding and output layer, as Qwen2.5-0.5B
    seed: int = 0  # weight initialisation seed
    num_experts: int = 4  # qwen3_moe: routed experts per MoE layer
    num_experts_per_tok: int = 2  # qwen3_moe: experts each token is routed to (top-k)
    moe_intermediate_size: int = 32  # qwen3_moe: each expert's SwiGLU width

    def __post_init__(self):
        _choice("model.tiny.architecture", self.architecture, ("qwen2", "llama", "qwen3", "qwen3_moe"))
        for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            _positive(f"model.tiny.{key}", getattr(self, key))
        for key in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        ):
            _positive(f"model.tiny.{key}", getattr(self, key))


@dataclass(kw_only=True)
class ModelConfig:
    hf_path: str | None = None  # HF folder: architecture, initial weights, tokenizer
    mcore_ckpt: str | None = None  # `spin-convert hf-to-mcore` output; used for the weights when set
    tokenizer_path: str | None = None  # default: hf_path, else the checkpoint's tokenizer/, else Qwen2.5's
    tiny: TinyModelConfig | None = None  # build a random tiny model instead of loading one
    dtype: str = "fp32"  # parameter dtype: fp32 | bf16
    fused_swiglu: bool = True  # GPU: Megatron's fused bias-SwiGLU (compiled with torch.compile); CPU: never
    # MoE load-balancing loss weight (Megatron's moe_aux_loss_coeff, logged as moe/load_balancing_loss); 0: off,
    # the DPO default (slime's Qwen3-MoE RL recipes also train with 0); null: the checkpoint's router_aux_loss_coef
    moe_aux_loss_coeff: float | None = 0.0

    def __post_init__(self):
        _choice("model.dtype", self.dtype, ("fp32", "bf16"))
        if self.moe_aux_loss_coeff is not None and not self.moe_aux_loss_coeff >= 0:
            raise ConfigError(
                f"model.moe_aux_loss_coeff must be ≥ 0 (or null), got {self.moe_aux_loss_coeff}"
            )

    def check_source(self) -> None:
        sources = [k for k in ("hf_path", "mcore_ckpt", "tiny") if getattr(self, k) is not None]
        if not sources:
            raise ConfigError(
                "no model given: set model.hf_path=HF_DIR or model.mcore_ckpt=DIR, or use a preset such as "
                "experiment=tiny_cpu"
            )
        if self.tiny is not None and len(sources) > 1:
            raise ConfigError(
                f"model.tiny builds a random model and model.{sources[0]} loads one: set only one; to load "
                f"{sources[0]} in a preset that sets model.tiny (e.g. experiment=tiny_cpu), add model.tiny=null"
            )


def _file_list(key: str, value) -> list[str]:
    """``data.*_files`` as a list: one path (``data.train_files=/path/train.jsonl``) or a list of paths."""
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [str(value)] if str(value) else []
    if isinstance(value, (list, tuple)) and all(isinstance(path, (str, Path)) for path in value):
        return [str(path) for path in value]
    raise ConfigError(f"{key} must be a file path or a list of file paths, got {value!r}")


@dataclass(kw_only=True)
class DataConfig:
    # local .jsonl/.parquet files: a list or one path (typed Any so that Hydra takes a plain path too)
    train_files: Any = field(default_factory=lambda: _default_files("train"))
    val_files: Any = field(default_factory=lambda: _default_files("test"))  # as train_files
    hub_dataset: str = "openai/gsm8k"  # used when the *_files lists are empty (needs network)
    hub_config: str | None = "main"  # the hub dataset's configuration name
    train_split: str = "train"  # hub split for training
    val_split: str = "test"  # hub split for validation
    prompt_key: str = "question"  # field holding the prompt text
    # field holding the gold response (SPIN's chosen; GSM8K's '#### n' answer); null: prompts only (online mode)
    answer_key: str | None = "answer"
    instruction: str = 'Let\'s think step by step and output the final answer after "####".'  # appended
    system_prompt: str | None = None  # None: the chat template's default
    use_chat_template: bool = True  # wrap prompts with the tokenizer's chat template
    max_prompt_tokens: int = 512  # longer prompts are dropped or left-truncated
    # drop | left_truncate (keep the last tokens; conversations: drop whole earliest turns, keeping the system
    # turn and the last user turn)
    overlong_prompts: str = "drop"
    # SPIN chosen: gold tokens + the chat template's end-of-turn token; a longer gold is cut here, unterminated
    max_gold_tokens: int = 512
    strip_calculator_annotations: bool = True  # remove GSM8K's <<48/2=24>> from gold responses
    shuffle: bool = True  # reshuffle the training prompts every epoch
    seed: int = 1  # shuffling seed
    val_max_prompts: int | None = 128  # validate on the first N val prompts (None: all)
    # field holding a conversation, a list of {role, content} (UltraChat's messages, uclaml's real or chosen):
    # prompt = every turn before the last assistant turn, gold = that turn (spin_megatron/data/chat.py);
    # prompt_key, answer_key, instruction and strip_calculator_annotations are then not used
    messages_key: str | None = None
    # conversations that end with a user turn, have no assistant turn or unknown roles: drop (counted) | error
    bad_rows: str = "drop"
    # tokenized conversations are kept here, keyed by files, tokenizer, chat template and data.* settings, and
    # loaded from here on the next start and on resume; null: no cache
    cache_dir: str | None = "~/.cache/spin_megatron/data"
    tokenize_workers: int = 0  # processes tokenizing conversations; 0: one per CPU core, at most 8

    def __post_init__(self):
        self.train_files = _file_list("data.train_files", self.train_files)
        self.val_files = _file_list("data.val_files", self.val_files)
        _choice("data.overlong_prompts", self.overlong_prompts, ("drop", "left_truncate"))
        _choice("data.bad_rows", self.bad_rows, ("drop", "error"))
        _positive("data.max_prompt_tokens", self.max_prompt_tokens)
        _positive("data.max_gold_tokens", self.max_gold_tokens)
        _positive("data.tokenize_workers", self.tokenize_workers, zero_ok=True)
        if self.val_max_prompts is not None:
            _positive("data.val_max_prompts", self.val_max_prompts)
        if self.messages_key is not None and not self.messages_key:
            raise ConfigError("data.messages_key must name a field (e.g. messages), or be null")
        if self.messages_key is not None and not self.use_chat_template:
            raise ConfigError(
                "data.messages_key renders conversations with the chat template: set data.use_chat_template=true"
            )

    @property
    def has_gold(self) -> bool:
        """Rows carry a reference response (SPIN's chosen): an answer field, or a conversation's last turn."""
        return self.messages_key is not None or self.answer_key is not None


@dataclass(kw_only=True)
class RolloutConfig:
    engine: str = "hf"  # hf (transformers in-process, CPU default) | sglang | replay | package.module:factory
    # samples per prompt; null: the mode's own (online 2: best vs worst; spin algorithm.pairs_per_prompt, 1: a
    # sample no pair uses would be generated for nothing)
    n: int | None = None
    temperature: float = 1.0  # sampling temperature (log-probs of samples are scored at it)
    top_p: float = 1.0  # nucleus sampling
    top_k: int = -1  # -1: off
    max_new_tokens: int = 256  # response length limit (finish_reason=length beyond)
    val_max_new_tokens: int | None = None  # greedy validation length (None: max_new_tokens)
    sync_every: int = (
        1  # algorithm.sample_from=policy: push policy weights into the engine every k rollout steps
    )
    sync_bucket_mb: int = 512  # weight-sync bucket size
    max_batch_size: int = 64  # hf engine: sequences decoded together
    hf_process: str = (
        "inline"  # hf engine: inline (in the trainer's process) | separate (a process of its own)
    )
    hf_threads: int = 0  # hf_process=separate: the engine process's torch threads (0: torch's default)
    dump_path: str | None = None  # write every step's samples to this jsonl
    replay_path: str | None = None  # engine=replay: serve samples from this dump
    timeout_s: float = 3600.0  # a generation call longer than this counts as a hung engine
    max_restarts: int = 2  # engine restarts (+ weight re-sync) per generation before the run saves and stops
    # 1: the next step's batch is generated while this step trains (one policy version old when sampling from the
    # policy; exact, staleness 0, when sampling from the reference); 0: generate, then train (spin_megatron/training/overlap.py)
    max_staleness: int = 0
    sglang: SGLangConfig = field(default_factory=SGLangConfig)  # engine=sglang: servers, sync mode, ...

    def __post_init__(self):
        if ":" not in self.engine:  # 'package.module:factory' plugs in a custom engine
            _choice("rollout.engine", self.engine, ("hf", "sglang", "replay"))
        _choice("rollout.hf_process", self.hf_process, ("inline", "separate"))
        _choice("rollout.max_staleness", self.max_staleness, (0, 1))
        _positive("rollout.hf_threads", self.hf_threads, zero_ok=True)
        _positive("rollout.timeout_s", self.timeout_s)
        _positive("rollout.max_restarts", self.max_restarts, zero_ok=True)
        if self.n is not None:
            _positive("rollout.n", self.n)
        _positive("rollout.temperature", self.temperature)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ConfigError(f"rollout.top_k must be -1 (off) or ≥ 1, got {self.top_k}")
        for key in ("max_new_tokens", "sync_every", "sync_bucket_mb", "max_batch_size"):
            _positive(f"rollout.{key}", getattr(self, key))
        if self.engine == "replay" and not self.replay_path:
            raise ConfigError(
                "rollout.engine=replay needs rollout.replay_path (a file written with rollout.dump_path)"
            )


@dataclass(kw_only=True)
class AlgorithmConfig:
    mode: str = "online"  # online: best vs worst sample | spin: gold vs the opponent's sample
    # Who generates the samples: policy (the engine follows the policy every rollout.sync_every steps) |
    # reference (SPIN's opponent p_θt: the engine holds the reference and is synced only when it is refreshed).
    # None: reference for mode=spin, policy for mode=online.
    sample_from: str | None = None
    beta: float = 0.1  # DPO temperature β
    # sigmoid | robust | hinge | ipo | exo_pair | nca_pair | bco_pair | sppo_hard | aot | aot_pair
    # (alias aot_unpaired) | apo_zero | apo_down | discopop — formulas in loss.py and README
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0  # ε: sigmoid (cDPO), robust, exo_pair (needs ε > 0), aot, aot_pair
    discopop_tau: float = 0.05  # discopop's temperature τ
    reference_free: bool = False  # drop the reference terms
    rpo_alpha: float = 0.0  # weight of the NLL term on chosen tokens (RPO); 0: off
    # average instead of sum token log-probs; None: True for ipo (as TRL), False otherwise
    length_normalize: bool | None = None
    ld_alpha: float | None = None  # LD-DPO: tokens past the shorter response of a pair weigh α; None: off
    use_weighting: bool = False  # WPO: weight each pair by the policy's (length-averaged) probability of both
    # registered reward name or 'package.module:function'; none: no rule (a reward model decides: reward_model.*)
    reward: str | None = "gsm8k"
    # more reward names scored on every sample and LOGGED only (reward/<name>/accuracy), never used for pairing
    reward_metrics: list[str] = field(default_factory=list)
    tie_policy: str = "drop"  # online: what to do when every sample of a prompt scores the same
    # online: order of equal scores (picks among equally good/bad samples, and the pair of a kept tie):
    # first (lowest sample index; samples are i.i.d., so unbiased) | shorter | longer (both length-biased)
    tie_break: str = "first"
    missing_eos: str = "keep"  # truncated samples: keep | penalize | exclude
    missing_eos_penalty: float = 1.0  # subtracted from a truncated sample's reward (penalize)
    pairs_per_prompt: Any = 1  # spin: pairs built per prompt: an integer ≤ rollout.n, or all (one per sample)

    def __post_init__(self):
        from spin_megatron.algorithm.loss import (
            LOSS_ALIASES,
            LOSS_TYPES,
            SMOOTHED_LOSSES,
            canonical_loss_type,
        )

        _choice("algorithm.mode", self.mode, ("online", "spin"))
        # (None defaults are resolved by properties, never written back: Hydra takes the schema's defaults
        # from an instance built with the defaults, so a value written here would become everyone's default)
        if self.sample_from is not None:
            _choice("algorithm.sample_from", self.sample_from, ("policy", "reference"))
        _choice("algorithm.loss_type", self.loss_type, LOSS_TYPES + tuple(LOSS_ALIASES))
        loss_type = canonical_loss_type(self.loss_type)
        _positive("algorithm.beta", self.beta)
        _positive("algorithm.discopop_tau", self.discopop_tau)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"algorithm.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and loss_type not in SMOOTHED_LOSSES:
            raise ConfigError(
                f"algorithm.label_smoothing applies to loss_type {', '.join(SMOOTHED_LOSSES)}, not "
                f"{self.loss_type}: set it to 0 or change the loss"
            )
        if loss_type == "exo_pair" and not self.label_smoothing:
            raise ConfigError("algorithm.loss_type=exo_pair needs algorithm.label_smoothing > 0 (e.g. 1e-3)")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ConfigError(f"algorithm.ld_alpha must be in [0, 1] (or null: off), got {self.ld_alpha}")
        if self.use_weighting and loss_type in ("aot", "aot_pair"):
            raise ConfigError(
                "algorithm.use_weighting (WPO) weights pairs, and aot/aot_pair pair ranks, not pairs: "
                "turn one of them off"
            )
        _positive("algorithm.rpo_alpha", self.rpo_alpha, zero_ok=True)
        _choice("algorithm.tie_policy", self.tie_policy, ("drop", "keep"))
        _choice("algorithm.tie_break", self.tie_break, ("first", "shorter", "longer"))
        if len(set(self.reward_metrics)) != len(self.reward_metrics) or not all(self.reward_metrics):
            raise ConfigError(
                f"algorithm.reward_metrics must list distinct reward names; got {self.reward_metrics}"
            )
        _choice("algorithm.missing_eos", self.missing_eos, ("keep", "penalize", "exclude"))
        count = isinstance(self.pairs_per_prompt, int) and not isinstance(self.pairs_per_prompt, bool)
        if self.pairs_per_prompt != "all" and not (count and self.pairs_per_prompt >= 1):
            raise ConfigError(
                f"algorithm.pairs_per_prompt must be an integer ≥ 1 or all; got {self.pairs_per_prompt!r}"
            )

    @property
    def rule_reward(self) -> str | None:
        """``reward``, None when it is off (null or 'none')."""
        return None if self.reward in (None, "none") else self.reward

    @property
    def sampler(self) -> str:
        """Who generates the samples: ``sample_from``, else reference for spin and policy for online."""
        return self.sample_from or ("reference" if self.mode == "spin" else "policy")

    @property
    def canonical_loss(self) -> str:
        from spin_megatron.algorithm.loss import canonical_loss_type

        return canonical_loss_type(self.loss_type)

    @property
    def length_normalized(self) -> bool:
        """``length_normalize``, else True for ipo only (TRL: IPO is defined on length-averaged log-probs)."""
        return self.length_normalize if self.length_normalize is not None else self.canonical_loss == "ipo"


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


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # machines, for spin-plan
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)  # online labels from a model

    def __post_init__(self):
        self.model.check_source()
        # rollout.n unset: the mode's own (Config itself is never instantiated for the schema's defaults, so
        # writing here cannot become everyone's default, unlike in a section's __post_init__)
        if self.rollout.n is None:
            per_prompt = self.algorithm.pairs_per_prompt
            spin_n = 1 if per_prompt == "all" else per_prompt
            self.rollout.n = 2 if self.algorithm.mode == "online" else spin_n
        if self.algorithm.mode == "online" and self.rollout.n < 2:
            raise ConfigError("algorithm.mode=online needs rollout.n ≥ 2 (best vs worst sample of a prompt)")
        per_prompt, n = self.algorithm.pairs_per_prompt, self.rollout.n
        if self.algorithm.mode == "spin" and per_prompt != "all" and per_prompt > n:
            raise ConfigError(f"algorithm.pairs_per_prompt={per_prompt} exceeds rollout.n={n}")
        if self.algorithm.mode == "spin" and per_prompt != "all" and per_prompt < n:
            raise ConfigError(
                f"rollout.n={n} samples per prompt, but spin mode pairs only algorithm.pairs_per_prompt="
                f"{per_prompt} of them with the gold: set rollout.n={per_prompt} (or leave it unset), or "
                f"algorithm.pairs_per_prompt={n} (or all)"
            )
        if self.algorithm.mode == "online" and per_prompt != 1:
            raise ConfigError(
                f"algorithm.pairs_per_prompt={per_prompt} applies to algorithm.mode=spin; online mode builds one "
                "pair per prompt (best vs worst sample): remove algorithm.pairs_per_prompt"
            )
        _check_reference_anchors(self)
        _check_overlap(self)
        if self.parallel.overlap_param_gather and not self.optim.use_distributed_optimizer:
            raise ConfigError(
                "parallel.overlap_param_gather overlaps the distributed optimizer's parameter all-gather, but "
                "optim.use_distributed_optimizer=false: set one of them the other way"
            )
        _check_reward_model(self)
        if self.algorithm.sampler == "reference" and self.rollout.sync_every != 1:
            raise ConfigError(
                "rollout.sync_every applies to algorithm.sample_from=policy; with sample_from=reference the engine "
                "is synced when the reference is refreshed: remove rollout.sync_every or sample from the policy"
            )
        if self.rollout.engine == "replay" and self.trainer.test_freq:
            raise ConfigError(
                "rollout.engine=replay serves recorded training samples only: set trainer.test_freq=0"
            )
        if self.algorithm.mode == "spin" and not self.data.has_gold:
            raise ConfigError(
                "algorithm.mode=spin trains toward the dataset's responses (chosen = gold), but data.answer_key is "
                "null: name the response field (or a conversation field, data.messages_key), or use "
                "algorithm.mode=online"
            )
        if self.data.messages_key is not None and self.algorithm.rule_reward in ("gsm8k", "gsm8k_verl"):
            raise ConfigError(
                f"algorithm.reward={self.algorithm.reward} scores GSM8K '#### n' answers, but data.messages_key="
                f"{self.data.messages_key} gives conversations: set algorithm.reward=none (online mode: and a "
                "reward model, reward_model.path)"
            )
        if self.algorithm.mode == "spin" and self.algorithm.missing_eos == "penalize":
            raise ConfigError(
                "algorithm.missing_eos=penalize ranks samples; spin mode ranks nothing: keep or exclude"
            )


def _check_overlap(cfg: Config) -> None:
    """rollout.max_staleness=1 needs an engine that runs beside the trainer and a sync at step boundaries."""
    r, t = cfg.rollout, cfg.trainer
    if not r.max_staleness:
        return
    why = None
    if r.engine == "hf" and r.hf_process == "inline":
        why = "the in-process hf engine shares the trainer's threads: set rollout.hf_process=separate"
    elif r.engine == "sglang" and (r.sglang.enable_memory_saver or r.sglang.sync_mode == "colocated"):
        why = "colocated SGLang shares the training GPUs and keeps the synchronous loop: use disaggregated servers"
    elif cfg.algorithm.sampler == "policy" and r.sync_every != 1:
        why = "it replaces rollout.sync_every (the staleness bound would not hold): remove rollout.sync_every"
    elif cfg.algorithm.sampler == "reference" and t.ref_model_sync_steps:
        why = (
            "trainer.ref_model_sync_steps refreshes the reference inside a step: use trainer.ref_update_freq"
        )
    if why:
        raise ConfigError(
            f"rollout.max_staleness={r.max_staleness} overlaps generation with training, but {why}"
        )


def _check_reward_model(cfg: Config) -> None:
    rm, a = cfg.reward_model, cfg.algorithm
    if not rm.enabled:
        if a.rule_reward is None and a.mode == "online":  # spin ranks nothing: its chosen is the gold
            raise ConfigError(
                "algorithm.reward=none leaves nothing to rank the samples: set a reward model (reward_model.path, "
                "or reward_model.backend=judge) or a rule reward"
            )
        return
    if a.mode != "online":
        raise ConfigError(
            "reward_model ranks samples, and algorithm.mode=spin ranks nothing (chosen is the gold response): use "
            "algorithm.mode=online or remove reward_model.path"
        )
    if rm.combine != "model" and a.rule_reward is None:
        raise ConfigError(f"reward_model.combine={rm.combine} combines the model with the rule reward, but "
                          "algorithm.reward=none: set a rule reward or reward_model.combine=model")  # fmt: skip
    if rm.backend == "judge":
        if cfg.rollout.n != 2:
            raise ConfigError(f"reward_model.backend=judge compares two answers per prompt: set rollout.n=2 (got "
                              f"{cfg.rollout.n})")  # fmt: skip
        if a.rule_reward is None and cfg.trainer.test_freq:
            raise ConfigError(
                "validation scores one greedy answer per prompt, which a pairwise judge cannot: set a rule reward "
                "(algorithm.reward) for validation, or trainer.test_freq=0"
            )


def _check_reference_anchors(cfg: Config) -> None:
    """Refuse a run whose reference equals the policy at every update: DPO logits are then 0, the loss is
    log 2 whatever the data, every rewards/* metric is 0 and nothing anchors the policy (clipping and Adam
    cancel β)."""
    t, a = cfg.trainer, cfg.algorithm
    if t.ref_model_mixup_alpha < 1.0:
        if not (t.ref_update_freq or t.ref_model_sync_steps):
            raise ConfigError(
                "trainer.ref_model_mixup_alpha < 1 mixes the policy into the reference at each refresh, but no "
                "refresh is set: set trainer.ref_update_freq (rollout steps) or trainer.ref_model_sync_steps"
            )
        if cfg.model.dtype != "fp32":
            # α·(policy − ref) is usually below half a bf16 ulp of the weight at DPO learning rates: the
            # reference would never move
            raise ConfigError(
                "trainer.ref_model_mixup_alpha < 1 (TR-DPO) needs model.dtype=fp32: in bf16 the soft update rounds "
                "away; use a hard refresh (alpha 1) or fp32 parameters"
            )
    if a.reference_free or t.ref_model_mixup_alpha < 1.0:
        return
    if t.ref_update_freq == 1 and t.updates_per_rollout == 1:
        halves = [d for d in range(t.prompts_per_step // 2, 0, -1) if t.prompts_per_step % d == 0][:1]
        hint = f"trainer.mini_batch_size={halves[0]}" if halves else "trainer.update_epochs=2"
        raise ConfigError(
            "trainer.ref_update_freq=1 with one optimizer step per rollout batch trains against a reference equal "
            f"to the policy (DPO logits always 0): take several optimizer steps per batch (e.g. {hint}), or set "
            "trainer.ref_update_freq ≥ 2"
        )
    if t.ref_model_sync_steps == 1:
        raise ConfigError(
            "trainer.ref_model_sync_steps=1 copies the policy into the reference after every optimizer step "
            "(DPO logits always 0): use a larger interval or a soft update (trainer.ref_model_mixup_alpha < 1)"
        )


def register_configs() -> None:
    """Register the schema so ``conf/config.yaml`` can extend it (``defaults: [base_config, ...]``).

    Mappings (``dict`` fields such as ``rollout.sglang.extra_server_env``) are open: their keys are the user's, so
    ``key={A: b}`` or ``key.A=b`` adds entries. Hydra makes the whole config struct (unknown keys are errors); a
    node's own flag wins over the one it would inherit."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import DictConfig, OmegaConf

    def open_mappings(node: DictConfig) -> None:
        for key in node:
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                if child._metadata.object_type is dict:
                    OmegaConf.set_struct(child, False)
                else:
                    open_mappings(child)

    schema = OmegaConf.structured(Config)
    open_mappings(schema)
    ConfigStore.instance().store(name="base_config", node=schema)
