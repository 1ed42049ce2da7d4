"""main_ppo on two CPU ranks beside one rank, 10 steps each: ``ci/multirank_runs.py``.

FSDP2 (DP = 2, Ulysses SP = 2) and verl's Megatron engine (one rank, CP = 2, TP = 2). Thirteen main_ppo runs,
about 50 minutes on a 2-core machine: behind the ``multirank_runs`` marker, outside the CI run
(``-m multirank_runs`` selects it). Three FSDP2 layouts x binary TV and Top-K TV on the tiny task, three FSDP2
layouts x binary TV with every 4th prompt unsolvable (``cppo_grpo`` excludes those groups at every step), and
three Megatron layouts x binary TV (the shard-local loss; Top-K is refused with it), then CP = 2 with every 4th
prompt unsolvable. The script's own checks
decide (every run exits 0 after every step with finite metrics, the reward rises as the tiny regression's must,
exclusion at every step where prompts are unsolvable, Top-K coverage in (0, 1], the rollout-vs-actor log-prob
gap within the regression's bound at every step, the shard-local loss in every step of a CP layout);
``MULTIRANK_RUNS_DIR=DIR`` keeps the outputs (summary.json, multirank.png, logs).
"""

import os
import subprocess
import sys

import pytest

from tests.support import REPO_ROOT
from verl_cppo.testing.launcher import TEST_ENV


@pytest.mark.multirank_runs
@pytest.mark.vllm
@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("tiny_task", []),
        ("unsolvable", ["--arms", "cppo", "--unsolvable-every", "4"]),
        ("megatron", ["--layouts", "mcore1,mcore_cp2,mcore_tp2", "--arms", "cppo"]),
        ("megatron_unsolvable", ["--layouts", "mcore_cp2", "--arms", "cppo", "--unsolvable-every", "4"]),
    ],
)
def test_two_ranks_train_through_main_ppo_like_one(tmp_path, name, options):
    outdir = os.path.join(os.environ.get("MULTIRANK_RUNS_DIR") or str(tmp_path), name)
    command = [sys.executable, "-m", "ci.multirank_runs", outdir, "--steps", "10", *options]
    env = {**os.environ, **TEST_ENV}
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, cwd=REPO_ROOT, env=env)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-3000:]}"
    assert "multirank checks: all passed" in done.stdout
