"""The tiny regression's CPPO arms through ``main_ppo`` on two CPU ranks (gloo), beside the one-rank run.

Layouts (each arm of the tiny regression runs once per layout through ``verl_cppo.testing.launcher``, with
verl's vLLM rollout on vLLM's CPU build):
  one   trainer.n_gpus_per_node=1                                   (FSDP2, one rank; the reference)
  dp2   trainer.n_gpus_per_node=2                                   (FSDP2 DP = 2)
  sp2   trainer.n_gpus_per_node=2, ulysses_sequence_parallel_size=2 (DP = 1, Ulysses SP = 2)
Every layout packs sequences (``use_remove_padding=True``, which Ulysses needs) and uses the CPU test platform's
packed attention ``cpu_varlen`` (hook ``cpu_varlen_attention`` in patches/README.md), so the three differ only
in the layout. The rollout is one vLLM replica per trainer rank (``rollout.tensor_model_parallel_size=1``: verl builds
n_gpus / TP replicas); a TP = 2 replica would need vLLM's CPU build to run its own two-process executor.
Arms: ``cppo`` (binary TV) and ``cppo_topk_tv``, both with ``adv_estimator=cppo_grpo`` (the regression's
default). On the tiny task a group's 8 answers all score the same only once the policy is near-deterministic
(reward above ~0.95, after about 15 steps), so ``--unsolvable-every 4`` makes every 4th prompt unsolvable
(``tiny_task.write_data``): its group scores 0 throughout and is excluded at every step, on every layout.

OUTDIR/<layout>/metrics.json (every metric), OUTDIR/summary.json (the panels' metrics, loss, Top-K coverage
and step time per step, exit code and wall time per run) and OUTDIR/multirank.png (reward, masked fraction,
delta_b, grad norm, excluded-response share per step, layouts side by side per arm). The sampled rollouts
differ between layouts (one replica vs two, each seeded), so these runs show that the layouts train alike; the
step-for-step equality of the update is tests/e2e/test_multirank_equivalence.py's (one recorded rollout
replayed through verl's worker path).

    python -m ci.multirank_runs OUTDIR [--layouts one,dp2,sp2] [--arms cppo,cppo_topk_tv] [--steps 10]
        [--unsolvable-every K]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

LAYOUT_OVERRIDES = {
    "one": [],
    "dp2": [  # 64 responses per mini-batch -> 32 per rank; verl needs them divisible by the micro-batch size
        "trainer.n_gpus_per_node=2",
        "ray_kwargs.ray_init.num_gpus=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=32",
    ],
    "sp2": [
        "trainer.n_gpus_per_node=2",
        "ray_kwargs.ray_init.num_gpus=2",
        "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2",
    ],
}
PACKED = [  # every layout: packed sequences and the CPU packed attention (later overrides win in Hydra)
    "actor_rollout_ref.model.use_remove_padding=True",
    "actor_rollout_ref.model.override_config.attn_implementation=cpu_varlen",
]
PANELS = ("reward", "masked_frac", "actor/cppo_delta_b_mean", "actor/grad_norm", "cppo_grpo/excluded_response_frac")
SUMMARY_KEYS = (*PANELS, "actor/pg_loss", "actor/cppo_topk_coverage", "timing_s/step")
"""Per-step metrics kept in OUTDIR/summary.json (the compact record of the runs; metrics.json has them all)."""


def plot(results: dict[str, dict[str, list[dict]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = sorted({arm for per_arm in results.values() for arm in per_arm})
    fig, axes = plt.subplots(len(arms), len(PANELS), figsize=(4 * len(PANELS), 3.2 * len(arms)), squeeze=False)
    for row, arm in enumerate(arms):
        for col, key in enumerate(PANELS):
            ax = axes[row][col]
            for layout, per_arm in results.items():
                points = [(r["step"], r[key]) for r in per_arm.get(arm, []) if key in r and r[key] == r[key]]
                if points:
                    ax.plot(*zip(*points), marker=".", label=layout)
            ax.set(title=f"{arm}: {key}", xlabel="step")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def check(summary: dict[str, dict], steps: int, unsolvable_every: int) -> list[str]:
    """The runs' sanity checks (``summary``: OUTDIR/summary.json): each run exited 0 after every step with
    finite reward, masked fraction and grad norm; its reward rose as the tiny regression's cppo must (the mean
    of its last ``last_window`` steps at least the scaled ``cppo_rise_min`` above its first step); with
    unsolvable prompts, cppo_grpo excluded responses at every step (their all-zero groups); the Top-K arm's
    coverage is in (0, 1] at every step."""
    from ci import regression_checks

    rise_min = regression_checks.scaled_limits(regression_checks.DEFAULT_CHECKS, steps)["cppo_rise_min"]
    window = regression_checks.last_window(steps)
    problems = []
    for name, run in summary.items():
        if run["exit_code"] != 0 or run["steps"] != steps:
            problems.append(f"{name}: exit {run['exit_code']} after {run['steps']} of {steps} steps")
            continue
        for key in ("reward", "masked_frac", "actor/grad_norm"):
            if not all(isinstance(v, float) and math.isfinite(v) for v in run[key]):
                problems.append(f"{name}: non-finite {key}: {run[key]}")
        rewards = run["reward"]
        rise = sum(rewards[-window:]) / window - rewards[0]
        if not rise >= rise_min:
            problems.append(f"{name}: reward rose {rise:.3f} (last {window} steps vs first), needs >= {rise_min:.3f}")
        excluded = run["cppo_grpo/excluded_response_frac"]
        if unsolvable_every and not all(v and v > 0 for v in excluded):
            problems.append(f"{name}: cppo_grpo excluded no response in some step: {excluded}")
        if "topk" in name and not all(v is not None and 0 < v <= 1 for v in run["actor/cppo_topk_coverage"]):
            problems.append(f"{name}: Top-K coverage outside (0, 1]: {run['actor/cppo_topk_coverage']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir")
    parser.add_argument("--layouts", default="one,dp2,sp2")
    parser.add_argument("--arms", default="cppo,cppo_topk_tv")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arm-timeout", type=float, default=1200.0)
    parser.add_argument(
        "--unsolvable-every", type=int, default=0, help="every k-th prompt unsolvable: cppo_grpo excludes its group"
    )
    args = parser.parse_args(argv)
    outdir = os.path.abspath(args.outdir)
    from verl_cppo.testing import launcher, tiny_task

    task = tiny_task.build(
        os.path.join(outdir, "task"), seed=args.seed, head_dim=32, unsolvable_every=args.unsolvable_every
    )
    results: dict[str, dict[str, list[dict]]] = {}
    codes = {}
    for layout in args.layouts.split(","):
        results[layout] = {}
        for arm in args.arms.split(","):
            run = launcher.run_arm(
                os.path.join(outdir, layout, arm),
                arm,
                launcher.tiny_task_overrides(task, seed=args.seed, steps=args.steps),
                after=[*PACKED, *LAYOUT_OVERRIDES[layout]],
                steps=args.steps,
                label=f"{layout}/{arm}",
                timeout_s=args.arm_timeout,
            )
            results[layout][arm] = run.rows
            codes[f"{layout}/{arm}"] = {
                "exit_code": run.exit_code,
                "wall_s": round(run.wall_s, 1),
                "steps": len(run.rows),
            }
        with open(os.path.join(outdir, layout, "metrics.json"), "w") as f:
            json.dump(results[layout], f, indent=1, allow_nan=True)
    plot(results, os.path.join(outdir, "multirank.png"))
    with open(os.path.join(outdir, "runs.json"), "w") as f:
        json.dump(codes, f, indent=1)
    summary = {
        f"{layout}/{arm}": {**codes[f"{layout}/{arm}"], **{k: [row.get(k) for row in rows] for k in SUMMARY_KEYS}}
        for layout, per_arm in results.items()
        for arm, rows in per_arm.items()
    }
    with open(os.path.join(outdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, allow_nan=True)
    problems = check(summary, args.steps, args.unsolvable_every)
    print("\n".join(["multirank checks:", *problems]) if problems else "multirank checks: all passed")
    print(json.dumps(codes))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
