"""The tiny regression's checks (ci/regression_checks.py) catch what they claim to, on hand-made metrics."""

import argparse
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ci"))
from regression_checks import CPPO_METRICS, check, summarize

STEPS = 6
ARGS = argparse.Namespace(steps=STEPS, seed=0, lr=1.5e-3, adv_estimator="cppo_grpo")


def rows(rewards, masked=0.02, **extra):
    out = []
    for step, reward in enumerate(rewards, start=1):
        row = {"step": step, "reward": reward, "masked_frac": masked, "actor/pg_loss": 0.1, "actor/grad_norm": 1.0}
        row.update({key: 0.5 for key in CPPO_METRICS})
        row["training/rollout_probs_diff_max"] = 1e-7
        row.update(extra)
        out.append(row)
    return out


def good():
    rising = [0.1, 0.2, 0.4, 0.6, 0.8, 0.9]
    metrics = {"cppo": rows(rising), "dppo_tv": rows(rising), "vanilla": rows(rising)}
    runs = {arm: {"exit_code": 0} for arm in metrics}
    return metrics, runs


def golden_of(metrics, tol=0.05):
    return {
        "config": {"steps": STEPS, "seed": 0, "lr": 1.5e-3, "adv_estimator": "cppo_grpo"},
        "arms": {arm: {k: {"value": v, "tol": tol} for k, v in summarize(r).items()} for arm, r in metrics.items()},
    }


def test_summary_by_hand():
    s = summarize(rows([0.1, 0.2, 0.4, 0.6, 0.8, 0.9], masked=0.25))
    assert s["reward_first"] == 0.1
    assert s["reward_mean"] == pytest.approx(3.0 / 6)
    assert s["reward_last5"] == pytest.approx(2.9 / 5)
    assert s["masked_mean"] == 0.25


def test_a_good_run_passes_sanity_and_its_own_golden():
    metrics, runs = good()
    assert check(metrics, runs, ARGS, None) == []
    assert check(metrics, runs, ARGS, golden_of(metrics)) == []


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda m, r: r["dppo_tv"].update(exit_code=1), "dppo_tv: main_ppo exited 1"),
        (lambda m, r: m["vanilla"].pop(), "vanilla: main_ppo exited 0 after 5/6"),
        (lambda m, r: m["cppo"][2].update({"actor/pg_loss": math.nan}), "cppo step 3: missing or non-finite"),
        (lambda m, r: m["cppo"][4].pop("actor/cppo_delta_b_mean"), "actor/cppo_delta_b_mean"),
        (lambda m, r: [row.update(reward=0.1 + 0.01 * row["step"]) for row in m["cppo"]], "cppo: reward over"),
        (lambda m, r: m["vanilla"][1].update({"training/rollout_probs_diff_max": 0.3}), "weights not synced"),
        (lambda m, r: [row.update(masked_frac=0.0) for row in m["cppo"][:2]], "cppo: masked tokens in 4 of 6 steps"),
    ],
    ids=["exit-code", "missing-step", "nan-loss", "missing-cppo-metric", "no-rise", "stale-rollout", "mask-idle"],
)
def test_sanity_failures_are_reported(break_it, message):
    metrics, runs = good()
    break_it(metrics, runs)
    failures = check(metrics, runs, ARGS, None)
    assert any(message in f for f in failures), failures


def test_golden_tolerance_and_configuration():
    metrics, runs = good()
    golden = golden_of(metrics, tol=0.05)
    for row in metrics["dppo_tv"]:
        row["reward"] += 0.04  # inside the tolerance
    assert check(metrics, runs, ARGS, golden) == []
    for row in metrics["dppo_tv"]:
        row["masked_frac"] += 0.06  # outside
    assert check(metrics, runs, ARGS, golden) == ["dppo_tv: masked_mean = 0.0800, golden 0.0200 +- 0.0500"]
    golden["arms"]["cppo"]["masked_mean"] = {"value": 0.01, "log_tol": math.log(2.0)}  # band [0.005, 0.02]
    for masked, inside in [(0.0199, True), (0.0051, True), (0.0201, False), (0.0049, False), (0.0, False)]:
        for row in metrics["cppo"]:
            row["masked_frac"] = masked
        failures = [f for f in check(metrics, runs, ARGS, golden) if f.startswith("cppo: masked_mean")]
        expected = [] if inside else [f"cppo: masked_mean = {masked:.4f}, golden 0.0100 in [0.0050, 0.0200] (x/ 2.00)"]
        assert failures == expected, masked
    metrics, runs = good()
    other = argparse.Namespace(**{**vars(ARGS), "lr": 3e-3})
    assert "another configuration" in check(metrics, runs, other, golden)[0]
    overridden = argparse.Namespace(**{**vars(ARGS), "override": ["actor_rollout_ref.actor.ppo_mini_batch_size=32"]})
    assert "without overrides" in check(metrics, runs, overridden, golden)[0]
