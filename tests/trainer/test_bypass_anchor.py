"""The legacy trainer's bypass mode (verl's ``apply_bypass_mode``) keeps ``loss_mode=cppo`` and anchors it on mu.

verl's real function and its real composed config; the expected results come from verl's original
(``__wrapped__``) on an identical copy of the inputs, or from the rollout log-probs themselves.
"""

import copy
import inspect

import pytest
import torch
from verl import DataProto

from tests.support.verl_hydra import compose_trainer
from verl_cppo import hooks
from verl_cppo.trainer import bypass_anchor

BYPASS = "algorithm.rollout_correction.bypass_mode=true"


def _inputs(loss_mode: str, *overrides: str):
    cfg = compose_trainer("dp", [f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}", BYPASS, *overrides])
    generator = torch.Generator().manual_seed(0)
    rollout = -torch.rand(4, 6, generator=generator, dtype=torch.float32)  # [B, T] mu's log-probs
    recomputed = rollout + 1e-3 * torch.randn(4, 6, generator=generator)  # [B, T] what the actor would give
    batch = DataProto.from_dict({"rollout_log_probs": rollout, "old_log_probs": recomputed})
    return cfg, batch


def _apply(cfg, batch):
    """The call of verl 0.9.1's RayPPOTrainer.fit (a function-local import, so it reaches the hook)."""
    from verl.trainer.ppo.rollout_corr_helper import apply_bypass_mode

    apply_bypass_mode(
        batch=batch,
        rollout_corr_config=cfg.algorithm.rollout_correction,
        policy_loss_config=cfg.actor_rollout_ref.actor.policy_loss,
    )


def test_the_plugin_wraps_verls_apply_bypass_mode():
    from verl.trainer.ppo import rollout_corr_helper

    assert hooks.hook_name(rollout_corr_helper.apply_bypass_mode) == bypass_anchor.HOOK_NAME
    assert inspect.signature(rollout_corr_helper.apply_bypass_mode) == inspect.signature(
        rollout_corr_helper.apply_bypass_mode.__wrapped__
    )
    # the legacy trainer looks the function up at call time, in the module the hook rebinds
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    assert "from verl.trainer.ppo.rollout_corr_helper import apply_bypass_mode" in inspect.getsource(RayPPOTrainer.fit)


def test_cppo_stays_cppo_with_mu_as_old_log_prob():
    cfg, batch = _inputs("cppo")
    rollout = batch.batch["rollout_log_probs"].clone()
    _apply(cfg, batch)
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "cppo"
    assert "rollout_correction" not in cfg.actor_rollout_ref.actor.policy_loss
    assert torch.equal(batch.batch["old_log_probs"], rollout)  # mu, not the recomputed values


@pytest.mark.parametrize("loss_mode", ["vanilla", "dppo_tv", "gspo"])
def test_every_other_loss_gets_verls_own_function(loss_mode):
    from verl.trainer.ppo.rollout_corr_helper import apply_bypass_mode

    cfg, batch = _inputs(loss_mode, "algorithm.rollout_correction.rollout_is=token")
    cfg_ref, batch_ref = copy.deepcopy(cfg), copy.deepcopy(batch)
    _apply(cfg, batch)
    apply_bypass_mode.__wrapped__(
        batch_ref, cfg_ref.algorithm.rollout_correction, cfg_ref.actor_rollout_ref.actor.policy_loss
    )
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "bypass_mode"  # verl's rewrite
    assert cfg == cfg_ref
    assert torch.equal(batch.batch["old_log_probs"], batch_ref.batch["old_log_probs"])


def test_cppo_without_rollout_log_probs_gets_verls_error():
    cfg, batch = _inputs("cppo")
    batch.batch.pop("rollout_log_probs")
    with pytest.raises(ValueError, match="bypass_mode=True requires rollout_log_probs in batch"):
        _apply(cfg, batch)


def test_uninstall_restores_verls_rewrite_and_install_is_idempotent():
    from verl.trainer.ppo import rollout_corr_helper

    try:
        assert bypass_anchor.uninstall()
        assert hooks.hook_name(rollout_corr_helper.apply_bypass_mode) is None
        cfg, batch = _inputs("cppo")
        _apply(cfg, batch)
        assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "bypass_mode"  # what the hook prevents
    finally:
        bypass_anchor.install()
        bypass_anchor.install()
    wrapped = rollout_corr_helper.apply_bypass_mode
    assert hooks.hook_name(wrapped) == bypass_anchor.HOOK_NAME
    assert hooks.hook_name(wrapped.__wrapped__) is None  # wrapped once
