"""The driver side's readers of a composed config: the plugin predicate on raw configs (DictConfig and dicts,
unresolvable values included) and K read with the config class's default and range."""

import pytest
from omegaconf import OmegaConf

from verl_cppo.config import INT32_MAX, CPPOConfig
from verl_cppo.config_paths import POLICY_LOSS, config_node, configured_topk, uses_the_plugin


def _config(**dotted):
    """A DictConfig from ``{"a.b.c": value}`` (keys with dots given as a__b__c)."""
    config = OmegaConf.create({})
    for key, value in dotted.items():
        OmegaConf.update(config, key.replace("__", "."), value, force_add=True)
    return config


@pytest.mark.parametrize(
    "dotted, found",
    [
        ({"actor_rollout_ref__actor__policy_loss__loss_mode": "cppo"}, f"{POLICY_LOSS}.loss_mode=cppo"),
        ({"actor_rollout_ref__actor__policy_loss__loss_mode": "CPPO"}, f"{POLICY_LOSS}.loss_mode=CPPO"),
        ({"algorithm__adv_estimator": "cppo_grpo"}, "algorithm.adv_estimator=cppo_grpo"),
        ({"actor_rollout_ref__actor__policy_loss__cppo__delta": 0.1}, f"{POLICY_LOSS}.cppo"),
        ({"algorithm__cppo_grpo__x": 1}, "algorithm.cppo_grpo"),
        (
            {"actor_rollout_ref__actor__policy_loss___target_": "verl_cppo.config.CPPOPolicyLossConfig"},
            f"{POLICY_LOSS}._target_=verl_cppo.config.CPPOPolicyLossConfig",
        ),
        (
            {"actor_rollout_ref__model__external_lib": "verl_cppo.megatron_shard_local"},
            "actor_rollout_ref.model.external_lib=verl_cppo.megatron_shard_local",
        ),
        (
            {"reward__custom_reward_function__path": "pkg://verl_cppo.math_task.reward"},
            "reward.custom_reward_function.path=pkg://verl_cppo.math_task.reward",
        ),
        ({"actor_rollout_ref__actor__policy_loss__loss_mode": "vanilla", "algorithm__adv_estimator": "grpo"}, None),
        ({"actor_rollout_ref__actor__policy_loss__loss_mode": "???"}, None),  # a missing value: no answer, no error
        ({"algorithm__adv_estimator": "${nowhere.at_all}"}, None),  # an interpolation that cannot resolve
    ],
)
def test_uses_the_plugin(dotted, found):
    config = _config(**dotted)
    assert uses_the_plugin(config) == found
    assert uses_the_plugin(OmegaConf.to_container(config)) == found  # plain dicts read the same


def test_config_node_refuses_a_scalar_where_a_node_belongs():
    config = _config(actor_rollout_ref__actor__policy_loss__cppo=0.2)
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.actor\.policy_loss\.cppo must be a config node.*0\.2"):
        config_node(config, f"{POLICY_LOSS}.cppo")
    assert config_node(config, "algorithm.cppo_grpo") == {}


def _topk_config(**cppo):
    return _config(
        actor_rollout_ref__actor__policy_loss__loss_mode="cppo", actor_rollout_ref__actor__policy_loss__cppo=cppo
    )


def test_configured_topk_reads_default_and_range_from_the_config_class():
    assert configured_topk(_topk_config(divergence="topk_tv")) == CPPOConfig().topk  # the class's default K
    assert configured_topk(_topk_config(divergence="topk_kl", topk=INT32_MAX)) == INT32_MAX  # the class's bound
    assert configured_topk(_topk_config()) == 0  # the class's default divergence is not a Top-K one
    assert configured_topk(_topk_config(topk=5)) == 0  # K without a Top-K divergence
    for k in (0, INT32_MAX + 1, 2.0, True):
        with pytest.raises(ValueError, match=rf"policy_loss\.cppo\.topk must be an int in \[1, {INT32_MAX}\]"):
            configured_topk(_topk_config(divergence="topk_tv", topk=k))
