"""The whole run's :class:`Config`: the sections, the checks that span sections, and the Hydra schema."""

from __future__ import annotations

from dataclasses import dataclass, field

from spin_megatron.config.algorithm import AlgorithmConfig
from spin_megatron.config.data import DataConfig
from spin_megatron.config.model import ModelConfig
from spin_megatron.config.rollout import RolloutConfig
from spin_megatron.config.training import (
    ClusterConfig,
    LoggingConfig,
    OptimConfig,
    ParallelConfig,
    TrainerConfig,
)
from spin_megatron.errors import ConfigError
from spin_megatron.reward_model.config import RewardModelConfig


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
