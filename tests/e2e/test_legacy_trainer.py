"""verl's legacy trainer (``trainer.use_v1=False``: ``RayPPOTrainer``, DataProto, no TransferQueue) through
``python -m verl.trainer.main_ppo`` on CPU with verl's vLLM rollout (vLLM's CPU build), 2 steps per arm.

One run per arm through ``verl_cppo.testing.launcher`` serves every test (the ``vanilla`` and ``cppo`` arms,
both with the ``cppo_grpo`` estimator), with ``verl_cppo.testing.loss_probe`` reporting what ``ppo_loss`` receives:

* vanilla (old log-probs recomputed by the actor): the rollout's log-probs equal the actor's at every step
  (``training/rollout_probs_diff_max``), which holds only if every weight sync reached vLLM;
* cppo with bypass mode: the loss is ``cppo`` (its ``actor/cppo_*`` metrics) and its ``old_log_prob`` is the
  rollout's log-probs, exactly (probe: max |old - rollout| = 0 over every response token), not the actor's
  recomputation (none ran), while the policy moved within the step (old != current);
* ``cppo_grpo``'s excluded responses leave the sequence count the loss divides by, on the legacy path too
  (probe: global_batch_size + excluded responses = the mini-batch's 64 responses).

And the Top-K divergence on the legacy trainer (its own run): mu's top-K from the live vLLM server through the
DataProto agent loop (``verl_cppo.topk.rollout``'s two wrappers) and the legacy ``_update_actor``
(``topk_actor_update.diff``) into the FSDP2 engine hook; with one update per step pi = mu, so D < 1e-4 at every
step and coverage 1, as the v1 trainer's test (tests/testing/test_vllm_cpu.py) requires.
"""

import pytest

from ci.regression_checks import DEFAULT_CHECKS
from verl_cppo.testing import launcher, tiny_task

pytestmark = pytest.mark.vllm

STEPS = 2
MINI_BATCH_RESPONSES = 8 * 8  # ppo_mini_batch_size x rollout.n of launcher.tiny_task_overrides
PROBE = {"VERL_CPPO_LOSS_PROBE": "1"}
LEGACY_OVERRIDES = ["trainer.use_v1=False"]


def _legacy_run(out, arms: tuple[str, ...]) -> dict[str, list[dict]]:
    """The regression's arms on the legacy trainer with the loss probe, through the project's one main_ppo
    launcher: {arm: verl's per-step metrics}. Its 20-step sanity checks are not asserted here."""
    task = tiny_task.build(str(out / "task"), seed=0, head_dim=32)
    metrics = {}
    for arm in arms:
        overrides = [*launcher.tiny_task_overrides(task, steps=STEPS), *launcher.ARMS[arm].overrides]
        run = launcher.run_main_ppo(
            str(out / arm), [*overrides, *LEGACY_OVERRIDES], steps=STEPS, env=PROBE, label=arm, timeout_s=540
        )
        log = open(run.log_path, errors="replace").read()[-4000:]
        assert run.exit_code == 0 and len(run.rows) == STEPS, f"{arm}: exit {run.exit_code}\n{log}"
        metrics[arm] = run.rows
    return metrics


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    metrics = _legacy_run(tmp_path_factory.mktemp("legacy"), ("vanilla", "cppo"))
    for arm, rows in metrics.items():  # the figures, for the log
        for r in rows:
            keys = ("probe", "rollout_probs_diff", "grad_norm", "cppo_masked_frac", "reward")
            print(arm, r["step"], {k: v for k, v in r.items() if any(key in k for key in keys)})
    return metrics


def test_vanilla_rollout_and_actor_log_probs_agree_at_every_step(legacy):
    rows = legacy["vanilla"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        gap = row["training/rollout_probs_diff_max"]
        assert 0.0 <= gap <= DEFAULT_CHECKS["rollout_actor_prob_gap_max"], row  # stale weights give ~0.1 and more
        assert "timing_s/old_log_prob" in row  # the actor recomputed old_log_prob
        assert row["actor/probe_old_vs_rollout_abs_max"] < 1e-3, row  # recomputed: mu up to the mismatch
        assert "actor/cppo_masked_frac" not in row


def test_cppo_trains_anchored_on_the_rollout_log_probs(legacy):
    rows = legacy["cppo"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        assert row["actor/probe_old_vs_rollout_abs_max"] == 0.0, row  # old_log_prob is mu, bit for bit
        assert "timing_s/old_log_prob" not in row and "training/rollout_probs_diff_max" not in row  # no recompute
        assert 0.0 <= row["actor/cppo_masked_frac"] <= 1.0 and row["actor/cppo_nonfinite_frac"] == 0.0, row
        assert not any("rollout_corr/" in key for key in row)  # verl's bypass_mode loss did not run
        assert row["actor/probe_old_vs_current_abs_max"] > 0.0, row  # 4 updates per step moved pi away from mu
        assert 0.0 < row["actor/grad_norm"] < float("inf") and 0.0 <= row["critic/score/mean"] <= 1.0, row


def test_cppo_grpo_exclusion_reaches_the_loss_normaliser(legacy):
    for arm, rows in legacy.items():
        for row in rows:
            kept = row["actor/probe_global_batch_size"]
            assert kept + row["actor/probe_zeroed_rows"] == MINI_BATCH_RESPONSES, (arm, row)


def test_topk_tv_on_the_legacy_trainer_through_the_live_vllm_server(tmp_path):
    """pi = mu (one update per step: the mini-batch is the step's 32 prompts): Top-K TV ~ float rounding at every
    step (a token read against another token's top-K, or a shifted row, gives D ~ 0.1), every token with its
    top-K, the rollout's log-probs as the anchor (no recompute)."""
    task = tiny_task.build(str(tmp_path / "task"), seed=0, head_dim=32)
    overrides = [
        *launcher.tiny_task_overrides(task, steps=STEPS),
        *launcher.ARMS["cppo_topk_tv"].overrides,
        "actor_rollout_ref.actor.ppo_mini_batch_size=32",
        *LEGACY_OVERRIDES,
    ]
    run = launcher.run_main_ppo(str(tmp_path / "topk"), overrides, steps=STEPS, label="legacy_topk", timeout_s=540)
    log = open(run.log_path, errors="replace").read()
    assert run.exit_code == 0 and len(run.rows) == STEPS, f"exit {run.exit_code}\n{log[-4000:]}"
    assert "Legacy trainer `main_ppo_v0.py` is deprecated" in log  # verl's legacy TaskRunner ran, not v1's
    assert [r["step"] for r in run.rows] == list(range(1, STEPS + 1))
    for row in run.rows:
        print("legacy_topk", row["step"], {k: v for k, v in row.items() if "cppo_" in k})
        assert row["actor/cppo_nonfinite_frac"] == 0.0, row
        assert row["actor/cppo_topk_coverage"] == 1.0, row
        assert 0.0 <= row["actor/cppo_div_mean"] < 1e-4, row
        assert row["actor/cppo_masked_frac"] == 0.0, row
        assert "timing_s/old_log_prob" not in row, row  # bypass mode: mu is the anchor, nothing recomputed
