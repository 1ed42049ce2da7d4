"""verl settings that ``loss_mode=cppo`` does not read, set away from verl's defaults: refused by the driver
(``verl_cppo.launch.driver``), naming the key and the ``cppo.*`` key to use instead, because a silently ignored setting
trains at CPPO's defaults while the user believes otherwise. A refusal rather than a warning: the fix is one key,
and a warning scrolls past in a multi-node log."""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any

from omegaconf import OmegaConf

from verl_cppo.config_paths import POLICY_LOSS, config_node, config_value
from verl_cppo.launch.verl_checks import Problem

__all__ = ["ignored_clip_settings", "ignored_rollout_correction"]

_CLIP_KEYS = {
    "clip_ratio": "cppo.delta (the token threshold at t = 1)",
    "clip_ratio_low": "cppo.delta (the token threshold at t = 1)",
    "clip_ratio_high": "cppo.delta (the token threshold at t = 1)",
    "clip_ratio_c": "cppo.ratio_cap (the truncation of the detached ratio, default 20)",
}


def ignored_clip_settings(config: Any) -> list[Problem]:
    """Errors for verl's ratio-clip keys set away from verl's defaults under loss_mode=cppo, which reads none of
    them: a user coming from the authors' port (clip_ratio=0.2, clip_ratio_c) would silently train at CPPO's
    defaults."""
    from verl.workers.config.actor import ActorConfig

    if config_node(config, POLICY_LOSS).get("loss_mode") != "cppo":
        return []
    defaults = {f.name: f.default for f in fields(ActorConfig) if f.name in _CLIP_KEYS}
    actor = config_value(config, "actor_rollout_ref.actor", {}) or {}
    errors = []
    for key, replacement in _CLIP_KEYS.items():
        value = actor.get(key, defaults[key])
        if value is not None and value != defaults[key]:
            errors.append(
                Problem(
                    f"loss_mode=cppo does not read actor_rollout_ref.actor.{key} (set to {value!r}, verl's default is "
                    f"{defaults[key]!r}); CPPO's setting is +{POLICY_LOSS}.{replacement}: move the value there or "
                    f"drop {key}"
                )
            )
    return errors


def ignored_rollout_correction(config: Any) -> list[Problem]:
    """verl's rollout-correction settings away from verl's defaults under bypass mode with loss_mode=cppo.

    Under bypass mode the v1 trainer skips verl's rollout correction, and its settings are read only by verl's
    own ``bypass_mode`` loss, which ``loss_mode=cppo`` replaces: ``rollout_is`` would not reweight, ``rollout_rs``
    would not reject, ``loss_type`` would not switch to REINFORCE. Refused, naming the key, for the reason the
    ratio-clip keys are: the fix is one key, and a warning scrolls past in a multi-node log."""
    import verl.trainer.config as verl_configs

    if config_node(config, POLICY_LOSS).get("loss_mode") != "cppo":
        return []
    if not config_value(config, "algorithm.rollout_correction.bypass_mode", False):
        return []  # decoupled mode: verl computes rollout_is_weights / the rejection mask and CPPO applies them
    yaml = os.path.join(os.path.dirname(verl_configs.__file__), "algorithm", "rollout_correction.yaml")
    defaults = OmegaConf.load(yaml)  # verl's own defaults, as main_ppo composes them
    node = config_node(config, "algorithm.rollout_correction")
    problems = []
    for key, default in defaults.items():
        value = node.get(key, default)
        if key != "bypass_mode" and value != default:
            problems.append(
                Problem(
                    f"algorithm.rollout_correction.{key}={value!r} does nothing with bypass_mode=True and "
                    "loss_mode=cppo "
                    f"(verl reads it only in decoupled mode or in its own bypass_mode loss, which cppo replaces); "
                    f"remove it (verl's default is {default!r})"
                )
            )
    return problems
