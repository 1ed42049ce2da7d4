"""Write ci/golden/tiny_regression.json from repeated runs of ci/tiny_regression.py (same seed, same config).

    python ci/make_golden.py RUN_DIR [RUN_DIR ...] [--out ci/golden/tiny_regression.json]

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

The runs' values are stored next to each entry, so the golden file shows the spread it was derived from.
ci/README.md explains the choices.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from regression_checks import DEFAULT_CHECKS, summarize  # noqa: E402

SIGMAS = 4.0
FLOOR = {"reward_first": 0.05, "reward_mean": 0.05, "reward_last5": 0.05}
LOG_STATS = ("masked_mean",)
LOG_FLOOR = math.log(2.0)
"""The smallest log-scale tolerance: a factor of 2 either way."""
NOT_COMPARED = {
    ("dppo_tv", "masked_mean"): "dppo_tv clips almost nothing on this task (0.0001-0.011 over the runs): no band",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", default=os.path.join(HERE, "golden", "tiny_regression.json"))
    args = parser.parse_args()
    configs, per_run = [], []
    for run in args.runs:
        with open(os.path.join(run, "summary.json")) as f:
            configs.append(json.load(f)["config"])
        with open(os.path.join(run, "metrics.json")) as f:
            per_run.append({arm: summarize(rows) for arm, rows in json.load(f).items()})
    if any(c != configs[0] for c in configs) or len(per_run) < 2:
        raise SystemExit(f"need >= 2 runs of one configuration, got {configs}")
    stats = list(next(iter(per_run[0].values())))
    linear = [k for k in stats if k not in LOG_STATS]
    std = {arm: {k: statistics.stdev([run[arm][k] for run in per_run]) for k in linear} for arm in per_run[0]}
    pooled = {k: statistics.fmean([std[arm][k] ** 2 for arm in std]) ** 0.5 for k in linear}
    arms = {}
    for arm in per_run[0]:
        arms[arm] = {}
        for stat in stats:
            values = [run[arm][stat] for run in per_run]
            runs = [round(v, 4) for v in values]
            if (arm, stat) in NOT_COMPARED:
                arms[arm][stat] = {"not_compared": NOT_COMPARED[(arm, stat)], "runs": runs}
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
            f"{len(per_run)} runs of ci/tiny_regression.py with the configuration below on one machine; value = "
            f"mean over the runs, tol = max({SIGMAS} x max(sample std of the arm, std pooled over the arms), "
            f"floor {FLOOR}); {list(LOG_STATS)} on ln(value): value = geometric mean, log_tol = max({SIGMAS} x "
            f"sample std of ln over the arm's runs, ln 2); not_compared where noted; see ci/README.md"
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
