"""Checks of the tiny regression (ci/tiny_regression.py): sanity checks, then the golden comparison.

Sanity (always, for any number of steps N >= 2; ``scaled_limits`` scales the two limits measured on the
REFERENCE_STEPS-step run):
  * every arm ran all steps and main_ppo exited 0;
  * reward, masked fraction, pg_loss and grad_norm are finite at every step of every arm;
  * the cppo arms report every ``actor/cppo_*`` metric of the loss (``CPPO_METRICS``) at every step, all finite;
  * cppo's reward over its last ``last_window(N)`` steps (5 of 20) exceeds its first-step reward by at least
    ``cppo_rise_min`` x (N - 1) / (REFERENCE_STEPS - 1) (all of it from REFERENCE_STEPS steps on): the rise is
    asked in proportion to the updates made, which asks less than the measured curves give, since the reward
    rises fastest early;
  * cppo masks tokens (``masked_frac > 0``) in at least ``masked_steps_min(N)`` steps: the mask engages
    throughout the run, not in one spike that alone lifts ``masked_mean`` into its (wide) golden band. The
    bound is the fewest masking steps that a run masking at the lowest measured rate (9 of 20 steps) reaches
    with 98% probability: ``cppo_masked_steps_min`` = 5 at 20 steps, 1 at 7, 0 (no check) below 7 steps, where a
    healthy run can mask in no step at all;
  * in the vanilla arm (old log-probs recomputed by the actor) the rollout's log-probs equal the actor's:
    ``training/rollout_probs_diff_max`` <= ``rollout_actor_prob_gap_max`` at every step, which holds only if
    verl's weight sync reached the rollout server (vLLM) at every step.
Golden (unless --no-golden): each summary statistic of ``summarize`` within its tolerance of the golden value
(ci/golden/tiny_regression.json records the values, the tolerances and how they were measured). Rewards
are compared on a linear scale (|value - golden| <= tol); the masked fraction, whose run-to-run variation is
multiplicative (a run that moves the policy further masks proportionally more), on a log scale
(|ln(value / golden)| <= log_tol, golden = geometric mean of the runs), so 0 always fails; an entry marked
``not_compared`` (dppo_tv's near-zero clip fraction) is skipped; an entry with only ``min`` (dppo_tv's bimodal
rewards) is a floor: the value must be finite and >= min.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from verl_cppo.core.token_loss import METRIC_KEYS

CPPO_METRICS = tuple(key for key in METRIC_KEYS if key.startswith("actor/cppo_"))
"""The loss's own metrics (its METRIC_KEYS less the two it also reports under verl's names): a metric added to
the loss is checked here without a second list."""
FINITE_EVERY_STEP = ("reward", "masked_frac", "actor/pg_loss", "actor/grad_norm")
DEFAULT_CHECKS = {"cppo_rise_min": 0.3, "cppo_masked_steps_min": 5, "rollout_actor_prob_gap_max": 1e-4}
REFERENCE_STEPS = 20
"""The run length the limits of DEFAULT_CHECKS (and the golden file) were measured at."""
ROLLOUT = "vllm"
"""The rollout every regression run uses (recorded in the golden file's configuration)."""


def last_window(steps: int) -> int:
    """How many final steps the rise check averages: 5 of REFERENCE_STEPS, in proportion, at least 1."""
    return max(1, round(steps * 5 / REFERENCE_STEPS))


MASKING_RATE_MIN = 0.45
"""The lowest share of steps in which cppo masked tokens over every measured 20-step run (9 of 20)."""
MASKING_FALSE_ALARM = 0.02
"""How often a healthy run (masking at MASKING_RATE_MIN) may fail the masking check."""


def masked_steps_min(steps: int) -> int:
    """The largest k with P(Binomial(steps, MASKING_RATE_MIN) < k) <= MASKING_FALSE_ALARM (5 at 20 steps)."""
    p = MASKING_RATE_MIN
    below, k = 0.0, 0
    while k < steps:
        below += math.comb(steps, k) * p**k * (1 - p) ** (steps - k)  # P(X <= k) = P(X < k + 1)
        if below > MASKING_FALSE_ALARM:
            break
        k += 1
    return k


def scaled_limits(limits: Mapping[str, float], steps: int) -> dict[str, float]:
    """The sanity limits for a run of ``steps`` steps (``limits`` hold for REFERENCE_STEPS steps)."""
    if steps < 2:
        raise ValueError(f"the regression's checks need steps >= 2 (a first step and a later one), got {steps}")
    scaled = dict(limits)
    scaled["cppo_rise_min"] = limits["cppo_rise_min"] * min(1.0, (steps - 1) / (REFERENCE_STEPS - 1))
    scaled["cppo_masked_steps_min"] = masked_steps_min(steps)
    return scaled


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize(rows: list[dict]) -> dict[str, float]:
    """The statistics compared with the golden file (per arm)."""
    rewards = [r["reward"] for r in rows]
    masked = [r["masked_frac"] for r in rows]
    return {
        "reward_first": rewards[0] if rewards else float("nan"),
        "reward_mean": _mean(rewards),
        "reward_last5": _mean(rewards[-5:]),
        "masked_mean": _mean(masked),
    }


def _finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def check(metrics: dict[str, list[dict]], runs: dict[str, dict], config: Mapping, golden: dict | None) -> list[str]:
    """Every failed check, one line each. ``config``: the run's ``steps``, ``seed``, ``lr``, ``adv_estimator``
    and ``override`` (a list, empty for the regression's own configuration)."""
    failures: list[str] = []
    steps = config["steps"]
    limits = scaled_limits({**DEFAULT_CHECKS, **((golden or {}).get("checks", {}))}, steps)
    for arm, rows in metrics.items():
        run = runs[arm]
        if run["exit_code"] != 0 or len(rows) != steps:
            failures.append(f"{arm}: main_ppo exited {run['exit_code']} after {len(rows)}/{steps} steps")
            continue
        for row in rows:
            bad = [key for key in FINITE_EVERY_STEP if not _finite(row.get(key))]
            if arm.startswith("cppo"):
                bad += [key for key in CPPO_METRICS if not _finite(row.get(key))]
            if bad:
                failures.append(f"{arm} step {row['step']}: missing or non-finite {bad}")
    cppo = metrics.get("cppo")
    if cppo and len(cppo) == steps:
        window = last_window(steps)
        first, last = cppo[0]["reward"], _mean([row["reward"] for row in cppo[-window:]])
        if not last >= first + limits["cppo_rise_min"]:
            failures.append(
                f"cppo: reward over the last {window} steps {last:.3f} is not at least "
                f"{limits['cppo_rise_min']:.3f} above the first step's {first:.3f}"
            )
        masking_steps = sum(row["masked_frac"] > 0 for row in cppo)
        if masking_steps < limits["cppo_masked_steps_min"]:
            failures.append(
                f"cppo: masked tokens in {masking_steps} of {len(cppo)} steps, "
                f"fewer than cppo_masked_steps_min={limits['cppo_masked_steps_min']} (for {steps} steps)"
            )
    for row in metrics.get("vanilla", []):
        gap = row.get("training/rollout_probs_diff_max")
        if not (_finite(gap) and gap <= limits["rollout_actor_prob_gap_max"]):
            failures.append(
                f"vanilla step {row['step']}: rollout vs actor prob gap {gap} > "
                f"{limits['rollout_actor_prob_gap_max']} (rollout weights not synced?)"
            )
    if golden is not None:
        failures += _check_golden(metrics, config, golden)
    return failures


def _check_golden(metrics: dict[str, list[dict]], config: Mapping, golden: dict) -> list[str]:
    failures = []
    recorded = golden.get("config", {})
    ours = {key: config[key] for key in ("steps", "seed", "lr", "adv_estimator")}
    ours["rollout"] = ROLLOUT
    if config.get("override"):
        return [f"golden values hold for the configuration without overrides; got --override {config['override']}"]
    differ = {k: (ours[k], recorded.get(k)) for k in ours if ours[k] != recorded.get(k)}
    if differ:
        return [f"golden file was recorded with another configuration (ours, golden): {differ}"]
    for arm, rows in metrics.items():
        expected = golden.get("arms", {}).get(arm)
        if expected is None:
            failures.append(f"{arm}: no golden values")
            continue
        if len(rows) != config["steps"]:
            continue  # already reported
        actual = summarize(rows)
        for stat, ref in expected.items():
            failure = _outside(actual[stat], ref)
            if failure:
                failures.append(f"{arm}: {stat} = {actual[stat]:.4f}, {failure}")
    return failures


def _outside(value: float, ref: dict) -> str | None:
    """None if ``value`` lies within the golden entry ``ref``, else the band it missed."""
    if "not_compared" in ref:
        return None
    if "min" in ref:
        inside = _finite(value) and value >= ref["min"]
        return None if inside else f"golden floor {ref['min']:.4f} (one-sided: {ref['why']})"
    if "log_tol" in ref:
        low, high = ref["value"] * math.exp(-ref["log_tol"]), ref["value"] * math.exp(ref["log_tol"])
        inside = _finite(value) and value > 0 and abs(math.log(value / ref["value"])) <= ref["log_tol"]
        return (
            None
            if inside
            else f"golden {ref['value']:.4f} in [{low:.4f}, {high:.4f}] (x/ {math.exp(ref['log_tol']):.2f})"
        )
    inside = _finite(value) and abs(value - ref["value"]) <= ref["tol"]
    return None if inside else f"golden {ref['value']:.4f} +- {ref['tol']:.4f}"
