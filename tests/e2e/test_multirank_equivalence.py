"""Two ranks equal one: the same CPPO update through verl's worker path on 1 rank, DP = 2 and Ulysses SP = 2.

tests/support/multirank_update.py runs verl's ``TrainingWorker.train_mini_batch`` (FSDP2 engine, CPU platform,
gloo) on a recorded vLLM rollout for three cases: ``loss_mode=cppo`` with binary TV (``token-mean``), Top-K TV
(the engine's logits hook; mu's top-K from vLLM) and ``cppo_grpo`` with one excluded group
(``seq-mean-token-mean``, so both of verl's global counts matter). Each layout's processes run every case, two
optimizer steps each (the second masks tokens). The checks:

* the global counts verl hands the loss (``dp_size``, ``batch_num_tokens``, ``global_batch_size``) are the
  one-rank values on every micro-batch of every rank (DP = 2: dp_size 2; SP = 2: dp_size 1), and the worker's
  exclusion removes the estimator's 4 excluded responses from ``global_batch_size`` on every layout;
* the loss and gradient norm of each step and every CPPO metric (masked fraction, delta_b mean, Top-K coverage,
  ...) equal the one-rank run to float32 tolerance, and so do the gradients each optimizer step applies;
* each layout's parameters after each step are AdamW's update of its parameters and gradients (a float64 replay
  with a derived bound on float32 rounding). Weights after AdamW steps are not compared across layouts: Adam's
  g / sqrt(v) turns a gradient entry at rounding level into an update of up to ~lr, so such a comparison
  depends on the CPU's summation order; the gradients (sums) and the update rule are checked separately instead.

Planting a count error in front of the loss (``MULTIRANK_PLANT=dp_size`` or ``tokens`` in the environment; the
2-rank runs then pass ``--plant``) makes these tests fail; ci/README.md records that check.
``MULTIRANK_KEEP_DIR=DIR`` keeps every rank's log and output file.
"""

from __future__ import annotations

import os
import tempfile
import time

import pytest
import torch

from tests.support import rank_processes
from tests.support.adamw_reference import UNIT_ROUNDOFF, replay_adamw
from tests.support.multirank_update import GRAD_RTOL, assert_cppo_metrics_match, close
from verl_cppo.testing import tiny_task

pytestmark = pytest.mark.slow

CASES = ("cppo", "topk_tv", "cppo_grpo")
LAYOUTS = {"dp2": (2, 1), "sp2": (2, 2)}  # name: (world, ulysses sp)
RUN_TIMEOUT_S = 420


def run_layout(world: int, sp: int, out_dir: str, plant: str | None = None) -> dict:
    """Run `world` ranks of the update script (gloo, FileStore) for at most RUN_TIMEOUT_S; rank 0's file."""
    args = [",".join(CASES), str(sp), *(["--plant", plant] if plant else [])]
    run = rank_processes.start("tests.support.multirank_update", args, world, out_dir, f"w{world}_sp{sp}")
    return rank_processes.finish(run, time.monotonic() + RUN_TIMEOUT_S)


@pytest.fixture(scope="module")
def runs():
    plant = os.environ.get("MULTIRANK_PLANT") or None
    keep = os.environ.get("MULTIRANK_KEEP_DIR")  # keep the ranks' logs and outputs there (default: a temp dir)
    with tempfile.TemporaryDirectory(prefix="multirank_") as tmp:
        out_dir = keep or tmp
        os.makedirs(out_dir, exist_ok=True)
        result = {"one": run_layout(1, 1, out_dir)}
        for name, (world, sp) in LAYOUTS.items():
            result[name] = run_layout(world, sp, out_dir, plant)
    return result


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("case", CASES)
def test_global_counts_are_the_one_rank_counts(runs, case, layout):
    one, many = runs["one"]["results"][case], runs[layout]["results"][case]
    world, sp = LAYOUTS[layout]
    (reference,) = {(c["batch_num_tokens"], c["global_batch_size"]) for c in one["counts"][0]}
    assert many["layout"] == {"world": world, "sp": sp, "dp": world // sp}
    for rank, per_micro in enumerate(many["counts"]):
        assert per_micro, f"rank {rank} never called the loss"
        for counts in per_micro:
            assert counts["dp_size"] == world // sp, (rank, counts)
            assert (counts["batch_num_tokens"], counts["global_batch_size"]) == reference, (rank, counts, reference)
    excluded = 16 - reference[1]  # what the worker's exclusion removed from verl's sequence count
    assert excluded == (one["estimator_excluded"] if case == "cppo_grpo" else 0) and many["estimator_excluded"] == 4


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("case", CASES)
def test_loss_grad_norm_and_metrics_equal_one_rank(runs, case, layout):
    one, many = runs["one"]["results"][case], runs[layout]["results"][case]
    bounds = {"loss": {"scale": 1.5 * one["metrics"]["actor/cppo_rho_max"]}, "grad_norm": {"rtol": GRAD_RTOL}}
    for key in ("loss", "grad_norm"):
        assert len(one["steps"][key]) == len(many["steps"][key]) == 2
        for step, (a, b) in enumerate(zip(many["steps"][key], one["steps"][key])):
            assert close(a, b, **bounds[key]), f"{key} step {step}: {layout} {a!r} vs one rank {b!r}"
    assert_cppo_metrics_match(one["metrics"], many["metrics"], case, layout)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("case", CASES)
def test_gradients_equal_one_rank(runs, case, layout):
    """The gradients each optimizer step applies: per tensor, within the reordering bound of a float32 sum."""
    one, many = runs["one"]["optimizer_steps"][case], runs[layout]["optimizer_steps"][case]
    assert len(one) == len(many) == 2
    for step, (a, b) in enumerate(zip(many, one)):
        assert sorted(a["grads"]) == sorted(b["grads"])
        scale = sum(float(g.double().norm()) ** 2 for g in b["grads"].values()) ** 0.5  # the global grad norm
        for name, g_one in b["grads"].items():
            g_one, g_many = g_one.double(), a["grads"][name].double()
            gap, size = float((g_many - g_one).norm()), float(g_one.norm())
            assert gap <= GRAD_RTOL * size + UNIT_ROUNDOFF * scale, f"{layout} step {step} {name}: {gap} vs {size}"


@pytest.mark.parametrize("layout", ["one", *sorted(LAYOUTS)])
@pytest.mark.parametrize("case", CASES)
def test_updates_follow_adamw(runs, case, layout):
    """Each layout's parameters after each step are AdamW's float64 update of its own parameters and gradients,
    within the float32 rounding bound of that update (tests/support/adamw_reference.py)."""
    steps = runs[layout]["optimizer_steps"][case]
    for step, (record, expected) in enumerate(zip(steps, replay_adamw(steps))):
        if step:
            assert all(torch.equal(record["before"][n], steps[step - 1]["after"][n]) for n in record["before"])
        for name, (new, bound) in expected.items():
            excess = float(((record["after"][name].double() - new).abs() - 2 * bound).max())
            assert excess <= 0, f"{layout} step {step} {name}: off AdamW's update by {excess} beyond 2x the bound"
    initial = tiny_task.build_model(seed=0, head_dim=32).state_dict()
    names = sorted(steps[0]["before"])  # the trained parameters (the tied lm_head is the embedding)
    assert names and all(torch.equal(steps[0]["before"][n], initial[n]) for n in names)  # the recorded model
    moved = max(float((steps[-1]["after"][n] - initial[n]).abs().max()) for n in names)
    assert moved > 1e-3  # the update moved the weights: the comparison is not of the initial model
