"""verl-cppo's configuration as verl ``BaseConfig`` dataclasses, each field documented beneath it.

Two Hydra nodes, one override per setting (command line and YAML alike):

    actor_rollout_ref.actor.policy_loss.loss_mode=cppo
    +actor_rollout_ref.actor.policy_loss.cppo.delta=0.2        # any CPPOConfig field, '+' because the key is new

    algorithm.adv_estimator=cppo_grpo                          # alone: CPPOGRPOConfig's defaults
    +algorithm.cppo_grpo.norm_adv_by_std=true                  # any CPPOGRPOConfig field

The plugin's driver check (``verl_cppo.launch.driver``) points a node that holds ``cppo`` / ``cppo_grpo`` at the
classes below (``_target_``) when it still names verl's stock class; writing the ``_target_`` yourself
(``actor_rollout_ref.actor.policy_loss._target_=verl_cppo.config.CPPOPolicyLossConfig``,
``algorithm._target_=verl_cppo.config.CPPOAlgoConfig``) works as well. Every value is checked here
(``__post_init__``) before any training step, and an error names the key, its allowed values and the value
given.

One home for each allowed range: a field's ``metadata["allowed"]`` (``_allowed``) for numbers, its type for
booleans and ``Literal`` choices. ``allowed(cls, name)`` renders it as README's tables show it, and
``_check_fields`` derives the check from the same text.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

from verl.base_config import BaseConfig
from verl.trainer.config import AlgoConfig
from verl.workers.config import PolicyLossConfig

from verl_cppo.core.divergence import Divergence
from verl_cppo.kernels import Backend

__all__ = [
    "CPPO_ALGO_TARGET",
    "CPPO_POLICY_LOSS_TARGET",
    "FLOAT32_MAX",
    "INT32_MAX",
    "CPPOAlgoConfig",
    "CPPOConfig",
    "CPPOGRPOConfig",
    "CPPOPolicyLossConfig",
    "Gate",
    "allowed",
    "checked_setting",
    "cppo_config_of",
    "cppo_grpo_config_of",
    "default_of",
]

CPPO_POLICY_LOSS_TARGET = "verl_cppo.config.CPPOPolicyLossConfig"
CPPO_ALGO_TARGET = "verl_cppo.config.CPPOAlgoConfig"

FLOAT32_MAX = 3.4028234663852886e38
"""The loss computes in float32 (or wider): a finite setting beyond this would overflow to inf in it."""

INT32_MAX = 2**31 - 1
"""The largest integer setting: the fused kernel and the Top-K fields carry positions and ids as int32."""

Gate = Literal["hard", "soft"]


def _allowed(default: Any, allowed: str) -> Any:
    """A field whose allowed values are ``allowed``: "(0, inf)", "null or [0, 1]", "int in [1, 2147483647]"..."""
    return field(default=default, metadata={"allowed": allowed})


_RANGE = re.compile(r"^(?P<null>null or )?(?P<int>int in )?(?P<lo>[\[(])(?P<a>[^,]+), (?P<b>[^\])]+)(?P<hi>[\])])$")


@dataclass(frozen=True)
class _Range:
    """A parsed ``allowed`` text: a real (or int) interval, optionally null."""

    text: str
    low: float
    low_closed: bool
    high: float
    high_closed: bool
    integer: bool
    optional: bool

    @classmethod
    def parse(cls, text: str) -> _Range:
        m = _RANGE.match(text)
        if m is None:
            raise ValueError(f"not a range: {text!r}")
        low, high = float(m["a"]), float(m["b"])
        return cls(text, low, m["lo"] == "[", high, m["hi"] == "]", bool(m["int"]), bool(m["null"]))

    def contains(self, x: float) -> bool:
        above = x > self.low or (self.low_closed and x == self.low)
        return above and (x < self.high or (self.high_closed and x == self.high))

    def description(self, typed: bool = True) -> str:
        """What an error says a value must be: 'a number in (0, inf)' (``typed``: the value was not a number)
        or 'in (0, inf)' (a number out of range); 'null or an int in [1, 2147483647]'."""
        interval = self.text.removeprefix("null or ").removeprefix("int in ")
        body = f"an int in {interval}" if self.integer else f"a number in {interval}" if typed else f"in {interval}"
        return f"null or {body}" if self.optional else body


def allowed(cls: type, name: str) -> str:
    """The allowed values of field ``name`` of ``cls``, as README's tables show them."""
    f = next(f for f in fields(cls) if f.name == name)
    if "allowed" in f.metadata:
        return f.metadata["allowed"]
    kind = _type_of(cls, f)
    if kind is bool:
        return "bool"
    if get_origin(kind) is Literal:
        return ", ".join(get_args(kind))
    raise TypeError(f"{cls.__name__}.{name} declares no allowed values")


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of ``cls`` (what an absent key means)."""
    return next(f for f in fields(cls) if f.name == name).default


def checked_setting(cls: type, name: str, value: Any, prefix: str) -> Any:
    """``value`` of the numeric field ``name`` of ``cls`` checked against its allowed values, as the config class
    checks it: the value to use, or a ValueError naming ``prefix.name``, the allowed values and ``value``."""
    return _check_number(prefix, name, value, _Range.parse(allowed(cls, name)))


def _fail(prefix: str, name: str, value: Any, allowed_text: str) -> None:
    hint = ""
    if isinstance(value, str) and value.lower() in ("none", "null", "~"):  # Hydra parses `None` as a string
        hint = " (a string: Hydra's null is written null, in an override and in YAML)"
    raise ValueError(f"{prefix}.{name} must be {allowed_text}, got {value!r}{hint}")


def _check_number(prefix: str, name: str, value: Any, rng: _Range) -> Any:
    """``value`` checked against ``rng``: the value to store (a float for a real field) or a ValueError."""
    if value is None and rng.optional:
        return None
    if rng.integer:
        if isinstance(value, bool) or not isinstance(value, int) or not rng.contains(value):
            _fail(prefix, name, value, rng.description())
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(prefix, name, value, rng.description())
    try:
        x = float(value)
    except OverflowError:  # an int beyond any float
        _fail(prefix, name, value, f"{rng.description(False)} and at most {FLOAT32_MAX:.4g} (float32)")
    if math.isnan(x):
        _fail(prefix, name, value, rng.description())
    if not rng.contains(x):
        _fail(prefix, name, value, rng.description(False))
    if math.isfinite(x) and abs(x) > FLOAT32_MAX:
        _fail(prefix, name, value, f"{rng.description(False)} and at most {FLOAT32_MAX:.4g} (float32)")
    return x


def _check_field(cfg: BaseConfig, f: Field, prefix: str) -> None:
    name, value = f.name, getattr(cfg, f.name)
    if "allowed" in f.metadata:
        checked = _check_number(prefix, name, value, _Range.parse(f.metadata["allowed"]))
        object.__setattr__(cfg, name, checked)  # BaseConfig fields are frozen after construction
        return
    kind = _type_of(type(cfg), f)
    if kind is bool and not isinstance(value, bool):
        _fail(prefix, name, value, "true or false")
    if get_origin(kind) is Literal and value not in get_args(kind):
        _fail(prefix, name, value, f"one of {get_args(kind)}")


def _check_fields(cfg: BaseConfig, prefix: str) -> None:
    """Validate every field of ``cfg`` against ``allowed``; ints of a real field become floats (Hydra passes
    ``delta=1`` as an int). ONE ValueError lists every bad field (so a second bad value is not found only on
    the next launch), each naming ``prefix.field``, the allowed values and the value."""
    errors = []
    for f in fields(cfg):
        if f.name == "_target_":
            continue
        try:
            _check_field(cfg, f, prefix)
        except ValueError as exc:
            errors.append(str(exc))
    if errors:
        raise ValueError("; ".join(errors))


_HINTS: dict[type, dict[str, Any]] = {}


def _type_of(cls: type, f: Field) -> Any:
    """The field's annotation as a type (annotations are strings under ``from __future__ import annotations``)."""
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls][f.name]


@dataclass
class CPPOConfig(BaseConfig):
    """Hyper-parameters of the CPPO mask (arXiv 2606.10968, Algorithm 1). Defaults are the paper's."""

    delta: float = _allowed(0.15, "(0, inf)")
    """Token-level divergence threshold at the first response position; a token at the end of the horizon
    may move delta / w_min."""

    w_min: float = _allowed(0.8, "(0, 1]")
    """Position weight at the end of the horizon: w_t falls linearly from 1 at t = 1 to w_min at t = H.
    1 disables the position weighting."""

    delta_b: float = _allowed(0.02, "[0, inf)")
    """Prefix budget: the response's weighted running average divergence may not exceed it. With
    delta_b_quantile set, this is the floor delta_b_min of the per-response calibration."""

    delta_b_quantile: float | None = _allowed(0.9, "null or [0, 1]")
    """Calibrate delta_b per response as clamp(delta_b_scale * quantile_q(D), delta_b, delta_b_max_mult *
    delta_b), q = this value (linear interpolation, as torch.quantile). None = fixed delta_b."""

    delta_b_scale: float = _allowed(1.0, "(0, inf)")
    """Multiplier k of the calibrated quantile."""

    delta_b_max_mult: float = _allowed(2.0, "[1, inf)")
    """Cap of the calibrated delta_b as a multiple of delta_b (the paper's 2; the authors' later tuning
    used 5); delta_b * delta_b_max_mult must stay within float32."""

    position_horizon: int | None = _allowed(None, f"null or int in [1, {INT32_MAX}]")
    """H of the position weight. None = each response's own length (position of its last valid token);
    an int = a fixed horizon such as data.max_response_length."""

    divergence: Divergence = "binary_tv"
    """Per-token divergence D between mu and pi: binary_tv = |mu_t - pi_t| or binary_kl (sampled token
    against the rest); topk_tv / topk_kl over mu's top-K tokens, the sampled token and "other" (the paper's
    main setting; the rollout then returns mu's top-K log-probs, see topk)."""

    topk: int = _allowed(20, f"int in [1, {INT32_MAX}]")
    """K of topk_tv / topk_kl: how many of mu's most likely tokens the rollout returns per generated token
    (the paper's 20; vLLM serves at most 20 unless engine_kwargs.vllm.max_logprobs is raised). Unused by
    the binary divergences."""

    gate: Gate = "hard"
    """hard = keep or drop each away-moving token; soft = weight it by min(1, 1/x_t) (paper ablation)."""

    ratio_cap: float = _allowed(20.0, "(0, inf]")
    """Truncation of the detached importance ratio in the loss (verl's clip_ratio_c is NOT used: its
    default 3.0 truncates far harder than the paper's 20); inf = no truncation."""

    position_weight: bool = True
    """Ablation switch: False sets w_t = 1 for every token (thresholds and budget become uniform)."""

    prefix_budget: bool = True
    """Ablation switch: False drops the cumulative budget, leaving the position-weighted threshold."""

    shuffle_positions: bool = False
    """Ablation switch: assign each response's position weights in a random order (tests whether the
    early-strict ordering matters). Requires position_weight."""

    kernel: Backend = "auto"
    """Implementation of the mask and loss: torch = the pure-torch path (the reference, any device);
    triton = the fused Triton kernel (CUDA tensors; fails on the first call without Triton or a GPU);
    auto = triton on CUDA tensors when Triton is installed, torch otherwise. Both give the same tokens and
    losses up to float rounding."""

    def __post_init__(self):
        _check_fields(self, "cppo")
        if self.shuffle_positions and not self.position_weight:
            raise ValueError("cppo.shuffle_positions=True requires cppo.position_weight=True (nothing to shuffle)")
        if self.delta_b * self.delta_b_max_mult > FLOAT32_MAX:
            raise ValueError(
                f"cppo.delta_b * cppo.delta_b_max_mult must be at most {FLOAT32_MAX:.4g} (float32), got "
                f"{self.delta_b!r} * {self.delta_b_max_mult!r}"
            )


def _validated_node(node: Any, cls: type, where: str) -> Any:
    """``node`` (a mapping of ``cls`` fields, or an instance) as a validated ``cls``."""
    if isinstance(node, cls):
        return node
    if not isinstance(node, Mapping):
        raise ValueError(f"{where} must be a mapping of {cls.__name__} fields, got {node!r}")
    known = {f.name for f in fields(cls)} - {"_target_"}
    unknown = sorted(set(node) - known - {"_target_"})
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; known keys: {sorted(known)}")
    return cls(**{k: node[k] for k in node if k != "_target_"})


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
        object.__setattr__(self, "cppo", _validated_node(self.cppo, CPPOConfig, "policy_loss.cppo"))


@dataclass
class CPPOGRPOConfig(BaseConfig):
    """Settings of the ``cppo_grpo`` advantage estimator. Defaults are the authors' configs (arXiv 2606.10968,
    App. D)."""

    norm_adv_by_std: bool = False
    """Divide the group-centred score by the group's standard deviation (unbiased, as verl's ``grpo``) plus
    ``std_epsilon``. False (default) = mean-centring only, as in the authors' configs (Dr. GRPO). verl's own
    ``algorithm.norm_adv_by_std_in_grpo`` is not read: it belongs to the built-in ``grpo``."""

    std_epsilon: float = _allowed(1e-6, "(0, inf)")
    """Added to the standard deviation before dividing (verl's ``grpo`` uses 1e-6)."""

    exclude_zero_variance: bool = True
    """Exclude groups whose scores are all equal (every single-response group included) from the gradient
    AND from the loss normalisers of every loss_agg_mode (the paper's "mask_std_0"). False = their responses
    keep advantage 0 but still count in the token and sequence counts, as with verl's ``grpo``."""

    zero_variance_atol: float = _allowed(0.0, "[0, inf)")
    """A group has zero variance when max(score) - min(score) <= this tolerance; its advantage is exactly 0.
    0 (default) = exactly equal scores."""

    def __post_init__(self):
        _check_fields(self, "cppo_grpo")


@dataclass
class CPPOAlgoConfig(AlgoConfig):
    """verl's ``AlgoConfig`` plus the ``cppo_grpo`` node. Select it with
    ``algorithm._target_=verl_cppo.config.CPPOAlgoConfig``."""

    cppo_grpo: CPPOGRPOConfig = field(default_factory=CPPOGRPOConfig)
    """Settings of the ``cppo_grpo`` estimator; a mapping (YAML / '+algorithm.cppo_grpo.<key>=' overrides) is
    validated into CPPOGRPOConfig."""

    def __post_init__(self):
        parent_post_init = getattr(super(), "__post_init__", None)
        if parent_post_init is not None:
            parent_post_init()
        object.__setattr__(self, "cppo_grpo", _validated_node(self.cppo_grpo, CPPOGRPOConfig, "algorithm.cppo_grpo"))


_DEFAULTS: dict[type, Any] = {}


def _node_of(parent: Any, key: str, cls: type, where: str) -> Any:
    node = parent.get(key, None) if parent is not None else None
    if node is None:
        if cls not in _DEFAULTS:
            _DEFAULTS[cls] = cls()
        return _DEFAULTS[cls]
    if isinstance(node, cls):
        return node
    if isinstance(node, Mapping):  # a DictConfig / dict that bypassed instantiation
        return _validated_node(node, cls, where)
    raise ValueError(f"{where} must be a {cls.__name__} or a mapping, got {node!r}")


def cppo_config_of(actor_config: Any) -> CPPOConfig:
    """The CPPOConfig carried by a verl actor config, or the defaults for verl's plain PolicyLossConfig."""
    policy_loss = actor_config.get("policy_loss", None) if actor_config is not None else None
    return _node_of(policy_loss, "cppo", CPPOConfig, "actor config policy_loss.cppo")


def cppo_grpo_config_of(algo_config: Any) -> CPPOGRPOConfig:
    """The settings carried by the ``config`` verl passes to an estimator (the ``algorithm`` DictConfig, an
    AlgoConfig, or None): its ``cppo_grpo`` node validated, or the defaults when there is none."""
    return _node_of(algo_config, "cppo_grpo", CPPOGRPOConfig, "algorithm.cppo_grpo")


def _check_every_field_declares_its_values() -> None:
    for cls in (CPPOConfig, CPPOGRPOConfig):
        for f in fields(cls):
            if f.name != "_target_":
                allowed(cls, f.name)  # raises for a field with neither metadata nor a bool / Literal type
            if "allowed" in f.metadata:
                _Range.parse(f.metadata["allowed"])


_check_every_field_declares_its_values()
