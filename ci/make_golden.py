"""Write ci/golden/tiny_regression.json from repeated runs of ci/tiny_regression.py (same seed, same config).

    python -m ci.make_golden [--stored GOLDEN] RUN_DIR [RUN_DIR ...] [--out ci/golden/tiny_regression.json]

A run directory may hold a subset of the arms (a rerun of one arm); each arm's statistics use the runs that
hold it. ``--stored`` adds the runs recorded in an earlier golden file (its per-run values, same
configuration), so a new measurement extends the evidence instead of replacing it.

Rewards (linear scale): per arm and statistic of ``regression_checks.summarize``, value = mean over the runs,
tolerance = max(SIGMAS * max(std of the arm, std pooled over the arms), FLOOR[stat]) with sample standard
deviations over the runs. A few runs estimate one arm's spread poorly; pooling the arms' variances of a reward
statistic (which behave alike across arms) multiplies the degrees of freedom, and taking the larger of the two
keeps an arm whose own spread is larger.

Masked fraction (LOG_STATS, log scale): its variation is multiplicative and right-skewed, so the rule is applied
to ln(value) with the arm's own spread only (arms mask at very different rates, so their relative spreads are
not one quantity): value = geometric mean, ``log_tol`` = max(SIGMAS * std of ln, LOG_FLOOR). An arm whose
masked fraction comes near 0 in some run (NOT_COMPARED) gets no band: ln of ~0 has no useful spread, and a run
at exactly 0 would fail a log-scale band for no fault.

One-sided statistics (ONE_SIDED): where an arm's runs are bimodal, a mean +- k sd band describes neither
mode. dppo_tv's rewards are: most runs climb to ~0.9, but one run in the 11 measured through the project's
since-removed HF stand-in rollout was knocked back by a large update late in the run (in CI's first failure a
step clipped 38% of tokens and the reward fell from 0.54 to 0.29) and ended near 0.4. That is the instability
CPPO exists to remove, not a fault of the plumbing, so there the golden entry is a floor only: ``min`` = the
arm's mean first-step reward + LEARNS_MIN, i.e. the arm must learn at all (a broken sign or a zero gradient
stays at ~0.08).

The runs' values are stored next to each entry, so the golden file shows the spread it was derived from.
ci/README.md explains the choices.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics

from ci.regression_checks import DEFAULT_CHECKS, summarize

HERE = os.path.dirname(os.path.abspath(__file__))

SIGMAS = 4.0
FLOOR = {"reward_first": 0.05, "reward_mean": 0.05, "reward_last5": 0.05}
LOG_STATS = ("masked_mean",)
LOG_FLOOR = math.log(2.0)
"""The smallest log-scale tolerance: a factor of 2 either way."""
ONE_SIDED = {
    (
        "dppo_tv",
        "reward_mean",
    ): "bimodal (1 run in 11 through the since-removed HF stand-in rollout was knocked back late): a floor",
    (
        "dppo_tv",
        "reward_last5",
    ): "bimodal (1 run in 11 through the since-removed HF stand-in rollout was knocked back late): a floor",
}
LEARNS_MIN = 0.1
"""A one-sided statistic must exceed the arm's mean first-step reward by this much."""
NOT_COMPARED = {
    ("dppo_tv", "masked_mean"): "dppo_tv clips almost nothing on this task (0.0001-0.0041 over the vLLM runs): no band",
}


def _stored_runs(path: str) -> tuple[dict, dict[str, list[dict[str, float]]]]:
    """(configuration, {arm: [per-run statistics]}) of the runs recorded in an earlier golden file."""
    with open(path) as f:
        golden = json.load(f)
    arms = {}
    for arm, entries in golden["arms"].items():
        count = {len(e["runs"]) for e in entries.values()}
        if len(count) != 1:
            raise SystemExit(f"{path}: {arm}'s statistics record different numbers of runs: {count}")
        arms[arm] = [{stat: e["runs"][i] for stat, e in entries.items()} for i in range(count.pop())]
    return golden["config"], arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--stored", help="an earlier golden file whose recorded runs are added")
    parser.add_argument("--out", default=os.path.join(HERE, "golden", "tiny_regression.json"))
    args = parser.parse_args()
    configs, per_arm = [], {}
    if args.stored:
        config, stored = _stored_runs(args.stored)
        configs.append(config)
        for arm, values in stored.items():
            per_arm.setdefault(arm, []).extend(values)
    for run in args.runs:
        with open(os.path.join(run, "summary.json")) as f:
            configs.append(json.load(f)["config"])
        with open(os.path.join(run, "metrics.json")) as f:
            for arm, rows in json.load(f).items():
                per_arm.setdefault(arm, []).append(summarize(rows))
    if any(c != configs[0] for c in configs) or min(len(v) for v in per_arm.values()) < 2:
        raise SystemExit(f"need >= 2 runs of each arm, of one configuration; got {configs}")
    stats = list(next(iter(per_arm.values()))[0])
    linear = [k for k in stats if k not in LOG_STATS]
    std = {arm: {k: statistics.stdev([r[k] for r in runs]) for k in linear} for arm, runs in per_arm.items()}
    # the pooled spread leaves out the one-sided entries: a bimodal arm's variance is not the others'
    pooled = {
        k: statistics.fmean([std[arm][k] ** 2 for arm in std if (arm, k) not in ONE_SIDED]) ** 0.5 for k in linear
    }
    arms = {}
    for arm, arm_runs in per_arm.items():
        arms[arm] = {}
        for stat in stats:
            values = [run[stat] for run in arm_runs]
            runs = [round(v, 4) for v in values]
            if (arm, stat) in NOT_COMPARED:
                arms[arm][stat] = {"not_compared": NOT_COMPARED[(arm, stat)], "runs": runs}
            elif (arm, stat) in ONE_SIDED:
                first = statistics.fmean([run["reward_first"] for run in arm_runs])
                arms[arm][stat] = {"min": round(first + LEARNS_MIN, 4), "why": ONE_SIDED[(arm, stat)], "runs": runs}
            elif stat in LOG_STATS:
                if min(values) <= 0:
                    raise SystemExit(f"{arm}: {stat} = {min(values)} in a golden run; a log-scale statistic is > 0")
                logs = [math.log(v) for v in values]
                value, sd = math.exp(statistics.fmean(logs)), statistics.stdev(logs)
                tol = max(SIGMAS * sd, LOG_FLOOR)
                arms[arm][stat] = {
                    "value": round(value, 4),
                    "log_tol": round(tol, 4),
                    "range": [round(value * math.exp(-tol), 4), round(value * math.exp(tol), 4)],
                    "runs": runs,
                    "std_ln": round(sd, 4),
                }
            else:
                tol = max(SIGMAS * max(std[arm][stat], pooled[stat]), FLOOR[stat])
                arms[arm][stat] = {
                    "value": round(statistics.fmean(values), 4),
                    "tol": round(tol, 4),
                    "runs": runs,
                    "std": round(std[arm][stat], 4),
                    "pooled_std": round(pooled[stat], 4),
                }
    golden = {
        "method": (
            f"runs of ci/tiny_regression.py with the configuration below on one machine (per arm: "
            f"{ {arm: len(runs) for arm, runs in per_arm.items()} }); value = "
            f"mean over the runs, tol = max({SIGMAS} x max(sample std of the arm, std pooled over the arms), "
            f"floor {FLOOR}); {list(LOG_STATS)} on ln(value): value = geometric mean, log_tol = max({SIGMAS} x "
            f"sample std of ln over the arm's runs, ln 2); one-sided (min = mean first-step reward + {LEARNS_MIN}) "
            "and not_compared where noted; see ci/README.md"
        ),
        "config": configs[0],
        "checks": DEFAULT_CHECKS,
        "arms": arms,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")
    print(json.dumps(arms, indent=1))


if __name__ == "__main__":
    main()
