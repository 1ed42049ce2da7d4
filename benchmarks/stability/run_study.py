"""Seeded stability study: CPPO vs DPPO vs clipped PPO (and CPPO's ablations) under heavy off-policy reuse.

Every run is one ``python -m verl.trainer.main_ppo`` on CPU with the same trainer, rollout (verl's vLLM rollout
on vLLM's CPU build), model and data as ``ci/tiny_regression.py``, launched by ``verl_cppo.testing.launcher``
(the tiny task's shared command line, the CPU environment, the subprocess); this study appends its regime on
top (later Hydra overrides win):

* the reward of ``prefix_reward.py``: 16-word copy answers, each earlier mistake halves the later credit;
* 16 prompts x 8 samples per step, mini-batches of 2 prompts and 2 epochs: 16 optimizer updates per rollout,
  so the last mini-batches are trained far from the rollout policy mu;
* a learning rate of 5e-3 (the regression's is 1.5e-3 with 4 updates per rollout).

Arms (the loss and its anchoring; everything else identical):

  cppo                     loss_mode=cppo, paper defaults, anchored on mu (bypass mode)
  cppo_no_position_weight  the same with cppo.position_weight=false (w_t = 1)
  cppo_no_prefix_budget    the same with cppo.prefix_budget=false (the position-weighted token test only)
  dppo_tv                  verl's dppo_tv, delta 0.15 both sides, ratio cap 20, anchored on mu
  vanilla                  PPO clip-higher 0.2 / 0.28, old log-probs recomputed by the actor (verl's default)

A seed fixes the model's initialisation, the data order, the actor and the rollout's per-request seeds, and
every arm gets the same seeds. Runs are still not bit-identical (ci/README.md: the TransferQueue agent loop
assigns the rollout's per-request seeds in arrival order), which is why the study reports spreads.

Resumable: RESULTS (default ``benchmarks/stability/results.json``) is rewritten after every run, and a run
already there that completed every step with the same configuration is not run again. Runs go seed by seed
(all arms of seed 0, then seed 1, ...), so an interrupted study has comparable arms. The summary (per-arm
final reward, worst drawdown, collapses) goes to ``summary.json`` next to RESULTS, the plot to PLOT.

    python -m benchmarks.stability.run_study [--arms cppo,dppo_tv,...] [--seeds 0,1,2,3,4] [--steps 24]
        [--lr 5e-3] [--results PATH] [--plot PATH] [--run-dir DIR] [--override K=V] [--summarize-only]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import sys

from benchmarks.stability import prefix_reward
from verl_cppo.testing import launcher

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

RESPONSE_LENGTH = prefix_reward.ANSWER_LENGTH
SAMPLES_PER_PROMPT = 8  # the regression's rollout.n
CPPO_CONFIG_TARGET = "actor_rollout_ref.actor.policy_loss._target_=verl_cppo.config.CPPOPolicyLossConfig"
ARM_OVERRIDES = {
    "cppo": launcher.ARM_OVERRIDES["cppo"],
    "dppo_tv": launcher.ARM_OVERRIDES["dppo_tv"],
    "vanilla": launcher.ARM_OVERRIDES["vanilla"],
    "cppo_no_position_weight": [
        *launcher.ARM_OVERRIDES["cppo"],
        CPPO_CONFIG_TARGET,
        "+actor_rollout_ref.actor.policy_loss.cppo.position_weight=false",
    ],
    "cppo_no_prefix_budget": [
        *launcher.ARM_OVERRIDES["cppo"],
        CPPO_CONFIG_TARGET,
        "+actor_rollout_ref.actor.policy_loss.cppo.prefix_budget=false",
    ],
}
ARMS = ("cppo", "dppo_tv", "vanilla", "cppo_no_position_weight", "cppo_no_prefix_budget")
MASKED_KEY = {arm: "actor/cppo_masked_frac" if arm.startswith("cppo") else "actor/pg_clipfrac" for arm in ARMS}
"""The fraction of valid tokens each loss drops from the gradient (masked or clipped)."""

PER_STEP_FIELDS = {
    "rewards": "critic/score/mean",
    "grad_norm": "actor/grad_norm",
    "rollout_train_kl": "actor/ppo_kl",  # k1 estimate of KL(mu || pi) over the step's updates, anchored on mu
    "pg_loss": "actor/pg_loss",
    "response_length": "response_length/mean",
    "step_time_s": "timing_s/step",
}
"""results.json field -> verl metric, per step (masked_frac comes from MASKED_KEY)."""

FINAL_WINDOW = 3
"""Final reward = mean over the last FINAL_WINDOW steps (one step's mean over 128 samples is noisy)."""
COLLAPSE_DROP = 0.25
"""A run collapsed when its final reward is more than COLLAPSE_DROP below the best FINAL_WINDOW-step moving
average it reached earlier: it learnt something and then lost it (a run that never learns is not a collapse)."""
LOCKED_GRAD_NORM = 1e-3
"""A run locked in when the actor's gradient norm stayed below LOCKED_GRAD_NORM over the last FINAL_WINDOW
steps while its final reward was below LOCKED_BELOW: every group's 8 samples got the same reward (the policy
became deterministic), so group-relative advantages are 0 and the run can never improve again. The learning
steps of these runs have gradient norms of 0.01-0.1."""
LOCKED_BELOW = 0.95


def regime_overrides(args: argparse.Namespace) -> list[str]:
    """The study's regime, appended after the regression's command line (later overrides win)."""
    return [
        "data.train_batch_size=16",
        f"data.max_response_length={RESPONSE_LENGTH}",
        f"actor_rollout_ref.actor.loss_scale_factor={RESPONSE_LENGTH}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={args.mini_batch}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={args.mini_batch * SAMPLES_PER_PROMPT}",
        f"actor_rollout_ref.actor.ppo_epochs={args.epochs}",
        f"reward.custom_reward_function.path={os.path.join(HERE, 'prefix_reward.py')}",
        "reward.custom_reward_function.name=compute_score",
    ]


def run_config(args: argparse.Namespace) -> dict:
    """What must match for a stored run to count as done."""
    return {
        "steps": args.steps,
        "lr": args.lr,
        "mini_batch": args.mini_batch,
        "epochs": args.epochs,
        "adv_estimator": args.adv_estimator,
        "override": list(args.override),
    }


def run_one(arm: str, seed: int, task: dict, args: argparse.Namespace) -> dict:
    """One main_ppo run; returns its results.json entry."""
    run_dir = os.path.join(args.run_dir, f"seed{seed}", arm)
    os.makedirs(run_dir, exist_ok=True)
    overrides = launcher.tiny_task_overrides(
        task, seed=seed, lr=args.lr, steps=args.steps, adv_estimator=args.adv_estimator
    )
    run = launcher.run_main_ppo(
        run_dir,
        [*overrides, *regime_overrides(args), *ARM_OVERRIDES[arm], *args.override],
        steps=args.steps,
        label=f"{arm}_seed{seed}",
        timeout_s=args.run_timeout,
        masked_key=MASKED_KEY[arm],
    )
    rows, wall = run.rows, run.wall_s
    entry = {"seed": seed, "masked_frac": [row.get(MASKED_KEY[arm], math.nan) for row in rows]}
    for field, key in PER_STEP_FIELDS.items():
        entry[field] = [row.get(key, math.nan) for row in rows]
    if arm.startswith("cppo"):
        entry["masked_by_budget_share"] = [row.get("actor/cppo_masked_by_budget_share", math.nan) for row in rows]
    entry.update({"steps_done": len(rows), "exit_code": run.exit_code, "wall_s": round(wall, 1)})
    entry["config"] = run_config(args)
    rewards = " ".join(f"{r:.2f}" for r in entry["rewards"])
    print(f"[{arm} seed {seed}] exit {run.exit_code}, {len(rows)} steps, {wall:.0f} s; rewards {rewards}", flush=True)
    return entry


def is_complete(entry: dict, args: argparse.Namespace) -> bool:
    return (
        entry.get("exit_code") == 0
        and entry.get("steps_done") == args.steps
        and entry.get("config") == run_config(args)
    )


def load_results(path: str) -> dict[str, list[dict]]:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def save_json(data, path: str) -> None:
    """Write through a temporary file, so an interrupted study never leaves a truncated results.json."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, allow_nan=True)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- statistics


def moving_average(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def worst_drawdown(rewards: list[float]) -> float:
    """Largest fall of the per-step reward below its running maximum (0 for a non-decreasing curve)."""
    peak, worst = -math.inf, 0.0
    for reward in rewards:
        peak = max(peak, reward)
        worst = max(worst, peak - reward)
    return worst


def run_stats(entry: dict) -> dict:
    rewards = entry["rewards"]
    final = statistics.fmean(rewards[-FINAL_WINDOW:])
    best_smoothed = max(moving_average(rewards, FINAL_WINDOW))
    masked = [m for m in entry["masked_frac"] if not math.isnan(m)]
    return {
        "final_reward": final,
        "best_reward": max(rewards),
        "worst_drawdown": worst_drawdown(rewards),
        "collapsed": final < best_smoothed - COLLAPSE_DROP,
        "locked_in": max(entry["grad_norm"][-FINAL_WINDOW:]) < LOCKED_GRAD_NORM and final < LOCKED_BELOW,
        "masked_frac_mean": statistics.fmean(masked) if masked else math.nan,
        "rollout_train_kl_max": max(entry["rollout_train_kl"]),
        "grad_norm_max": max(entry["grad_norm"]),
    }


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: dict[str, list[dict]], args: argparse.Namespace) -> dict:
    """Per arm over its completed runs: mean and sd of the final reward, worst drawdowns, collapses."""
    summary = {}
    for arm, entries in results.items():
        done = [e for e in entries if is_complete(e, args)]
        if not done:
            continue
        per_run = {e["seed"]: run_stats(e) for e in done}
        finals = [s["final_reward"] for s in per_run.values()]
        drawdowns = [s["worst_drawdown"] for s in per_run.values()]
        final_mean, final_sd = mean_sd(finals)
        drawdown_mean, _ = mean_sd(drawdowns)
        summary[arm] = {
            "runs": len(done),
            "seeds": sorted(per_run),
            "final_reward_mean": final_mean,
            "final_reward_sd": final_sd,
            "final_reward_min": min(finals),
            "worst_drawdown_mean": drawdown_mean,
            "worst_drawdown_max": max(drawdowns),
            "collapsed": sum(s["collapsed"] for s in per_run.values()),
            "locked_in": sum(s["locked_in"] for s in per_run.values()),
            "masked_frac_mean": statistics.fmean(s["masked_frac_mean"] for s in per_run.values()),
            "rollout_train_kl_max": max(s["rollout_train_kl_max"] for s in per_run.values()),
            "wall_s_mean": statistics.fmean(e["wall_s"] for e in done),
            "per_seed": per_run,
        }
    return summary


def summary_table(summary: dict) -> str:
    lines = [
        f"| arm | runs | final reward (last {FINAL_WINDOW} steps) mean ± sd | min | worst drawdown mean / max "
        "| collapsed | locked in | masked / clipped frac | max KL(mu‖pi) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, s in summary.items():
        lines.append(
            f"| {arm} | {s['runs']} | {s['final_reward_mean']:.3f} ± {s['final_reward_sd']:.3f} "
            f"| {s['final_reward_min']:.3f} | {s['worst_drawdown_mean']:.3f} / {s['worst_drawdown_max']:.3f} "
            f"| {s['collapsed']}/{s['runs']} | {s['locked_in']}/{s['runs']} "
            f"| {s['masked_frac_mean']:.4f} | {s['rollout_train_kl_max']:.4f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- plot


def plot(results: dict[str, list[dict]], args: argparse.Namespace, path: str) -> None:
    """Reward, masked fraction and KL(mu || pi) per step: mean over seeds with a ± sd band, seeds as thin lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("rewards", "reward (critic/score/mean)"), ("masked_frac", "masked / clipped fraction"))
    panels += (("rollout_train_kl", "KL(mu || pi) over the updates (actor/ppo_kl)"),)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0))
    for index, (arm, entries) in enumerate(results.items()):
        done = [e for e in entries if is_complete(e, args)]
        if not done:
            continue
        color = f"C{index}"
        for ax, (field, _) in zip(axes, panels):
            curves = [e[field] for e in done]
            steps = range(1, len(curves[0]) + 1)
            mean = [statistics.fmean(c[i] for c in curves) for i in range(len(steps))]
            sd = [statistics.stdev(c[i] for c in curves) if len(curves) > 1 else 0.0 for i in range(len(steps))]
            for curve in curves:
                ax.plot(steps, curve, color=color, alpha=0.15, linewidth=0.8)
            ax.plot(steps, mean, color=color, linewidth=2, label=f"{arm} (n={len(done)})")
            ax.fill_between(
                steps, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], color=color, alpha=0.15
            )
    for ax, (_, title) in zip(axes, panels):
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--mini-batch", type=int, default=2, help="prompts per mini-batch (of 16 per step)")
    parser.add_argument("--epochs", type=int, default=2, help="passes over each rollout batch")
    parser.add_argument("--adv-estimator", default="cppo_grpo")
    parser.add_argument("--results", default=os.path.join(HERE, "results.json"))
    parser.add_argument("--plot", default=None, help="default: reward_curves.png next to RESULTS")
    parser.add_argument("--run-dir", default=os.path.join(ROOT, "out", "stability"), help="logs and task files")
    parser.add_argument("--run-timeout", type=float, default=900.0, help="seconds before one run is killed")
    parser.add_argument("--override", action="append", default=[], help="one more main_ppo override (repeatable)")
    parser.add_argument("--summarize-only", action="store_true", help="no runs: rewrite summary and plot")
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {ARMS}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    args.results = os.path.abspath(args.results)
    args.run_dir = os.path.abspath(args.run_dir)
    plot_path = args.plot or os.path.join(os.path.dirname(args.results), "reward_curves.png")
    os.makedirs(os.path.dirname(args.results), exist_ok=True)

    from verl_cppo.testing import tiny_task

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # run the cleanup in run_one

    results = load_results(args.results)
    for seed in [] if args.summarize_only else seeds:
        task = None
        for arm in arms:
            entries = results.setdefault(arm, [])
            if any(e["seed"] == seed and is_complete(e, args) for e in entries):
                print(f"[{arm} seed {seed}] already complete, skipped", flush=True)
                continue
            if task is None:  # the model's initialisation and the data order follow the seed
                task_dir = os.path.join(args.run_dir, f"seed{seed}", "task")
                task = tiny_task.build(task_dir, seed=seed, head_dim=32)  # vLLM's CPU attention: head size >= 32
            entry = run_one(arm, seed, task, args)
            results[arm] = sorted([e for e in entries if e["seed"] != seed] + [entry], key=lambda e: e["seed"])
            save_json(results, args.results)

    summary = summarize(results, args)
    save_json(summary, os.path.join(os.path.dirname(args.results), "summary.json"))
    if summary:
        plot(results, args, plot_path)
        print(summary_table(summary))
    incomplete = [
        (arm, s)
        for arm in arms
        for s in seeds
        if not any(e["seed"] == s and is_complete(e, args) for e in results.get(arm, []))
    ]
    if incomplete and not args.summarize_only:
        print(f"incomplete runs: {incomplete}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
