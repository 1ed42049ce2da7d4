"""Driver-side refusal of configurations in which CPPO would not measure against the rollout policy."""

import logging
import re

import pytest
import verl.utils.config

from tests.support.verl_hydra import CPPO_TARGET, ENGINES, compose_trainer
from verl_cppo import hooks
from verl_cppo.launch.driver import STRICT_ANCHOR_ENV, install, problems, validate

CPPO = "actor_rollout_ref.actor.policy_loss.loss_mode=cppo"
BYPASS = "algorithm.rollout_correction.bypass_mode=true"


def check_cppo_config(config):
    """(errors, warnings) of every driver-side check (notes left out)."""
    found = problems(config)
    return [p.message for p in found if p.level == "error"], [p.message for p in found if p.level == "warning"]


def _check(engine, *overrides):
    return check_cppo_config(compose_trainer(engine, list(overrides)))


@pytest.mark.parametrize("engine", ENGINES)
def test_bypass_mode_on_the_v1_trainer_is_clean(engine):
    assert _check(engine, CPPO, BYPASS) == ([], [])


@pytest.mark.parametrize("engine", ENGINES)
def test_recomputed_anchor_warns_and_strict_mode_refuses(engine, monkeypatch):
    errors, warnings = _check(engine, CPPO)
    assert errors == [] and len(warnings) == 1
    assert "bypass_mode=False makes old_log_prob the actor's recomputed pi_old" in warnings[0]
    monkeypatch.setenv(STRICT_ANCHOR_ENV, "1")
    errors, warnings = _check(engine, CPPO)
    assert warnings == [] and "set algorithm.rollout_correction.bypass_mode=True" in errors[0]


def test_use_rollout_log_probs_is_called_out_as_ineffective():
    _, warnings = _check("dp", CPPO, "+actor_rollout_ref.actor.use_rollout_log_probs=true")
    assert "use_rollout_log_probs=True has no effect in verl 0.9.1" in warnings[0]


@pytest.mark.parametrize("engine", ENGINES)
def test_legacy_trainer_with_bypass_is_clean(engine):
    """verl_cppo.trainer.bypass_anchor keeps loss_mode=cppo in the legacy trainer's bypass mode."""
    assert _check(engine, CPPO, BYPASS, "trainer.use_v1=false") == ([], [])


def test_topk_divergence_is_accepted_on_either_trainer():
    """mu's top-K travels the v1 TransferQueue record and the legacy trainer's DataProto batch alike."""
    topk = [CPPO, BYPASS, CPPO_TARGET, "+actor_rollout_ref.actor.policy_loss.cppo.divergence=topk_tv"]
    topk.append("actor_rollout_ref.rollout.name=vllm")
    assert _check("dp", *topk) == ([], [])
    assert _check("dp", *topk, "trainer.use_v1=false") == ([], [])
    errors, _ = _check("dp", *topk, "trainer.use_v1=false", "algorithm.rollout_correction.bypass_mode=false")
    assert errors and "bypass" in errors[0]  # the anchoring rule is the same on both trainers


def test_bypass_without_rollout_log_probs_is_an_error():
    errors, _ = _check("dp", CPPO, BYPASS, "actor_rollout_ref.rollout.calculate_log_probs=false")
    assert "calculate_log_probs=False" in errors[0]


def test_shard_local_engines_with_context_parallel_are_refused():
    errors, _ = _check("torchtitan", CPPO, BYPASS, "actor_rollout_ref.actor.torchtitan.context_parallel_size=2")
    assert "'torchtitan' with context parallel size 2" in errors[0]
    assert _check("torchtitan", CPPO, BYPASS) == ([], [])


def test_cppo_node_with_a_foreign_target_is_an_error():
    foreign = "actor_rollout_ref.actor.policy_loss._target_=verl.workers.config.ActorConfig"
    errors, _ = _check("dp", CPPO, BYPASS, foreign, "+actor_rollout_ref.actor.policy_loss.cppo.delta=0.2")
    assert errors == [
        "actor_rollout_ref.actor.policy_loss.cppo is set but actor_rollout_ref.actor.policy_loss._target_ is "
        "'verl.workers.config.ActorConfig', which has no cppo field; set actor_rollout_ref.actor.policy_loss._target_"
        "=verl_cppo.config.CPPOPolicyLossConfig (or a subclass of it)"
    ]


def test_other_loss_modes_are_not_checked():
    assert _check("dp", "actor_rollout_ref.actor.policy_loss.loss_mode=dppo_tv") == ([], [])


def test_verl_validate_config_runs_the_check_first(caplog):
    """main_ppo binds the wrapped validate_config because the plugin loads during `import verl`."""
    import verl.trainer.main_ppo as main_ppo

    assert main_ppo.validate_config is verl.utils.config.validate_config
    assert hooks.hook_name(main_ppo.validate_config) == "driver_check"
    install()  # idempotent
    assert main_ppo.validate_config.__wrapped__.__module__ == "verl.utils.config"
    with pytest.raises(ValueError, match="verl-cppo configuration error"):
        main_ppo.validate_config(
            compose_trainer("dp", [CPPO, BYPASS, "actor_rollout_ref.rollout.calculate_log_probs=false"]),
            use_reference_policy=False,
            use_critic=False,
        )
    with caplog.at_level(logging.WARNING, logger="verl_cppo.launch.driver"):
        main_ppo.validate_config(compose_trainer("megatron", [CPPO]), use_reference_policy=False, use_critic=False)
    assert "verl-cppo WARNING" in caplog.text and "!!!!" in caplog.text


CPPO_NODE = "+actor_rollout_ref.actor.policy_loss.cppo"


@pytest.mark.parametrize("loss_mode", [None, "vanilla", "CPPO", "dppo_tv"])
def test_a_cppo_node_without_loss_mode_cppo_is_refused_naming_loss_mode_and_the_keys(loss_mode):
    """Every CPPO setting would be dropped while another loss trains: refused before Ray starts."""
    overrides = [CPPO_TARGET, BYPASS, f"{CPPO_NODE}.divergence=topk_tv", f"{CPPO_NODE}.delta=0.2"]
    if loss_mode is not None:  # None: loss_mode left at verl's default, vanilla
        overrides.append(f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}")
    cfg = compose_trainer("dp", overrides)
    errors, _ = check_cppo_config(cfg)
    shown = repr(loss_mode or "vanilla")
    assert len(errors) == 1
    if loss_mode == "CPPO":  # not a registered loss: the registry check names it (once) and the fix
        assert errors[0].startswith("actor_rollout_ref.actor.policy_loss.loss_mode='CPPO' is not registered")
        assert errors[0].endswith("did you mean actor_rollout_ref.actor.policy_loss.loss_mode=cppo?")
        return
    assert (
        f"policy_loss.cppo sets ['delta', 'divergence'] but actor_rollout_ref.actor.policy_loss.loss_mode={shown}"
        in errors[0]
    )
    assert "set actor_rollout_ref.actor.policy_loss.loss_mode=cppo" in errors[0]
    with pytest.raises(ValueError, match=r"policy_loss\.cppo sets \['delta', 'divergence'\] but .*loss_mode="):
        verl.utils.config.validate_config(cfg, use_reference_policy=False, use_critic=False)


def test_an_empty_cppo_node_and_the_target_alone_pass_with_another_loss_mode():
    """Only settings that would be dropped are refused: the target alone (a superset of verl's config) is not."""
    assert _check("dp", CPPO_TARGET, "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla") == ([], [])


@pytest.mark.parametrize("estimator", ["grpo", "CPPO_GRPO"])
def test_a_cppo_grpo_node_without_the_estimator_is_refused(estimator):
    cfg = compose_trainer(
        "dp",
        [
            f"algorithm.adv_estimator={estimator}",
            "algorithm._target_=verl_cppo.config.CPPOAlgoConfig",
            "+algorithm.cppo_grpo.norm_adv_by_std=true",
        ],
    )
    if estimator == "CPPO_GRPO":  # not registered: the registry check names it once, with the registered spelling
        message = (
            r"\n  - algorithm\.adv_estimator='CPPO_GRPO' is not registered in verl; .*did you mean .*=cppo_grpo\?$"
        )
    else:
        message = rf"algorithm\.cppo_grpo sets \['norm_adv_by_std'\] but .*={estimator!r}"
    with pytest.raises(ValueError, match=message) as info:
        validate(cfg)
    assert str(info.value).count("\n  - ") == 1


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (f"{CPPO_NODE}=0.2", "actor_rollout_ref.actor.policy_loss.cppo"),
        (f"{CPPO_NODE}=[1,2]", "actor_rollout_ref.actor.policy_loss.cppo"),
        ("+algorithm.cppo_grpo=0.2", "algorithm.cppo_grpo"),
    ],
)
@pytest.mark.parametrize("loss_mode", ["cppo", "vanilla"])
def test_a_scalar_where_a_node_belongs_is_refused_naming_key_and_value(override, key, loss_mode):
    cfg = compose_trainer(
        "dp",
        [
            CPPO_TARGET,
            BYPASS,
            "algorithm._target_=verl_cppo.config.CPPOAlgoConfig",
            f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}",
            override,
        ],
    )
    value = override.partition("=")[2].replace(",", ", ")
    with pytest.raises(ValueError, match=rf"\n  - {key} must be a config node .*, got {re.escape(value)}$") as info:
        validate(cfg)
    assert str(info.value).count("must be a config node") == 1  # read by several checks, reported once
