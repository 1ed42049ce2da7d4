"""Dry run of a ``main_ppo`` launch (example script or your own): everything up to the first Ray call, on a CPU.

The ``run_*.sh`` scripts build their override list once and hand it either to ``python -m
verl.trainer.main_ppo`` or, with ``CPPO_DRY_RUN=1``, to this module (through the thin ``examples/dry_run.py``,
which checks the repository's copy of the plugin, the one ``ray job submit`` ships)::

    python -m verl_cppo.launch.dry_run [--quiet] [--working-dir DIR] [--config-path DIR --config-name NAME] \
        <overrides...>

(the options may also stand after or between the overrides: the example scripts append the user's arguments
last).

It is part of the installed package, so a user who installed the wheel without the repository checks their
own ``main_ppo`` command line by replacing ``python -m verl.trainer.main_ppo`` with ``python -m
verl_cppo.launch.dry_run`` (a YAML config that extends verl's ``ppo_trainer`` included: ``--config-path`` /
``--config-name`` as for ``main_ppo``; a relative ``--config-path`` is taken from the current directory).

It does what ``main_ppo.main`` does before Ray starts, and nothing else decides the outcome:

1. compose the config from the overrides with Hydra, as ``@hydra.main`` does (a misspelled key, a missing
   ``+`` or a bad value type fails here);
2. run every driver-side check of ``verl_cppo.launch.driver.problems`` (the same list ``main_ppo``'s
   ``validate_config`` runs, see there: CPPO's anchoring and settings, the workers' configs, the names verl
   resolves late, the launch layout), then verl's own ``validate_config``, as ``main_ppo.main`` calls it.
   A warning (e.g. CPPO anchored on the recomputed pi_old) is printed and, as in ``main_ppo``, does not fail
   the dry run; ``VERL_CPPO_STRICT_ANCHOR=1`` makes it an error in both.

Exit status 0 means the launch gets past configuration; otherwise every problem found is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass, field, fields

import verl  # loads the verl.plugins entry point: verl_cppo registers itself
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import verl_cppo  # noqa: F401  (explicit: also registers when the entry point is disabled)
from verl_cppo.launch import driver
from verl_cppo.topk.setup import propagate_topk

VERL_CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    config: DictConfig | None = None
    """The composed config (None if composition failed)."""
    built: dict = field(default_factory=dict)
    """The dataclass configs the workers build, by name (actor, rollout, algorithm, ref, critic, model)."""

    def step(self, what: str, fn, *args):
        """Run one step; an exception becomes an error line naming the step."""
        try:
            return fn(*args)
        except Exception as exc:
            self.errors.append(f"{what}: {type(exc).__name__}: {exc}")
            return None


def compose_config(overrides: list[str], config_dir: str = VERL_CONFIG_DIR, config_name: str = "ppo_trainer"):
    """The trainer config exactly as ``python -m verl.trainer.main_ppo [--config-path/-name] <overrides>``
    composes it (verl's ``ppo_trainer`` by default)."""
    with initialize_config_dir(config_dir=os.path.abspath(config_dir), version_base=None):
        config = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    # as @hydra.main: the launch's overrides are Hydra's record (verl_cppo.launch.unread_settings reads which keys
    # the command line wrote), and the job's config carries no hydra node
    HydraConfig.instance().set_config(config)
    with open_dict(config):
        del config["hydra"]
    return config


def verl_validate(config: DictConfig) -> None:
    """verl's own ``validate_config`` as main_ppo.main calls it (the plugin's checks ran already)."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils import config as verl_config

    original = getattr(verl_config.validate_config, "__wrapped__", verl_config.validate_config)
    original(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))


def describe_loss(config: DictConfig, report: Report) -> None:
    from verl.utils.config import omega_conf_to_dataclass

    try:
        actor = report.built["actor"] = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    except Exception:  # verl_validate reported it
        return
    pl = actor.policy_loss
    text = f"policy loss: {pl.loss_mode}, {actor.loss_agg_mode} / loss_scale_factor={actor.loss_scale_factor}"
    if pl.loss_mode == "cppo":
        from verl_cppo.config import cppo_config_of

        cppo = cppo_config_of(actor)
        settings = ", ".join(f"{f.name}={getattr(cppo, f.name)!r}" for f in fields(cppo) if f.name != "_target_")
        text += f"; cppo: {settings}"
    else:
        text += f"; clip_ratio_low={actor.clip_ratio_low} high={actor.clip_ratio_high} c={actor.clip_ratio_c}"
    report.notes.append(text)
    bypass = config.algorithm.rollout_correction.bypass_mode
    report.notes.append(
        f"anchor: bypass_mode={bypass}, trainer.use_v1={config.trainer.use_v1}, "
        f"adv_estimator={config.algorithm.adv_estimator}"
    )


def check_data_files(config: DictConfig, report: Report) -> None:
    for key in ("train_files", "val_files"):
        files = config.data[key]
        files = [files] if isinstance(files, str) else list(files)
        missing = [f for f in files if not os.path.exists(os.path.expanduser(str(f)))]
        if missing:
            report.notes.append(f"data.{key}: not on this machine (fine for CI; prepare them before a run): {missing}")


def dry_run(
    overrides: list[str],
    working_dir: str | None = None,
    config_dir: str = VERL_CONFIG_DIR,
    config_name: str = "ppo_trainer",
) -> Report:
    """All checks on one launch; the returned report lists every error, warning and note."""
    report = Report()
    config = report.config = report.step("compose (Hydra)", compose_config, overrides, config_dir, config_name)
    if config is None:
        return report
    from verl.utils.device import auto_set_device

    auto_set_device(config)
    found = report.step("verl-cppo driver checks", driver.problems, config, working_dir, report.built) or []
    for problem in found:
        {"error": report.errors, "warning": report.warnings, "note": report.notes}[problem.level].append(
            problem.message
        )
    if not report.errors:  # as driver.validate: K of a Top-K divergence into the Ray job's runtime env
        report.step("Top-K setup", propagate_topk, config)
    report.step("validate_config", verl_validate, config)
    describe_loss(config, report)
    check_data_files(config, report)
    return report


def _each_warning_once(show):
    """``warnings.showwarning`` that shows each message once: verl warns from each call site (need_critic's
    "Disabled critic" from two checks), and a ``"once"`` filter is undone by any ``catch_warnings`` between."""
    shown = set()

    def showwarning(message, category, *args, **kwargs):
        if (str(message), category) not in shown:
            shown.add((str(message), category))
            show(message, category, *args, **kwargs)

    return showwarning


OPTIONS = ("--quiet", "--working-dir", "--config-path", "--config-name", "--help")
"""The dry run's own options; everything else on its command line is a Hydra override."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m verl_cppo.launch.dry_run",
        description=__doc__.split("\n\n")[0],
        epilog="Example: python -m verl_cppo.launch.dry_run actor_rollout_ref.actor.policy_loss.loss_mode=cppo "
        "algorithm.rollout_correction.bypass_mode=True actor_rollout_ref.model.path=Qwen/Qwen3-1.7B ... "
        "(the overrides of your main_ppo command). Exit status 0: the launch gets past configuration.",
    )
    parser.add_argument("--quiet", action="store_true", help="print only errors")
    parser.add_argument(
        "--working-dir",
        default=None,
        help="directory a relative reward.custom_reward_function.path is resolved against (default: the "
        "current directory; examples/dry_run.py passes the repository, the ray job's working dir)",
    )
    parser.add_argument("--config-path", default=None, help="directory of your YAML config (as for main_ppo)")
    parser.add_argument("--config-name", default=None, help="name of your YAML config (as for main_ppo)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for main_ppo")
    args, unknown = parser.parse_known_intermixed_args(argv)
    if unknown:
        print(
            f"[dry-run] unknown option(s) {unknown}: the options ({', '.join(OPTIONS)}) may stand anywhere among "
            "the overrides; every other argument is a Hydra override key=value (+key=value, ~key), as for main_ppo",
            file=sys.stderr,
        )
        return 2
    overrides = [o for o in args.overrides if o != "--"]
    if not overrides and args.config_name is None:
        print(
            "[dry-run] nothing to check: give the overrides of your main_ppo command (or --config-path DIR "
            "--config-name NAME); see --help",
            file=sys.stderr,
        )
        return 2
    if (args.config_path is None) != (args.config_name is None):
        print("[dry-run] --config-path and --config-name go together (as for main_ppo)", file=sys.stderr)
        return 2
    os.environ.setdefault("WANDB_MODE", "disabled")
    warnings.showwarning = _each_warning_once(warnings.showwarning)
    config_dir, config_name = args.config_path or VERL_CONFIG_DIR, args.config_name or "ppo_trainer"
    report = dry_run(overrides, args.working_dir, config_dir, config_name)
    if not args.quiet:
        for note in report.notes:
            print(f"[dry-run] {note}")
    for warning in report.warnings:
        print(f"[dry-run] WARNING: {warning}", file=sys.stderr)
    if report.errors:
        print(f"[dry-run] FAILED: {len(report.errors)} problem(s) in {len(overrides)} overrides:", file=sys.stderr)
        for error in report.errors:
            print(f"  - {error}", file=sys.stderr)
        return 1
    print(f"[dry-run] OK: {len(overrides)} overrides compose, validate and instantiate against verl {verl.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
