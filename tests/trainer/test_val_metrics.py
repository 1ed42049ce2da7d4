"""The averaged AIME validation metric: the computation against hand-made verl metric dicts, and install()
on verl 0.9.1's real trainer methods (v1 and v0) fed per-sample scores whose Avg@n is worked out by hand."""

import numpy as np
import pytest

from verl_cppo import hooks
from verl_cppo.trainer import val_metrics


def test_average_over_aime_sources_by_hand():
    metrics = {
        "val-core/aime2024/acc/mean@16": 0.30,
        "val-core/aime2025/acc/mean@16": 0.20,
        "val-core/aime2026/acc/mean@16": 0.10,
        "val-core/aime2024/acc/best@16/mean": 0.9,  # bootstrap statistics are not averaged
        "val-aux/aime2024/acc/std@16": 0.4,
        "val-aux/aime2024/reward/mean@16": 1.0,
        "val-aux/aime2025/reward/mean@16": 2.0,
        "val-aux/aime2026/reward/mean@16": 6.0,
        "val-core/math_dapo/acc/mean@16": 0.99,  # not an AIME source
        "val-aux/num_turns/mean": 1.0,
        "actor/pg_loss": 0.5,
    }
    out = val_metrics.average_metrics(metrics)
    assert out == {
        "val-core/aime_avg/acc/mean@16": pytest.approx(0.20),
        "val-aux/aime_avg/reward/mean@16": pytest.approx(3.0),
    }
    assert val_metrics.add_averages(dict(metrics))["val-core/aime_avg/acc/mean@16"] == pytest.approx(0.2)


def test_a_metric_missing_for_one_year_is_not_averaged():
    metrics = {
        "val-core/aime2024/acc/mean@16": 0.3,
        "val-core/aime2025/acc/mean@16": 0.2,
        "val-core/aime2026/reward/mean@16": 0.1,  # this year reports no acc
    }
    assert "val-core/aime_avg/acc/mean@16" not in val_metrics.average_metrics(metrics)
    # a data source with '/' in its name, and a custom group
    metrics = {"val-core/org/aime24/acc/mean@4": 0.5, "val-core/org/aime25/acc/mean@4": 0.25}
    assert val_metrics.average_metrics(metrics, {"org_avg": r"^org/aime"}) == {
        "val-core/org_avg/acc/mean@4": pytest.approx(0.375)
    }


# per sample acc of 4 problems x 4 samples: Avg@4 aime2024 = (3/4 + 1/4) / 2 = 0.5,
# aime2025 = (4/4 + 1/4) / 2 = 0.625; their mean 0.5625. math_dapo (1.0) does not count.
SAMPLES = {
    ("aime2024", "a"): [1, 0, 1, 1],
    ("aime2024", "b"): [0, 0, 0, 1],
    ("aime2025", "c"): [1, 1, 1, 1],
    ("aime2025", "d"): [1, 0, 0, 0],
    ("math_dapo", "e"): [1, 1, 1, 1],
}


def _inputs():
    sources, uids, acc = [], [], []
    for (source, uid), values in SAMPLES.items():
        sources += [source] * len(values)
        uids += [uid] * len(values)
        acc += [float(v) for v in values]
    return np.array(sources), uids, {"reward": list(acc), "acc": list(acc)}


@pytest.fixture
def installed():
    val_metrics.install(now=True)  # the plugin installs it lazily; here the trainer modules are imported first
    yield


def test_install_adds_the_average_to_verl_v1_and_v0_trainers(installed):
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    val_metrics.install(now=True)  # idempotent
    for cls in (PPOTrainer, RayPPOTrainer):
        sources, uids, infos = _inputs()
        metrics = cls._val_metrics_update(object(), sources, uids, infos, [])
        assert metrics["val-core/aime2024/acc/mean@4"] == pytest.approx(0.5)
        assert metrics["val-core/aime2025/acc/mean@4"] == pytest.approx(0.625)
        assert metrics["val-core/aime_avg/acc/mean@4"] == pytest.approx(0.5625), cls
        assert metrics["val-aux/aime_avg/reward/mean@4"] == pytest.approx(0.5625)
        assert "val-core/aime_avg/acc/best@4/mean" not in metrics


def test_uninstall_restores_verl():
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    val_metrics.install(now=True)
    wrapped = PPOTrainer.__dict__["_val_metrics_update"]
    assert hooks.hook_name(wrapped) == val_metrics.HOOK_NAME
    val_metrics.uninstall()
    try:
        assert PPOTrainer.__dict__["_val_metrics_update"] is wrapped.__wrapped__
        assert hooks.hook_name(PPOTrainer.__dict__["_val_metrics_update"]) is None
        sources, uids, infos = _inputs()
        assert not any("aime_avg" in k for k in PPOTrainer._val_metrics_update(object(), sources, uids, infos, []))
    finally:
        val_metrics.install(now=True)  # as the plugin leaves it
