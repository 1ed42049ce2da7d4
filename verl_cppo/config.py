"""CPPO configuration as verl ``BaseConfig`` dataclasses.

The one Hydra form (command line and YAML alike) is the node ``actor_rollout_ref.actor.policy_loss``::

    actor_rollout_ref.actor.policy_loss._target_=verl_cppo.config.CPPOPolicyLossConfig
    actor_rollout_ref.actor.policy_loss.loss_mode=cppo
    +actor_rollout_ref.actor.policy_loss.cppo.delta=0.2        # any CPPOConfig field, '+' because the key is new

verl's driver instantiates that node with Hydra in ``validate_config`` before Ray starts, so every value is
checked here (``__post_init__``) before any training step. ``loss_mode=cppo`` alone, on verl's stock
``PolicyLossConfig``, runs CPPO with the defaults below.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from verl.base_config import BaseConfig
from verl.workers.config import PolicyLossConfig

__all__ = [
    "DIVERGENCES",
    "GATES",
    "KERNELS",
    "TOPK_DIVERGENCES",
    "CPPOConfig",
    "CPPOPolicyLossConfig",
    "cppo_config_of",
]

BINARY_DIVERGENCES = ("binary_tv", "binary_kl")
"""Divergences the loss computes from the sampled token's log-probs alone."""

# --- Top-K divergences (issue 7) -----------------------------------------------------------------------------
TOPK_DIVERGENCES = ("topk_tv", "topk_kl")
"""Divergences over mu's top-K tokens + the sampled token + "other": they need mu's top-K log-probs from the
rollout and pi's logits in the engine (verl_cppo.topk_setup enables both; see README "Top-K divergences")."""

DIVERGENCES = BINARY_DIVERGENCES + TOPK_DIVERGENCES
# --- end Top-K divergences -----------------------------------------------------------------------------------

GATES = ("hard", "soft")

KERNELS = ("auto", "torch", "triton")
"""Implementations of the mask and loss (``verl_cppo.kernels``)."""


@dataclass
class CPPOConfig(BaseConfig):
    """Hyper-parameters of the CPPO mask (arXiv 2606.10968, Algorithm 1). Defaults are the paper's."""

    delta: float = 0.15
    """Token-level divergence threshold at the first response position; a token at the end of the horizon
    may move delta / w_min. Range: (0, inf)."""

    w_min: float = 0.8
    """Position weight at the end of the horizon: w_t falls linearly from 1 at t = 1 to w_min at t = H.
    Range: (0, 1]; 1 disables the position weighting."""

    delta_b: float = 0.02
    """Prefix budget: the response's weighted running average divergence may not exceed it. With
    delta_b_quantile set, this is the floor delta_b_min of the per-response calibration. Range: [0, inf)."""

    delta_b_quantile: float | None = 0.9
    """Calibrate delta_b per response as clamp(delta_b_scale * quantile_q(D), delta_b, delta_b_max_mult *
    delta_b), q = this value (linear interpolation, as torch.quantile). None = fixed delta_b. Range: [0, 1]."""

    delta_b_scale: float = 1.0
    """Multiplier k of the calibrated quantile. Range: (0, inf)."""

    delta_b_max_mult: float = 2.0
    """Cap of the calibrated delta_b as a multiple of delta_b (the paper's 2; the authors' later tuning
    used 5). Range: [1, inf)."""

    position_horizon: int | None = None
    """H of the position weight. None = each response's own length (position of its last valid token);
    an int = a fixed horizon such as data.max_response_length. Range: None or an int >= 1."""

    divergence: str = "binary_tv"
    """Per-token divergence D between mu and pi: binary_tv = |mu_t - pi_t| or binary_kl (sampled token
    against the rest); topk_tv / topk_kl over mu's top-K tokens, the sampled token and "other" (the paper's
    main setting; the rollout then returns mu's top-K log-probs, see topk)."""

    topk: int = 20
    """K of topk_tv / topk_kl: how many of mu's most likely tokens the rollout returns per generated token
    (the paper's 20; vLLM serves at most 20 unless engine_kwargs.vllm.max_logprobs is raised). Unused by
    the binary divergences. Range: int >= 1."""

    gate: str = "hard"
    """hard = keep or drop each away-moving token; soft = weight it by min(1, 1/x_t) (paper ablation)."""

    ratio_cap: float = 20.0
    """Truncation of the detached importance ratio in the loss (verl's clip_ratio_c is NOT used: its
    default 3.0 truncates far harder than the paper's 20). Range: (0, inf]."""

    position_weight: bool = True
    """Ablation switch: False sets w_t = 1 for every token (thresholds and budget become uniform)."""

    prefix_budget: bool = True
    """Ablation switch: False drops the cumulative budget, leaving the position-weighted threshold."""

    shuffle_positions: bool = False
    """Ablation switch: assign each response's position weights in a random order (tests whether the
    early-strict ordering matters). Requires position_weight."""

    # --- kernel selection (issue 8) ---
    kernel: str = "auto"
    """Implementation of the mask and loss: torch = the pure-torch path (the reference, any device);
    triton = the fused Triton kernel (CUDA tensors; fails on the first call without Triton or a GPU);
    auto = triton on CUDA tensors when Triton is installed, torch otherwise. Both give the same tokens and
    losses up to float rounding. One of auto, torch, triton."""
    # --- end kernel selection ---

    def __post_init__(self):
        for f in fields(self):
            if f.name != "_target_":
                _check_field(self, f.name, getattr(self, f.name))
        if self.shuffle_positions and not self.position_weight:
            raise ValueError("cppo.shuffle_positions=True requires cppo.position_weight=True (nothing to shuffle)")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"cppo.{name} must be {allowed}, got {value!r}")


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        _fail(name, value, "a number")
    return float(value)


_INTERVALS = {
    # name: (low, low_inclusive, high, high_inclusive, text)
    "delta": (0.0, False, math.inf, False, "in (0, inf)"),
    "w_min": (0.0, False, 1.0, True, "in (0, 1]"),
    "delta_b": (0.0, True, math.inf, False, "in [0, inf)"),
    "delta_b_quantile": (0.0, True, 1.0, True, "None or in [0, 1]"),
    "delta_b_scale": (0.0, False, math.inf, False, "in (0, inf)"),
    "delta_b_max_mult": (1.0, True, math.inf, False, "in [1, inf)"),
    "ratio_cap": (0.0, False, math.inf, True, "in (0, inf]"),
}


def _check_field(cfg: CPPOConfig, name: str, value: Any) -> None:
    """Validate one field and normalise ints to floats (Hydra passes `delta=1` as an int)."""
    if name in _INTERVALS:
        if value is None and name == "delta_b_quantile":
            return
        low, low_in, high, high_in, text = _INTERVALS[name]
        x = _real(name, value)
        if not ((x > low or (low_in and x == low)) and (x < high or (high_in and x == high))):
            _fail(name, value, text)
        object.__setattr__(cfg, name, x)  # BaseConfig fields are frozen after construction
    elif name == "position_horizon":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            _fail(name, value, "None or an int >= 1")
    elif name == "divergence":
        if value not in DIVERGENCES:
            _fail(name, value, f"one of {DIVERGENCES}")
    elif name == "topk":  # Top-K divergences (issue 7)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(name, value, "an int >= 1")
    elif name == "gate":
        if value not in GATES:
            _fail(name, value, f"one of {GATES}")
    elif name == "kernel":
        if value not in KERNELS:
            _fail(name, value, f"one of {KERNELS}")
    elif not isinstance(value, bool):  # position_weight, prefix_budget, shuffle_positions
        _fail(name, value, "true or false")


@dataclass
class CPPOPolicyLossConfig(PolicyLossConfig):
    """verl's ``PolicyLossConfig`` plus the ``cppo`` node. Select it with
    ``actor_rollout_ref.actor.policy_loss._target_=verl_cppo.config.CPPOPolicyLossConfig``."""

    cppo: CPPOConfig = field(default_factory=CPPOConfig)
    """CPPO hyper-parameters; a mapping (YAML / '+...cppo.<key>=' overrides) is validated into CPPOConfig."""

    def __post_init__(self):
        parent_post_init = getattr(super(), "__post_init__", None)
        if parent_post_init is not None:
            parent_post_init()
        if isinstance(self.cppo, CPPOConfig):
            return
        if not isinstance(self.cppo, Mapping):
            raise ValueError(f"policy_loss.cppo must be a mapping of CPPOConfig fields, got {self.cppo!r}")
        known = {f.name for f in fields(CPPOConfig)}
        unknown = sorted(set(self.cppo) - known)
        if unknown:
            raise ValueError(
                f"policy_loss.cppo has unknown key(s) {unknown}; known keys: {sorted(known - {'_target_'})}"
            )
        object.__setattr__(self, "cppo", CPPOConfig(**dict(self.cppo)))


_DEFAULT = None


def cppo_config_of(actor_config: Any) -> CPPOConfig:
    """The CPPOConfig carried by a verl actor config, or the defaults for verl's plain PolicyLossConfig."""
    global _DEFAULT
    policy_loss = actor_config.get("policy_loss", None) if actor_config is not None else None
    cfg = policy_loss.get("cppo", None) if policy_loss is not None else None
    if cfg is None:
        if _DEFAULT is None:
            _DEFAULT = CPPOConfig()
        return _DEFAULT
    if isinstance(cfg, CPPOConfig):
        return cfg
    if isinstance(cfg, Mapping):  # a DictConfig / dict that bypassed instantiation
        return CPPOPolicyLossConfig(cppo=dict(cfg)).cppo
    raise TypeError(f"actor config policy_loss.cppo must be a CPPOConfig or a mapping, got {type(cfg).__name__}")
