"""KeepLatestAndBest: the pruning rule by hand, and the callback driven the way verl 0.9.1's v1 trainer
drives it (save, then validate and log, step after step), with verl's own Tracking logger and a resume."""

import os
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf
from verl.trainer.ppo.checkpoint_callback import build_checkpoint_callback
from verl.utils.tracking import Tracking

from verl_cppo.trainer.checkpoints import HISTORY_FILE, KeepLatestAndBest, best_step, checkpoints_to_delete


def test_pruning_rule_by_hand():
    steps, scores = [10, 20, 30, 40, 50], {10: 0.1, 20: 0.5, 30: 0.2, 40: 0.3}
    assert checkpoints_to_delete(steps, scores, keep_latest=2) == [10, 30]  # keep 40, 50 and the best 20
    assert checkpoints_to_delete(steps, scores, keep_latest=1, protected=[40]) == [10, 30]
    assert checkpoints_to_delete(steps, scores, keep_latest=1, mode="min") == [20, 30, 40]  # best: 10
    assert checkpoints_to_delete(steps, {10: 0.5, 30: 0.5}, keep_latest=1) == [10, 20, 40]  # tie: the later
    assert checkpoints_to_delete(steps, {}, keep_latest=3) == [10, 20]
    assert checkpoints_to_delete([], {}, keep_latest=2) == []


def _config(root, **options):
    return OmegaConf.create(
        {
            "trainer": {
                "default_local_dir": str(root),
                "checkpoint_callback_class": "verl_cppo.trainer.checkpoints.KeepLatestAndBest",
                "max_actor_ckpt_to_keep": None,
                "cppo_checkpoints": {"keep_latest": 2, "best_metric": "val-core/aime_avg/acc/mean@16", **options},
            }
        }
    )


def _save(root, step):
    """What verl's _save_checkpoint leaves on disk before calling on_save."""
    path = os.path.join(root, f"global_step_{step}")
    os.makedirs(os.path.join(path, "actor"))
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(step))
    return path


def _on_disk(root):
    return sorted(int(n.split("_")[-1]) for n in os.listdir(root) if n.startswith("global_step_"))


# validation scores per step (per-year values whose mean is the score); the callback computes the average
VAL = {10: 0.1, 20: 0.5, 30: 0.2, 40: 0.3, 50: 0.6, 60: 0.4}
# checkpoints on disk after each save, worked out by hand (latest 2 + the best validated before that save)
EXPECTED = {10: [10], 20: [10, 20], 30: [20, 30], 40: [20, 30, 40], 50: [20, 40, 50], 60: [50, 60]}


def test_callback_through_a_training_loop_and_a_resume(tmp_path, capsys):
    root = tmp_path / "ckpts"
    callback = build_checkpoint_callback(_config(root))  # as verl's trainer builds it
    assert isinstance(callback, KeepLatestAndBest)
    trainer = SimpleNamespace(logger=Tracking(project_name="p", experiment_name="e", default_backend=["console"]))
    for step, score in VAL.items():
        callback.on_save(trainer=trainer, global_step=step, checkpoint_dir=_save(root, step), async_save=False)
        assert _on_disk(root) == EXPECTED[step], step
        # verl: validate after the save, then log the step's metrics (train + val) in one dict
        trainer.logger.log(
            {
                "actor/pg_loss": 0.0,
                "val-core/aime2024/acc/mean@16": score - 0.05,
                "val-core/aime2025/acc/mean@16": score + 0.05,
                "val-core/math_dapo/acc/mean@16": 1.0,
            },
            step=step,
        )
    assert callback.scores == pytest.approx(VAL)
    assert "best checkpoint: global_step_50" in capsys.readouterr().out
    # resume: a new trainer process reads the scores back and keeps protecting the best checkpoint
    resumed = KeepLatestAndBest(_config(root))
    assert resumed.scores == pytest.approx(VAL) and (root / HISTORY_FILE).exists()
    trainer = SimpleNamespace(logger=Tracking(project_name="p", experiment_name="e", default_backend=["console"]))
    for step in (70, 80):
        resumed.on_save(trainer=trainer, global_step=step, checkpoint_dir=_save(root, step))
    assert _on_disk(root) == [50, 70, 80]
    # an async (Megatron) save does not prune: its files may still be in flight
    resumed.on_save(trainer=trainer, global_step=90, checkpoint_dir=_save(root, 90), async_save=True)
    assert _on_disk(root) == [50, 70, 80, 90]


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="keep_latest must be an int >= 1"):
        KeepLatestAndBest(_config(tmp_path, keep_latest=0))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['keep'\]"):
        KeepLatestAndBest(_config(tmp_path, keep=3))
    with pytest.raises(ValueError, match="mode must be 'max' or 'min'"):
        KeepLatestAndBest(_config(tmp_path, mode="best"))


def test_non_finite_or_missing_scores_are_never_the_best():
    """A NaN validation on an old step must not displace the real best (whose checkpoint would be deleted)."""
    nan, inf = float("nan"), float("inf")
    steps = [10, 20, 30, 40, 50]
    for bad in (nan, inf, -inf, None, "0.9"):
        scores = {10: bad, 20: 0.5, 30: 0.2}
        assert checkpoints_to_delete(steps, scores, keep_latest=2) == [10, 30], bad  # keep 20 (best), 40, 50
        assert checkpoints_to_delete(steps, scores, keep_latest=2, mode="min") == [10, 20], bad  # best: 30
    assert checkpoints_to_delete(steps, {10: nan, 20: inf}, keep_latest=2) == [10, 20, 30]  # no best at all
    assert best_step(steps, {10: nan, 20: -inf}) is None


def test_a_nan_validation_through_the_callback_keeps_the_best_checkpoint(tmp_path):
    root = tmp_path / "ckpts"
    callback = KeepLatestAndBest(_config(root, keep_latest=1))
    trainer = SimpleNamespace(logger=Tracking(project_name="p", experiment_name="e", default_backend=["console"]))
    for step, score in {10: 0.5, 20: float("nan"), 30: 0.1, 40: float("inf"), 50: 0.2}.items():
        callback.on_save(trainer=trainer, global_step=step, checkpoint_dir=_save(root, step))
        trainer.logger.log({"val-core/aime_avg/acc/mean@16": score}, step=step)
    callback.on_save(trainer=trainer, global_step=60, checkpoint_dir=_save(root, 60))
    assert _on_disk(root) == [10, 60]  # the best (10) and the latest; NaN / inf steps are not "best"
    assert callback.scores == {10: 0.5, 30: 0.1, 50: 0.2}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"10": 0.5, "20"', "not valid JSON"),  # truncated by a crash mid-write
        ("[0.5, 0.2]", "expected a JSON object of step -> score, got list"),
        ('{"ten": 0.5}', "entry 'ten': 0.5 is not <step>: <score>"),
        ('{"10": "high"}', "entry '10': score 'high' is not a number"),
        ('{"10": [0.5]}', r"entry '10': score \[0.5\] is not a number"),
        ("", "not valid JSON"),
    ],
)
def test_a_malformed_history_file_is_an_error_naming_it(tmp_path, content, message):
    (tmp_path / HISTORY_FILE).write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        KeepLatestAndBest(_config(tmp_path))
    assert str(info.value).startswith(str(tmp_path / HISTORY_FILE))


def test_the_tracker_is_reached_through_a_hook_not_an_instance_attribute(tmp_path):
    """verl's Tracking.log carries the verl_cppo hook; the tracker object itself is left as verl built it."""
    from verl_cppo.hooks import hook_name

    callback = KeepLatestAndBest(_config(tmp_path / "c"))
    tracker = Tracking(project_name="p", experiment_name="e", default_backend=["console"])
    callback.on_save(trainer=SimpleNamespace(logger=tracker), global_step=1, checkpoint_dir=_save(tmp_path / "c", 1))
    assert "log" not in vars(tracker) and hook_name(Tracking.log) == "cppo_val_history"
    other = Tracking(project_name="p", experiment_name="e", default_backend=["console"])
    other.log({"val-core/aime_avg/acc/mean@16": 0.9}, step=1)  # another tracker: not this callback's
    tracker.log({"val-core/aime_avg/acc/mean@16": 0.3}, step=1)
    assert callback.scores == {1: 0.3}
