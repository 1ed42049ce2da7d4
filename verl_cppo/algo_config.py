"""Settings of the ``cppo_grpo`` advantage estimator as verl ``BaseConfig`` dataclasses.

The one Hydra form (command line and YAML alike) is the node ``algorithm``::

    algorithm.adv_estimator=cppo_grpo                              # alone: the defaults below
    algorithm._target_=verl_cppo.algo_config.CPPOAlgoConfig        # needed only to change a setting
    +algorithm.cppo_grpo.norm_adv_by_std=true                      # any CPPOGRPOConfig field, '+': new key

verl 0.9.1 never instantiates ``algorithm`` (the trainers hand the estimator the raw DictConfig), so the
plugin's driver check (``validate_cppo_grpo_config``, run from verl's ``validate_config`` before Ray starts,
see ``verl_cppo.anchoring``) instantiates the node with ``omega_conf_to_dataclass`` and every value is
checked here (``__post_init__``) before any training step. The ``_target_`` keeps the node instantiable by
anything that does build ``AlgoConfig`` from it (verl's stock class refuses the unknown ``cppo_grpo`` key).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from verl.base_config import BaseConfig
from verl.trainer.config import AlgoConfig

__all__ = [
    "CPPO_ALGO_TARGET",
    "CPPOAlgoConfig",
    "CPPOGRPOConfig",
    "cppo_grpo_config_of",
    "validate_cppo_grpo_config",
]

CPPO_ALGO_TARGET = "verl_cppo.algo_config.CPPOAlgoConfig"


@dataclass
class CPPOGRPOConfig(BaseConfig):
    """Settings of ``cppo_grpo``. Defaults are the authors' configs (arXiv 2606.10968, App. D)."""

    norm_adv_by_std: bool = False
    """Divide the group-centred score by the group's standard deviation (unbiased, as verl's ``grpo``) plus
    ``std_epsilon``. False (default) = mean-centring only, as in the authors' configs (Dr. GRPO). verl's own
    ``algorithm.norm_adv_by_std_in_grpo`` is not read: it belongs to the built-in ``grpo``."""

    std_epsilon: float = 1e-6
    """Added to the standard deviation before dividing (verl's ``grpo`` uses 1e-6). Range: (0, inf)."""

    exclude_zero_variance: bool = True
    """Exclude groups whose scores are all equal (every single-response group included) from the gradient
    AND from the loss normalisers of every loss_agg_mode (the paper's "mask_std_0"). False = their responses
    keep advantage 0 but still count in the token and sequence counts, as with verl's ``grpo``."""

    zero_variance_atol: float = 0.0
    """A group has zero variance when max(score) - min(score) <= this tolerance; its advantage is exactly 0.
    0 (default) = exactly equal scores. Range: [0, inf)."""

    def __post_init__(self):
        for f in fields(self):
            if f.name != "_target_":
                _check_field(self, f.name, getattr(self, f.name))


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"cppo_grpo.{name} must be {allowed}, got {value!r}")


def _check_field(cfg: CPPOGRPOConfig, name: str, value: Any) -> None:
    """Validate one field and normalise ints to floats (Hydra passes `std_epsilon=1` as an int)."""
    if name in ("norm_adv_by_std", "exclude_zero_variance"):
        if not isinstance(value, bool):
            _fail(name, value, "true or false")
        return
    low_open = name == "std_epsilon"
    allowed = "in (0, inf)" if low_open else "in [0, inf)"
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        _fail(name, value, f"a number {allowed}")
    if math.isinf(value) or value < 0 or (low_open and value == 0):
        _fail(name, value, allowed)
    object.__setattr__(cfg, name, float(value))  # BaseConfig fields are frozen after construction


def _from_mapping(node: Mapping) -> CPPOGRPOConfig:
    known = {f.name for f in fields(CPPOGRPOConfig)} - {"_target_"}
    unknown = sorted(set(node) - known - {"_target_"})
    if unknown:
        raise ValueError(f"algorithm.cppo_grpo has unknown key(s) {unknown}; known keys: {sorted(known)}")
    return CPPOGRPOConfig(**{k: node[k] for k in node if k != "_target_"})


@dataclass
class CPPOAlgoConfig(AlgoConfig):
    """verl's ``AlgoConfig`` plus the ``cppo_grpo`` node. Select it with
    ``algorithm._target_=verl_cppo.algo_config.CPPOAlgoConfig``."""

    cppo_grpo: CPPOGRPOConfig = field(default_factory=CPPOGRPOConfig)
    """Settings of the ``cppo_grpo`` estimator; a mapping (YAML / '+algorithm.cppo_grpo.<key>=' overrides) is
    validated into CPPOGRPOConfig."""

    def __post_init__(self):
        parent_post_init = getattr(super(), "__post_init__", None)
        if parent_post_init is not None:
            parent_post_init()
        if isinstance(self.cppo_grpo, CPPOGRPOConfig):
            return
        if not isinstance(self.cppo_grpo, Mapping):
            raise ValueError(f"algorithm.cppo_grpo must be a mapping of CPPOGRPOConfig fields, got {self.cppo_grpo!r}")
        object.__setattr__(self, "cppo_grpo", _from_mapping(self.cppo_grpo))


_DEFAULT = None


def cppo_grpo_config_of(algo_config: Any) -> CPPOGRPOConfig:
    """The settings carried by the ``config`` verl passes to an estimator (the ``algorithm`` DictConfig, an
    AlgoConfig, or None): its ``cppo_grpo`` node validated, or the defaults when there is none."""
    global _DEFAULT
    node = algo_config.get("cppo_grpo", None) if algo_config is not None else None
    if node is None:
        if _DEFAULT is None:
            _DEFAULT = CPPOGRPOConfig()
        return _DEFAULT
    if isinstance(node, CPPOGRPOConfig):
        return node
    if isinstance(node, Mapping):  # the DictConfig the trainers pass
        return _from_mapping(node)
    raise TypeError(f"algorithm.cppo_grpo must be a CPPOGRPOConfig or a mapping, got {type(node).__name__}")


def validate_cppo_grpo_config(config: Any) -> None:
    """Driver-side check of a composed trainer config: refuse a ``cppo_grpo`` node that verl's AlgoConfig
    could not hold, and instantiate the node (validating every setting) when the estimator is selected."""
    algorithm = config.get("algorithm", None) if isinstance(config, Mapping) else None
    if not isinstance(algorithm, Mapping):
        return
    selected = algorithm.get("adv_estimator", None) == "cppo_grpo"
    has_node = "cppo_grpo" in algorithm
    if not (selected or has_node):
        return
    target = algorithm.get("_target_", "")
    if has_node and target != CPPO_ALGO_TARGET:
        raise ValueError(
            f"algorithm.cppo_grpo is set but algorithm._target_ is {target!r}; "
            f"add algorithm._target_={CPPO_ALGO_TARGET}"
        )
    if target == CPPO_ALGO_TARGET:
        from verl.utils.config import omega_conf_to_dataclass

        omega_conf_to_dataclass(algorithm)  # raises naming the key and its allowed range
