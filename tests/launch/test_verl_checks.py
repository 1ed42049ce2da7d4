"""One set of checks, two entry points: every launch that main_ppo's driver refuses before Ray starts, the dry
run refuses too, and the other way round; a warning is a warning in both. Through verl's real Hydra
composition and main_ppo's own (plugin-wrapped) ``validate_config``."""

import subprocess
import sys
import textwrap

import pytest
import verl.trainer.main_ppo as main_ppo
from verl.utils.config import omega_conf_to_dataclass

from tests.support import REPO_ROOT
from tests.support.verl_hydra import MICRO_BATCHES, VERL_CONFIG_DIR
from verl_cppo.config import CPPO_POLICY_LOSS_TARGET
from verl_cppo.launch import dry_run
from verl_cppo.launch.driver import STRICT_ANCHOR_ENV

LOSS = "actor_rollout_ref.actor.policy_loss"
CPPO = f"{LOSS}.loss_mode=cppo"
BYPASS = "algorithm.rollout_correction.bypass_mode=true"
BASE = [*MICRO_BATCHES, CPPO, BYPASS, "algorithm.adv_estimator=grpo"]  # grpo: no critic model to load
TOPK = f"+{LOSS}.cppo.divergence=topk_tv"

REFUSED = {
    "loss_mode=CPPO": (
        [f"{LOSS}.loss_mode=CPPO"],
        "loss_mode='CPPO' is not registered in verl; registered: [",
    ),
    "loss_mode=Cppo-with-node": (
        [f"{LOSS}.loss_mode=Cppo", f"+{LOSS}.cppo.delta=0.2"],
        "did you mean actor_rollout_ref.actor.policy_loss.loss_mode=cppo?",
    ),
    "external_lib-typo": (
        ["actor_rollout_ref.model.external_lib=verl_cppo.megatron_shard_lcoal"],
        "actor_rollout_ref.model.external_lib='verl_cppo.megatron_shard_lcoal': no such module",
    ),
    "position_horizon-10**30": (
        [f"+{LOSS}.cppo.position_horizon=1000000000000000000000000000000"],
        "cppo.position_horizon must be null or an int in [1, 2147483647], got 1000000000000000000000000000000",
    ),
    "rollout_is-under-bypass": (
        ["algorithm.rollout_correction.rollout_is=token"],
        "algorithm.rollout_correction.rollout_is='token' does nothing with bypass_mode=True and loss_mode=cppo",
    ),
    "loss_type-under-bypass": (
        ["algorithm.rollout_correction.loss_type=reinforce"],
        "algorithm.rollout_correction.loss_type='reinforce' does nothing with bypass_mode=True",
    ),
    "rollout_rs-under-bypass": (
        ["algorithm.rollout_correction.rollout_rs=token_k1"],
        "algorithm.rollout_correction.rollout_rs='token_k1' does nothing",
    ),
    "max_logprobs-abc": (
        [TOPK, "+actor_rollout_ref.rollout.engine_kwargs.vllm.max_logprobs=abc"],
        "actor_rollout_ref.rollout.engine_kwargs.vllm.max_logprobs must be an int (-1 = no limit), got 'abc'",
    ),
    "unknown-rollout": (
        ["actor_rollout_ref.rollout.name=vllmm"],
        "actor_rollout_ref.rollout.name='vllmm' is not registered in verl",
    ),
}


def _main_ppo_refusal(overrides) -> str:
    config = dry_run.compose_config(overrides)
    with pytest.raises(Exception) as info:  # ValueError from the plugin, Hydra's error for the actor
        main_ppo.validate_config(config, use_reference_policy=False, use_critic=False)
    return str(info.value)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_main_ppo_and_the_dry_run_refuse_the_same_launches_naming_the_key(case):
    extra, message = REFUSED[case]
    overrides = [*BASE, *extra]
    assert message in _main_ppo_refusal(overrides)
    report = dry_run.dry_run(overrides)
    assert any(message in error for error in report.errors), report.errors
    assert dry_run.dry_run(BASE).errors == []  # the same launch without the mistake passes both


def test_a_plain_verl_launch_is_warned_never_refused_by_the_plugin(caplog):
    """The entry point loads the plugin into every verl process: a launch without CPPO keeps verl's behaviour
    (what the plugin would refuse is a warning), while the same mistake in a CPPO launch is refused."""
    typo = "actor_rollout_ref.model.external_lib=some_lib_that_does_not_exist"
    plain = [*MICRO_BATCHES, "algorithm.adv_estimator=grpo", typo]
    report = dry_run.dry_run(plain)
    assert report.errors == [] and any("some_lib_that_does_not_exist" in w for w in report.warnings)
    config = dry_run.compose_config(plain)
    with caplog.at_level("WARNING"):
        try:
            main_ppo.validate_config(config, use_reference_policy=False, use_critic=False)
        except Exception as exc:  # verl's own checks may still refuse; the plugin's must not
            assert "verl-cppo" not in str(exc), exc
    assert "not refused: this launch does not use verl-cppo" in caplog.text
    assert "some_lib_that_does_not_exist" in _main_ppo_refusal([*BASE, typo])


def test_the_math_reward_without_math_verify_is_refused_by_both(monkeypatch):
    """math_reward imports math-verify on its first call, in a reward worker after Ray started."""
    overrides = [
        *BASE,
        "reward.custom_reward_function.path=pkg://verl_cppo.math_task.reward",
        "reward.custom_reward_function.name=compute_score",
    ]
    assert dry_run.dry_run(overrides).errors == []
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify now raises ImportError
    message = "reward.custom_reward_function.path=pkg://verl_cppo.math_task.reward needs math_verify"
    assert message in _main_ppo_refusal(overrides)
    assert any(message in error for error in dry_run.dry_run(overrides).errors)


def test_a_topk_launch_without_bypass_gets_one_message_for_the_one_key():
    """The anchoring check and the Top-K check used to report bypass_mode twice."""
    report = dry_run.dry_run([*MICRO_BATCHES, CPPO, TOPK, "algorithm.adv_estimator=grpo"])
    bypass = [e for e in report.errors if "bypass_mode" in e]
    assert len(bypass) == 1 and "a Top-K divergence compares pi with the rollout policy's top-K" in bypass[0]
    assert report.warnings == []


def test_both_accept_a_topk_divergence_on_the_legacy_trainer_and_export_k(monkeypatch):
    """trainer.use_v1=False: mu's top-K travels the DataProto batch (verl_cppo.topk.rollout), so neither refuses."""
    from verl_cppo.topk.setup import ENV_TOPK

    monkeypatch.delenv(ENV_TOPK, raising=False)  # both export K to this process; restored after the test
    overrides = [*BASE, TOPK, f"+{LOSS}.cppo.topk=4", "trainer.use_v1=False"]
    report = dry_run.dry_run(overrides)
    assert report.errors == [] and report.warnings == [], report.errors
    assert report.config.ray_kwargs.ray_init.runtime_env.env_vars[ENV_TOPK] == "4"
    config = dry_run.compose_config(overrides)
    main_ppo.validate_config(config, use_reference_policy=False, use_critic=False)  # the wrapped driver: no raise
    assert config.trainer.use_v1 is False and config.ray_kwargs.ray_init.runtime_env.env_vars[ENV_TOPK] == "4"


def test_without_bypass_both_warn_and_strict_anchor_makes_both_refuse(monkeypatch, caplog):
    overrides = [*MICRO_BATCHES, CPPO, "algorithm.adv_estimator=grpo"]
    main_ppo.validate_config(dry_run.compose_config(overrides), use_reference_policy=False, use_critic=False)
    report = dry_run.dry_run(overrides)
    assert report.errors == [] and len(report.warnings) == 1
    assert report.warnings[0].endswith(f"CPPO continues against pi_old ({STRICT_ANCHOR_ENV}=1 makes this an error)")
    assert dry_run.main(overrides) == 0
    monkeypatch.setenv(STRICT_ANCHOR_ENV, "1")
    message = f"set algorithm.rollout_correction.bypass_mode=True (an error because {STRICT_ANCHOR_ENV}=1 is set)"
    assert message in _main_ppo_refusal(overrides)
    assert any(e.endswith(message) for e in dry_run.dry_run(overrides).errors)


@pytest.mark.parametrize("engine", ["dp", "megatron"])
def test_one_override_per_cppo_key_through_main_ppo_and_the_dry_run(engine):
    """`+...cppo.<key>=<value>` alone: the driver points verl's stock node at CPPOPolicyLossConfig."""
    overrides = [f"model_engine={engine}", *BASE, f"+{LOSS}.cppo.delta=0.2", f"+{LOSS}.cppo.gate=soft"]
    config = dry_run.compose_config(overrides)
    assert config.actor_rollout_ref.actor.policy_loss._target_ == "verl.workers.config.PolicyLossConfig"
    main_ppo.validate_config(config, use_reference_policy=False, use_critic=False)
    assert config.actor_rollout_ref.actor.policy_loss._target_ == CPPO_POLICY_LOSS_TARGET  # what Ray receives
    cppo = omega_conf_to_dataclass(config.actor_rollout_ref.actor).policy_loss.cppo
    assert (cppo.delta, cppo.gate, cppo.w_min) == (0.2, "soft", 0.8)
    report = dry_run.dry_run(overrides)
    assert report.errors == [] and report.built["actor"].policy_loss.cppo.delta == 0.2
    # the two-override form is unchanged
    two = dry_run.dry_run([*overrides, f"{LOSS}._target_={CPPO_POLICY_LOSS_TARGET}"])
    assert two.errors == [] and two.built["actor"].policy_loss.cppo.gate == "soft"


def test_one_override_for_the_estimator_node():
    overrides = [*BASE, "algorithm.adv_estimator=cppo_grpo", "actor_rollout_ref.rollout.n=4"]
    report = dry_run.dry_run([*overrides, "+algorithm.cppo_grpo.norm_adv_by_std=true"])
    assert report.errors == [] and report.built["algorithm"].cppo_grpo.norm_adv_by_std is True


README_YAML = """\
hydra:
  searchpath: [pkg://verl.trainer.config]
defaults: [ppo_trainer, _self_]
actor_rollout_ref:
  actor:
    ppo_micro_batch_size_per_gpu: 2
    policy_loss:
      loss_mode: cppo
      cppo: {delta: 0.2, delta_b_quantile: null}
  rollout:
    name: vllm
    log_prob_micro_batch_size_per_gpu: 2
algorithm:
  adv_estimator: grpo
  rollout_correction: {bypass_mode: true}
"""


def test_the_dry_run_checks_a_yaml_config(tmp_path, capsys):
    """README's YAML form (without the _target_ line, which stays optional): --config-path / --config-name."""
    (tmp_path / "my_cppo.yaml").write_text(README_YAML)
    args = ["--config-path", str(tmp_path), "--config-name", "my_cppo"]
    assert dry_run.main(args) == 0, capsys.readouterr().err
    assert "cppo: delta=0.2, w_min=0.8, delta_b=0.02, delta_b_quantile=None" in capsys.readouterr().out
    assert dry_run.main([*args, f"+{LOSS}.cppo.w_min=1.5"]) == 1
    assert "cppo.w_min must be in (0, 1], got 1.5" in capsys.readouterr().err
    yaml_only = dry_run.dry_run([], config_dir=str(tmp_path), config_name="my_cppo")
    assert yaml_only.errors == [] and yaml_only.built["actor"].policy_loss.cppo.delta_b_quantile is None


def test_the_dry_run_with_no_arguments_prints_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "verl_cppo.launch.dry_run"], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT
    )
    lines = [line for line in out.stderr.splitlines() if line.startswith("[dry-run]") or "Traceback" in line]
    assert out.returncode == 2 and lines == [
        "[dry-run] nothing to check: give the overrides of your main_ppo command (or --config-path DIR "
        "--config-name NAME); see --help"
    ]
    assert "Traceback" not in out.stderr


def test_verl_config_dir_is_the_dry_runs_default():
    assert dry_run.VERL_CONFIG_DIR == VERL_CONFIG_DIR
    assert textwrap.dedent(dry_run.__doc__).count("--config-path") >= 1


@pytest.mark.parametrize("path", ["pkg://verl_cppo.math_task.reward", "packaged_file"])
def test_rows_without_the_rewards_ground_truth_are_refused_by_both_before_ray(path, tmp_path):
    """The math reward declares what it reads from every row (``DATA_FIELDS``); both entry points check the
    training and validation files for it, naming the file, the rows and the key."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from verl_cppo.math_task import reward as math_reward

    rows = [{"prompt": "q", "reward_model": {"style": "rule", "ground_truth": str(i)}} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    rows[4]["reward_model"]["ground_truth"] = None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "val.parquet")
    reward = math_reward.__file__ if path == "packaged_file" else path
    overrides = [
        *BASE,
        f"reward.custom_reward_function.path={reward}",
        "reward.custom_reward_function.name=compute_score",
        f"data.train_files={tmp_path / 'train.parquet'}",
    ]
    assert dry_run.dry_run([*overrides, f"data.val_files={tmp_path / 'train.parquet'}"]).errors == []
    overrides.append(f"data.val_files={tmp_path / 'val.parquet'}")
    message = f"data.val_files: {tmp_path / 'val.parquet'} rows 4 (1 of 6) have no reward_model.ground_truth"
    assert message in _main_ppo_refusal(overrides)
    assert [e for e in dry_run.dry_run(overrides).errors if message in e]
