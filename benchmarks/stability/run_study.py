"""Seeded stability study: CPPO vs DPPO (at its own and at a matched tighter delta) and CPPO's ablations.

Every run is one ``python -m verl.trainer.main_ppo`` on CPU with the same trainer, rollout (verl's vLLM rollout
on vLLM's CPU build), model and data as ``ci/tiny_regression.py``, launched by ``verl_cppo.testing.launcher``
(the tiny task's shared command line, the CPU environment, the subprocess); this study appends its regime on
top (later Hydra overrides win):

* the reward of ``prefix_reward.py``: 64-word copy answers, each earlier mistake costs 10% of every later credit;
* 16 prompts x 8 samples per step, mini-batches of 2 prompts and 2 epochs: 16 optimizer updates per rollout,
  so the last mini-batches are trained far from the rollout policy mu;
* a learning rate of 5e-3 (the regression's is 1.5e-3 with 4 updates per rollout).

Arms (the loss and its anchoring; everything else identical):

  cppo                     loss_mode=cppo, paper defaults (binary TV), anchored on mu (bypass mode)
  dppo_tv                  verl's dppo_tv, delta 0.15 both sides, ratio cap 20, anchored on mu
  dppo_tv_matched          dppo_tv with delta MATCHED_DELTA: calibrated on seed 0 so that its masked fraction
                           matches cppo's (is CPPO's effect its cumulative prefix budget, or only tightness?)
  cppo_topk_tv             cppo with divergence=topk_tv, K = 4 (vLLM's top-K log-probs, the paper's divergence)
  cppo_no_position_weight  cppo with cppo.position_weight=false (w_t = 1)
  cppo_no_prefix_budget    cppo with cppo.prefix_budget=false (the position-weighted token test only)
  vanilla                  PPO clip-higher 0.2 / 0.28 on the actor's recomputed old log-probs (first round only)

A seed fixes the model's initialisation, the data order, the actor and the rollout's per-request seeds, and
every arm gets the same seeds (SEEDS: 10 for the three main arms, 5 for the others). Runs are still not
bit-identical (ci/README.md: the TransferQueue agent loop assigns the rollout's per-request seeds in arrival
order), which is why the study reports spreads and paired tests (``stats.py``).

Resumable: RESULTS (default ``benchmarks/stability/results.json``) is rewritten after every run, and a run
already there that completed every step with the same configuration is not run again. Runs go seed by seed
(all arms of seed 0, then seed 1, ...), so an interrupted study has comparable arms. The summary (per-arm
statistics and the paired comparisons of COMPARISONS) goes to ``summary.json`` next to RESULTS, the plot to PLOT.

    python -m benchmarks.stability.run_study [--arms cppo,dppo_tv,...] [--seeds 0,1,2] [--steps 24]
        [--lr 5e-3] [--matched-delta D] [--results PATH] [--plot PATH] [--run-dir DIR] [--override K=V]
        [--summarize-only]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import signal
import sys

from benchmarks.stability import prefix_reward, report, round3
from verl_cppo.config_paths import POLICY_LOSS
from verl_cppo.testing import launcher

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

RESPONSE_LENGTH = prefix_reward.ANSWER_LENGTH
MAX_PROMPT = 16  # the tiny task's data.max_prompt_length
SAMPLES_PER_PROMPT = 8  # the regression's rollout.n
MATCHED_DELTA = 0.0625
"""dppo_tv_matched's delta (clip_ratio_low = clip_ratio_high), calibrated on seed 0 (README: "Calibrating")."""
ARMS = (
    "cppo",
    "dppo_tv",
    "dppo_tv_matched",
    "cppo_topk_tv",
    "cppo_no_position_weight",
    "cppo_no_prefix_budget",
    "vanilla",
    "cppo_permuted_prefix",
)
STUDY_LOSSES = {"cppo_permuted_prefix": "benchmarks.stability.permuted_prefix"}
"""Arms whose loss mode this folder registers: the module joins VERL_USE_EXTERNAL_MODULES in every process."""
SEEDS = {"cppo": range(10), "dppo_tv": range(10), "dppo_tv_matched": range(10), "cppo_permuted_prefix": range(10)}
"""The default seeds per arm; arms not listed get DEFAULT_SEEDS. The arms listed are the main ones: their runs go
seed by seed before the others'."""
DEFAULT_SEEDS = range(5)
DEFAULT_ARMS = ARMS[:-2]
"""The second round's arms (vanilla was measured in the first round only)."""

ROUND3 = {
    "arms": "cppo,cppo_permuted_prefix,dppo_tv_matched",
    "seeds": ",".join(str(seed) for seed in range(10)),
    "steps": 50,
    "lr": 1e-3,
    "mini_batch": 4,
    "epochs": 2,
    "answer_length": 32,
    "matched_delta": 0.0452,
    "results": os.path.join(HERE, "round3", "results.json"),
    "run_dir": os.path.join(ROOT, "out", "stability3"),
}
"""``--round 3``'s defaults: the third round's arms, seeds and regime (README, "Third round"; the regime from
its calibration runs)."""

PER_STEP_FIELDS = {
    "rewards": "reward",  # launcher.REWARD_KEY
    "masked_frac": "masked_frac",  # the arm's masked_key
    "grad_norm": "actor/grad_norm",
    "rollout_train_kl": "actor/ppo_kl",  # k1 estimate of KL(mu || pi) over the step's updates, anchored on mu
    "pg_loss": "actor/pg_loss",
    "response_length": "response_length/mean",
    "step_time_s": "timing_s/step",
}
"""results.json field -> key of launcher.run_arm's rows (a verl metric, or the reward / masked fraction the
launcher adds), per step."""


def arm_of(name: str, args: argparse.Namespace) -> launcher.Arm:
    """The arm ``launcher.ARMS`` names; dppo_tv_matched is dppo_tv with its delta set to ``args.matched_delta``;
    a STUDY_LOSSES arm is its loss mode anchored on mu, as cppo."""
    if name in STUDY_LOSSES:
        cppo = launcher.ARMS["cppo"]
        return launcher.Arm((*cppo.overrides, f"{POLICY_LOSS}.loss_mode={name}"), cppo.masked_key)
    if name != "dppo_tv_matched":
        return launcher.ARMS[name]
    delta = args.matched_delta
    if not 0.0 < delta <= 1.0:
        raise ValueError(f"--matched-delta must be in (0, 1], got {delta}")
    dppo_tv = launcher.ARMS["dppo_tv"]
    matched = (f"actor_rollout_ref.actor.clip_ratio_low={delta}", f"actor_rollout_ref.actor.clip_ratio_high={delta}")
    return launcher.Arm((*dppo_tv.overrides, *matched), dppo_tv.masked_key)


def arm_env(name: str) -> dict[str, str] | None:
    """The processes' environment for a STUDY_LOSSES arm: its module imported by ``import verl`` everywhere,
    and this repository on the path of the driver and the Ray workers (which start in other directories)."""
    if name not in STUDY_LOSSES:
        return None
    modules = f"{launcher.CPU_ENV['VERL_USE_EXTERNAL_MODULES']},{STUDY_LOSSES[name]}"
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return {"VERL_USE_EXTERNAL_MODULES": modules, "PYTHONPATH": path}


def regime_overrides(args: argparse.Namespace) -> list[str]:
    """The study's regime, appended after the regression's command line (later overrides win)."""
    return [
        "data.train_batch_size=16",
        f"data.max_response_length={args.answer_length}",
        f"actor_rollout_ref.actor.loss_scale_factor={args.answer_length}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={args.mini_batch}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={args.mini_batch * SAMPLES_PER_PROMPT}",
        f"actor_rollout_ref.actor.ppo_epochs={args.epochs}",
        f"reward.custom_reward_function.path={os.path.join(HERE, 'prefix_reward.py')}",
        "reward.custom_reward_function.name=compute_score",
        f"+reward.custom_reward_function.reward_kwargs.answer_length={args.answer_length}",
    ]


def run_config(args: argparse.Namespace, arm: str = "") -> dict:
    """What must match for a stored run to count as done."""
    matched = {"matched_delta": args.matched_delta} if arm == "dppo_tv_matched" else {}
    return {
        **matched,
        "answer_length": args.answer_length,
        "steps": args.steps,
        "lr": args.lr,
        "mini_batch": args.mini_batch,
        "epochs": args.epochs,
        "adv_estimator": args.adv_estimator,
        "override": list(args.override),
    }


@contextlib.contextmanager
def held(lock_path: str | None):
    """An exclusive flock on ``lock_path`` for the duration (none when it is None): one run per lock, so that
    other users of the machine's Ray lock interleave between the study's runs."""
    if lock_path is None:
        yield
        return
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_one(arm: str, seed: int, task: dict, args: argparse.Namespace) -> dict:
    """One main_ppo run (under ``args.lock``); returns its results.json entry."""
    with held(args.lock):
        return _run_one(arm, seed, task, args)


def _run_one(arm: str, seed: int, task: dict, args: argparse.Namespace) -> dict:
    run_dir = os.path.join(args.run_dir, f"seed{seed}", arm)
    os.makedirs(run_dir, exist_ok=True)
    overrides = launcher.tiny_task_overrides(
        task, seed=seed, lr=args.lr, steps=args.steps, adv_estimator=args.adv_estimator
    )
    run = launcher.run_arm(
        run_dir,
        arm_of(arm, args),
        [*overrides, *regime_overrides(args)],
        after=args.override,
        steps=args.steps,
        label=f"{arm}_seed{seed}",
        timeout_s=args.run_timeout,
        env=arm_env(arm),
    )
    rows, wall = run.rows, run.wall_s
    entry = {"seed": seed}
    for field, key in PER_STEP_FIELDS.items():
        entry[field] = [row.get(key, math.nan) for row in rows]
    if arm.startswith("cppo"):
        entry["masked_by_budget_share"] = [row.get("actor/cppo_masked_by_budget_share", math.nan) for row in rows]
    entry.update({"steps_done": len(rows), "exit_code": run.exit_code, "wall_s": round(wall, 1)})
    entry["config"] = run_config(args, arm)
    rewards = " ".join(f"{r:.2f}" for r in entry["rewards"])
    print(f"[{arm} seed {seed}] exit {run.exit_code}, {len(rows)} steps, {wall:.0f} s; rewards {rewards}", flush=True)
    return entry


def is_complete(entry: dict, args: argparse.Namespace, arm: str = "") -> bool:
    return (
        entry.get("exit_code") == 0
        and entry.get("steps_done") == args.steps
        and entry.get("config") == run_config(args, arm)
    )


def load_results(path: str) -> dict[str, list[dict]]:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def record(arm: str, entry: dict, path: str) -> dict[str, list[dict]]:
    """Merge one run into the results file as it is on disk now (a study call run in between, e.g. a
    calibration trial, may have added to it) and return the merged results."""
    results = load_results(path)
    others = [e for e in results.get(arm, []) if e["seed"] != entry["seed"]]
    results[arm] = sorted([*others, entry], key=lambda e: e["seed"])
    save_json(results, path)
    return results


def seed_task(seed: int, run_dir: str, answer_length: int = RESPONSE_LENGTH) -> dict:
    """The seed's model and data, built once per run directory (task.json marks a finished build)."""
    from verl_cppo.testing import tiny_task

    task_dir = os.path.join(run_dir, f"seed{seed}", "task")
    done = os.path.join(task_dir, "task.json")
    if not os.path.exists(done):  # vLLM's CPU attention needs head size >= 32; prompt and answer must fit
        tiny_task.build(task_dir, seed=seed, head_dim=32, max_positions=MAX_PROMPT + answer_length)
    with open(done) as f:
        return json.load(f)


def save_json(data, path: str) -> None:
    """Write through a temporary file, so an interrupted study never leaves a truncated results.json."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, allow_nan=True)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS))
    parser.add_argument("--seeds", default=None, help="the same seeds for every arm (default: SEEDS per arm)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--matched-delta", type=float, default=MATCHED_DELTA, help="dppo_tv_matched's delta")
    parser.add_argument("--mini-batch", type=int, default=2, help="prompts per mini-batch (of 16 per step)")
    parser.add_argument("--epochs", type=int, default=2, help="passes over each rollout batch")
    parser.add_argument("--answer-length", type=int, default=RESPONSE_LENGTH, help="words per answer (and horizon)")
    parser.add_argument("--adv-estimator", default="cppo_grpo")
    parser.add_argument("--results", default=os.path.join(HERE, "results.json"))
    parser.add_argument("--plot", default=None, help="default: reward_curves.png next to RESULTS")
    parser.add_argument("--run-dir", default=os.path.join(ROOT, "out", "stability"), help="logs and task files")
    parser.add_argument("--run-timeout", type=float, default=900.0, help="seconds before one run is killed")
    parser.add_argument("--override", action="append", default=[], help="one more main_ppo override (repeatable)")
    parser.add_argument("--summarize-only", action="store_true", help="no runs: rewrite summary and plot")
    parser.add_argument("--lock", default=None, help="a file to flock around each run (e.g. the machine's Ray lock)")
    parser.add_argument("--round", type=int, choices=(2, 3), default=2, help="3: ROUND3's arms, seeds and regime")
    known, _ = parser.parse_known_args(argv)
    if known.round == 3:
        unset = sorted(key for key, value in ROUND3.items() if value is None)
        if unset:
            parser.error(f"--round 3: the regime is not fixed yet (ROUND3 {unset}); calibrate first (README)")
        parser.set_defaults(**ROUND3)
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {ARMS}")
    if args.seeds is None:
        plan = {arm: list(SEEDS.get(arm, DEFAULT_SEEDS)) for arm in arms}
    else:
        plan = {arm: [int(s) for s in args.seeds.split(",") if s] for arm in arms}
    seeds = sorted({seed for arm_seeds in plan.values() for seed in arm_seeds})
    args.results = os.path.abspath(args.results)
    args.run_dir = os.path.abspath(args.run_dir)
    plot_path = args.plot or os.path.join(os.path.dirname(args.results), "reward_curves.png")
    os.makedirs(os.path.dirname(args.results), exist_ok=True)

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # run the cleanup in run_one

    results = load_results(args.results)
    main_arms = [arm for arm in arms if arm in SEEDS]
    # the main arms' seeds first (the primary comparison complete as early as possible), then the others
    order = [(seed, group) for group in (main_arms, [a for a in arms if a not in SEEDS]) for seed in seeds]
    for seed, group in [] if args.summarize_only else order:
        task = None
        for arm in [arm for arm in group if seed in plan[arm]]:
            entries = results.setdefault(arm, [])
            if any(e["seed"] == seed and is_complete(e, args, arm) for e in entries):
                print(f"[{arm} seed {seed}] already complete, skipped", flush=True)
                continue
            if task is None:  # the model's initialisation and the data order follow the seed
                task = seed_task(seed, args.run_dir, args.answer_length)
            results = record(arm, run_one(arm, seed, task, args), args.results)

    completed = {arm: [e for e in entries if is_complete(e, args, arm)] for arm, entries in results.items()}
    summary = report.summarize(completed)
    if args.round == 3:
        summary["round3"] = round3.summarize(completed)
    save_json(summary, os.path.join(os.path.dirname(args.results), "summary.json"))
    if summary["arms"]:
        report.plot(completed, plot_path)
        print(report.summary_table(summary["arms"]))
        print(report.per_seed_table(summary["arms"]))
        print(report.comparison_table(summary["comparisons"]))
    if args.round == 3 and summary["arms"]:
        masked = {arm: s["masked_frac_mean"] for arm, s in summary["arms"].items()}
        print(round3.arm_table(summary["round3"]["arms"], masked))
        print(round3.comparison_table(summary["round3"]["comparisons"]))
        print(round3.sensitivity_table(summary["round3"]["comparisons"]))
    incomplete = [
        (arm, s)
        for arm in arms
        for s in plan[arm]
        if not any(e["seed"] == s and is_complete(e, args, arm) for e in results.get(arm, []))
    ]
    if incomplete and not args.summarize_only:
        print(f"incomplete runs: {incomplete}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
