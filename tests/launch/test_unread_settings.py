"""verl settings that loss_mode=cppo does not read, refused when set away from verl's defaults: each check on
verl's real composed config, and the driver's list of checks carrying them."""

import pytest

from tests.support.verl_hydra import compose_trainer
from verl_cppo.launch.driver import problems
from verl_cppo.launch.unread_settings import ignored_clip_settings, ignored_rollout_correction

CPPO = "actor_rollout_ref.actor.policy_loss.loss_mode=cppo"
BYPASS = "algorithm.rollout_correction.bypass_mode=true"


@pytest.mark.parametrize(
    ("key", "value", "replacement"),
    [
        ("clip_ratio", 0.25, "cppo.delta"),
        ("clip_ratio_low", 0.15, "cppo.delta"),
        ("clip_ratio_high", 0.28, "cppo.delta"),
        ("clip_ratio_c", 20.0, "cppo.ratio_cap"),
    ],
)
def test_ratio_clip_keys_that_cppo_ignores_are_refused_naming_the_cppo_key(key, value, replacement):
    config = compose_trainer("dp", [CPPO, BYPASS, f"actor_rollout_ref.actor.{key}={value}"])
    (found,) = ignored_clip_settings(config)
    assert found.level == "error"
    assert f"actor_rollout_ref.actor.{key} (set to {value!r}" in found.message
    assert f"policy_loss.{replacement}" in found.message
    assert [p.message for p in problems(config) if p.level == "error"] == [found.message]  # in the driver's list


def test_ratio_clip_keys_at_verls_defaults_or_under_other_losses_pass():
    defaults = ["actor_rollout_ref.actor.clip_ratio=0.2", "actor_rollout_ref.actor.clip_ratio_c=3.0"]
    assert ignored_clip_settings(compose_trainer("dp", [CPPO, BYPASS, *defaults])) == []
    vanilla = ["actor_rollout_ref.actor.policy_loss.loss_mode=vanilla", "actor_rollout_ref.actor.clip_ratio_high=0.28"]
    assert ignored_clip_settings(compose_trainer("dp", vanilla)) == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rollout_is=token", "algorithm.rollout_correction.rollout_is='token' does nothing with bypass_mode=True"),
        ("rollout_rs=token_k1", "algorithm.rollout_correction.rollout_rs='token_k1' does nothing"),
        ("loss_type=reinforce", "algorithm.rollout_correction.loss_type='reinforce' does nothing"),
    ],
)
def test_rollout_correction_under_bypass_is_refused_naming_the_key(override, message):
    config = compose_trainer("dp", [CPPO, BYPASS, f"algorithm.rollout_correction.{override}"])
    (found,) = ignored_rollout_correction(config)
    assert found.level == "error" and found.message.startswith(message), found.message
    decoupled = compose_trainer("dp", [CPPO, f"algorithm.rollout_correction.{override}"])  # verl applies it there
    assert ignored_rollout_correction(decoupled) == []
    assert ignored_rollout_correction(compose_trainer("dp", [CPPO, BYPASS])) == []  # verl's defaults
