"""How verl finds CPPO, and why a broken install cannot go unnoticed.

``pyproject.toml`` declares the entry point ``verl.plugins: cppo = verl_cppo.plugin``, so ``import verl``
imports this package in every process (driver, TaskRunner, Ray workers) unless VERL_USE_EXTERNAL_PLUGINS
excludes it; ``actor_rollout_ref.model.external_lib=verl_cppo`` and the ``_target_`` of
``CPPOPolicyLossConfig`` import it too. Importing the package calls ``register()`` once:

* when VERL_CPPO_TOPK is set (a Top-K divergence is configured, see ``verl_cppo.topk.setup``) it first
  arranges for the Top-K diffs to be applied to verl's modules;
* it imports ``verl_cppo.loss`` (which registers the policy loss ``cppo``) and
  ``verl_cppo.advantage.estimator`` (the advantage estimator ``cppo_grpo``); a ``cppo`` / ``cppo_grpo``
  registered from elsewhere first keeps its name (``verl_cppo.hooks.assumptions``: the driver then refuses a
  CPPO launch, naming the other registrant, unless VERL_CPPO_REPLACE_REGISTERED=1 lets ours replace it);
* it installs the driver-side checks (``verl_cppo.launch.driver``), the hook that keeps ``loss_mode=cppo`` in the
  legacy trainer's bypass mode (``verl_cppo.trainer.bypass_anchor``), and the hooks that carry ``cppo_grpo``'s excluded
  groups to the loss normalisers (``verl_cppo.advantage.exclusion``) and the averaged AIME validation metric
  (``verl_cppo.trainer.val_metrics``); every change to verl goes through ``verl_cppo.hooks``;
* if that fails, verl would log the exception at DEBUG and later stop with "Unsupported loss mode: cppo".
  Instead the error is logged at ERROR with its traceback, a stand-in ``cppo`` loss (and ``cppo_grpo``
  estimator) is registered that raises a RuntimeError naming the original exception, and verl's
  ``validate_config`` is wrapped (through ``verl_cppo.hooks``, stdlib only, so it imports even when the rest
  does not) so that a launch that asks for verl-cppo (``verl_cppo.config_paths.uses_the_plugin``, also stdlib
  only), stops in the driver with that exception as its cause, before Ray starts, instead of at
  the first actor update after the model loaded and the rollouts ran. Then the exception propagates.
"""

from __future__ import annotations

import functools
import logging

__all__ = ["register"]

logger = logging.getLogger("verl_cppo")

_registered = False


def register() -> None:
    """Register the ``cppo`` policy loss with verl (idempotent); loud on failure."""
    global _registered
    if _registered:
        return
    try:
        from verl_cppo.topk.setup import install_topk_runtime

        install_topk_runtime()  # Top-K divergences: patches verl's modules on import, only if VERL_CPPO_TOPK is set
        from verl_cppo.hooks.assumptions import registering_ours

        with registering_ours():  # a registrant from elsewhere keeps its name unless opted out (the driver says so)
            import verl_cppo.advantage.estimator  # registers the advantage estimator "cppo_grpo"
            import verl_cppo.loss  # noqa: F401  (registers "cppo")
        from verl_cppo.advantage import exclusion
        from verl_cppo.launch import driver
        from verl_cppo.trainer import bypass_anchor, val_metrics

        driver.install()
        bypass_anchor.install()  # the legacy trainer's bypass mode keeps loss_mode=cppo
        exclusion.install()  # carries cppo_grpo's excluded groups to the loss normalisers
        val_metrics.install()  # the averaged AIME metric in the trainer's validation metrics
    except Exception as exc:
        logger.error(
            "verl-cppo failed to load (%s: %s); loss_mode=cppo cannot run", type(exc).__name__, exc, exc_info=True
        )
        _register_broken(exc)
        raise
    _registered = True


def _register_broken(exc: BaseException) -> None:
    """Register a ``cppo`` loss (and ``cppo_grpo`` estimator) that explain the failed import instead of verl's
    'Unsupported loss mode' / 'Unknown advantage estimator'."""
    try:
        from verl.trainer.ppo.core_algos import register_policy_loss
    except Exception:  # verl itself is broken: nothing to register into
        return
    reason = f"{type(exc).__name__}: {exc}"
    message = f"verl-cppo is installed but failed to import ({reason}); see the ERROR logged at import"

    @register_policy_loss("cppo")
    def broken_cppo_loss(*args, **kwargs):
        raise RuntimeError(message)

    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, register_adv_est

    if "cppo_grpo" not in ADV_ESTIMATOR_REGISTRY:  # unless it registered before the failure

        @register_adv_est("cppo_grpo")
        def broken_cppo_grpo(*args, **kwargs):
            raise RuntimeError(message)

    _stop_launches_that_need_the_plugin(exc)


def _stop_launches_that_need_the_plugin(exc: BaseException) -> None:
    """Wrap verl's ``validate_config`` so that a launch needing verl-cppo stops there, naming ``exc``."""
    try:
        from verl_cppo import hooks  # stdlib only
        from verl_cppo.config_paths import uses_the_plugin  # stdlib only
    except Exception:  # the hook mechanism itself is broken: the stand-ins above still name the failure
        logger.error("verl-cppo: cannot stop launches that select cppo early; they fail at the first actor update")
        return

    def make_wrapper(original):
        @functools.wraps(original)
        def validate_config(config, *args, **kwargs):
            needed = uses_the_plugin(config)
            if needed is not None:
                raise RuntimeError(
                    f"{needed} needs verl-cppo, which is installed but failed to import "
                    f"({type(exc).__name__}: {exc}); fix the install (see the ERROR logged at import)"
                ) from exc
            return original(config, *args, **kwargs)

        return validate_config

    try:
        hooks.wrap(
            "verl.utils.config",
            "validate_config",
            make_wrapper,
            name="broken_install",
            aliases=("verl.utils",),
            now=True,
        )
    except Exception:
        logger.error("verl-cppo: cannot wrap verl's validate_config to stop launches that need it", exc_info=True)
