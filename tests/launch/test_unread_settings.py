"""verl settings that cppo / cppo_grpo do not read (one table), refused when the user set them: each row on
verl's real composed config, through both entry points, and the driver's list of checks carrying them."""

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.launch.test_verl_checks import _main_ppo_refusal
from tests.support import REPO_ROOT
from tests.support.verl_hydra import MICRO_BATCHES, compose_trainer
from verl_cppo.launch import dry_run
from verl_cppo.launch.driver import problems
from verl_cppo.launch.unread_settings import (
    COUNTERPARTS,
    SELECTORS,
    UNREAD,
    ignored_rollout_correction,
    ignored_settings,
    verl_defaults,
)

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
    (found,) = ignored_settings(config)
    assert found.level == "error"
    assert f"actor_rollout_ref.actor.{key} (set to {value!r}" in found.message
    assert f"policy_loss.{replacement}" in found.message
    assert [p.message for p in problems(config) if p.level == "error"] == [found.message]  # in the driver's list


def test_ratio_clip_keys_at_verls_defaults_or_under_other_losses_pass():
    defaults = ["actor_rollout_ref.actor.clip_ratio=0.2", "actor_rollout_ref.actor.clip_ratio_c=3.0"]
    assert ignored_settings(compose_trainer("dp", [CPPO, BYPASS, *defaults])) == []
    vanilla = ["actor_rollout_ref.actor.policy_loss.loss_mode=vanilla", "actor_rollout_ref.actor.clip_ratio_high=0.28"]
    assert ignored_settings(compose_trainer("dp", vanilla)) == []


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


BASE = [
    *MICRO_BATCHES,
    "actor_rollout_ref.actor.policy_loss.loss_mode=cppo",
    "algorithm.rollout_correction.bypass_mode=true",
    "algorithm.adv_estimator=cppo_grpo",
    "actor_rollout_ref.rollout.n=4",
]
STD = "algorithm.norm_adv_by_std_in_grpo"


def _away_from_default(key: str):
    """A value of ``key`` that is not verl's composed default (and, for a key with a CPPO counterpart, not
    what CPPO does either)."""
    default = OmegaConf.select(verl_defaults(), key)
    if isinstance(default, bool):
        return not default
    return 0.37 if default is None else round(float(default) * 1.5 + 0.01, 6)


def _both(overrides: list[str]) -> tuple[str, list[str]]:
    """main_ppo's refusal text (or '' when it accepts) and the dry run's errors, for one launch."""
    try:
        refusal = _main_ppo_refusal(overrides)
    except pytest.fail.Exception:  # main_ppo's validate_config raised nothing
        refusal = ""
    return refusal, dry_run.dry_run(overrides).errors


@pytest.mark.parametrize(("selector", "key", "instead"), UNREAD, ids=[row[1] for row in UNREAD])
def test_every_unread_setting_set_away_from_verls_default_is_refused_by_both(selector, key, instead):
    value, extra = _away_from_default(key), []
    if key in COUNTERPARTS:  # a value that agrees with CPPO's own setting passes: make CPPO's disagree
        counterpart, cppo_default = COUNTERPARTS[key]
        assert value == cppo_default  # a bool away from verl's default: here, what cppo_grpo does by default
        extra = [f"+{counterpart}={str(not value).lower()}"]
    refusal, errors = _both([*BASE, *extra, f"{key}={value}"])
    expected = f"{selector} does not read {key} (set to {value!r}"
    assert expected in refusal and instead in refusal, refusal
    assert [e for e in errors if expected in e and instead in e], errors


@pytest.mark.parametrize(("selector", "key", "instead"), UNREAD, ids=[row[1] for row in UNREAD])
def test_an_unread_setting_written_at_verls_default_is_refused_left_unwritten_it_is_not(selector, key, instead):
    default = OmegaConf.select(verl_defaults(), key)
    written = f"{key}={'null' if default is None else default}"
    if key in COUNTERPARTS and default == COUNTERPARTS[key][1]:
        pytest.fail("a default that agrees with CPPO is never refused; this table row needs another test")
    refusal, errors = _both([*BASE, written])
    assert f"{key} (written in the overrides as {default!r}" in refusal, refusal
    assert [e for e in errors if f"{key} (written in the overrides as" in e], errors
    assert _both(BASE) == ("", [])  # the launch without it passes both


def test_a_grpo_script_moved_to_cppo_grpo_keeps_no_silent_std_normalisation():
    """verl's default norm_adv_by_std_in_grpo=True: written out it is refused (cppo_grpo never divides by
    the std unless +algorithm.cppo_grpo.norm_adv_by_std=true); left at the default, the dry run notes it;
    False agrees with cppo_grpo's default and passes."""
    refusal, errors = _both([*BASE, f"{STD}=True"])
    fix = "+algorithm.cppo_grpo.norm_adv_by_std=true"
    assert f"adv_estimator=cppo_grpo does not read {STD}" in refusal and fix in refusal
    assert len(errors) == 1 and fix in errors[0]
    assert _both([*BASE, f"{STD}=False"]) == ("", [])
    report = dry_run.dry_run(BASE)
    assert report.errors == [] and [n for n in report.notes if "left at verl's default True" in n and fix in n]
    moved = dry_run.dry_run([*BASE, f"{STD}=True", fix])
    assert moved.errors == [] and moved.built["algorithm"].cppo_grpo.norm_adv_by_std is True
    assert not [n for n in moved.notes if STD in n]


def test_the_table_names_only_keys_of_verls_config_and_selectors_it_has():
    for selector, key, _ in UNREAD:
        assert selector in SELECTORS
        assert OmegaConf.select(verl_defaults(), key, default="absent") != "absent", key
    assert not [row for row in UNREAD if row[1] == STD and row[0] != "adv_estimator=cppo_grpo"]


def test_verls_defaults_of_the_table_are_the_same_for_every_engine():
    """The defaults are read from verl's flattened ppo_trainer (FSDP); the Megatron, torchtitan and veomni
    trainers verl generates must agree on every key of the table, or a Megatron launch would be misjudged."""
    import verl

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    generated = sorted(f for f in os.listdir(config_dir) if f.startswith("_generated_ppo_"))
    assert "_generated_ppo_megatron_trainer.yaml" in generated
    for name in generated:
        other = OmegaConf.load(os.path.join(config_dir, name))
        for _, key, _ in UNREAD:
            assert OmegaConf.select(other, key) == OmegaConf.select(verl_defaults(), key), (name, key)


def test_main_ppo_itself_refuses_the_written_default_before_ray(tmp_path):
    """The real entry point: @hydra.main records the command line, the wrapped validate_config reads it."""
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": REPO_ROOT}
    out = subprocess.run(
        [sys.executable, "-m", "verl.trainer.main_ppo", *BASE, f"{STD}=True", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode != 0
    assert f"adv_estimator=cppo_grpo does not read {STD} (written in the overrides as True" in out.stderr
    assert "ray.init" not in out.stderr and "Started a local Ray instance" not in out.stderr + out.stdout
