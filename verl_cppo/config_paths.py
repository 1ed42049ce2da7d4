"""Where the driver side reads a composed ``main_ppo`` config: the paths of the nodes it looks into and the
readers that look, in one module.

Every launch check (``verl_cppo.launch.driver`` and the modules it runs), the Top-K switch
(``verl_cppo.topk.setup``), the plugin's broken-install guard (``verl_cppo.plugin``) and the CPU launcher
(``verl_cppo.testing.launcher``) name a node by these paths and read the raw composed config (an OmegaConf
``DictConfig`` or plain dicts, before verl instantiates anything) through these readers:

* ``config_value``: a leaf, or a default where a key on the way is absent;
* ``config_node``: a node as a mapping ({} where absent or null), refusing a scalar where a node belongs;
* ``uses_the_plugin``: what in the config asks for verl-cppo, or None;
* ``configured_topk``: K of a Top-K divergence, 0 without one; its default and range are the config class's.

The module imports only the standard library, so the plugin can still ask ``uses_the_plugin`` when the rest of
verl-cppo (or verl) failed to import; ``configured_topk`` imports the config class when it is called.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "ACTOR",
    "ALGORITHM",
    "CPPO_GRPO_NODE",
    "CPPO_NODE",
    "POLICY_LOSS",
    "ROLLOUT",
    "config_node",
    "config_value",
    "configured_topk",
    "uses_the_plugin",
]

ACTOR = "actor_rollout_ref.actor"
ROLLOUT = "actor_rollout_ref.rollout"
POLICY_LOSS = f"{ACTOR}.policy_loss"
"""verl's policy-loss node: ``loss_mode`` selects the loss, ``_target_`` its config class."""
CPPO_NODE = f"{POLICY_LOSS}.cppo"
"""The loss's settings (``verl_cppo.config.CPPOConfig``)."""
ALGORITHM = "algorithm"
"""verl's algorithm node: ``adv_estimator`` selects the estimator, ``_target_`` its config class."""
CPPO_GRPO_NODE = f"{ALGORITHM}.cppo_grpo"
"""The estimator's settings (``verl_cppo.config.CPPOGRPOConfig``)."""


def config_value(config: Any, dotted: str, default: Any = None) -> Any:
    """``config[a][b]...`` for ``dotted`` = "a.b...." over nested mappings (DictConfig or dict), else default."""
    node = config
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


def config_node(config: Any, dotted: str) -> Mapping:
    """The config node (mapping) at ``dotted`` of a raw composed config; {} where it is absent or null.

    The one reader of the nodes the driver-side checks look into (``policy_loss``, ``policy_loss.cppo``,
    ``algorithm``, ``algorithm.cppo_grpo``, ...): a node set to a scalar or a list (``+...policy_loss.cppo=0.2``)
    is refused here, naming the key and the value, instead of failing later on a ``.get`` of a float."""
    node, path = config, []
    for key in dotted.split("."):
        path.append(key)
        node = node.get(key, None) if isinstance(node, Mapping) else None
        if node is None:
            return {}
        if not isinstance(node, Mapping):
            where = ".".join(path)
            raise ValueError(f"{where} must be a config node (a mapping, e.g. +{where}.<key>=<value>), got {node!r}")
    return node


def _lenient(config: Any, dotted: str) -> Any:
    """``config_value`` that reads a value it cannot resolve (``???``, a broken interpolation) as None."""
    try:
        return config_value(config, dotted)
    except Exception:  # OmegaConf's MissingMandatoryValue / InterpolationResolutionError: not ours to judge here
        return None


def uses_the_plugin(config: Any) -> str | None:
    """What in a composed config asks for verl-cppo, as ``key=value`` (or the node's path), or None: a CPPO loss
    or estimator (also mistyped in another case), a ``cppo`` / ``cppo_grpo`` settings node, a ``verl_cppo``
    ``_target_``, ``external_lib`` or reward function."""
    for where in (f"{POLICY_LOSS}.loss_mode", f"{ALGORITHM}.adv_estimator"):
        value = _lenient(config, where)
        if isinstance(value, str) and value.lower() in ("cppo", "cppo_grpo"):
            return f"{where}={value}"
    for where in (CPPO_NODE, CPPO_GRPO_NODE):
        if _lenient(config, where) is not None:
            return where
    for where in (
        f"{POLICY_LOSS}._target_",
        f"{ALGORITHM}._target_",
        "actor_rollout_ref.model.external_lib",
        "reward.custom_reward_function.path",
        "custom_reward_function.path",
    ):
        value = _lenient(config, where)
        if isinstance(value, str) and "verl_cppo" in value:
            return f"{where}={value}"
    return None


def configured_topk(config: Any) -> int:
    """K when the composed trainer config selects a Top-K divergence of the cppo loss, else 0.

    The divergence's default and K's default and allowed range are ``CPPOConfig``'s (a K outside them is a
    ValueError naming ``cppo.topk``, as the config class would raise it)."""
    from verl_cppo.config import CPPOConfig, checked_setting, default_of
    from verl_cppo.core.divergence import TOPK_DIVERGENCES

    if config_node(config, POLICY_LOSS).get("loss_mode") != "cppo":
        return 0
    cppo = config_node(config, CPPO_NODE)
    if cppo.get("divergence", default_of(CPPOConfig, "divergence")) not in TOPK_DIVERGENCES:
        return 0
    return checked_setting(CPPOConfig, "topk", cppo.get("topk", default_of(CPPOConfig, "topk")), CPPO_NODE)
