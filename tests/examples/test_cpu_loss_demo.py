"""examples/cpu_loss_demo.py: its printout explains itself (no `_target_=''`, a legend for the surrogate and
for rho_max above ratio_cap) and shows training working (log pi/mu rises where A > 0, falls where A < 0)."""

import os
import subprocess
import sys

from tests.support import REPO_ROOT


def test_the_demo_prints_a_legend_and_training_that_works():
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "examples", "cpu_loss_demo.py"), "--steps", "5"],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "_target_" not in out.stdout
    assert "surrogate   the value of the loss" in out.stdout and "It may exceed ratio_cap" in out.stdout
    lines = out.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("step   A>0"))
    rows = [line.split() for line in lines[start + 1 : start + 6]]
    up, down = [float(r[1]) for r in rows], [float(r[2]) for r in rows]
    assert up == sorted(up) and up[-1] > 0 and down == sorted(down, reverse=True) and down[-1] < 0
