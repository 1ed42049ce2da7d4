"""verl settings that ``loss_mode=cppo`` / ``adv_estimator=cppo_grpo`` do not read, in ONE table (``UNREAD``):
refused by the driver (``verl_cppo.launch.driver``), naming the key and what CPPO reads instead, because a silently
ignored setting trains at CPPO's defaults while the user believes otherwise (a GRPO script moved to cppo_grpo
would lose its std normalisation, a port's ``clip_ratio=0.25`` would become delta 0.15). A refusal rather than
a warning: the fix is one key, and a warning scrolls past in a multi-node log.

"Set by the user" versus "left at verl's default": verl's composed config holds every key, so a value alone
cannot say who set it. A row fires when its value differs from verl's composed default
(``_generated_ppo_trainer.yaml``, the flattened ``ppo_trainer`` verl ships), whatever set it (override or YAML),
OR when the key is among the launch's command-line overrides (Hydra's ``hydra.overrides.task``, which
``@hydra.main`` records for ``main_ppo`` and ``verl_cppo.launch.dry_run`` records the same way), even at verl's default
value: ``algorithm.norm_adv_by_std_in_grpo=True`` written out asks for std normalisation that cppo_grpo does not
do. A key left at verl's default and not written is never refused, nor a value that agrees with the CPPO setting of
the same meaning (``COUNTERPARTS``); where verl's default means what CPPO does not do, a note says so. The message
says how to silence it: drop the key (or move its value to the CPPO key named). A YAML config that writes a
key at verl's default value cannot be told from verl's default (the composed config is all the checks see).

Rollout correction under bypass mode (``ignored_rollout_correction``) is the one other rule: its keys are read
in decoupled mode, so the condition is the mode, not the loss.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from omegaconf import OmegaConf

from verl_cppo.config_paths import POLICY_LOSS, config_node, config_value
from verl_cppo.launch.verl_checks import Problem

__all__ = ["COUNTERPARTS", "UNREAD", "ignored_rollout_correction", "ignored_settings", "launch_overrides"]

_ACTOR = "actor_rollout_ref.actor"
_DELTA = f"+{POLICY_LOSS}.cppo.delta (the token threshold at t = 1)"
_NOTHING = "nothing in CPPO (it belongs to another loss)"

SELECTORS = {"loss_mode=cppo": f"{POLICY_LOSS}.loss_mode", "adv_estimator=cppo_grpo": "algorithm.adv_estimator"}
"""Each selector of ``UNREAD``: the key whose value (after ``=``) selects the CPPO method."""

UNREAD = (
    # (the CPPO method that does not read the key, the key, what to use instead)
    ("loss_mode=cppo", f"{_ACTOR}.clip_ratio", _DELTA),
    ("loss_mode=cppo", f"{_ACTOR}.clip_ratio_low", _DELTA),
    ("loss_mode=cppo", f"{_ACTOR}.clip_ratio_high", _DELTA),
    ("loss_mode=cppo", f"{_ACTOR}.clip_ratio_c", f"+{POLICY_LOSS}.cppo.ratio_cap (the detached ratio's cap, 20)"),
    ("loss_mode=cppo", f"{_ACTOR}.tau_pos", f"{_NOTHING}: loss_mode=sapo"),
    ("loss_mode=cppo", f"{_ACTOR}.tau_neg", f"{_NOTHING}: loss_mode=sapo"),
    ("loss_mode=cppo", f"{POLICY_LOSS}.clip_cov_ratio", f"{_NOTHING}: loss_mode=clip_cov"),
    ("loss_mode=cppo", f"{POLICY_LOSS}.clip_cov_lb", f"{_NOTHING}: loss_mode=clip_cov"),
    ("loss_mode=cppo", f"{POLICY_LOSS}.clip_cov_ub", f"{_NOTHING}: loss_mode=clip_cov"),
    ("loss_mode=cppo", f"{POLICY_LOSS}.kl_cov_ratio", f"{_NOTHING}: loss_mode=kl_cov"),
    ("loss_mode=cppo", f"{POLICY_LOSS}.ppo_kl_coef", f"{_NOTHING}: loss_mode=kl_cov"),
    ("loss_mode=cppo", f"{POLICY_LOSS}.dro_beta", f"{_NOTHING}: loss_mode=dro"),
    (
        "adv_estimator=cppo_grpo",
        "algorithm.norm_adv_by_std_in_grpo",
        "+algorithm.cppo_grpo.norm_adv_by_std=true (divide by the group std; cppo_grpo's default false = "
        "mean-centring only, the authors' configs)",
    ),
)
"""Every verl setting a CPPO method does not read, with what to use instead (README *Hyper-parameters*)."""

COUNTERPARTS = {"algorithm.norm_adv_by_std_in_grpo": ("algorithm.cppo_grpo.norm_adv_by_std", False)}
"""An ``UNREAD`` key whose meaning a CPPO setting has (that setting, its default): a value that agrees with
CPPO's effective setting is a harmless no-op (``norm_adv_by_std_in_grpo=False`` under cppo_grpo's default),
and verl's default that disagrees with it, left unwritten, gets a note (verl's True: cppo_grpo does not divide
by the group std unless told to)."""


@functools.cache
def verl_defaults() -> Any:
    """verl's composed ``ppo_trainer`` defaults (the flattened YAML verl generates from it and ships)."""
    import verl.trainer.config as verl_configs

    return OmegaConf.load(os.path.join(os.path.dirname(verl_configs.__file__), "_generated_ppo_trainer.yaml"))


def launch_overrides() -> list[str]:
    """The launch's command-line overrides as Hydra recorded them (empty when Hydra recorded none)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task]


def _written(key: str, overrides: list[str]) -> bool:
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in overrides)


def ignored_settings(config: Any) -> list[Problem]:
    """Errors for the ``UNREAD`` keys of the selected CPPO methods that the user set (see the module docstring),
    notes for a verl default that means something the method does not do."""
    overrides, defaults, found = launch_overrides(), verl_defaults(), []
    for selector, key, instead in UNREAD:
        where, method = SELECTORS[selector], selector.split("=", 1)[1]
        if config_value(config, where) != method:
            continue
        default = OmegaConf.select(defaults, key, default=None)
        value = config_value(config, key, default)
        counterpart = COUNTERPARTS.get(key)
        effective = None if counterpart is None else config_value(config, *counterpart)
        if counterpart is not None and value == effective:
            continue  # the unread key says what CPPO's own setting does
        if value != default or _written(key, overrides):
            how = "set to" if value != default else "written in the overrides as"
            found.append(
                Problem(
                    f"{selector} does not read {key} ({how} {value!r}; verl's default is {default!r}); CPPO's "
                    f"setting is {instead}: move the value there or drop {key}"
                )
            )
        elif counterpart is not None:
            found.append(
                Problem(
                    f"{selector} does not read {key} (left at verl's default {default!r}, which it does not do: "
                    f"{counterpart[0]}={effective!r}); set {instead} to have it",
                    "note",
                )
            )
    return found


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
