"""Driver-side checks: refuse configurations in which ``loss_mode=cppo`` would not do what it says.

CPPO measures divergence from the rollout policy mu, and verl 0.9.1 hands the loss mu only as
``old_log_prob`` when ``algorithm.rollout_correction.bypass_mode=True`` under the v1 trainer. Otherwise:

* bypass off (any trainer): ``old_log_prob`` is pi_old recomputed by the actor, so CPPO silently measures
  against the wrong policy (a known collapse mode, DPPO paper section 5.2);
* bypass on with ``trainer.use_v1=False``: the legacy trainer rewrites ``loss_mode`` to ``bypass_mode``
  (``rollout_corr_helper.apply_bypass_mode``) and CPPO never runs;
* bypass on without ``rollout.calculate_log_probs``: there are no rollout log-probs to anchor on;
* ``actor.use_rollout_log_probs=True`` is read by nothing in verl 0.9.1, so it does not anchor on mu;
* torchtitan / automodel with context parallelism hand the loss shard-local rows, on which a prefix
  sum over the row is not the response's prefix sum.

The first case is a prominent warning, because ``loss_mode=cppo`` alone (verl's default bypass_mode=False)
must still run: CPPO then anchors on pi_old, which equals mu up to the trainer/inference mismatch on the first
mini-batch and drifts from it afterwards. ``VERL_CPPO_STRICT_ANCHOR=1`` makes it an error (our examples and
CI set bypass mode, so they never see it). Every other case is an error (``ValueError`` before Ray starts):
CPPO would not run at all, or would compute garbage. verl has no hook for whole-config checks, so
``install_driver_check`` wraps ``verl.utils.config.validate_config`` (documented in patches/README.md); it runs
in the driver when the plugin is loaded there (the ``verl.plugins`` entry point, the default, or
VERL_USE_EXTERNAL_MODULES).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["STRICT_ANCHOR_ENV", "check_cppo_config", "install_driver_check", "validate_cppo_config"]

logger = logging.getLogger(__name__)

STRICT_ANCHOR_ENV = "VERL_CPPO_STRICT_ANCHOR"
CPPO_TARGET = "verl_cppo.config.CPPOPolicyLossConfig"


def _get(config: Any, dotted: str, default: Any = None) -> Any:
    node = config
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


def _shard_local_cp(actor: Any) -> int:
    """Context-parallel size of engines whose loss sees shard-local rows (no log-prob gather in 0.9.1)."""
    if _get(actor, "strategy") not in ("torchtitan", "automodel"):
        return 1
    sizes = [
        child.get(key, 1) or 1
        for child in actor.values()
        if isinstance(child, Mapping)
        for key in ("context_parallel_size", "cp_size")
    ]
    return max(sizes, default=1)


def check_cppo_config(config: Any) -> tuple[list[str], list[str]]:
    """(errors, warnings) for a composed verl trainer config (DictConfig or nested dicts)."""
    errors: list[str] = []
    warnings: list[str] = []
    policy_loss = _get(config, "actor_rollout_ref.actor.policy_loss", {}) or {}
    target = policy_loss.get("_target_", "")
    if "cppo" in policy_loss and target != CPPO_TARGET:
        errors.append(
            "actor_rollout_ref.actor.policy_loss.cppo is set but the node's _target_ is "
            f"{target!r}; add actor_rollout_ref.actor.policy_loss._target_={CPPO_TARGET}"
        )
    if policy_loss.get("loss_mode") != "cppo":
        return errors, warnings

    bypass = bool(_get(config, "algorithm.rollout_correction.bypass_mode", False))
    use_v1 = bool(_get(config, "trainer.use_v1", True))
    if not bypass:
        message = (
            "loss_mode=cppo measures divergence from the rollout policy, but "
            "algorithm.rollout_correction.bypass_mode=False makes old_log_prob the actor's recomputed pi_old; "
            "set algorithm.rollout_correction.bypass_mode=True"
        )
        if _get(config, "actor_rollout_ref.actor.use_rollout_log_probs", False):
            message += " (actor.use_rollout_log_probs=True has no effect in verl 0.9.1)"
        if os.environ.get(STRICT_ANCHOR_ENV, "") == "1":
            errors.append(message + f" ({STRICT_ANCHOR_ENV}=1)")
        else:
            warnings.append(message + f"; CPPO continues against pi_old ({STRICT_ANCHOR_ENV}=1 makes this an error)")
    elif not use_v1:
        errors.append(
            "trainer.use_v1=False with algorithm.rollout_correction.bypass_mode=True: the legacy trainer rewrites "
            "policy_loss.loss_mode to 'bypass_mode', so CPPO would never run; use trainer.use_v1=True"
        )
    if bypass and not _get(config, "actor_rollout_ref.rollout.calculate_log_probs", True):
        errors.append(
            "bypass mode anchors CPPO on the rollout log-probs, but actor_rollout_ref.rollout.calculate_log_probs="
            "False; set it to True"
        )
    cp = _shard_local_cp(_get(config, "actor_rollout_ref.actor", {}) or {})
    if cp > 1:
        errors.append(
            f"actor strategy {_get(config, 'actor_rollout_ref.actor.strategy')!r} with context parallel size {cp} "
            "gives the loss shard-local rows in verl 0.9.1; CPPO's prefix sums need whole responses"
        )
    from verl_cppo.topk_setup import check_topk_config  # Top-K divergences (issue 7)

    errors.extend(check_topk_config(config))
    return errors, warnings


def validate_cppo_config(config: Any) -> None:
    """Raise ValueError listing every problem of check_cppo_config; log its warnings prominently."""
    errors, warnings = check_cppo_config(config)
    for message in warnings:
        logger.warning("\n%s\nverl-cppo WARNING: %s\n%s", "!" * 100, message, "!" * 100)
    if errors:
        raise ValueError("verl-cppo configuration error(s):\n" + "\n".join(f"  - {e}" for e in errors))


def install_driver_check() -> None:
    """Run validate_cppo_config (and the estimator's validate_cppo_grpo_config) before verl's own
    validate_config (idempotent)."""
    import verl.utils
    import verl.utils.config as verl_config

    original = verl_config.validate_config
    if getattr(original, "__cppo_checked__", False):
        return

    from verl_cppo.algo_config import validate_cppo_grpo_config

    @functools.wraps(original)
    def validate_config(config, *args, **kwargs):
        validate_cppo_config(config)
        validate_cppo_grpo_config(config)  # the cppo_grpo advantage estimator's settings
        from verl_cppo.topk_setup import propagate_topk  # Top-K divergences (issue 7): K to every Ray process

        propagate_topk(config)
        return original(config, *args, **kwargs)

    validate_config.__cppo_checked__ = True
    verl_config.validate_config = validate_config
    verl.utils.validate_config = validate_config
