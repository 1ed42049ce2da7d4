"""Write ci/golden/tiny_regression.json from repeated runs of ci/tiny_regression.py (same seed, same config).

    python ci/make_golden.py RUN_DIR [RUN_DIR ...] [--out ci/golden/tiny_regression.json]

For each arm and each statistic of ``regression_checks.summarize``: value = mean over the runs, tolerance =
max(SIGMAS * max(std of the arm, std pooled over the arms), FLOOR[stat]) with sample standard deviations over
the runs. A few runs estimate one arm's spread poorly (from 3 runs the true value may be 4x the estimate);
pooling the arms' variances of a statistic doubles the degrees of freedom, and taking the larger of the two
keeps an arm whose own spread is larger. The runs' values are stored next to them, so the golden file shows
the spread it was derived from. ci/README.md explains the choice of SIGMAS and FLOOR.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from regression_checks import DEFAULT_CHECKS, summarize  # noqa: E402

SIGMAS = 4.0
FLOOR = {"reward_first": 0.05, "reward_mean": 0.05, "reward_last5": 0.05, "masked_mean": 0.01}


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
    std = {arm: {k: statistics.stdev([run[arm][k] for run in per_run]) for k in stats} for arm in per_run[0]}
    pooled = {k: statistics.fmean([std[arm][k] ** 2 for arm in std]) ** 0.5 for k in stats}
    arms = {}
    for arm in per_run[0]:
        arms[arm] = {}
        for stat in stats:
            values = [run[arm][stat] for run in per_run]
            arms[arm][stat] = {
                "value": round(statistics.fmean(values), 4),
                "tol": round(max(SIGMAS * max(std[arm][stat], pooled[stat]), FLOOR[stat]), 4),
                "runs": [round(v, 4) for v in values],
                "std": round(std[arm][stat], 4),
                "pooled_std": round(pooled[stat], 4),
            }
    golden = {
        "method": (
            f"{len(per_run)} runs of ci/tiny_regression.py with the configuration below on one machine; value = "
            f"mean over the runs, tol = max({SIGMAS} x max(sample std of the arm, std pooled over the arms), "
            f"floor {FLOOR}); see ci/README.md"
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
