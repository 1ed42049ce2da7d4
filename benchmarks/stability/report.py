"""The stability study's statistics, tables and plot, computed from results.json entries (no runs here).

Per run: the final reward (mean of the last FINAL_WINDOW steps), the worst drawdown, whether it collapsed or
locked in (definitions below, fixed before the seeds ran). Per arm: mean, spread and counts over its seeds.
Between arms: the paired comparisons of COMPARISONS, by seed, with the exact tests of ``stats.py``.
"""

from __future__ import annotations

import math
import statistics

from benchmarks.stability import stats

COMPARISONS = (
    ("cppo", "dppo_tv_matched"),
    ("cppo", "dppo_tv"),
    ("dppo_tv_matched", "dppo_tv"),
    ("cppo_topk_tv", "cppo"),
    ("cppo_no_position_weight", "cppo"),
    ("cppo_no_prefix_budget", "cppo"),
)
"""The paired comparisons fixed before the second round ran (README, "Statistics"); the first is the primary
one: cumulative budget against the same tightness without it."""

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


def summarize(completed: dict[str, list[dict]]) -> dict:
    """Per arm over its completed runs (``completed``: arm -> results.json entries): mean and sd of the final
    reward, worst drawdowns, collapses and lock-ins; then the paired comparisons of COMPARISONS."""
    summary = {}
    for arm, done in completed.items():
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
    comparisons = {}
    for arm_a, arm_b in COMPARISONS:
        if arm_a in summary and arm_b in summary:
            per_seed_a, per_seed_b = summary[arm_a]["per_seed"], summary[arm_b]["per_seed"]
            comparisons[f"{arm_a} vs {arm_b}"] = stats.paired_comparison(per_seed_a, per_seed_b)
    return {"arms": summary, "comparisons": comparisons}


def comparison_table(comparisons: dict) -> str:
    lines = [
        "| A vs B | seeds | final reward A - B (mean), A higher on | p | worst drawdown A - B, p "
        "| locked in A / B (only A, only B) | p |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in comparisons.items():
        n = len(c["seeds"])
        lines.append(
            f"| {name} | {n} | {c['final_reward_diff_mean']:+.3f}, {c['final_reward_wins_a']}/{n} "
            f"| {c['final_reward_p']:.3f} | {c['worst_drawdown_diff_mean']:+.3f}, {c['worst_drawdown_p']:.3f} "
            f"| {c['locked_in_a']} / {c['locked_in_b']} ({c['locked_only_a']}, {c['locked_only_b']}) "
            f"| {c['locked_in_p']:.3f} |"
        )
    return "\n".join(lines)


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


def plot(completed: dict[str, list[dict]], path: str) -> None:
    """Reward, masked fraction and KL(mu || pi) per step: mean over seeds with a ± sd band, seeds as thin lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("rewards", "reward (critic/score/mean)"), ("masked_frac", "masked / clipped fraction"))
    panels += (("rollout_train_kl", "KL(mu || pi) over the updates (actor/ppo_kl)"),)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0))
    for index, (arm, done) in enumerate(completed.items()):
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


def per_seed_table(summary: dict) -> str:
    """Final reward per arm and seed, "(locked)" marking the runs that locked in, "(collapsed)" the collapses."""
    seeds = sorted({seed for s in summary.values() for seed in s["per_seed"]})
    lines = ["| arm | " + " | ".join(f"seed {seed}" for seed in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for arm, s in summary.items():
        cells = []
        for seed in seeds:
            run = s["per_seed"].get(seed)
            if run is None:
                cells.append("")
                continue
            marks = " (locked)" * bool(run["locked_in"]) + " (collapsed)" * bool(run["collapsed"])
            cells.append(f"{run['final_reward']:.2f}{marks}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
