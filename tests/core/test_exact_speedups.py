"""The CPU speed-ups of the non-default settings against the formulas they replace, on random inputs and edge
values: binary_kl / log1mexp without a bool where, the sanitising path's finite mask and zeroing, the soft
gate's weight, and the shuffle's permutation."""

import math

import pytest
import torch

from tests.support.reference import LossParams
from verl_cppo.core.divergence import KL_MAX, LOG_HALF, _log1mexp_into, binary_kl, log1mexp
from verl_cppo.core.mask import _shuffled_by_sort, exclusive_cumsum, position_weights, prefix_gate, shuffled_positions
from verl_cppo.core.token_loss import _finite, _FiniteOrZero, _zero_off


def _old_log1mexp(x):
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _old_binary_kl(log_pi, log_mu):
    log_pi = log_pi.clamp(max=0.0)
    log_mu = log_mu.clamp(max=0.0)
    mu = torch.exp(log_mu)
    head = mu * (log_mu - log_pi)
    rest = torch.where(log_mu < 0, -torch.expm1(log_mu) * (_old_log1mexp(log_mu) - _old_log1mexp(log_pi)), 0.0)
    return torch.nan_to_num(head + rest, nan=KL_MAX, posinf=KL_MAX).clamp(0.0, KL_MAX)


def _bits(x):
    return x.view(torch.int32 if x.dtype == torch.float32 else torch.int64)


def _assert_same(got, want):
    """Equal values (NaN where NaN), and equal bits wherever the value is not a zero."""
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    nonzero = want != 0
    assert _bits(got)[nonzero].equal(_bits(want)[nonzero])


def _edge_log_probs(dtype):
    """Log-probs around every branch point: 0 and -0, tiny, both sides of -log 2, where exp rounds to 1, huge."""
    thr = torch.tensor(-math.log(2.0), dtype=dtype)
    near = [torch.nextafter(thr, torch.tensor(v, dtype=dtype)).item() for v in (0.0, -1.0)]
    finfo = torch.finfo(dtype)
    values = [0.0, -0.0, -finfo.tiny * finfo.eps, -finfo.tiny, -1e-30, -1e-8, -6e-8, -1.2e-7, -1e-4, thr.item()]
    values += [*near, -0.5, -1.0, -5.0, -20.0, -88.0, -104.0, -700.0, -1e30, 1e-7, 0.3]  # > 0: clamped to 0
    return torch.tensor(values, dtype=dtype)


def _kl_inputs(dtype, gen):
    edge = _edge_log_probs(dtype)
    grid_pi, grid_mu = torch.meshgrid(edge, edge, indexing="ij")  # every pair of edge values
    rand_mu = -torch.rand(64, 257, generator=gen, dtype=dtype).pow(3) * 8  # mostly near 0
    rand_pi = (rand_mu + 0.3 * torch.randn(64, 257, generator=gen, dtype=dtype)).clamp(max=0.0)  # many exact 0
    return (grid_pi, grid_mu), (rand_pi, rand_mu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_binary_kl_equals_the_where_formula(dtype, gen):
    for log_pi, log_mu in _kl_inputs(dtype, gen):
        keep_pi, keep_mu = log_pi.clone(), log_mu.clone()
        got = binary_kl(log_pi, log_mu)
        _assert_same(got, _old_binary_kl(log_pi, log_mu))
        assert log_pi.equal(keep_pi) and log_mu.equal(keep_mu)  # inputs untouched
        assert (got >= 0).all() and (got <= KL_MAX).all() and (got == KL_MAX).any()  # pi = 1 > mu: the cap


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log1mexp_into_is_the_where_formula_bit_for_bit_except_at_zero(dtype, gen):
    x = torch.cat([_edge_log_probs(dtype).clamp(max=0.0), -torch.rand(5000, generator=gen, dtype=dtype) * 3])
    got = _log1mexp_into((x > LOG_HALF).to(dtype), torch.expm1(x).neg_(), torch.exp(x))
    want = log1mexp(x)
    zero = x == 0
    assert _bits(got[~zero]).equal(_bits(want[~zero]))
    assert want[zero].eq(-math.inf).all() and got[zero].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_binary_kl_non_finite_inputs_as_the_where_formula(dtype):
    """Not reached through the loss (non-finite tokens are zeroed first), but the values agree there too."""
    special = torch.tensor([math.nan, -math.inf, math.inf, 0.0, -0.3, -3.0], dtype=dtype)
    log_pi, log_mu = torch.meshgrid(special, special, indexing="ij")
    _assert_same(binary_kl(log_pi, log_mu), _old_binary_kl(log_pi, log_mu))


def test_binary_kl_with_flushed_denormals(gen):
    """Where the CPU flushes denormals the clamp to the smallest float is 0 and -inf comes back: same values."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        for log_pi, log_mu in _kl_inputs(torch.float32, gen):
            _assert_same(binary_kl(log_pi, log_mu), _old_binary_kl(log_pi, log_mu))
    finally:
        torch.set_flush_denormal(False)


# ---------------------------------------------------------------------------------- the sanitising path
def _dirty(gen, dtype, shape=(6, 50)):
    x = torch.randn(*shape, generator=gen, dtype=dtype)
    specials = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 3e38], dtype=dtype)
    pick = torch.rand(*shape, generator=gen) < 0.2
    x[pick] = specials[torch.randint(0, 6, (int(pick.sum()),), generator=gen)]
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_mask_and_zeroing_equal_isfinite_and_where(dtype, gen):
    a, b, c, d = (_dirty(gen, dtype) for _ in range(4))
    want = a.isfinite() & b.isfinite() & c.isfinite()
    assert _finite(a, b, c).equal(want)
    assert _finite(a, b, c, d).equal(want & d.isfinite())
    assert _finite(a, None, c).equal(a.isfinite() & c.isfinite())
    huge = torch.full((3,), torch.finfo(dtype).max, dtype=dtype)
    assert _finite(huge, huge, -huge).all()  # no sum of values that could overflow
    valid = want & (torch.rand(want.shape, generator=gen) > 0.3)
    got = _zero_off(a, valid.to(dtype))
    torch.testing.assert_close(got, torch.where(valid, a, 0.0), rtol=0, atol=0)
    assert _bits(got)[valid].equal(_bits(a)[valid])  # the kept entries bit for bit (a -0 stays -0)


def test_finite_or_zero_graph_equals_the_where_graph(gen):
    log_prob = _dirty(gen, torch.float64)
    valid = log_prob.isfinite() & (torch.rand(log_prob.shape, generator=gen) > 0.3)
    coef = torch.randn(log_prob.shape, generator=gen, dtype=torch.float64) * valid  # 0 off valid, as the gate's
    upstream = torch.rand(log_prob.shape, generator=gen, dtype=torch.float64)
    grads = []
    for graph in (lambda x: torch.where(valid, x, 0.0), _FiniteOrZero.apply):
        leaf = log_prob.clone().requires_grad_(True)
        loss = graph(leaf) * coef
        (loss * upstream).sum().backward()
        grads.append((loss.detach(), leaf.grad))
    (loss_where, grad_where), (loss_new, grad_new) = grads
    torch.testing.assert_close(loss_new, loss_where, rtol=0, atol=0)
    torch.testing.assert_close(grad_new, grad_where, rtol=0, atol=0)
    assert grad_new[~valid].eq(0).all()


# ------------------------------------------------------------------------------------- the soft gate
def _old_prefix_gate(z, s_excl, w_excl, delta_b, toward_mu, valid, params):
    delta = params.delta
    over_token = z > delta
    allowance = delta + delta_b[:, None] * w_excl
    rejected = over_token | (z > allowance - s_excl) if params.prefix_budget else over_token
    masked = valid & ~toward_mu & rejected
    keep = valid & ~masked
    if params.gate == "hard":
        return keep.to(z.dtype), masked, masked & ~over_token
    x = z / delta
    if params.prefix_budget:
        x = torch.maximum(x, (s_excl + z) / allowance)
    weight = torch.where(valid, torch.where(keep, 1.0, 1.0 / x.clamp(min=1.0)), 0.0)
    return weight, masked, masked & ~over_token


@pytest.mark.parametrize("setting", [{"gate": "soft"}, {"gate": "soft", "prefix_budget": False}, {"gate": "hard"}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prefix_gate_bit_for_bit_as_the_where_formula(setting, dtype, gen):
    cfg = LossParams(**setting)
    div = torch.rand(8, 60, generator=gen, dtype=dtype) * 0.4
    div[0, :5] = 0.0
    div[1, :5] = cfg.delta  # exactly on the token threshold
    valid = torch.rand(8, 60, generator=gen) > 0.15
    toward = torch.rand(8, 60, generator=gen) > 0.6
    w = torch.where(valid, position_weights(torch.arange(1, 61, dtype=dtype)[None], 60.0, cfg.w_min), 0.0)
    z = w * torch.where(valid, div, 0.0)
    delta_b = torch.rand(8, generator=gen, dtype=dtype) * 0.05
    args = (z, exclusive_cumsum(z), exclusive_cumsum(w), delta_b, toward, valid, cfg)
    got, want = prefix_gate(*args), _old_prefix_gate(*args)
    assert _bits(got[0]).equal(_bits(want[0])) and got[1].equal(want[1]) and got[2].equal(want[2])
    assert got[1].any() and (got[0] > 0).any() and (got[0] < 1).any()


# --------------------------------------------------------------------------------------- the shuffle
def test_shuffled_positions_on_cpu_are_uniform_permutations_of_each_prefix(gen):
    lengths = torch.tensor([0, 1, 2, 5, 40, 40])
    first = torch.zeros(5, 5)  # first[i, v - 1]: how often row 3 put position v in column i
    for _ in range(2000):
        pos = shuffled_positions(lengths, 40, generator=gen)
        first[torch.arange(5), pos[3, :5] - 1] += 1
    assert pos.dtype == torch.int64
    for b, n in enumerate(lengths.tolist()):
        assert sorted(pos[b, :n].tolist()) == list(range(1, n + 1))
        assert pos[b, n:].tolist() == list(range(n + 1, 41))
    assert not pos[4].equal(pos[5])  # rows of the same length are drawn independently
    assert 330 < first.min() and first.max() < 470  # 400 each (sd 18)


def test_shuffled_positions_same_permutation_in_every_dtype_and_the_sort_fallback(gen):
    lengths = torch.tensor([3, 17, 0, 25])
    state = gen.get_state()
    ints = shuffled_positions(lengths, 25, generator=gen)
    for dtype in (torch.float32, torch.float64):
        gen.set_state(state)
        assert shuffled_positions(lengths, 25, generator=gen, dtype=dtype).equal(ints.to(dtype))
    by_sort = _shuffled_by_sort(lengths, 25, gen)  # the non-CPU path, here on CPU
    for b, n in enumerate(lengths.tolist()):
        assert sorted(by_sort[b, :n].tolist()) == list(range(1, n + 1))
        assert by_sort[b, n:].tolist() == list(range(n + 1, 26))
