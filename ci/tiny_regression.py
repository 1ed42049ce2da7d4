"""CPPO regression on a tiny model through verl's real trainer (``python -m verl.trainer.main_ppo``) on CPU.

Each arm is one ``main_ppo`` run (Ray, the v1 trainer, the FSDP2 engine, verl's vLLM rollout on vLLM's CPU
build, the reward loop) on the tiny copy task of ``verl_cppo.testing.tiny_task``, with fixed seeds, launched by
``verl_cppo.testing.launcher`` (the task's command line, the CPU environment, the subprocess, progress):

  cppo     loss_mode=cppo (paper defaults), bypass mode: anchored on the rollout log-probs
  dppo_tv  verl's DPPO-Binary-TV, bypass mode (DPPO is defined against the rollout policy), delta = 0.15
           (CPPO's delta) on both sides and CPPO's ratio cap 20: CPPO without position weights and budget
  vanilla  PPO clip-higher (0.2 / 0.28), old log-probs recomputed by the actor (verl's default, what GRPO
           users run); its rollout-vs-actor log-prob gap also checks verl's weight sync into vLLM

OUTDIR/metrics.json is ``{arm: [{"step", "reward", "masked_frac", <every numeric verl metric>}, ...]}``,
OUTDIR/reward.png plots reward and masked fraction per arm and, for the CPPO arms, the share of masked tokens
the prefix budget masked and the mean delta_b; OUTDIR/<arm>/main_ppo.log keeps verl's output (and its
progress bar). The terminal gets a line at once, one per start-up phase (Ray, the vLLM server) and one per
step with the elapsed time and an ETA: the mean step time so far (verl's ``timing_s/step``) times the steps
left, and with more arms to run, those arms projected at this arm's wall time.
The checks (``ci/regression_checks.py``) compare with ``ci/golden/tiny_regression.json`` (20 steps; the
sanity checks scale with --steps); see ci/README.md for how its tolerances were measured. Exit status 0 only
when every check passed.

    python -m ci.tiny_regression OUTDIR [--arms cppo,dppo_tv,vanilla] [--steps 20] [--seed 0] [--no-golden]
                                        [--override K=V]
"""

from __future__ import annotations

import time

START = time.time()
if __name__ == "__main__":  # the first line, before verl's imports take their seconds
    print("tiny regression: loading verl, then building the tiny model and task  elapsed 0s", flush=True)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from ci.regression_checks import ROLLOUT, check, scaled_limits, summarize  # noqa: E402
from verl_cppo.testing import launcher, progress, tiny_task  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden", "tiny_regression.json")
ARMS = ("cppo", "dppo_tv", "vanilla")
"""The default arms (launcher.ARMS defines more, run only when named in --arms, without golden values:
tests/testing/test_vllm_cpu.py runs cppo_topk_tv)."""


PANELS = (
    # (row key, title, y label, y limits): reward and masked fraction for every arm, CPPO's budget panels for
    # the arms that log them (the loss's actor/cppo_* metrics)
    ("reward", "reward", "reward (critic/score/mean)", (0, 1.02)),
    ("masked_frac", "masked / clipped fraction", "fraction of valid tokens", None),
    ("actor/cppo_masked_by_budget_share", "masked by the prefix budget", "share of masked tokens", (0, 1.02)),
    ("actor/cppo_delta_b_mean", "delta_b in effect", "mean delta_b per response", None),
)


def plot(metrics: dict[str, list[dict]], path: str) -> list[dict]:
    """Write the 2 x 2 panels of PANELS to ``path``; returns, per panel, its title and the arms drawn in it."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    drawn = []
    for ax, (key, title, ylabel, ylim) in zip(axes.flat, PANELS):
        arms = []
        for arm, rows in metrics.items():
            points = [(r["step"], r[key]) for r in rows if key in r and r[key] == r[key]]
            if points:
                ax.plot(*zip(*points), marker=".", label=arm)
                arms.append(arm)
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        if ylim:
            ax.set_ylim(*ylim)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if arms:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no arm logs this metric", ha="center", va="center", transform=ax.transAxes)
        drawn.append({"title": title, "key": key, "arms": arms})
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--steps", type=int, default=20, help="any N >= 2; the golden values hold for 20")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--adv-estimator", default="cppo_grpo")
    parser.add_argument("--arm-timeout", type=float, default=900.0)
    parser.add_argument("--golden", default=GOLDEN)
    parser.add_argument("--no-golden", action="store_true", help="run the sanity checks only")
    parser.add_argument(
        "--override", action="append", default=[], help="one more main_ppo override for every arm (repeatable)"
    )
    args = parser.parse_args()
    args.outdir = os.path.abspath(args.outdir)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(launcher.ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {tuple(launcher.ARMS)}")
    try:
        scaled_limits({"cppo_rise_min": 0.0, "cppo_masked_steps_min": 0}, args.steps)
    except ValueError as error:
        parser.error(str(error))
    os.makedirs(args.outdir, exist_ok=True)

    # vLLM's CPU attention needs a head size >= 32
    task = tiny_task.build(os.path.join(args.outdir, "task"), seed=args.seed, head_dim=32)
    print(f"tiny regression: model and task in {args.outdir}/task  elapsed {progress.duration(time.time() - START)}")
    metrics: dict[str, list[dict]] = {}
    runs: dict[str, dict] = {}
    overrides = launcher.tiny_task_overrides(
        task, seed=args.seed, lr=args.lr, steps=args.steps, adv_estimator=args.adv_estimator
    )
    for index, arm in enumerate(arms):
        run = launcher.run_arm(
            os.path.join(args.outdir, arm),
            arm,
            overrides,
            after=args.override,
            steps=args.steps,
            label=arm,
            timeout_s=args.arm_timeout,
            arms_after=len(arms) - index - 1,
        )
        metrics[arm] = run.rows
        runs[arm] = {"wall_s": round(run.wall_s, 1), "exit_code": run.exit_code, "steps": len(run.rows)}
    with open(os.path.join(args.outdir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1, allow_nan=True)
    plot(metrics, os.path.join(args.outdir, "reward.png"))

    golden = None if args.no_golden else json.load(open(args.golden))
    config = {k: getattr(args, k) for k in ("steps", "seed", "lr", "adv_estimator", "override")}
    failures = check(metrics, runs, config, golden)
    summary = {"runs": runs, "summary": {arm: summarize(rows) for arm, rows in metrics.items()}, "failures": failures}
    summary["config"] = {**config, "rollout": ROLLOUT}
    if not args.override:
        del summary["config"]["override"]
    with open(os.path.join(args.outdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    for arm, info in runs.items():
        s = summary["summary"][arm]
        print(
            f"[{arm}] {info['wall_s']:.0f} s, {info['steps']} steps, reward first {s['reward_first']:.3f} "
            f"last5 {s['reward_last5']:.3f}, masked mean {s['masked_mean']:.3f}"
        )
    if failures:
        print(f"FAILED {len(failures)} check(s):")
        for failure in failures:
            print(f"  - {failure}")
        return 1
    print(f"all checks passed; {args.outdir}/metrics.json, {args.outdir}/reward.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
