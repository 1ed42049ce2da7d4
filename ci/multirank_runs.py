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
verl's Megatron engine (``model_engine=megatron``, the engine of ``cpu_megatron.PROVEN_ENGINE``: mbridge, THD
packing, distributed optimizer, float32, the shard-local CPPO loss; ``launcher.megatron_actor_overrides``):
  mcore1     trainer.n_gpus_per_node=1                                   (Megatron, one rank)
  mcore_cp2  trainer.n_gpus_per_node=2, megatron.context_parallel_size=2 (DP = 1, CP = 2, zig-zag THD)
  mcore_tp2  trainer.n_gpus_per_node=2, megatron.tensor_model_parallel_size=2 (DP = 1, TP = 2)
The Megatron layouts run binary TV only: the shard-local loss serves ``ppo_loss``, and the driver refuses Top-K
with it (Top-K reaches the loss through verl's gathered path).
Arms: ``cppo`` (binary TV) and ``cppo_topk_tv``, both with ``adv_estimator=cppo_grpo`` (the regression's
default). On the tiny task a group's 8 answers all score the same only once the policy is near-deterministic
(reward above ~0.95, after about 15 steps), so ``--unsolvable-every 4`` makes every 4th prompt unsolvable
(``tiny_task.write_data``): its group scores 0 throughout and is excluded at every step, on every layout.

Every run has the loss probe on (``VERL_CPPO_LOSS_PROBE=1``, ``verl_cppo.testing.loss_probe``): its
``actor/probe_rollout_gap_abs_max`` / ``_mean`` is the rollout-vs-actor log-prob gap of each step,
|log pi_theta - log mu| on the step's first mini-batch, before any update moves pi_theta away from the weights
vLLM sampled with (bypass mode has no verl metric for it: ``training/rollout_probs_diff_*`` needs the actor's
recomputation). The runs import this repository's ``verl_cppo`` (``PYTHONPATH``), in every Ray worker too.

OUTDIR/<layout>/metrics.json (every metric), OUTDIR/summary.json (the panels' metrics, loss, Top-K coverage
and step time per step, exit code and wall time per run) and OUTDIR/multirank.png (reward, masked fraction,
delta_b, grad norm, excluded-response share, log-prob gap per step, layouts side by side per arm). The sampled rollouts
differ between layouts (one replica vs two, each seeded), so these runs show that the layouts train alike; the
step-for-step equality of the update is tests/e2e/test_multirank_equivalence.py's (one recorded rollout
replayed through verl's worker path).

    python -m ci.multirank_runs OUTDIR [--layouts one,dp2,sp2] [--arms cppo,cppo_topk_tv] [--steps 10]
        [--unsolvable-every K]
    python -m ci.multirank_runs OUTDIR --layouts mcore1,mcore_cp2,mcore_tp2 --arms cppo [--reuse]

``--reuse`` reads back the runs already finished in OUTDIR (``<layout>/<arm>/run.json``), so each layout can run
in its own invocation and a last one over all of them writes the plot, summary and checks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
MEGATRON_LAYOUTS = {"mcore1": (1, 1), "mcore_cp2": (1, 2), "mcore_tp2": (2, 1)}
"""Megatron layouts: (TP, CP), one rank each (DP = 1)."""
MEGATRON_ARMS = ("cppo",)
"""Arms the Megatron layouts can run: binary TV through the shard-local loss (Top-K is refused with it)."""
PACKED = [  # every layout: packed sequences and the CPU packed attention (later overrides win in Hydra)
    "actor_rollout_ref.model.use_remove_padding=True",
    "actor_rollout_ref.model.override_config.attn_implementation=cpu_varlen",
]
GAP_MAX, GAP_MEAN = "actor/probe_rollout_gap_abs_max", "actor/probe_rollout_gap_abs_mean"  # loss_probe.GAP_KEYS
SHARD_LOCAL = "actor/probe_shard_local_micro_batches"
PANELS = (
    "reward",
    "masked_frac",
    "actor/cppo_delta_b_mean",
    "actor/grad_norm",
    "cppo_grpo/excluded_response_frac",
    GAP_MAX,
)
LOG_PANELS = (GAP_MAX,)
SUMMARY_KEYS = (*PANELS, GAP_MEAN, SHARD_LOCAL, "actor/pg_loss", "actor/cppo_topk_coverage", "timing_s/step")
"""Per-step metrics kept in OUTDIR/summary.json (the compact record of the runs; metrics.json has them all)."""


def layout_overrides(layout: str) -> list[str]:
    """The overrides that make ``layout`` of the tiny task's command line (after the arm's)."""
    if layout not in MEGATRON_LAYOUTS:
        return [*PACKED, *LAYOUT_OVERRIDES[layout]]
    tp, cp = MEGATRON_LAYOUTS[layout]
    return [
        f"actor_rollout_ref.actor.megatron.tensor_model_parallel_size={tp}",
        f"actor_rollout_ref.actor.megatron.context_parallel_size={cp}",
        f"trainer.n_gpus_per_node={tp * cp}",
        f"ray_kwargs.ray_init.num_gpus={tp * cp}",
    ]


def finished_rows(run_dir: str, arm: str) -> list[dict]:
    """The per-step rows of a finished run in ``run_dir`` as ``launcher.run_arm`` returns them (``--reuse``)."""
    from verl_cppo.testing import launcher
    from verl_cppo.testing.progress import read_steps

    return launcher.arm_rows(read_steps(os.path.join(run_dir, "metrics.jsonl")), arm)


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
            ax.set(title=f"{arm}: {key}", xlabel="step", yscale="log" if key in LOG_PANELS else "linear")
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
    coverage is in (0, 1] at every step; where the loss probe reported it, the rollout-vs-actor log-prob gap
    is at most the regression's ``rollout_actor_prob_gap_max`` at every step (vLLM got the trained weights each
    step); a Megatron CP layout took the shard-local loss in every step."""
    from ci import regression_checks

    rise_min = regression_checks.scaled_limits(regression_checks.DEFAULT_CHECKS, steps)["cppo_rise_min"]
    gap_limit = regression_checks.DEFAULT_CHECKS["rollout_actor_prob_gap_max"]
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
        gaps = run.get(GAP_MAX) or []
        if any(v is not None for v in gaps) and not all(v is not None and 0 <= v <= gap_limit for v in gaps):
            problems.append(f"{name}: rollout vs actor log-prob gap above {gap_limit} (or missing): {gaps}")
        layout = name.split("/")[0]
        if layout in MEGATRON_LAYOUTS and not all(v is not None for v in gaps):
            problems.append(f"{name}: the loss probe reported no rollout vs actor gap in some step: {gaps}")
        if MEGATRON_LAYOUTS.get(layout, (1, 1))[1] > 1 and not all(v and v > 0 for v in run.get(SHARD_LOCAL) or [None]):
            problems.append(f"{name}: the shard-local loss did not run in every step: {run.get(SHARD_LOCAL)}")
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
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="read back a run whose OUTDIR/<layout>/<arm>/run.json exists instead of running it again",
    )
    args = parser.parse_args(argv)
    outdir = os.path.abspath(args.outdir)
    layouts, arms = args.layouts.split(","), args.arms.split(",")
    unknown = [layout for layout in layouts if layout not in LAYOUT_OVERRIDES and layout not in MEGATRON_LAYOUTS]
    if unknown:
        parser.error(f"unknown layouts {unknown}; known: {[*LAYOUT_OVERRIDES, *MEGATRON_LAYOUTS]}")
    if any(layout in MEGATRON_LAYOUTS for layout in layouts) and set(arms) - set(MEGATRON_ARMS):
        parser.error(f"--arms {args.arms}: the Megatron layouts run only {MEGATRON_ARMS} (the shard-local loss)")
    from verl_cppo.testing import launcher, tiny_task
    from verl_cppo.testing.loss_probe import PROBE_ENV

    task = tiny_task.build(
        os.path.join(outdir, "task"), seed=args.seed, head_dim=32, unsolvable_every=args.unsolvable_every
    )
    results: dict[str, dict[str, list[dict]]] = {}
    codes = {}
    env = {"PYTHONPATH": REPO_ROOT, PROBE_ENV: "1"}  # this checkout's verl_cppo in every process; the probe
    for layout in layouts:
        results[layout] = {}
        engine = "megatron" if layout in MEGATRON_LAYOUTS else "fsdp2"
        for arm in arms:
            run_dir = os.path.join(outdir, layout, arm)
            record_path = os.path.join(run_dir, "run.json")
            if args.reuse and os.path.exists(record_path):
                with open(record_path) as f:
                    codes[f"{layout}/{arm}"] = json.load(f)
                results[layout][arm] = finished_rows(run_dir, arm)
                continue
            run = launcher.run_arm(
                run_dir,
                arm,
                launcher.tiny_task_overrides(task, seed=args.seed, steps=args.steps, engine=engine),
                after=layout_overrides(layout),
                steps=args.steps,
                label=f"{layout}/{arm}",
                timeout_s=args.arm_timeout,
                env=env,
            )
            results[layout][arm] = run.rows
            codes[f"{layout}/{arm}"] = {
                "exit_code": run.exit_code,
                "wall_s": round(run.wall_s, 1),
                "steps": len(run.rows),
            }
            with open(record_path, "w") as f:
                json.dump(codes[f"{layout}/{arm}"], f)
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
