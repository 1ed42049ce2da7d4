"""The stability study's plumbing, end to end: benchmarks/stability/run_study.py on 1 arm x 1 seed x 2 steps.

The first invocation runs ``main_ppo`` once (the real trainer on CPU with verl's vLLM rollout on vLLM's CPU
build, the study's regime and prefix reward, and the study's own loss mode ``cppo_permuted_prefix``, so its
module is registered in every process through ``VERL_USE_EXTERNAL_MODULES`` and passes the driver's checks)
and must write a ``results.json`` of the documented shape, ``summary.json`` and the plot. The second, identical
invocation must resume: it skips the completed run (no new ``main_ppo`` log, results unchanged) and returns quickly. The
statistics the README's verdict rests on (drawdown, collapse, lock-in, completeness) are checked on hand-made curves.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

import pytest

from benchmarks.stability import report
from benchmarks.stability import run_study as study_module
from tests.support import REPO_ROOT
from verl_cppo.testing.launcher import TEST_ENV

ARM = "cppo_permuted_prefix"
STEPS = 2
PER_STEP_FIELDS = ("rewards", "masked_frac", "grad_norm", "rollout_train_kl")


def run_study(tmp_path, timeout):
    command = [
        sys.executable,
        "-m",
        "benchmarks.stability.run_study",
        f"--arms={ARM}",
        "--seeds=0",
        f"--steps={STEPS}",
        f"--results={tmp_path / 'results.json'}",
        f"--run-dir={tmp_path / 'runs'}",
        "--run-timeout=500",
    ]
    env = {**os.environ, **TEST_ENV}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env)


@pytest.mark.slow
@pytest.mark.vllm
def test_one_run_writes_results_and_a_second_invocation_resumes(tmp_path):
    first = run_study(tmp_path, timeout=600)
    log_path = tmp_path / "runs" / "seed0" / ARM / "main_ppo.log"
    log_tail = log_path.read_text()[-4000:] if log_path.exists() else "(no main_ppo.log)"
    assert first.returncode == 0, f"{first.stdout[-3000:]}\n{first.stderr[-3000:]}\n{log_tail}"

    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == [ARM]
    (entry,) = results[ARM]
    assert entry["seed"] == 0 and entry["exit_code"] == 0 and entry["steps_done"] == STEPS
    for field in PER_STEP_FIELDS:
        values = entry[field]
        assert len(values) == STEPS and all(isinstance(v, float) and math.isfinite(v) for v in values), field
    assert all(0.0 <= r <= 1.0 for r in entry["rewards"])
    assert all(0.0 <= m <= 1.0 for m in entry["masked_frac"])
    assert all(0.0 <= s <= 1.0 for s in entry["masked_by_budget_share"])  # the CPPO metrics came from our loss
    command = (tmp_path / "runs" / "seed0" / ARM / "command.txt").read_text()
    assert f"policy_loss.loss_mode={ARM}" in command and "benchmarks.stability.permuted_prefix" in command
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["arms"][ARM]["runs"] == 1 and summary["arms"][ARM]["seeds"] == [0]
    assert (tmp_path / "reward_curves.png").stat().st_size > 0

    log_mtime = log_path.stat().st_mtime
    start = time.time()
    second = run_study(tmp_path, timeout=120)
    assert second.returncode == 0, f"{second.stdout[-3000:]}\n{second.stderr[-3000:]}"
    assert "already complete, skipped" in second.stdout
    assert "starting main_ppo" not in second.stdout
    assert log_path.stat().st_mtime == log_mtime
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert time.time() - start < 60  # no Ray cluster was started


def test_drawdown_collapse_and_completeness_on_hand_made_curves():
    study = study_module
    assert report.worst_drawdown([0.1, 0.5, 0.3, 0.6, 0.2, 0.4]) == pytest.approx(0.4)
    assert report.worst_drawdown([0.1, 0.2, 0.2, 0.9]) == 0.0

    def entry(rewards):
        n = len(rewards)
        return {"seed": 0, "rewards": rewards, "masked_frac": [0.0] * n, "grad_norm": [1.0] * n}

    rising = {**entry([0.1, 0.3, 0.5, 0.7, 0.8, 0.9]), "rollout_train_kl": [0.01] * 6}
    collapsing = {**entry([0.1, 0.6, 0.8, 0.8, 0.3, 0.2, 0.1]), "rollout_train_kl": [0.01] * 7}
    never_learns = {**entry([0.02, 0.03, 0.02, 0.01, 0.02]), "rollout_train_kl": [0.01] * 5}
    assert not report.run_stats(rising)["collapsed"]
    assert report.run_stats(collapsing)["collapsed"]
    assert not report.run_stats(never_learns)["collapsed"]
    assert not any(report.run_stats(e)["locked_in"] for e in (rising, collapsing, never_learns))
    frozen_gradient = [0.05, 0.05, 0.05, 0.0, 0.0, 0.0]
    locked = {**rising, "rewards": [0.1, 0.3, 0.44, 0.44, 0.44, 0.44], "grad_norm": frozen_gradient}
    solved = {**rising, "rewards": [0.1, 0.5, 0.9, 1.0, 1.0, 1.0], "grad_norm": frozen_gradient}
    assert report.run_stats(locked)["locked_in"] and not report.run_stats(locked)["collapsed"]
    assert not report.run_stats(solved)["locked_in"]

    args = argparse.Namespace(
        steps=6,
        lr=5e-3,
        mini_batch=2,
        epochs=2,
        adv_estimator="cppo_grpo",
        override=[],
        matched_delta=0.1,
        answer_length=64,
    )
    done = {**rising, "exit_code": 0, "steps_done": 6, "config": study.run_config(args)}
    assert study.is_complete(done, args)
    assert not study.is_complete({**done, "exit_code": 1}, args)
    assert not study.is_complete({**done, "steps_done": 5}, args)
    other_lr = argparse.Namespace(**{**vars(args), "lr": 1e-3})
    assert not study.is_complete(done, other_lr)
    matched = {**done, "config": study.run_config(args, "dppo_tv_matched")}
    assert study.is_complete(matched, args, "dppo_tv_matched")
    other_delta = argparse.Namespace(**{**vars(args), "matched_delta": 0.2})
    assert not study.is_complete(matched, other_delta, "dppo_tv_matched")
    shorter = argparse.Namespace(**{**vars(args), "answer_length": 32})
    assert not study.is_complete(done, shorter)


def test_permuted_arm_configuration():
    """The study's own loss mode: cppo's anchoring with its loss_mode, its module loaded in every process."""
    args = argparse.Namespace(matched_delta=0.1)
    arm = study_module.arm_of("cppo_permuted_prefix", args)
    cppo = study_module.arm_of("cppo", args)
    assert arm.masked_key == cppo.masked_key
    assert arm.overrides[: len(cppo.overrides)] == cppo.overrides
    assert arm.overrides[-1] == "actor_rollout_ref.actor.policy_loss.loss_mode=cppo_permuted_prefix"
    env = study_module.arm_env("cppo_permuted_prefix")
    assert env["VERL_USE_EXTERNAL_MODULES"].split(",") == [
        "verl_cppo.testing.register",
        "benchmarks.stability.permuted_prefix",
    ]
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO_ROOT)
    assert study_module.arm_env("cppo") is None
    # a main arm of the third round: its runs go seed by seed with cppo's and dppo_tv_matched's
    assert all(arm in study_module.SEEDS for arm in study_module.ROUND3["arms"].split(","))
