"""The launcher's arm table composed in verl's real trainer config: each arm selects the loss it is named for,
its ``masked_key`` is a metric that loss reports, and the CPPO settings reach ``CPPOConfig``."""

import pytest
from verl.utils.config import omega_conf_to_dataclass

from tests.support.verl_hydra import compose_trainer
from verl_cppo.config import cppo_config_of
from verl_cppo.config_paths import POLICY_LOSS, config_value
from verl_cppo.core.token_loss import METRIC_KEYS
from verl_cppo.testing import launcher


@pytest.mark.parametrize("name", list(launcher.ARMS))
def test_each_arm_composes_and_names_a_metric_of_its_loss(name):
    arm = launcher.ARMS[name]
    config = compose_trainer("dp", arm.overrides)
    loss_mode = config_value(config, f"{POLICY_LOSS}.loss_mode")
    assert name.startswith(loss_mode)  # cppo_*, dppo_tv, vanilla
    if loss_mode == "cppo":
        assert arm.masked_key in METRIC_KEYS
    else:
        assert arm.masked_key == "actor/pg_clipfrac"  # what verl's own losses report as their clip fraction


def test_cppo_settings_reach_the_config_class():
    overrides = [*launcher.ARMS["cppo"].overrides, *launcher.cppo_settings(prefix_budget=False, topk=7, delta=0.1)]
    actor = omega_conf_to_dataclass(compose_trainer("dp", overrides).actor_rollout_ref.actor)
    cppo = cppo_config_of(actor)
    assert (cppo.prefix_budget, cppo.topk, cppo.delta) == (False, 7, 0.1)
    assert (
        cppo_config_of(
            omega_conf_to_dataclass(compose_trainer("dp", launcher.ARMS["cppo"].overrides).actor_rollout_ref.actor)
        ).prefix_budget
        is True
    )
