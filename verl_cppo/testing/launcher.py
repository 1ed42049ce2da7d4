"""Run verl's real trainer (``python -m verl.trainer.main_ppo``) on CPU under the CPU test switch.

One home for what every CPU ``main_ppo`` run of this project shares: the environment block (``TEST_ENV``,
``CPU_ENV``), the tiny copy task's command line (``tiny_task_overrides``: batch sizes, the FSDP2 actor in fp32,
verl's vLLM rollout on vLLM's CPU build, one fake GPU slot per rank for Ray), and the subprocess itself
(``run_main_ppo``: its own session, its log, a timeout, verl's per-step metrics read back from verl's
FileLogger JSONL, and one terminal line per start-up phase and per step with the elapsed time and an ETA,
formatted by ``verl_cppo.testing.progress``), and the loss arms the runs compare (``ARMS``; ``run_arm`` runs one
and returns rows that carry ``reward`` and ``masked_frac``). Callers add their own overrides on top (later
Hydra overrides win):

    from verl_cppo.testing import launcher, tiny_task
    task = tiny_task.build(f"{out}/task", seed=0, head_dim=32)
    run = launcher.run_main_ppo(
        f"{out}/cppo",
        [*launcher.tiny_task_overrides(task, steps=5, n_gpus_per_node=2), "trainer.use_v1=False"],
        steps=5,
        env={"VERL_LOGGING_LEVEL": "INFO"},
    )
    run.rows, run.exit_code, run.wall_s

``ci/tiny_regression.py`` (the regression and README's main job), ``ci/multirank_runs.py`` and
``benchmarks/stability/run_study.py`` are thin callers of ``run_arm``; ``tests/conftest.py`` sets ``TEST_ENV``
for the test processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from verl_cppo.config import CPPO_POLICY_LOSS_TARGET
from verl_cppo.config_paths import CPPO_NODE, POLICY_LOSS
from verl_cppo.testing import PLATFORM_NAME, REGISTER_MODULE, SWITCH_ENV
from verl_cppo.testing.progress import duration, phases_in, progress_lines, read_steps
from verl_cppo.testing.vllm_cpu import VLLM_CPU_ENV, VLLM_CPU_OVERRIDES

__all__ = [
    "ARMS",
    "CPU_ENV",
    "REWARD_KEY",
    "TEST_ENV",
    "Arm",
    "Run",
    "arm_rows",
    "cppo_settings",
    "megatron_actor_overrides",
    "run_arm",
    "run_main_ppo",
    "tiny_task_overrides",
]

TEST_ENV = {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
"""Every process of a test or CI run: no W&B, no Hugging Face Hub, no tokenizer thread pools."""
CPU_ENV = {
    SWITCH_ENV: "1",
    "VERL_PLATFORM": PLATFORM_NAME,
    "VERL_USE_EXTERNAL_MODULES": REGISTER_MODULE,
    **VLLM_CPU_ENV,
}
"""The CPU test switch (``verl_cppo.testing``) and vLLM's CPU settings, for the driver and every Ray worker."""
RESPONSE_LENGTH = 8
"""The tiny task's answer length (``data.max_response_length`` and the loss's constant horizon)."""

REWARD_KEY = "critic/score/mean"
"""verl's mean reward of a step's responses (``Run.rows``' ``reward``)."""


def cppo_settings(**settings: object) -> list[str]:
    """Overrides that set ``policy_loss.cppo.<key>`` (on ``CPPOPolicyLossConfig``, the class that holds them)."""
    values = {key: str(value).lower() if isinstance(value, bool) else value for key, value in settings.items()}
    return [
        f"{POLICY_LOSS}._target_={CPPO_POLICY_LOSS_TARGET}",
        *(f"+{CPPO_NODE}.{key}={value}" for key, value in values.items()),
    ]


@dataclass(frozen=True)
class Arm:
    """One loss configuration of the main_ppo runs (on top of ``tiny_task_overrides``)."""

    overrides: tuple[str, ...]
    masked_key: str
    """The metric holding the fraction of valid tokens the arm's loss drops from the gradient (masked or
    clipped): ``masked_frac`` of ``run_arm``'s rows."""


_CPPO = (f"{POLICY_LOSS}.loss_mode=cppo", "algorithm.rollout_correction.bypass_mode=True")
_CPPO_MASKED = "actor/cppo_masked_frac"
_CLIPPED = "actor/pg_clipfrac"
ARMS = {
    "cppo": Arm(_CPPO, _CPPO_MASKED),
    "dppo_tv": Arm(
        (
            f"{POLICY_LOSS}.loss_mode=dppo_tv",
            "algorithm.rollout_correction.bypass_mode=True",
            "actor_rollout_ref.actor.clip_ratio_low=0.15",
            "actor_rollout_ref.actor.clip_ratio_high=0.15",
            "actor_rollout_ref.actor.clip_ratio_c=20.0",
        ),
        _CLIPPED,
    ),
    "vanilla": Arm(
        (
            f"{POLICY_LOSS}.loss_mode=vanilla",
            "algorithm.rollout_correction.bypass_mode=False",
            "actor_rollout_ref.actor.clip_ratio_low=0.2",
            "actor_rollout_ref.actor.clip_ratio_high=0.28",
        ),
        _CLIPPED,
    ),
    # of the tiny model's 10-token vocabulary
    "cppo_topk_tv": Arm((*_CPPO, *cppo_settings(divergence="topk_tv", topk=4)), _CPPO_MASKED),
    "cppo_no_position_weight": Arm((*_CPPO, *cppo_settings(position_weight=False)), _CPPO_MASKED),
    "cppo_no_prefix_budget": Arm((*_CPPO, *cppo_settings(prefix_budget=False)), _CPPO_MASKED),
}
"""The loss arms (ci/tiny_regression.py says what the first three are; the ablations are
benchmarks/stability/README.md's): cppo and dppo_tv anchored on the rollout log-probs (bypass mode), vanilla on
the actor's recomputed old log-probs (verl's default)."""


def tiny_task_overrides(
    task: dict,
    *,
    seed: int = 0,
    lr: float = 1.5e-3,
    steps: int = 20,
    adv_estimator: str = "cppo_grpo",
    n_gpus_per_node: int = 1,
    engine: str = "fsdp2",
) -> list[str]:
    """The main_ppo command line of the tiny copy task (``tiny_task.build``'s ``task``) on CPU.

    32 prompts x 8 samples per step, 8-token answers, 4 updates (mini-batches) per step; the FSDP2 actor in
    fp32 (``engine="megatron"``: verl's Megatron engine instead, ``megatron_actor_overrides``); verl's vLLM
    rollout (engine seed only: vLLM's full_determinism gives every sample of a prompt the same seed, i.e.
    identical groups); ``n_gpus_per_node`` ranks, each a fake Ray GPU slot; no validation, no checkpoints,
    metrics to verl's FileLogger (``run_main_ppo`` sets its path).
    """
    if n_gpus_per_node < 1:
        raise ValueError(f"n_gpus_per_node must be >= 1, got {n_gpus_per_node}")
    if engine not in ("fsdp2", "megatron"):
        raise ValueError(f"engine must be 'fsdp2' or 'megatron', got {engine!r}")
    estimator = [f"algorithm.adv_estimator={adv_estimator}"]
    if adv_estimator == "grpo":
        estimator.append("algorithm.norm_adv_by_std_in_grpo=False")  # the paper's mean-centring
    return [
        *estimator,
        "algorithm.use_kl_in_reward=False",
        f"data.train_files={task['train']}",
        f"data.val_files={task['val']}",
        "data.train_batch_size=32",
        "data.max_prompt_length=16",
        f"data.max_response_length={RESPONSE_LENGTH}",
        f"data.seed={seed}",
        "data.filter_overlong_prompts=False",
        "data.truncation=error",
        "data.dataloader_num_workers=0",
        f"actor_rollout_ref.model.path={task['model']}",
        "actor_rollout_ref.model.enable_gradient_checkpointing=False",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        *(megatron_actor_overrides(seed) if engine == "megatron" else _fsdp2_actor_overrides(seed)),
        "actor_rollout_ref.actor.use_torch_compile=False",
        "actor_rollout_ref.actor.ppo_mini_batch_size=8",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=64",
        f"actor_rollout_ref.actor.optim.lr={lr}",
        "actor_rollout_ref.actor.optim.weight_decay=0",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.actor.entropy_coeff=0",
        # the paper's aggregation: sum over tokens / constant horizon, mean over sequences
        "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm",
        f"actor_rollout_ref.actor.loss_scale_factor={RESPONSE_LENGTH}",
        # rollout: verl's vLLM rollout on vLLM's CPU build, with the rollout's log-probs
        *VLLM_CPU_OVERRIDES,
        "actor_rollout_ref.rollout.full_determinism=False",
        "actor_rollout_ref.rollout.n=8",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.dtype=float32",
        "actor_rollout_ref.rollout.calculate_log_probs=True",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=64",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        f"actor_rollout_ref.rollout.seed={seed}",
        "reward.num_workers=1",
        "reward.custom_reward_function.path=pkg://verl_cppo.testing.tiny_task",
        "reward.custom_reward_function.name=compute_score",
        # trainer: fake GPU slots on CPU, no validation or checkpoints, metrics to a JSONL file
        "trainer.device=cpu",
        f"trainer.n_gpus_per_node={n_gpus_per_node}",
        "trainer.nnodes=1",
        f"trainer.total_training_steps={steps}",
        "trainer.logger=[console,file]",
        "trainer.val_before_train=False",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        "trainer.project_name=verl_cppo_tiny",
        "trainer.v1.sampler.custom_sampler.path=pkg://verl_cppo.testing.replay_buffer",
        "trainer.v1.sampler.custom_sampler.name=PollingReplayBuffer",
        "+trainer.v1.sampler.sampler_kwargs.poll_interval=0.1",
        # Ray on CPU: one fake GPU slot per rank for the resource pool; one TransferQueue storage unit; no
        # dashboard (a dozen processes that start with Ray and poll through the run, for nobody to look at)
        "ray_kwargs.ray_init.num_cpus=16",
        "+ray_kwargs.ray_init.include_dashboard=False",
        f"+ray_kwargs.ray_init.num_gpus={n_gpus_per_node}",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
    ]


def _fsdp2_actor_overrides(seed: int) -> list[str]:
    """The FSDP2 actor in fp32 (FSDP1 and bf16 autocast are GPU paths), padded (callers may pack)."""
    return [
        "actor_rollout_ref.model.use_remove_padding=False",
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.actor.fsdp_config.model_dtype=fp32",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision.reduce_dtype=fp32",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision.buffer_dtype=fp32",
        "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
        f"actor_rollout_ref.actor.fsdp_config.seed={seed}",
        "actor_rollout_ref.actor.fsdp_config.full_determinism=True",
    ]


def megatron_actor_overrides(seed: int, *, tp: int = 1, cp: int = 1) -> list[str]:
    """verl's Megatron trainer config (``model_engine=megatron``) with the engine the CPU equivalence proves:
    ``cpu_megatron.PROVEN_ENGINE`` (mbridge, THD packing, distributed optimizer), float32, no sequence
    parallelism, ``OVERRIDE_TRANSFORMER_CONFIG`` (no CUDA fusions, no dropout), the shard-local CPPO loss
    (``PROVEN_EXTERNAL_LIB``; binary TV only: the driver refuses Top-K with it), TP = ``tp`` and CP = ``cp``."""
    from verl_cppo.testing.cpu_megatron import OVERRIDE_TRANSFORMER_CONFIG, PROVEN_ENGINE, PROVEN_EXTERNAL_LIB

    megatron = "actor_rollout_ref.actor.megatron"
    engine = {
        k: "null" if v is None else v for k, v in PROVEN_ENGINE.items() if k not in ("strategy", "use_remove_padding")
    }
    return [
        "model_engine=megatron",  # verl's megatron_actor / megatron_ref / megatron_critic configs
        "actor_rollout_ref.model.use_remove_padding=True",  # PROVEN_ENGINE's THD packing, read from the model
        f"actor_rollout_ref.model.external_lib={PROVEN_EXTERNAL_LIB}",
        # "++": fields of McoreEngineConfig that megatron.yaml may not list
        *(f"++{megatron}.{k}={v}" for k, v in engine.items()),
        f"{megatron}.dtype=float32",
        f"{megatron}.sequence_parallel=False",
        f"{megatron}.tensor_model_parallel_size={tp}",
        f"{megatron}.context_parallel_size={cp}",
        f"{megatron}.seed={seed}",
        *(f"++{megatron}.override_transformer_config.{k}={v}" for k, v in OVERRIDE_TRANSFORMER_CONFIG.items()),
    ]


@dataclass
class Run:
    """One finished main_ppo run."""

    rows: list[dict]
    """verl's metrics per step (``read_steps``)."""
    exit_code: int
    wall_s: float
    log_path: str
    phases: list[tuple[float, str]] = field(default_factory=list)
    """(seconds since launch, phase of ``PHASES``) in the order they appeared in the log."""


def run_main_ppo(
    run_dir: str,
    overrides: Sequence[str],
    *,
    steps: int,
    env: dict[str, str] | None = None,
    label: str = "main_ppo",
    timeout_s: float = 900.0,
    arms_after: int = 0,
    masked_key: str = "actor/pg_clipfrac",
    say: Callable[[str], None] = lambda line: print(line, flush=True),
) -> Run:
    """Run ``python -m verl.trainer.main_ppo *overrides`` in ``run_dir`` under the CPU test switch.

    ``env`` is added to the environment of the driver and of every Ray worker (``runtime_env.env_vars``),
    on top of ``TEST_ENV`` and ``CPU_ENV``. verl's output goes to ``run_dir/main_ppo.log``, the command to
    ``run_dir/command.txt``; ``say`` gets one line per start-up phase and one per finished step (elapsed time,
    ETA for this run and, with ``arms_after`` more runs like it to go, for all of them). The process runs in its
    own session; at ``timeout_s``, or if the caller is interrupted, its whole group (Ray included) is stopped.
    """
    run_dir = os.path.abspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    worker_env = {**TEST_ENV, **CPU_ENV, "VERL_FILE_LOGGER_PATH": metrics_path, **(env or {})}
    command = [
        sys.executable,
        "-m",
        "verl.trainer.main_ppo",
        *overrides,
        *[f"+ray_kwargs.ray_init.runtime_env.env_vars.{k}='{v}'" for k, v in worker_env.items()],
        f"trainer.experiment_name={label}",
        f"trainer.default_local_dir={run_dir}/checkpoints",
        f"hydra.run.dir={run_dir}/hydra",
    ]
    with open(os.path.join(run_dir, "command.txt"), "w") as f:
        f.write(" \\\n  ".join(command) + "\n")
    log_path = os.path.join(run_dir, "main_ppo.log")
    process_env = {**os.environ, **worker_env, "PYTHONUNBUFFERED": "1"}
    say(f"[{label}] starting main_ppo: Ray, the actor, the vLLM server (log: {log_path})")
    start = time.time()
    watcher = _Watcher(label, steps, arms_after, masked_key, say, start)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=process_env, cwd=run_dir, start_new_session=True
        )
        try:
            while proc.poll() is None:
                time.sleep(1.0)
                watcher.poll(log_path, metrics_path)
                if time.time() - start > timeout_s:
                    say(f"[{label}] timed out after {timeout_s:.0f} s")
                    os.killpg(proc.pid, signal.SIGTERM)
                    try:
                        proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        pass
        finally:  # also when the caller is stopped: no Ray cluster is left behind
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    watcher.poll(log_path, metrics_path)
    wall = time.time() - start
    say(f"[{label}] main_ppo exited {proc.returncode} after {duration(wall)}")
    return Run(read_steps(metrics_path), proc.returncode, wall, log_path, watcher.phases)


def run_arm(
    run_dir: str,
    arm: str | Arm,
    overrides: Sequence[str],
    *,
    after: Sequence[str] = (),
    steps: int,
    label: str,
    timeout_s: float = 900.0,
    arms_after: int = 0,
    env: dict[str, str] | None = None,
) -> Run:
    """One arm (a name of ``ARMS`` or an ``Arm``) through ``run_main_ppo``: ``overrides`` (the task's command
    line), then the arm's, then ``after`` (later Hydra overrides win). Every row of the result also carries
    ``reward`` (``REWARD_KEY``) and ``masked_frac`` (the arm's ``masked_key``), NaN where verl did not log them."""
    arm = ARMS[arm] if isinstance(arm, str) else arm
    run = run_main_ppo(
        run_dir,
        [*overrides, *arm.overrides, *after],
        steps=steps,
        env=env,
        label=label,
        timeout_s=timeout_s,
        arms_after=arms_after,
        masked_key=arm.masked_key,
    )
    arm_rows(run.rows, arm)
    return run


def arm_rows(rows: list[dict], arm: str | Arm) -> list[dict]:
    """``rows`` (verl's metrics per step) with ``reward`` and ``masked_frac`` added (NaN where verl did not log
    them), as ``run_arm`` returns them; also for a finished run's metrics read back with ``read_steps``."""
    arm = ARMS[arm] if isinstance(arm, str) else arm
    for row in rows:
        row["reward"] = row.get(REWARD_KEY, float("nan"))
        row["masked_frac"] = row.get(arm.masked_key, float("nan"))
    return rows


class _Watcher:
    """Turns a growing main_ppo.log and metrics JSONL into progress lines (each phase and step once)."""

    def __init__(self, label, steps, arms_after, masked_key, say, start):
        self.label, self.steps, self.arms_after, self.masked_key = label, steps, arms_after, masked_key
        self.say, self.start = say, start
        self.offset, self.pending, self.shown = 0, "", 0
        self.phases: list[tuple[float, str]] = []

    def poll(self, log_path: str, metrics_path: str) -> None:
        elapsed = time.time() - self.start
        if os.path.exists(log_path):
            with open(log_path, errors="replace") as f:
                f.seek(self.offset)
                text = self.pending + f.read()
                self.offset = f.tell()
            lines = text.split("\n")
            self.pending = lines.pop()  # an unfinished last line waits for the next poll
            for message in phases_in(lines, {message for _, message in self.phases}):
                self.phases.append((elapsed, message))
                self.say(f"[{self.label}] {message}  elapsed {duration(elapsed)}")
        rows = read_steps(metrics_path)
        lines = progress_lines(self.label, rows, self.shown, self.steps, elapsed, self.arms_after, self.masked_key)
        for line in lines:
            self.say(line)
        self.shown = max(self.shown, len(rows))
