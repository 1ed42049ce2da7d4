"""The study's ``cppo_permuted_prefix`` loss differs from ``cppo`` through the budget's order alone.

* the identity order gives cppo exactly (mask, loss, gradient, metrics);
* with a random order, mask, loss and gradient equal a float64 loop reference that walks each response in
  that order, charging the budget with w_t D_t at each token's TRUE position weight;
* the budget's amount is cppo's: the same delta_b per response, the same final sums S_H and W_H;
* the orders are one permutation per response, a function of the response alone (the same at any padding,
  micro-batch or epoch), and the registered loss uses them.
"""

from __future__ import annotations

import math

import pytest
import torch
from verl.trainer.ppo.core_algos import get_policy_loss_fn

from benchmarks.stability.permuted_prefix import LOSS_MODE, PermutedRows, budget_orders
from tests.support.loss_call import call_loss
from tests.support.reference import (
    LossParams,
    RefParams,
    _weight,
    random_case,
    ref_delta_b,
    ref_divergence,
    reference_aggregate,
)
from tests.support.verl_inputs import actor_config
from verl_cppo.core.token_loss import WHOLE_ROWS, cppo_token_losses
from verl_cppo.loss import compute_policy_loss_cppo

MODES = ("seq-mean-token-sum-norm", "token-mean")
SETTINGS = [{}, {"delta_b_quantile": None, "delta_b": 0.015}, {"position_horizon": 40}]
LOSS_RTOL = 1e-12
"""float64 loss and gradient: the vectorised sums and the loops add the same <= 29-term rows in different
orders, a relative difference of a few ulps (2^-52 = 2.2e-16) per term; 1e-12 leaves three orders of margin."""


def reference_permuted(old, new, adv, mask, p: RefParams, orders):
    """Float64 loops: CPPO's gate with the running sums S, W taken along ``orders[b]`` (a permutation of the
    columns), each token weighted by w at its own column's position. Returns per-row lists (column order) of
    masked flags, budget-masked flags and loss coefficients, plus delta_b and the final (S, W) per row."""
    old, new, adv = old.double().tolist(), new.double().tolist(), adv.double().tolist()
    mask, orders = mask.bool().tolist(), orders.tolist()
    out = {"masked": [], "by_budget": [], "coef": [], "delta_b": [], "final_sums": []}
    for b in range(len(mask)):
        width = len(mask[b])
        valid = [mask[b][t] for t in range(width)]  # random_case's values are all finite
        length = max((t + 1 for t in range(width) if valid[t]), default=0)
        horizon = p.position_horizon if p.position_horizon is not None else length
        divs = [ref_divergence(p.divergence, new[b][t], old[b][t]) if valid[t] else 0.0 for t in range(width)]
        db = ref_delta_b(p, divs, valid)
        masked, by_budget, coef = [False] * width, [False] * width, [0.0] * width
        s_prev = w_prev = 0.0
        for t in orders[b]:  # the visiting order
            if not valid[t]:
                continue
            w = _weight(t + 1, horizon, p.w_min)
            z = w * divs[t]
            rho = math.exp(min(max(new[b][t] - old[b][t], -20.0), 20.0))
            toward = adv[b][t] * (rho - 1.0) <= 0.0
            c = min(p.delta, p.delta + db * w_prev - s_prev)
            keep = toward or z <= c
            masked[t], by_budget[t] = not keep, not keep and z <= p.delta
            coef[t] = -(1.0 if keep else 0.0) * min(rho, p.ratio_cap) * adv[b][t]
            s_prev += z
            w_prev += w
        out["masked"].append(masked), out["by_budget"].append(by_budget), out["coef"].append(coef)
        out["delta_b"].append(db), out["final_sums"].append((s_prev, w_prev))
    return out


def reference_loss_and_grad(old, new, adv, mask, p, orders, mode):
    ref = reference_permuted(old, new, adv, mask, p, orders)
    lp = new.double().tolist()
    per_token = [[c * x for c, x in zip(rc, rl)] for rc, rl in zip(ref["coef"], lp)]
    loss = reference_aggregate(per_token, mask, mode)
    grad = torch.zeros(new.shape, dtype=torch.float64)
    zero = [[0.0] * new.shape[1] for _ in range(new.shape[0])]
    for b in range(new.shape[0]):
        for t in range(new.shape[1]):
            if ref["coef"][b][t] != 0.0:  # the loss is linear in log pi: its gradient is the aggregated basis
                zero[b][t] = ref["coef"][b][t]
                grad[b, t] = reference_aggregate(zero, mask, mode)
                zero[b][t] = 0.0
    return loss, grad, ref


def random_orders(gen, mask):
    """A uniform permutation of each row's columns below its length (identity past it)."""
    batch, width = mask.shape
    orders = torch.arange(width).repeat(batch, 1)
    lengths = [max((t + 1 for t in range(width) if mask[b, t]), default=0) for b in range(batch)]
    for b, n in enumerate(lengths):
        orders[b, :n] = torch.randperm(n, generator=gen)
    return orders


def test_identity_order_is_cppo(gen):
    old, new, adv, mask = random_case(gen, batch=8, width=29, spread=0.5)
    identity = torch.arange(29).repeat(8, 1)
    for setting in SETTINGS:
        p = LossParams(**setting)
        plain = cppo_token_losses(old, new, adv, mask, p, rows=WHOLE_ROWS).gate
        permuted = cppo_token_losses(old, new, adv, mask, p, rows=PermutedRows(identity)).gate
        for a, b in zip(plain, permuted):
            assert torch.equal(a, b)
        assert plain.masked.any() and plain.masked_by_budget.any()  # the case exercises both rules
    for mode in MODES:
        cfg = actor_config(mode)
        a = call_loss(old, new, adv, mask, mode, cfg)
        b = call_loss(old, new, adv, mask, mode, cfg, shard=PermutedRows(identity))
        assert torch.equal(a.loss, b.loss) and torch.equal(a.grad, b.grad) and a.metrics == b.metrics


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_permuted_mask_matches_loop_reference(setting, gen):
    old, new, adv, mask = random_case(gen, batch=10, width=29, spread=0.5)
    orders = random_orders(gen, mask)
    p = LossParams(**setting)
    gate = cppo_token_losses(old, new, adv, mask, p, rows=PermutedRows(orders)).gate
    ref = reference_permuted(old, new, adv, mask, p, orders)
    assert gate.masked.tolist() == ref["masked"]
    assert gate.masked_by_budget.tolist() == ref["by_budget"]
    assert gate.weight.tolist() == [
        [0.0 if m or not v else 1.0 for m, v in zip(rm, rv)] for rm, rv in zip(ref["masked"], mask.tolist())
    ]
    torch.testing.assert_close(gate.delta_b, torch.tensor(ref["delta_b"], dtype=torch.float64), rtol=1e-14, atol=0)
    # the order changes the mask: the same case in column order masks other tokens
    plain = cppo_token_losses(old, new, adv, mask, p, rows=WHOLE_ROWS).gate
    assert not torch.equal(plain.masked, gate.masked)


def test_budget_amount_is_cppos(gen):
    """Same delta_b per response and the same final running sums S_H, W_H as cppo's causal walk."""
    old, new, adv, mask = random_case(gen, batch=10, width=29, spread=0.5)
    orders = random_orders(gen, mask)
    p = LossParams()
    causal = reference_permuted(old, new, adv, mask, p, torch.arange(29).repeat(10, 1))
    permuted = reference_permuted(old, new, adv, mask, p, orders)
    assert permuted["delta_b"] == causal["delta_b"]
    for (s_perm, w_perm), (s_causal, w_causal) in zip(permuted["final_sums"], causal["final_sums"]):
        # <= 29 float64 terms in [0, 1], summed in two orders: |difference| <= 29 * 2^-52 * the sum
        assert s_perm == pytest.approx(s_causal, rel=29 * 2**-52, abs=1e-300)
        assert w_perm == pytest.approx(w_causal, rel=29 * 2**-52, abs=1e-300)
    plain = cppo_token_losses(old, new, adv, mask, p, rows=WHOLE_ROWS).gate
    moved = cppo_token_losses(old, new, adv, mask, p, rows=PermutedRows(orders)).gate
    assert torch.equal(plain.delta_b, moved.delta_b)


@pytest.mark.parametrize("mode", MODES)
def test_registered_loss_matches_reference(mode, gen):
    old, new, adv, mask = random_case(gen, batch=8, width=29, spread=0.5)
    cfg = actor_config(mode, loss_mode=LOSS_MODE)
    assert get_policy_loss_fn(LOSS_MODE).__name__ == "compute_policy_loss_cppo_permuted_prefix"
    loss, grad, metrics = call_loss(old, new, adv, mask, mode, cfg)
    ref_loss, ref_grad, ref = reference_loss_and_grad(old, new, adv, mask, RefParams(), budget_orders(old, mask), mode)
    assert loss.item() == pytest.approx(ref_loss, rel=LOSS_RTOL, abs=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=LOSS_RTOL, atol=1e-14)
    n_masked = sum(map(sum, ref["masked"]))
    assert 0 < n_masked < int(mask.sum())
    assert metrics["actor/cppo_masked_frac"] == pytest.approx(n_masked / int(mask.sum()), rel=1e-15)
    assert set(metrics) == set(compute_policy_loss_cppo(old, new, adv, mask, mode, actor_config(mode))[1])


def test_orders_are_per_response_and_padding_free(gen):
    old, _, _, mask = random_case(gen, batch=12, width=40, holes=0.0)
    orders = budget_orders(old, mask)
    lengths = mask.sum(dim=-1).tolist()  # no holes: the length is the count
    for b, n in enumerate(lengths):
        assert sorted(orders[b, :n].tolist()) == list(range(n))  # a permutation of the response's columns
        assert orders[b, n:].tolist() == list(range(n, 40))  # padding stays in place
    # the same responses at another padded width, in another micro-batch order: the same permutations
    wide_old = torch.cat([old, torch.zeros(12, 9, dtype=old.dtype)], dim=-1)[[*range(11, -1, -1)]]
    wide_mask = torch.cat([mask, torch.zeros(12, 9, dtype=torch.bool)], dim=-1)[[*range(11, -1, -1)]]
    again = budget_orders(wide_old, wide_mask).flip(0)
    for b, n in enumerate(lengths):
        assert again[b, :n].tolist() == orders[b, :n].tolist()
    # distinct responses get distinct permutations (the long ones: 16! orders each)
    long_rows = [tuple(orders[b, :n].tolist()) for b, n in enumerate(lengths) if n >= 16]
    assert len(long_rows) >= 3 and len(set(long_rows)) == len(long_rows)
    assert any(list(r) != sorted(r) for r in long_rows)
