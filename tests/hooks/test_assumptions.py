"""verl_cppo.hooks.assumptions on the real verl 0.9.1: every assumption holds there, the signature table covers
every function the package's hooks wrap, and each simulated violation (a foreign ``cppo`` / ``cppo_grpo``
registered first, a hooked function with a parameter removed, a verl config class with a ``cppo`` field, a
NeoProto data plane) is one named error of the dry run for a CPPO launch and only a warning for a plain one."""

import dataclasses
import os
import shutil

import pytest
from verl.trainer.ppo import core_algos

from tests.support.verl_hydra import MICRO_BATCHES
from verl_cppo import hooks
from verl_cppo.hooks import assumptions
from verl_cppo.launch import dry_run

CPPO_LAUNCH = [
    *MICRO_BATCHES,
    "actor_rollout_ref.actor.policy_loss.loss_mode=cppo",
    "algorithm.rollout_correction.bypass_mode=true",
    "algorithm.adv_estimator=grpo",
]
PLAIN_LAUNCH = [*MICRO_BATCHES, "algorithm.adv_estimator=grpo"]


def _errors_and_warnings(overrides) -> tuple[list[str], list[str]]:
    report = dry_run.dry_run(overrides)
    return report.errors, report.warnings


def test_every_assumption_holds_on_verl_0_9_1():
    assert assumptions.violations() == []
    assert core_algos.POLICY_LOSS_REGISTRY["cppo"].__module__ == "verl_cppo.loss"
    assert core_algos.ADV_ESTIMATOR_REGISTRY["cppo_grpo"].__module__.startswith("verl_cppo.")


def test_the_signature_table_covers_every_function_the_package_wraps(monkeypatch):
    """Every (module, attribute) the package's installers hand to ``hooks.wrap`` (recorded, not installed)."""
    from verl_cppo.advantage import exclusion
    from verl_cppo.launch import driver
    from verl_cppo.sharding import megatron
    from verl_cppo.topk import setup
    from verl_cppo.trainer import bypass_anchor, checkpoints, val_metrics

    wrapped = set()
    monkeypatch.setattr(hooks, "wrap", lambda module, attribute, *a, **k: wrapped.add((module, attribute)))
    monkeypatch.setattr(hooks, "apply_diffs", lambda names: [])
    monkeypatch.setenv(setup.ENV_TOPK, "4")
    driver.install()
    bypass_anchor.install()
    exclusion.install()
    val_metrics.install()
    megatron.install()
    setup.install_topk_runtime()

    class Tracker:  # weak-referenceable stand-in for verl's Tracking: only the hook's target is recorded
        pass

    checkpoints.listen_to_tracker(Tracker(), lambda data, step: None)
    table = {(s.module, s.qualname) for s in assumptions.SIGNATURES}
    assert len(wrapped) >= 10 and wrapped <= table, sorted(wrapped - table)


def _foreign(*args, **kwargs):
    raise AssertionError("never called")


_foreign.__module__ = "other_package.losses"


@pytest.mark.parametrize("kind", ["policy_loss", "adv_estimator"])
def test_a_foreign_registrant_keeps_its_name_and_is_a_named_error(kind, monkeypatch):
    registry = core_algos.POLICY_LOSS_REGISTRY if kind == "policy_loss" else core_algos.ADV_ESTIMATOR_REGISTRY
    name = "cppo" if kind == "policy_loss" else "cppo_grpo"
    ours = registry[name]
    monkeypatch.setitem(registry, name, _foreign)  # registered before verl-cppo loads
    with assumptions.registering_ours():
        registry.pop(name, None)  # verl's estimator registry refuses a second registrant without this
        registry[name] = ours  # what importing verl-cppo's modules does
    assert registry[name] is _foreign
    errors, _ = _errors_and_warnings(CPPO_LAUNCH)
    message = f"verl-cppo assumes the {kind} registry's '{name}' is its own; it holds other_package.losses._foreign"
    assert [e for e in errors if message in e and "supports verl 0.9.1" in e], errors
    errors, warnings = _errors_and_warnings(PLAIN_LAUNCH)
    assert errors == [] and [w for w in warnings if message in w]

    monkeypatch.setenv(assumptions.REPLACE_ENV, "1")  # the opt-in: ours replaces it
    with assumptions.registering_ours():
        registry.pop(name, None)
        registry[name] = ours
    assert registry[name] is ours and assumptions.violations() == []
    report = dry_run.dry_run(CPPO_LAUNCH)
    assert report.errors == [] and [w for w in report.warnings if "replaced other_package.losses._foreign" in w]
    env = report.config.ray_kwargs.ray_init.runtime_env.env_vars
    assert env[assumptions.REPLACE_ENV] == "1"  # every Ray process makes the same choice


def test_a_hooked_function_with_a_parameter_removed_is_a_named_error(monkeypatch, tmp_path):
    """verl's own source of ``apply_bypass_mode``, copied with ``policy_loss_config`` renamed."""
    module = "verl.trainer.ppo.rollout_corr_helper"
    real = assumptions._module_file(module)
    changed = tmp_path / "rollout_corr_helper.py"
    shutil.copy(real, changed)
    source = changed.read_text().replace("policy_loss_config", "loss_config")
    changed.write_text(source)
    original = assumptions._module_file
    monkeypatch.setattr(assumptions, "_module_file", lambda m: str(changed) if m == module else original(m))
    errors, _ = _errors_and_warnings(CPPO_LAUNCH)
    message = f"verl-cppo assumes {module}.apply_bypass_mode takes ['batch', 'rollout_corr_config', "
    assert [e for e in errors if message in e and "it has no ['policy_loss_config']" in e], errors

    changed.write_text(source.replace("def apply_bypass_mode(", "def apply_bypass(", 1))
    assert [v for v in assumptions.violations() if f"{changed} does not define it" in v]


def test_a_verl_config_class_with_a_cppo_field_is_a_named_error(monkeypatch):
    import verl.workers.config as worker_configs

    @dataclasses.dataclass
    class PolicyLossConfig(worker_configs.PolicyLossConfig):
        cppo: dict = dataclasses.field(default_factory=dict)

    monkeypatch.setattr(worker_configs, "PolicyLossConfig", PolicyLossConfig)
    (violation,) = assumptions.violations()
    assert "PolicyLossConfig has no 'cppo' field" in violation and "installed: verl 0.9.1" in violation


def test_a_data_plane_that_drops_undeclared_columns_is_a_named_error(monkeypatch):
    original = assumptions._module_file
    neoproto = os.path.join(os.path.dirname(original("verl")), "experimental", "neoproto", "__init__.py")
    monkeypatch.setattr(
        assumptions, "_module_file", lambda m: neoproto if m == "verl.experimental.neoproto" else original(m)
    )
    message = "this launch's data plane is NeoProto (verl.experimental.neoproto)"
    for plane, refused in ((None, True), ("neoproto", True), ("classic", False)):
        overrides = CPPO_LAUNCH + ([f"+trainer.data_plane={plane}"] if plane else [])
        errors, _ = _errors_and_warnings(overrides)
        assert bool([e for e in errors if message in e and "cppo_grpo_keep" in e]) == refused, (plane, errors)


def test_a_features_signatures_are_checked_only_for_a_launch_that_uses_it(monkeypatch, tmp_path):
    """verl's own mcore/util.py with postprocess_thd_engine's cp_layout renamed (as on verl's neo branch): an
    error with the shard-local Megatron loss configured, nothing for a launch without it."""
    module = "verl.models.mcore.util"
    changed = tmp_path / "util.py"
    changed.write_text(open(assumptions._module_file(module)).read().replace("cp_layout", "layout"))
    original = assumptions._module_file
    monkeypatch.setattr(assumptions, "_module_file", lambda m: str(changed) if m == module else original(m))
    message = f"verl-cppo assumes {module}.postprocess_thd_engine takes"
    assert not [v for v in assumptions.violations({"trainer": {}}) if message in v]
    shard_local = {"actor_rollout_ref": {"model": {"external_lib": "verl_cppo.megatron_shard_local"}}}
    assert [v for v in assumptions.violations(shard_local) if message in v and "no ['cp_layout']" in v]
    assert [v for v in assumptions.violations() if message in v]  # no config: every feature is checked


def test_a_topk_diff_that_no_longer_applies_is_a_named_error_of_a_topk_launch(monkeypatch, tmp_path):
    """verl's own ray_trainer.py with the line the legacy actor-update hunk replaces changed: the dry run of a Top-K
    launch names the diff, the file and the hunk (before Ray starts, instead of a PatchError in a Ray worker);
    a launch without a Top-K divergence does not apply the diffs and is not refused."""
    module = "verl.trainer.ppo.ray_trainer"
    changed = tmp_path / "ray_trainer.py"
    source = open(assumptions._module_file(module)).read()
    line = "            distillation_use_topk=distillation_use_topk,\n"
    assert source.count(line) == 1
    changed.write_text(source.replace(line, "            distillation_use_topk=bool(distillation_use_topk),\n"))
    original = assumptions._module_file
    monkeypatch.setattr(assumptions, "_module_file", lambda m: str(changed) if m == module else original(m))
    topk = [
        *CPPO_LAUNCH,
        "actor_rollout_ref.rollout.name=vllm",
        "+actor_rollout_ref.actor.policy_loss.cppo.divergence=topk_tv",
    ]
    errors, _ = _errors_and_warnings(topk)
    message = f"verl-cppo assumes its diff topk_actor_update.diff applies to {changed}: topk_actor_update.diff: hunk @@"
    assert [e for e in errors if message in e and "does not apply" in e and "supports verl 0.9.1" in e], errors
    errors, warnings = _errors_and_warnings(CPPO_LAUNCH)
    assert errors == [] and not [w for w in warnings if "topk_actor_update.diff" in w]
