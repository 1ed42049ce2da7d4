"""CPPO regression on a tiny model through verl's real trainer (``python -m verl.trainer.main_ppo``) on CPU.

Each arm is one ``main_ppo`` run (Ray, the v1 trainer, the FSDP2 engine, verl's vLLM rollout on vLLM's CPU
build, the reward loop) on the tiny copy task of ``verl_cppo.testing.tiny_task``, with fixed seeds:

  cppo     loss_mode=cppo (paper defaults), bypass mode: anchored on the rollout log-probs
  dppo_tv  verl's DPPO-Binary-TV, bypass mode (DPPO is defined against the rollout policy), delta = 0.15
           (CPPO's delta) on both sides and CPPO's ratio cap 20: CPPO without position weights and budget
  vanilla  PPO clip-higher (0.2 / 0.28), old log-probs recomputed by the actor (verl's default, what GRPO
           users run); its rollout-vs-actor log-prob gap also checks verl's weight sync into vLLM

OUTDIR/metrics.json is ``{arm: [{"step", "reward", "masked_frac", <every numeric verl metric>}, ...]}``,
OUTDIR/reward.png plots reward and masked fraction per arm and, for the CPPO arms, the share of masked tokens
the prefix budget masked and the mean delta_b; OUTDIR/<arm>/main_ppo.log keeps verl's output (and its
progress bar). The terminal gets one line per step with the elapsed time and an ETA: the mean step time so
far (verl's ``timing_s/step``) times the steps left, and with more arms to run, those arms projected at this
arm's wall time.
The checks (``check``) compare with ``ci/golden/tiny_regression.json``; see ci/README.md for how its
tolerances were measured. Exit status 0 only when every check passed.

    python ci/tiny_regression.py OUTDIR [--arms cppo,dppo_tv,vanilla] [--seed 0] [--no-golden] [--override K=V]
                                        [--rollout vllm|hf_cpu]

``--rollout hf_cpu`` (the project's HF server, ``verl_cppo.testing.cpu_rollout``) serves the environment
without vLLM (``.venv``: the stability study and the main_ppo tests there); it has no golden values.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GOLDEN = os.path.join(HERE, "golden", "tiny_regression.json")
ARMS = ("cppo", "dppo_tv", "vanilla")
EXTRA_ARMS = ("cppo_topk_tv",)
"""Arms run only when named in --arms (no golden values): tests/testing/test_vllm_cpu.py runs cppo_topk_tv."""
RESPONSE_LENGTH = 8

ARM_OVERRIDES = {
    "cppo": [
        "actor_rollout_ref.actor.policy_loss.loss_mode=cppo",
        "algorithm.rollout_correction.bypass_mode=True",
    ],
    "dppo_tv": [
        "actor_rollout_ref.actor.policy_loss.loss_mode=dppo_tv",
        "algorithm.rollout_correction.bypass_mode=True",
        "actor_rollout_ref.actor.clip_ratio_low=0.15",
        "actor_rollout_ref.actor.clip_ratio_high=0.15",
        "actor_rollout_ref.actor.clip_ratio_c=20.0",
    ],
    "vanilla": [
        "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla",
        "algorithm.rollout_correction.bypass_mode=False",
        "actor_rollout_ref.actor.clip_ratio_low=0.2",
        "actor_rollout_ref.actor.clip_ratio_high=0.28",
    ],
}
ARM_OVERRIDES["cppo_topk_tv"] = [
    *ARM_OVERRIDES["cppo"],
    "actor_rollout_ref.actor.policy_loss._target_=verl_cppo.config.CPPOPolicyLossConfig",
    "+actor_rollout_ref.actor.policy_loss.cppo.divergence=topk_tv",
    "+actor_rollout_ref.actor.policy_loss.cppo.topk=4",  # of the tiny model's 10-token vocabulary
]
MASKED_KEY = {
    "cppo": "actor/cppo_masked_frac",
    "cppo_topk_tv": "actor/cppo_masked_frac",
    "dppo_tv": "actor/pg_clipfrac",
    "vanilla": "actor/pg_clipfrac",
}
"""The fraction of valid tokens each loss drops from the gradient (masked or clipped)."""

CPU_ENV = {
    "VERL_CPPO_CPU_TESTING": "1",
    "VERL_PLATFORM": "cpu",
    "VERL_USE_EXTERNAL_MODULES": "verl_cppo.testing.register",
}


def rollout_env(args: argparse.Namespace) -> dict[str, str]:
    """Environment of main_ppo and its Ray workers for the chosen rollout backend."""
    if args.rollout == "vllm":
        from verl_cppo.testing.vllm_cpu import VLLM_CPU_ENV

        return dict(VLLM_CPU_ENV)
    return {}


def rollout_overrides(args: argparse.Namespace) -> list[str]:
    """hf_cpu: per-request seeds (full_determinism). vllm: verl's vLLM rollout on vLLM's CPU build, whose
    full_determinism gives every sample of a prompt the same seed and request id (identical groups, zero
    advantage), so there the engine's seed alone seeds the run."""
    if args.rollout == "vllm":
        from verl_cppo.testing.vllm_cpu import VLLM_CPU_OVERRIDES

        return [*VLLM_CPU_OVERRIDES, "actor_rollout_ref.rollout.full_determinism=False"]
    return ["actor_rollout_ref.rollout.name=hf_cpu", "actor_rollout_ref.rollout.full_determinism=True"]


def common_overrides(task: dict, args: argparse.Namespace, metrics_path: str) -> list[str]:
    """The main_ppo command line shared by every arm (CPU plumbing, task, batch sizes, seeds)."""
    env = {**CPU_ENV, "VERL_FILE_LOGGER_PATH": metrics_path, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.update(rollout_env(args))
    estimator = [f"algorithm.adv_estimator={args.adv_estimator}"]
    if args.adv_estimator == "grpo":
        estimator.append("algorithm.norm_adv_by_std_in_grpo=False")  # the paper's mean-centring
    return [
        *estimator,
        "algorithm.use_kl_in_reward=False",
        # task: 32 prompts x 8 samples per step, 8-token answers, 4 updates (mini-batches) per step
        f"data.train_files={task['train']}",
        f"data.val_files={task['val']}",
        "data.train_batch_size=32",
        "data.max_prompt_length=16",
        f"data.max_response_length={RESPONSE_LENGTH}",
        f"data.seed={args.seed}",
        "data.filter_overlong_prompts=False",
        "data.truncation=error",
        "data.dataloader_num_workers=0",
        f"actor_rollout_ref.model.path={task['model']}",
        "actor_rollout_ref.model.use_remove_padding=False",
        "actor_rollout_ref.model.enable_gradient_checkpointing=False",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        # actor: FSDP2 in fp32 (FSDP1 and bf16 autocast are GPU paths)
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.actor.fsdp_config.model_dtype=fp32",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision.reduce_dtype=fp32",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision.buffer_dtype=fp32",
        "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
        "actor_rollout_ref.actor.use_torch_compile=False",
        f"actor_rollout_ref.actor.fsdp_config.seed={args.seed}",
        "actor_rollout_ref.actor.fsdp_config.full_determinism=True",
        "actor_rollout_ref.actor.ppo_mini_batch_size=8",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=64",
        f"actor_rollout_ref.actor.optim.lr={args.lr}",
        "actor_rollout_ref.actor.optim.weight_decay=0",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.actor.entropy_coeff=0",
        # the paper's aggregation: sum over tokens / constant horizon, mean over sequences
        "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm",
        f"actor_rollout_ref.actor.loss_scale_factor={RESPONSE_LENGTH}",
        # rollout: the chosen backend (rollout_overrides), rollout log-probs
        *rollout_overrides(args),
        "actor_rollout_ref.rollout.n=8",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.dtype=float32",
        "actor_rollout_ref.rollout.calculate_log_probs=True",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=64",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        f"actor_rollout_ref.rollout.seed={args.seed}",
        "reward.num_workers=1",
        "reward.custom_reward_function.path=pkg://verl_cppo.testing.tiny_task",
        "reward.custom_reward_function.name=compute_score",
        # trainer: one CPU "GPU", no validation or checkpoints, metrics to a JSONL file
        "trainer.device=cpu",
        "trainer.n_gpus_per_node=1",
        "trainer.nnodes=1",
        f"trainer.total_training_steps={args.steps}",
        "trainer.logger=[console,file]",
        "trainer.val_before_train=False",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        "trainer.project_name=verl_cppo_tiny",
        "trainer.v1.sampler.custom_sampler.path=pkg://verl_cppo.testing.replay_buffer",
        "trainer.v1.sampler.custom_sampler.name=PollingReplayBuffer",
        "+trainer.v1.sampler.sampler_kwargs.poll_interval=0.1",
        # Ray on CPU: fake GPU slot for the resource pool; one TransferQueue storage unit (else it hangs)
        "ray_kwargs.ray_init.num_cpus=16",
        "+ray_kwargs.ray_init.num_gpus=1",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
        *[f"+ray_kwargs.ray_init.runtime_env.env_vars.{k}='{v}'" for k, v in env.items()],
    ]


def read_steps(path: str) -> list[dict]:
    """verl's FileLogger JSONL -> [{"step": int, **numeric metrics}] (non-numeric values dropped)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            row = {"step": int(record["step"])}
            for key, value in record["data"].items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    row[key] = float(value)
            rows.append(row)
    return rows


def duration(seconds: float) -> str:
    """42s, 3m05s, 1h02m ("?" when unknown)."""
    if seconds != seconds or seconds < 0:  # NaN
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and value == value and abs(value) != float("inf")


def eta_seconds(rows: list[dict], steps: int) -> float:
    """Seconds left in an arm: the mean of verl's timing_s/step so far times the steps left (NaN if unknown)."""
    times = [r["timing_s/step"] for r in rows if _finite(r.get("timing_s/step"))]
    if not rows or not times:
        return float("nan")
    return sum(times) / len(times) * max(steps - rows[-1]["step"], 0)


def progress_line(
    arm: str,
    row: dict,
    steps: int,
    elapsed: float | None = None,
    eta: float | None = None,
    eta_all: float | None = None,
) -> str:
    masked = row.get(MASKED_KEY[arm], float("nan"))
    line = (
        f"[{arm}] step {row['step']:3d}/{steps}  reward {row.get('critic/score/mean', float('nan')):.3f}  "
        f"masked {masked:.3f}  len {row.get('response_length/mean', float('nan')):.2f}  "
        f"step time {row.get('timing_s/step', float('nan')):.1f}s"
    )
    if elapsed is not None:
        line += f"  elapsed {duration(elapsed)}"
    if eta is not None:
        line += f"  eta {duration(eta)}"
    if eta_all is not None:
        line += f" (all arms {duration(eta_all)})"
    return line


def progress_lines(arm: str, rows: list[dict], shown: int, steps: int, elapsed: float, arms_after: int) -> list[str]:
    """The progress lines of rows[shown:], each with the elapsed time and the ETA as of that row."""
    lines = []
    for i in range(shown, len(rows)):
        eta = eta_seconds(rows[: i + 1], steps)
        eta_all = eta + arms_after * (elapsed + eta) if arms_after else None
        lines.append(progress_line(arm, rows[i], steps, elapsed, eta, eta_all))
    return lines


def run_arm(arm: str, task: dict, args: argparse.Namespace, arms_after: int = 0) -> tuple[list[dict], float, int]:
    """Run one arm through main_ppo; stream one progress line per step. Returns (rows, wall s, exit code)."""
    arm_dir = os.path.join(args.outdir, arm)
    os.makedirs(arm_dir, exist_ok=True)
    metrics_path = os.path.join(arm_dir, "metrics.jsonl")
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    command = [
        sys.executable,
        "-m",
        "verl.trainer.main_ppo",
        *common_overrides(task, args, metrics_path),
        *ARM_OVERRIDES[arm],
        *args.override,
        f"trainer.experiment_name={arm}",
        f"trainer.default_local_dir={arm_dir}/checkpoints",
        f"hydra.run.dir={arm_dir}/hydra",
    ]
    env = {**os.environ, **CPU_ENV, **rollout_env(args), "VERL_FILE_LOGGER_PATH": metrics_path, "PYTHONUNBUFFERED": "1"}
    env.update({"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    print(f"[{arm}] main_ppo starting (log: {arm_dir}/main_ppo.log)", flush=True)
    start = time.time()
    with open(os.path.join(arm_dir, "command.txt"), "w") as f:
        f.write(" \\\n  ".join(command) + "\n")
    with open(os.path.join(arm_dir, "main_ppo.log"), "w") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=arm_dir, start_new_session=True
        )
        shown = 0
        try:
            while proc.poll() is None:
                time.sleep(1.0)
                rows = read_steps(metrics_path)
                for line in progress_lines(arm, rows, shown, args.steps, time.time() - start, arms_after):
                    print(line, flush=True)
                shown = len(rows)
                if time.time() - start > args.arm_timeout:
                    print(f"[{arm}] timed out after {args.arm_timeout} s", flush=True)
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    rows = read_steps(metrics_path)
    for line in progress_lines(arm, rows, shown, args.steps, time.time() - start, arms_after):
        print(line, flush=True)
    wall = time.time() - start
    print(f"[{arm}] main_ppo exited {proc.returncode} after {wall:.0f} s", flush=True)
    for row in rows:
        row["reward"] = row.get("critic/score/mean", float("nan"))
        row["masked_frac"] = row.get(MASKED_KEY[arm], float("nan"))
    return rows, wall, proc.returncode


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
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--adv-estimator", default="cppo_grpo")
    parser.add_argument(
        "--rollout",
        choices=("hf_cpu", "vllm"),
        default="vllm",
        help="vllm: verl's vLLM rollout on vLLM's CPU build (.venv-vllm); hf_cpu: the project's HF server (.venv)",
    )
    parser.add_argument("--arm-timeout", type=float, default=900.0)
    parser.add_argument("--golden", default=GOLDEN)
    parser.add_argument("--no-golden", action="store_true", help="run the sanity checks only")
    parser.add_argument(
        "--override", action="append", default=[], help="one more main_ppo override for every arm (repeatable)"
    )
    args = parser.parse_args()
    args.outdir = os.path.abspath(args.outdir)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS) - set(EXTRA_ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {ARMS + EXTRA_ARMS}")
    os.makedirs(args.outdir, exist_ok=True)

    sys.path.insert(0, HERE)
    from regression_checks import check, summarize

    from verl_cppo.testing import tiny_task

    # vLLM's CPU attention needs a head size >= 32; hf_cpu keeps 16, the stability study's model
    head_dim = 32 if args.rollout == "vllm" else None
    task = tiny_task.build(os.path.join(args.outdir, "task"), seed=args.seed, head_dim=head_dim)
    metrics: dict[str, list[dict]] = {}
    runs: dict[str, dict] = {}
    for index, arm in enumerate(arms):
        rows, wall, code = run_arm(arm, task, args, arms_after=len(arms) - index - 1)
        metrics[arm] = rows
        runs[arm] = {"wall_s": round(wall, 1), "exit_code": code, "steps": len(rows)}
    with open(os.path.join(args.outdir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1, allow_nan=True)
    plot(metrics, os.path.join(args.outdir, "reward.png"))

    golden = None if args.no_golden else json.load(open(args.golden))
    failures = check(metrics, runs, args, golden)
    summary = {"runs": runs, "summary": {arm: summarize(rows) for arm, rows in metrics.items()}, "failures": failures}
    summary["config"] = {k: getattr(args, k) for k in ("steps", "seed", "lr", "adv_estimator", "rollout")}
    if args.override:
        summary["config"]["override"] = args.override
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
