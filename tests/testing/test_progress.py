"""The main job's terminal lines (start-up phases; per step the elapsed time and an ETA from the mean step time
so far; verl_cppo.testing.launcher), the launcher's command line, and the plot's panels (ci/tiny_regression.py),
against values worked out by hand."""

import math

import pytest

from ci import tiny_regression
from verl_cppo.testing import launcher, progress


def _row(step, seconds, **extra):
    return {"step": step, "timing_s/step": seconds, "critic/score/mean": 0.5, "actor/cppo_masked_frac": 0.1, **extra}


def test_duration_format():
    assert [progress.duration(s) for s in (0, 42.4, 60, 185, 3600, 3725, float("nan"))] == [
        "0s",
        "42s",
        "1m00s",
        "3m05s",
        "1h00m",
        "1h02m",
        "?",
    ]


def test_eta_is_the_mean_step_time_times_the_steps_left():
    rows = [_row(1, 10.0), _row(2, 20.0), _row(3, 30.0)]
    assert progress.eta_seconds(rows, steps=10) == 20.0 * 7
    assert progress.eta_seconds(rows[:1], steps=10) == 10.0 * 9
    assert progress.eta_seconds(rows, steps=3) == 0.0
    assert math.isnan(progress.eta_seconds([], steps=3))
    assert math.isnan(progress.eta_seconds([{"step": 1}], steps=3))  # no step time logged


def test_progress_lines_carry_elapsed_and_eta():
    rows = [_row(1, 10.0), _row(2, 20.0), _row(3, 30.0)]
    key = "actor/cppo_masked_frac"
    lines = progress.progress_lines("cppo", rows, shown=1, steps=10, elapsed=100.0, arms_after=0, masked_key=key)
    assert len(lines) == 2  # rows already shown are not repeated
    assert lines[0].startswith("[cppo] step   2/10  reward 0.500  masked 0.100")
    assert lines[0].endswith("step time 20.0s  elapsed 1m40s  eta 2m00s")  # mean 15 s x 8 steps left
    assert lines[1].endswith("step time 30.0s  elapsed 1m40s  eta 2m20s")  # mean 20 s x 7
    # with two arms still to run, each is projected at this arm's wall time: 140 + 2 x (100 + 140) = 620 s
    (line,) = progress.progress_lines("cppo", rows, shown=2, steps=10, elapsed=100.0, arms_after=2, masked_key=key)
    assert line.endswith("eta 2m20s (all arms 10m20s)")


def test_plot_adds_the_budget_share_and_delta_b_panels(tmp_path):
    budget = {"actor/cppo_masked_by_budget_share": 0.4, "actor/cppo_delta_b_mean": 0.03}
    metrics = {
        "cppo": [{**_row(s, 1.0, **budget), "reward": 0.1 * s, "masked_frac": 0.05} for s in (1, 2, 3)],
        "dppo_tv": [{**_row(s, 1.0), "reward": 0.1 * s, "masked_frac": 0.01} for s in (1, 2, 3)],
    }
    path = tmp_path / "reward.png"
    panels = tiny_regression.plot(metrics, str(path))
    assert [(p["title"], p["arms"]) for p in panels] == [
        ("reward", ["cppo", "dppo_tv"]),
        ("masked / clipped fraction", ["cppo", "dppo_tv"]),
        ("masked by the prefix budget", ["cppo"]),
        ("delta_b in effect", ["cppo"]),
    ]
    assert [p["key"] for p in panels][2:] == ["actor/cppo_masked_by_budget_share", "actor/cppo_delta_b_mean"]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_start_up_phases_are_reported_once_in_the_order_seen():
    """Lines as verl 0.9.1 and Ray print them into main_ppo.log (Ray's colour codes included)."""
    log = [
        "2026-12-06 19:16:59,422\tINFO worker.py:2029 -- Started a local Ray instance. View the dashboard at ...",
        "\x1b[36m(TaskRunnerV1 pid=22724)\x1b[0m {'actor_rollout_ref': {'actor': {'_target_': ...",
        "(TaskRunnerV1 pid=22724) INFO:2026-12-06 19:17:26,830:actor and ref model engine initialized",
        "Started a local Ray instance.",  # a repeat is not reported again
        "\x1b[36m(vLLMHttpServer pid=23298)\x1b[0m ['serve',",
        "(TaskRunnerV1 pid=22724) LLMServerManager: ['192.0.2.2:39495']",
        "(TaskRunnerV1 pid=22724) INFO:2026-12-06 19:18:46,357:all initialize finished, ready to fit",
    ]
    messages = [message for _, message in progress.PHASES]
    assert progress.phases_in(log, seen=set()) == messages
    assert progress.phases_in(log, seen={"Ray started", "vLLM server up"}) == [
        m for m in messages if m not in ("Ray started", "vLLM server up")
    ]
    assert progress.phases_in(log[:2], seen=set()) == messages[:2]
    assert progress.phases_in(["nothing to see", "(WorkerDict pid=1) Loading weights"], seen=set()) == []


def test_tiny_task_overrides_take_the_rank_count_seed_and_steps():
    task = {"train": "/t/train.parquet", "val": "/t/val.parquet", "model": "/t/model"}
    one = launcher.tiny_task_overrides(task, seed=3, steps=7)
    two = launcher.tiny_task_overrides(task, seed=3, steps=7, n_gpus_per_node=2)
    assert "trainer.n_gpus_per_node=1" in one and "+ray_kwargs.ray_init.num_gpus=1" in one
    assert "trainer.n_gpus_per_node=2" in two and "+ray_kwargs.ray_init.num_gpus=2" in two
    assert {"data.seed=3", "actor_rollout_ref.rollout.seed=3", "trainer.total_training_steps=7"} <= set(one)
    assert "actor_rollout_ref.rollout.name=vllm" in one  # verl's own vLLM rollout, the only one
    assert len({o.split("=", 1)[0] for o in one}) == len(one)  # no key set twice
    with pytest.raises(ValueError, match="n_gpus_per_node must be >= 1, got 0"):
        launcher.tiny_task_overrides(task, n_gpus_per_node=0)
    megatron = launcher.tiny_task_overrides(task, seed=3, steps=7, engine="megatron")
    assert len({o.split("=", 1)[0] for o in megatron}) == len(megatron)  # no key set twice
    assert "model_engine=megatron" in megatron and not any("fsdp_config" in o for o in megatron)
    with pytest.raises(ValueError, match="engine must be 'fsdp2' or 'megatron', got 'fsdp'"):
        launcher.tiny_task_overrides(task, engine="fsdp")


def test_a_failing_main_ppo_returns_its_exit_code_log_and_worker_env(tmp_path):
    """A bad override fails in main_ppo's config composition: no Ray, a non-zero exit, verl's message in the
    log, and the environment block (plus the caller's) in the Ray workers' runtime_env."""
    said = []
    run = launcher.run_main_ppo(
        str(tmp_path / "run"),
        ["+no_such_group.no_such_key=1", "trainer.no_such_key=1"],
        steps=2,
        env={"VERL_CPPO_EXTRA": "42"},
        label="bad",
        timeout_s=120,
        say=said.append,
    )
    assert run.exit_code not in (0, None) and run.rows == []
    assert "no_such_key" in (tmp_path / "run" / "main_ppo.log").read_text()
    command = (tmp_path / "run" / "command.txt").read_text()
    for key, value in {**launcher.TEST_ENV, **launcher.CPU_ENV, "VERL_CPPO_EXTRA": "42"}.items():
        assert f"+ray_kwargs.ray_init.runtime_env.env_vars.{key}='{value}'" in command
    assert said[0].startswith("[bad] starting main_ppo") and said[-1].startswith(
        f"[bad] main_ppo exited {run.exit_code}"
    )
