"""The tiny regression's checks (ci/regression_checks.py) catch what they claim to, on hand-made metrics."""

import math
import sys

import pytest

from ci.regression_checks import (
    CPPO_METRICS,
    DEFAULT_CHECKS,
    check,
    last_window,
    masked_steps_min,
    scaled_limits,
    summarize,
)
from tests.support import REPO_ROOT

STEPS = 6
ARGS = {"steps": STEPS, "seed": 0, "lr": 1.5e-3, "adv_estimator": "cppo_grpo", "override": []}


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
        "config": {"steps": STEPS, "seed": 0, "lr": 1.5e-3, "adv_estimator": "cppo_grpo", "rollout": "vllm"},
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
        (lambda m, r: [row.update(masked_frac=0.0) for row in m["cppo"][:16]], "cppo: masked tokens in 4 of 20 steps"),
    ],
    ids=["exit-code", "missing-step", "nan-loss", "missing-cppo-metric", "no-rise", "stale-rollout", "mask-idle"],
)
def test_sanity_failures_are_reported(break_it, message):
    metrics, runs = good()
    config = ARGS
    if "masked tokens" in message:  # below 7 steps no masking count is told from chance: 20 steps here
        metrics["cppo"] = rows([0.1, 0.2, 0.4, 0.6, 0.8] + [0.9] * 15)
        config = {**ARGS, "steps": 20}
    break_it(metrics, runs)
    failures = check({"cppo": metrics["cppo"]} if config is not ARGS else metrics, runs, config, None)
    assert any(message in f for f in failures), failures


def test_the_masking_bound_is_the_binomial_quantile():
    """The largest k with P(Binomial(n, 0.45) < k) <= 0.02, by hand: 20 steps: P(X <= 4) = 0.0189, P(X <= 5) =
    0.0553, so k = 5, the limit measured at 20 steps; 7 steps: P(X = 0) = 0.55^7 = 0.0152, P(X <= 1) = 0.1024,
    so k = 1; 6 steps: P(X = 0) = 0.55^6 = 0.0277 > 0.02, so k = 0 (no masking count is told from chance)."""
    assert masked_steps_min(20) == DEFAULT_CHECKS["cppo_masked_steps_min"] == 5
    assert masked_steps_min(7) == 1
    assert masked_steps_min(6) == 0
    assert masked_steps_min(2) == 0


def test_the_limits_scale_with_the_number_of_steps():
    """Measured at 20 steps (rise 0.3 over the last 5, masking in >= 5 steps); scaled for N steps."""
    assert scaled_limits(DEFAULT_CHECKS, 20) == DEFAULT_CHECKS
    assert [last_window(n) for n in (2, 5, 6, 10, 20, 40)] == [1, 1, 2, 2, 5, 10]
    by_hand = {2: (0.3 / 19, 0), 5: (0.3 * 4 / 19, 0), 10: (0.3 * 9 / 19, 1), 40: (0.3, 12)}
    for steps, (rise, masked_steps) in by_hand.items():
        limits = scaled_limits(DEFAULT_CHECKS, steps)
        assert limits["cppo_rise_min"] == pytest.approx(rise), steps
        assert limits["cppo_masked_steps_min"] == masked_steps, steps
        assert limits["rollout_actor_prob_gap_max"] == DEFAULT_CHECKS["rollout_actor_prob_gap_max"]
    with pytest.raises(ValueError, match="steps >= 2"):
        scaled_limits(DEFAULT_CHECKS, 1)


@pytest.mark.parametrize("steps", [2, 3, 5, 10, 20, 30])
def test_a_run_of_any_length_that_learns_and_masks_passes(steps):
    """A curve that climbs 0.06 per step from 0.08 (slower than the measured 5-step run: 0.08, 0.14, 0.17, 0.26,
    0.29) to at most 0.95, masking at every other step: passes at every length; the same run with a flat reward
    fails, and from 7 steps on so does one whose mask never engages."""
    rewards = [min(0.08 + 0.06 * i, 0.95) for i in range(steps)]
    metrics = {"cppo": rows(rewards)}
    for row in metrics["cppo"][1::2]:
        row["masked_frac"] = 0.0
    runs = {"cppo": {"exit_code": 0}}
    config = {**ARGS, "steps": steps}
    assert check(metrics, runs, config, None) == []
    flat = {"cppo": rows([0.08] * steps)}
    assert any("cppo: reward over" in f for f in check(flat, runs, config, None))
    idle = {"cppo": rows(rewards, masked=0.0)}
    idle_failures = [f for f in check(idle, runs, config, None) if "cppo: masked tokens in 0 of" in f]
    assert len(idle_failures) == (1 if steps >= 7 else 0), idle_failures


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
    other = {**ARGS, "lr": 3e-3}
    assert "another configuration" in check(metrics, runs, other, golden)[0]
    overridden = {**ARGS, "override": ["actor_rollout_ref.actor.ppo_mini_batch_size=32"]}
    assert "without overrides" in check(metrics, runs, overridden, golden)[0]


def test_not_compared_entries_are_skipped():
    metrics, runs = good()
    golden = golden_of(metrics)
    golden["arms"]["dppo_tv"]["masked_mean"] = {"not_compared": "near 0 on this task", "runs": [0.0001, 0.01]}
    for row in metrics["dppo_tv"]:
        row["masked_frac"] = 0.9
    assert check(metrics, runs, ARGS, golden) == []


def test_one_sided_entries_are_a_floor():
    metrics, runs = good()
    golden = golden_of(metrics)
    golden["arms"]["dppo_tv"]["reward_last5"] = {"min": 0.5, "why": "bimodal", "runs": [0.9, 0.4]}
    for last, inside in [(0.5, True), (5.0, True), (0.4999, False), (math.nan, False)]:
        for row in metrics["dppo_tv"][1:]:
            row["reward"] = last
        failures = [f for f in check(metrics, runs, ARGS, golden) if f.startswith("dppo_tv: reward_last5")]
        expected = [] if inside else [f"dppo_tv: reward_last5 = {last:.4f}, golden floor 0.5000 (one-sided: bimodal)"]
        assert failures == expected, last


def test_make_golden_by_hand(tmp_path):
    """Two runs: rewards get mean +- max(4 sd, pooled, floor); cppo's masked fraction a geometric band."""
    import json
    import subprocess

    masked = {"cppo": (0.01, 0.04), "dppo_tv": (0.001, 0.0), "vanilla": (0.03, 0.03)}
    last = {"cppo": (0.9, 0.7), "dppo_tv": (0.8, 0.8), "vanilla": (0.9, 0.9)}
    dirs = []
    for i in range(2):
        metrics = {arm: rows([0.1, 0.2, 0.3, 0.4, 0.5, last[arm][i]], masked=masked[arm][i]) for arm in masked}
        run = tmp_path / f"run{i}"
        run.mkdir()
        (run / "metrics.json").write_text(json.dumps(metrics))
        (run / "summary.json").write_text(json.dumps({"config": {"steps": STEPS, "seed": 0}}))
        dirs.append(str(run))
    out = tmp_path / "golden.json"
    script = ["-m", "ci.make_golden"]
    subprocess.run(
        [sys.executable, *script, *dirs, "--out", str(out)], check=True, capture_output=True, timeout=60, cwd=REPO_ROOT
    )
    arms = json.loads(out.read_text())["arms"]
    # reward_last5 (mean of the last 5 of 6 steps): cppo 0.46 / 0.42 -> mean 0.44, sd 0.04 / sqrt(2); others sd 0
    sd = 0.04 / math.sqrt(2)
    assert arms["cppo"]["reward_last5"]["value"] == pytest.approx(0.44, abs=1e-4)
    assert arms["cppo"]["reward_last5"]["tol"] == pytest.approx(4 * sd, abs=1e-4)
    # the pooled sd leaves out dppo_tv's one-sided reward_last5: sqrt((sd^2 + 0) / 2) over cppo and vanilla
    assert arms["vanilla"]["reward_last5"]["tol"] == pytest.approx(max(4 * sd / math.sqrt(2), 0.05), abs=1e-4)
    # dppo_tv's rewards are a floor: mean first-step reward (0.1) + 0.1
    assert arms["dppo_tv"]["reward_last5"] == {
        "min": 0.2,
        "why": arms["dppo_tv"]["reward_mean"]["why"],
        "runs": [0.44, 0.44],
    }
    # masked: geometric mean of 0.01 and 0.04 is 0.02; sd of ln = ln(4) / sqrt(2); vanilla at the ln 2 floor
    assert arms["cppo"]["masked_mean"]["value"] == pytest.approx(0.02, abs=1e-4)
    assert arms["cppo"]["masked_mean"]["log_tol"] == pytest.approx(4 * math.log(4) / math.sqrt(2), abs=1e-4)
    assert arms["vanilla"]["masked_mean"]["log_tol"] == pytest.approx(math.log(2), abs=1e-4)
    assert "not_compared" in arms["dppo_tv"]["masked_mean"]  # a run at exactly 0 is fine there
    # --stored adds the recorded runs; a run dir holding one arm adds to that arm only
    rerun = tmp_path / "rerun"
    rerun.mkdir()
    (rerun / "metrics.json").write_text(json.dumps({"cppo": rows([0.1, 0.2, 0.3, 0.4, 0.5, 0.5], masked=0.02)}))
    (rerun / "summary.json").write_text(json.dumps({"config": {"steps": STEPS, "seed": 0}}))
    out2 = tmp_path / "golden2.json"
    subprocess.run(
        [sys.executable, *script, "--stored", str(out), str(rerun), "--out", str(out2)],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        timeout=60,
    )
    arms2 = json.loads(out2.read_text())["arms"]
    assert arms2["cppo"]["reward_last5"]["runs"] == [0.46, 0.42, 0.38]
    assert arms2["cppo"]["reward_last5"]["value"] == pytest.approx(0.42, abs=1e-4)
    assert arms2["cppo"]["reward_last5"]["tol"] == pytest.approx(4 * 0.04, abs=1e-4)  # sd of 0.46, 0.42, 0.38
    assert arms2["vanilla"]["reward_last5"]["runs"] == [0.46, 0.46]  # untouched by a cppo-only rerun
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.json").write_text((rerun / "metrics.json").read_text())
    (other / "summary.json").write_text(json.dumps({"config": {"steps": STEPS, "seed": 1}}))
    refused = subprocess.run(
        [sys.executable, *script, "--stored", str(out), str(other), "--out", str(out2)],
        capture_output=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert refused.returncode != 0 and b"one configuration" in refused.stderr
