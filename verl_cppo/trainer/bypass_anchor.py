"""``loss_mode=cppo`` anchored on the rollout policy under verl's legacy trainer (``trainer.use_v1=False``).

CPPO measures divergence from the rollout policy mu, which verl hands the loss as ``old_log_prob`` in bypass
mode (``algorithm.rollout_correction.bypass_mode=True``). The two trainers of verl 0.9.1 do that differently:

* v1 (``PPOTrainer._compute_old_log_prob``): writes ``old_log_probs = rollout_log_probs`` and keeps the
  user's ``loss_mode``;
* legacy (``RayPPOTrainer.fit`` calls ``rollout_corr_helper.apply_bypass_mode`` at every step): the same
  substitution, then it rewrites ``policy_loss.loss_mode`` to ``"bypass_mode"`` (verl's
  ``compute_policy_loss_bypass_mode``, a PPO-clip or REINFORCE loss over mu) in the trainer's config.

``install`` wraps ``apply_bypass_mode`` (through ``verl_cppo.hooks``, when verl imports the module) so that
with ``loss_mode=cppo`` it does verl's substitution and nothing else: ``old_log_probs`` is mu, and the
loss mode stays ``cppo``. Every other loss mode gets verl's function unchanged. ``uninstall`` restores it.

In verl 0.9.1 the rewrite reaches only the trainer's copy of the config (the actor workers received theirs
when they were created), so the workers would run ``cppo`` anyway; measured through ``main_ppo`` without this
hook. The hook keeps the trainer's config saying what is trained and CPPO independent of when a config
reaches a worker.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from verl_cppo import hooks

__all__ = ["HOOK_NAME", "MODULE", "install", "uninstall"]

MODULE = "verl.trainer.ppo.rollout_corr_helper"
HOOK_NAME = "cppo_bypass_anchor"


def _keep_cppo(original: Callable) -> Callable:
    """``apply_bypass_mode`` that keeps ``loss_mode=cppo`` (verl's own function for every other loss)."""

    @functools.wraps(original)
    def apply_bypass_mode(batch, rollout_corr_config=None, policy_loss_config=None):
        if policy_loss_config is None or policy_loss_config.get("loss_mode", None) != "cppo":
            return original(batch, rollout_corr_config=rollout_corr_config, policy_loss_config=policy_loss_config)
        if "rollout_log_probs" not in batch.batch:  # verl's own check and message
            raise ValueError(
                "bypass_mode=True requires rollout_log_probs in batch. "
                "Ensure rollout worker is configured to calculate_log_probs=true."
            )
        batch.batch["old_log_probs"] = batch.batch["rollout_log_probs"]  # [B, T]: mu is CPPO's anchor

    return apply_bypass_mode


def install() -> None:
    """Wrap verl's ``apply_bypass_mode`` when (or, if already, as soon as) verl imports it (idempotent)."""
    hooks.wrap(MODULE, "apply_bypass_mode", _keep_cppo, name=HOOK_NAME)


def uninstall() -> bool:
    """Restore verl's ``apply_bypass_mode``; False if it was not wrapped."""
    return hooks.unwrap(MODULE, "apply_bypass_mode")
