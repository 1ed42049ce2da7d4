"""verl's Megatron engine at TP = 2, CP = 2 and TP = 2 x CP = 2 gives the one-rank CPPO update (CPU, gloo).

tests/support/megatron_update.py runs verl's ``TrainingWorker.train_mini_batch`` (``MegatronEngineWithLMHead``:
vanilla mbridge, THD packing, distributed optimizer, float32, ``verl_cppo.megatron_shard_local`` imported) on the
recorded vLLM rollout the FSDP equivalence uses, two optimizer steps per case (the second masks tokens): binary
TV (``token-mean``), Top-K TV (mu's recorded top-K through the engine's logits hook) and ``cppo_grpo`` with its
excluded group (``seq-mean-token-mean``). Each layout is 1, 2 or 4 gloo processes; DP is 1 in all of them.

What is compared, and the tolerance of each (u = 2^-24, float32's unit roundoff):

* counts: ``dp_size``, ``batch_num_tokens``, ``global_batch_size`` of every training micro-batch of every rank
  equal the one-rank values exactly (the exclusion removes the 4 excluded responses from the sequence count);
* shard-local loss: under CP = 2 every rank scored every training micro-batch of the binary-TV and ``cppo_grpo``
  cases with ``shard_local_ppo_loss`` (no log-prob all-gather); Top-K TV runs verl's gathered path (the hook
  serves ``ppo_loss`` only: ``ppo_loss_with_topk`` is not routed), which is asserted, not hidden;
* gradients of the first step (identical weights on every layout): each entry within 2 n u G of the one-rank
  entry, G the step's largest |gradient| and n the mini-batch's tokens. Reordering a float32 sum of n terms moves
  it by at most ~n u sum|terms|; TP and CP reorder the token sums (and the matmul sums inside each token's
  contribution, which are shorter than n here); taking sum|terms| ~ G is the assumption (cancellation could
  exceed it; measured differences sit 40-60x below the bound);
* the update rule, on every layout and both steps: the weights after each step equal a float64 replay of
  ``torch.optim.AdamW`` (the class megatron uses without TE / apex, asserted) from the recorded gradients and the
  optimizer's ``param_groups`` hyper-parameters, within ADAM_ROUNDINGS u (|w| + |update|): float32 rounds each
  entry's update at most 12 times, u / 2 each (m: 2, v: 2, sqrt, the bias correction, + eps, the quotient, the
  step size and its product, the sum with w, and the previous step's m carried), so 6 u, doubled; |update| is
  taken before the first moment's two terms cancel, since float32 rounds the terms (measured: 0.65 of 8 u);
* the weights after the first step across layouts: Adam's first step is lr g / (|g| + eps) per entry, whose
  derivative in g is at most lr eps / (|g| - B + eps)^2 where |g| > B, so a gradient difference B moves the
  weight by at most lr eps B / (max(|g| - B, 0) + eps)^2, capped at 2 lr (plus the update rule's rounding).
  This is where a fixed tolerance fails: an entry with |g| ~ 1e-7 moves by up to ~lr on one layout and
  differently on another. Nothing is compared after the second step across layouts (it starts from those
  weights); the second step is checked by the update rule on each layout;
* gradient norm of each step (from the recorded gradients; the engine's ``grad_norm`` metric is their mean,
  checked to 1e-6): within the norm of the first step's per-entry bound; the second within GRAD_RTOL relative,
  the FSDP equivalence's derived gradient bound (tests/support/multirank_update.py; that step starts from the
  differing weights above; measured at most 1.9e-6, and a planted error moves it by 2-12%);
* loss and every ``actor/cppo_*`` metric (means over both steps): within the FSDP equivalence's derived
  reordering bound (SUM_RTOL of the metric, of 1.5 rho_max for the signed loss): the first step's part is float32
  rounding; the second step's starts from weights that differ by the bound above on entries with near-zero
  gradient, whose first-order effect on the loss is sum |g2| |dw1|, checked below the loss's tolerance.

Planted errors (``MEGATRON_PLANT=no_carry|contiguous|dp_size``; the multi-rank runs then pass ``--plant``) make
these tests fail; ci/README.md records each by hand. ``MEGATRON_KEEP_DIR=DIR`` keeps the logs and outputs.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

import pytest
import torch

from tests.support import rank_processes
from tests.support.multirank_update import GRAD_RTOL, RECORD, SUM_RTOL, assert_cppo_metrics_match, close

pytestmark = pytest.mark.slow

CASES = ("cppo", "topk_tv", "cppo_grpo")
LAYOUTS = {"tp2": (2, 1), "cp2": (1, 2), "tp2_cp2": (2, 2)}  # name: (tp, cp)
RUN_TIMEOUT_S = 600  # all four layouts together
U = 2.0**-24  # float32 unit roundoff
ADAM_ROUNDINGS = 12  # the AdamW replay's bound, in units of u (module docstring)
MICRO_BATCHES = 8  # 4 micro-batches of 4 responses per epoch, 2 epochs, DP = 1


def start_layout(tp: int, cp: int, out_dir: str, plant: str | None = None) -> dict:
    """Start tp * cp ranks of the update script (gloo, FileStore); ``rank_processes.finish`` waits for them."""
    args = [",".join(CASES), str(tp), str(cp), *(["--plant", plant] if plant else [])]
    return rank_processes.start("tests.support.megatron_update", args, tp * cp, out_dir, f"tp{tp}_cp{cp}")


@pytest.fixture(scope="module")
def runs():
    """All four layouts at once (9 processes): most of a rank's time is imports and gloo waits, so running them
    side by side takes about half the wall time of one after another on 2 cores."""
    plant = os.environ.get("MEGATRON_PLANT") or None
    keep = os.environ.get("MEGATRON_KEEP_DIR")
    with tempfile.TemporaryDirectory(prefix="megatron_") as tmp:
        out_dir = keep or tmp
        os.makedirs(out_dir, exist_ok=True)
        started = {"one": start_layout(1, 1, out_dir)}
        started.update({name: start_layout(tp, cp, out_dir, plant) for name, (tp, cp) in LAYOUTS.items()})
        deadline = time.monotonic() + RUN_TIMEOUT_S
        result = {}
        try:
            for name, run in started.items():
                result[name] = rank_processes.finish(run, deadline)
        finally:
            for run in started.values():  # a failed layout must not leave the others running
                for p in run["procs"]:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
    return result


def tokens_in_batch() -> int:
    """n of the summation bound: the recorded mini-batch's prompt + response tokens."""
    with open(RECORD) as f:
        rows = json.load(f)["rows"]
    return sum(len(r["prompt"]) + len(r["response"]) for r in rows)


def grad_bound(grads: dict) -> float:
    """Per-entry bound of the first step's gradient difference: 2 n u G (module docstring)."""
    scale = max(float(g.abs().max()) for g in grads.values())
    return 2 * tokens_in_batch() * U * scale


def adamw_replay(update: dict, state: dict, step: int) -> tuple[dict, dict]:
    """torch.optim.AdamW's rule in float64 for one step: weights before + recorded gradient -> weights after, and
    per entry the update's magnitude before cancellation, step_size (b1 |m_prev| + (1 - b1) |g|) / denom (the
    first moment is a sum of two terms that may cancel; float32 rounds each of them, not their difference)."""
    hyper = update["hyper"]
    lr, (b1, b2), eps, wd = hyper["lr"], hyper["betas"], hyper["eps"], hyper["weight_decay"]
    out, scale = {}, {}
    for name, g in update["grads"].items():
        m, v = state.get(name, (torch.zeros_like(g), torch.zeros_like(g)))
        m_abs = b1 * m.abs() + (1 - b1) * g.abs()
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        state[name] = (m, v)
        w = update["before"][name] * (1 - lr * wd)
        step_size = lr / (1 - b1**step)
        denom = v.sqrt() / math.sqrt(1 - b2**step) + eps
        out[name] = w - step_size * m / denom
        scale[name] = step_size * m_abs / denom
    return out, scale


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("case", CASES)
def test_global_counts_are_the_one_rank_counts(runs, case, layout):
    one, many = runs["one"][case], runs[layout][case]
    tp, cp = LAYOUTS[layout]
    assert many["layout"] == {"world": tp * cp, "tp": tp, "cp": cp, "dp": 1}
    (reference,) = {tuple(c.values()) for c in one["counts"][0]}
    for rank, per_micro in enumerate(many["counts"]):
        assert len(per_micro) == MICRO_BATCHES, (rank, per_micro)
        assert all(tuple(c.values()) == reference for c in per_micro), (rank, per_micro, reference)
    assert reference[0] == 1  # dp_size
    assert (
        16 - reference[2]
        == (4 if case == "cppo_grpo" else 0)
        == (one["estimator_excluded"] if case == "cppo_grpo" else 0)
    )


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("case", CASES)
def test_shard_local_loss_ran_on_every_rank_under_cp(runs, case, layout):
    many = runs[layout][case]
    _, cp = LAYOUTS[layout]
    expected = MICRO_BATCHES if cp > 1 and case != "topk_tv" else 0
    assert many["shard_local_calls"] == [expected] * many["layout"]["world"]
    assert runs["one"][case]["shard_local_calls"] == [0]


@pytest.mark.parametrize("layout", ["one", *sorted(LAYOUTS)])
@pytest.mark.parametrize("case", CASES)
def test_every_step_follows_adamw(runs, case, layout):
    result = runs[layout][case]
    assert result["optimizer"] == "torch.optim.adamw.AdamW"
    state: dict = {}
    for step, update in enumerate(result["updates"], start=1):
        replay, scale = adamw_replay(update, state, step)
        for name, after in update["after"].items():
            bound = ADAM_ROUNDINGS * U * (update["before"][name].abs() + scale[name]) + 1e-30
            excess = float(((after - replay[name]).abs() - bound).max())
            assert excess <= 0, (
                f"{layout} step {step} {name}: AdamW replay off by {excess} beyond {ADAM_ROUNDINGS} u (|w| + |dw|)"
            )
    assert len(result["updates"]) == 2


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("case", CASES)
def test_first_step_gradients_and_weights_equal_one_rank(runs, case, layout):
    one, many = runs["one"][case]["updates"][0], runs[layout][case]["updates"][0]
    assert sorted(one["grads"]) == sorted(many["grads"])
    bound = grad_bound(one["grads"])
    worst = max(float((many["grads"][n] - g).abs().max()) for n, g in one["grads"].items())
    assert worst <= bound, f"{layout}: first-step gradients differ by {worst} > {bound}"
    lr, eps = one["hyper"]["lr"], one["hyper"]["eps"]
    for name, g in one["grads"].items():
        first = lr * eps * bound / ((g.abs() - bound).clamp(min=0) + eps) ** 2  # Adam's first step, |dg| <= bound
        allowed = first.clamp(max=2 * lr) + 16 * U * (one["before"][name].abs() + lr)
        diff = many["after"][name] - one["after"][name]
        assert bool((diff.abs() <= allowed).all()), (
            f"{layout} {name}: weights after step 1 differ by {diff.abs().max()}"
        )
    moved = max(float((one["after"][n] - one["before"][n]).abs().max()) for n in one["after"])
    assert moved > 1e-2  # the step moved the weights


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("case", CASES)
def test_loss_grad_norm_and_metrics_equal_one_rank(runs, case, layout):
    one, many = runs["one"][case], runs[layout][case]
    norms = {}
    for key, result in (("one", one), ("many", many)):
        norms[key] = [math.sqrt(sum(float((g**2).sum()) for g in u["grads"].values())) for u in result["updates"]]
        reported = result["steps"]["grad_norm"]
        assert len(reported) == 1 and abs(reported[0] - sum(norms[key]) / 2) <= 1e-6 * reported[0], (key, reported)
    first_bound = grad_bound(one["updates"][0]["grads"]) * math.sqrt(
        sum(g.numel() for g in one["updates"][0]["grads"].values())
    )
    assert abs(norms["many"][0] - norms["one"][0]) <= first_bound, f"{layout} step-1 grad norm: {norms}"
    assert close(norms["many"][1], norms["one"][1], rtol=GRAD_RTOL), f"{layout} step-2 grad norm: {norms}"
    loss = (many["steps"]["loss"][0], one["steps"]["loss"][0])
    loss_scale = 1.5 * one["metrics"]["actor/cppo_rho_max"]  # the loss's absolute sum (tests/support/multirank_update)
    assert close(*loss, scale=loss_scale), f"{layout} loss {loss[0]!r} vs one rank {loss[1]!r}"
    # the second step's first-order sensitivity to the first step's weight differences stays below the tolerance
    second = one["updates"][1]
    drift = sum(
        float((second["grads"][n].abs() * (many["updates"][0]["after"][n] - one["updates"][0]["after"][n]).abs()).sum())
        for n in second["grads"]
    )
    assert drift <= SUM_RTOL * loss_scale, f"{layout}: step-2 loss sensitivity to step-1 weight differences {drift}"
    assert_cppo_metrics_match(one["metrics"], many["metrics"], case, layout)


def test_every_cpu_shim_was_in_place_in_every_worker(runs):
    from verl_cppo.testing.cpu_megatron import HOOK_TARGETS

    for layout, result in runs.items():
        assert sorted(result["_shims"]) == sorted(HOOK_TARGETS), layout
