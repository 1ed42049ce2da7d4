"""Top-K divergence end to end through verl's real trainer on CPU (``python -m verl.trainer.main_ppo``).

``divergence=topk_tv`` with K=4 on the tiny task: the driver exports VERL_CPPO_TOPK to every Ray process, the
``hf_cpu`` server adds mu's top-K to its answers (as the patched vLLM / SGLang servers do), the patched agent
loop carries them through TransferQueue, the FSDP2 engine hook computes pi at those ids and the loss reads D.
A missing link fails loudly (the loss refuses a batch without top-K data) or shows in the metric
``actor/cppo_topk_coverage`` (tokens whose top-K row was lost), so a clean run at coverage 1 proves the wiring.

Alignment is checked by value: with one update per step (ppo_mini_batch_size = train_batch_size) pi is mu, so
D must be ~0 at every token; top-K ids or log-probs shifted by one token, or taken from another response,
give D of order 0.05 on this task (the 4-update run measures 0.05 at its first step).
"""

import json
import os
import subprocess
import sys

import pytest

from tests.support import REPO_ROOT

ROOT = REPO_ROOT
STEPS = 2


@pytest.mark.slow
def test_topk_tv_runs_through_main_ppo_with_pi_equal_mu(tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable,
        os.path.join(ROOT, "ci", "tiny_regression.py"),
        str(out),
        "--arms=cppo_topk_tv",
        f"--steps={STEPS}",
        "--no-golden",
        "--arm-timeout=540",
        "--override=actor_rollout_ref.actor.ppo_mini_batch_size=32",  # one update per step: pi = mu
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    log_path = out / "cppo_topk_tv" / "main_ppo.log"
    log = log_path.read_text() if log_path.exists() else ""
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n--- main_ppo.log ---\n{log[-6000:]}"
    rows = json.loads((out / "metrics.json").read_text())["cppo_topk_tv"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        assert row["actor/cppo_nonfinite_frac"] == 0.0
        assert row["actor/cppo_topk_coverage"] == 1.0, row  # every token arrived with mu's full top-K row
        assert 0.0 <= row["actor/cppo_div_mean"] < 1e-4, row  # pi = mu: Top-K TV ~ float rounding
        assert row["actor/cppo_masked_frac"] == 0.0, row
        assert abs(row["actor/cppo_rho_mean"] - 1.0) < 1e-3, row
