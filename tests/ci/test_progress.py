"""The main job's terminal line (elapsed, ETA from the mean step time so far) and its plot's panels
(ci/tiny_regression.py), against values worked out by hand."""

import importlib.util
import math
import sys
from pathlib import Path

from tests.support import REPO_ROOT

ROOT = Path(REPO_ROOT)
_spec = importlib.util.spec_from_file_location("cppo_tiny_regression", ROOT / "ci" / "tiny_regression.py")
tiny_regression = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = tiny_regression
_spec.loader.exec_module(tiny_regression)


def _row(step, seconds, **extra):
    return {"step": step, "timing_s/step": seconds, "critic/score/mean": 0.5, "actor/cppo_masked_frac": 0.1, **extra}


def test_duration_format():
    assert [tiny_regression.duration(s) for s in (0, 42.4, 60, 185, 3600, 3725, float("nan"))] == [
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
    assert tiny_regression.eta_seconds(rows, steps=10) == 20.0 * 7
    assert tiny_regression.eta_seconds(rows[:1], steps=10) == 10.0 * 9
    assert tiny_regression.eta_seconds(rows, steps=3) == 0.0
    assert math.isnan(tiny_regression.eta_seconds([], steps=3))
    assert math.isnan(tiny_regression.eta_seconds([{"step": 1}], steps=3))  # no step time logged


def test_progress_lines_carry_elapsed_and_eta():
    rows = [_row(1, 10.0), _row(2, 20.0), _row(3, 30.0)]
    lines = tiny_regression.progress_lines("cppo", rows, shown=1, steps=10, elapsed=100.0, arms_after=0)
    assert len(lines) == 2  # rows already shown are not repeated
    assert lines[0].startswith("[cppo] step   2/10  reward 0.500  masked 0.100")
    assert lines[0].endswith("step time 20.0s  elapsed 1m40s  eta 2m00s")  # mean 15 s x 8 steps left
    assert lines[1].endswith("step time 30.0s  elapsed 1m40s  eta 2m20s")  # mean 20 s x 7
    # with two arms still to run, each is projected at this arm's wall time: 140 + 2 x (100 + 140) = 620 s
    (line,) = tiny_regression.progress_lines("cppo", rows, shown=2, steps=10, elapsed=100.0, arms_after=2)
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
