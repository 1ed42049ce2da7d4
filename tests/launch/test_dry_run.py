"""What the dry run prints for one launch: every problem once, in one message; its options anywhere among the
overrides; a layout that does not divide said in words. Through verl's real Hydra composition and checks."""

import subprocess
import sys

from tests.launch.test_verl_checks import BASE, LOSS, README_YAML, _main_ppo_refusal
from tests.support import REPO_ROOT
from verl_cppo.launch import dry_run


def test_every_bad_cppo_value_is_reported_in_one_message_by_both():
    """Validation used to stop at the first bad field: the second was found only on the next launch."""
    overrides = [*BASE, f"+{LOSS}.cppo.w_min=3", f"+{LOSS}.cppo.delta_b_quantile=None", f"+{LOSS}.cppo.gate=sharp"]
    expected = [
        "cppo.w_min must be in (0, 1], got 3",
        "cppo.delta_b_quantile must be null or a number in [0, 1], got 'None' (a string: Hydra's null is written null",
        "cppo.gate must be one of ('hard', 'soft'), got 'sharp'",
    ]
    refusal = _main_ppo_refusal(overrides)
    errors = dry_run.dry_run(overrides).errors
    for message in expected:
        assert message in refusal, refusal
        assert len([e for e in errors if message in e]) == 1, errors
    assert len(errors) == 1  # one launch, one actor node, one message listing the three


def test_a_missing_rollout_name_is_one_problem():
    overrides = [o for o in BASE if not o.startswith("actor_rollout_ref.rollout.name=")]
    errors = dry_run.dry_run(overrides).errors
    assert errors == ["actor_rollout_ref.rollout.name must be set (verl's config has no default for it)"]


def test_a_layout_that_does_not_divide_says_so_instead_of_data_parallel_0():
    overrides = [*BASE, "model_engine=megatron", "actor_rollout_ref.actor.megatron.context_parallel_size=16"]
    report = dry_run.dry_run([*overrides, "trainer.n_gpus_per_node=8"])
    assert "8 GPUs are not divisible by Megatron TP x PP x CP = 16" in report.errors
    (layout,) = [n for n in report.notes if n.startswith("layout:")]
    assert "data-parallel none (8 GPUs / 16 is not whole)" in layout and "data-parallel 0" not in layout
    (layout,) = [n for n in dry_run.dry_run([*overrides, "trainer.n_gpus_per_node=32"]).notes if "layout" in n]
    assert "data-parallel 2;" in layout


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "verl_cppo.launch.dry_run", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )


def test_verls_disabled_critic_warning_is_printed_once():
    out = _cli(*BASE)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("Disabled critic as algorithm.adv_estimator != gae") == 1, out.stderr


def test_the_options_stand_anywhere_among_the_overrides(tmp_path, capsys):
    """The example scripts append the user's arguments last: `bash run.sh --quiet` reaches the dry run as
    `<overrides> --quiet`."""
    assert dry_run.main([*BASE, "--quiet"]) == 0
    assert "[dry-run] layout" not in capsys.readouterr().out  # --quiet took effect
    (tmp_path / "my_cppo.yaml").write_text(README_YAML)
    middle = [f"{LOSS}.cppo.delta=0.3", "--config-name", "my_cppo", "trainer.total_epochs=1", "--config-path"]
    assert dry_run.main([*middle, str(tmp_path)]) == 0, capsys.readouterr().err
    assert "cppo: delta=0.3" in capsys.readouterr().out
    assert dry_run.main([*BASE, "--verbose"]) == 2
    err = capsys.readouterr().err
    assert "unknown option(s) ['--verbose']" in err and "may stand anywhere among the overrides" in err
    assert "Hydra override key=value" in err
