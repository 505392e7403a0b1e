"""``algorithm.*``: online DPO vs SPIN, the loss family, rewards and pairing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from spin_megatron.config.common import (
    _choice,
    _positive,
)
from spin_megatron.errors import ConfigError


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
