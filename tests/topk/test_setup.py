"""Driver side of the Top-K divergences on verl's real composed config: which launches are refused before Ray
starts, and how K reaches every Ray process (the runtime env verl's run_ppo passes to ray.init)."""

import os

import pytest
from omegaconf import OmegaConf

from tests.support.verl_hydra import CPPO_TARGET, ENGINES, compose_trainer
from verl_cppo.config_paths import configured_topk
from verl_cppo.launch.driver import problems
from verl_cppo.topk.rollout import ENV_TOPK
from verl_cppo.topk.setup import propagate_topk

CPPO = "actor_rollout_ref.actor.policy_loss.loss_mode=cppo"
BYPASS = "algorithm.rollout_correction.bypass_mode=true"
TOPK_TV = [CPPO_TARGET, CPPO, "+actor_rollout_ref.actor.policy_loss.cppo.divergence=topk_tv"]


def check_cppo_config(config):
    """(errors, warnings) of every driver-side check."""
    found = problems(config)
    return [p.message for p in found if p.level == "error"], [p.message for p in found if p.level == "warning"]


def _config(engine="dp", *overrides, rollout="vllm"):
    return compose_trainer(engine, [*TOPK_TV, BYPASS, f"actor_rollout_ref.rollout.name={rollout}", *overrides])


@pytest.fixture(autouse=True)
def _no_inherited_topk(monkeypatch):
    monkeypatch.delenv(ENV_TOPK, raising=False)


@pytest.mark.parametrize("engine", ENGINES)
def test_valid_topk_launch_is_clean(engine):
    cfg = _config(engine)
    assert configured_topk(cfg) == 20
    assert check_cppo_config(cfg) == ([], [])


def test_k_is_read_from_the_policy_loss_node():
    assert configured_topk(_config("dp", "+actor_rollout_ref.actor.policy_loss.cppo.topk=5")) == 5
    assert configured_topk(compose_trainer("dp", [CPPO, BYPASS])) == 0  # binary_tv
    vanilla = compose_trainer("dp", [*TOPK_TV[:1], "+actor_rollout_ref.actor.policy_loss.cppo.divergence=topk_kl"])
    assert configured_topk(vanilla) == 0  # loss_mode is not cppo


@pytest.mark.parametrize(
    ("overrides", "engine", "rollout", "message"),
    [
        (["algorithm.rollout_correction.bypass_mode=false"], "dp", "vllm", "set algorithm.rollout_correction.bypass"),
        (["+actor_rollout_ref.actor.policy_loss.cppo.topk=32"], "dp", "vllm", "engine_kwargs.vllm.max_logprobs=32"),
        (["actor_rollout_ref.model.use_fused_kernels=true"], "dp", "vllm", "use_fused_kernels=True (the fused"),
        (["actor_rollout_ref.actor.pad_to_length=true"], "dp", "vllm", "actor.pad_to_length=True"),
        (["actor_rollout_ref.actor.megatron.dynamic_context_parallel=true"], "megatron", "sglang", "dynamic_context"),
        (["distillation.enabled=true"], "dp", "sglang", "distillation.enabled=True"),
        ([], "dp", "trtllm", "rollout.name='trtllm'"),
        ([], "dp", "hf", "rollout.name='hf'"),  # a rollout without the Top-K server diff
        ([], "torchtitan", "vllm", "actor strategy='torchtitan'"),
        (["actor_rollout_ref.model.external_lib=verl_cppo.megatron_shard_local"], "megatron", "vllm", "shard-local"),
    ],
)
def test_unservable_topk_launches_are_refused(overrides, engine, rollout, message):
    errors, _ = check_cppo_config(_config(engine, *overrides, rollout=rollout))
    assert any(message in e for e in errors), errors


def test_invalid_k_is_refused_in_the_driver():
    with pytest.raises(ValueError, match=r"policy_loss\.cppo\.topk must be an int in \[1, 2147483647\], got 0"):
        configured_topk(_config("dp", "+actor_rollout_ref.actor.policy_loss.cppo.topk=0"))


def test_more_than_twenty_top_logprobs():
    k32 = "+actor_rollout_ref.actor.policy_loss.cppo.topk=32"
    assert (
        check_cppo_config(_config("dp", k32, "+actor_rollout_ref.rollout.engine_kwargs.vllm.max_logprobs=32"))[0] == []
    )
    assert check_cppo_config(_config("dp", k32, rollout="sglang"))[0] == []  # SGLang has no such cap


def test_a_conflicting_preset_k_is_refused(monkeypatch):
    monkeypatch.setenv(ENV_TOPK, "7")
    errors, _ = check_cppo_config(_config("dp"))
    assert any("VERL_CPPO_TOPK=7 is set in the environment but cppo.topk=20" in e for e in errors)


def test_validate_config_exports_k_to_the_ray_runtime_env():
    """main_ppo's validate_config (wrapped by the plugin) exports K; run_ppo's own merge carries it to ray.init."""
    import verl.trainer.main_ppo as main_ppo
    from verl.trainer.constants_ppo import get_ppo_ray_runtime_env

    cfg = _config("dp", "+actor_rollout_ref.actor.policy_loss.cppo.topk=8")
    try:
        main_ppo.validate_config(cfg, use_reference_policy=False, use_critic=False)
        assert os.environ[ENV_TOPK] == "8"
    finally:
        os.environ.pop(ENV_TOPK, None)
    # the three lines of verl.trainer.main_ppo.run_ppo that build ray.init's runtime_env
    ray_init_kwargs = cfg.ray_kwargs.get("ray_init", {})
    runtime_env = OmegaConf.merge(get_ppo_ray_runtime_env(cfg), ray_init_kwargs.get("runtime_env", {}))
    assert runtime_env["env_vars"][ENV_TOPK] == "8"


def test_export_survives_a_null_runtime_env():
    cfg = _config("dp", "ray_kwargs.ray_init.runtime_env=null")
    try:
        assert propagate_topk(cfg) == 20
    finally:
        os.environ.pop(ENV_TOPK, None)
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars[ENV_TOPK] == "20"


def test_binary_divergence_exports_nothing():
    cfg = compose_trainer("dp", [CPPO, BYPASS])
    assert propagate_topk(cfg) == 0 and ENV_TOPK not in os.environ
    assert ENV_TOPK not in (OmegaConf.select(cfg, "ray_kwargs.ray_init.runtime_env.env_vars") or {})


def test_a_binary_launch_drops_a_top_k_left_in_the_environment(monkeypatch, caplog):
    """A VERL_CPPO_TOPK left by an earlier Top-K launch in the same process would reach the Ray workers."""
    monkeypatch.setenv(ENV_TOPK, "4")
    cfg = compose_trainer("dp", [CPPO, BYPASS])
    with caplog.at_level("WARNING", logger="verl_cppo.topk.setup"):
        assert propagate_topk(cfg) == 0
    assert ENV_TOPK not in os.environ
    assert f"{ENV_TOPK}=4 removed" in caplog.text
