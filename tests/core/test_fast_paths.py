"""The exact shortcuts of the torch path (selection instead of sort, the clamp decided by counting, one
prefix scan, the finite-input fast path) against plain torch formulations, and the kernel choice."""

import sys

import pytest
import torch
import torch.nn.functional as F

from tests.support.reference import LossParams, random_case
from verl_cppo.core.mask import (
    calibrated_delta_b,
    cppo_mask,
    exclusive_cumsum,
    hard_gate,
    position_weights,
    prefix_gate,
    response_lengths,
    row_quantile,
)
from verl_cppo.core.token_loss import _all_finite, cppo_token_losses
from verl_cppo.kernels import use_triton


def _torch_quantile_rows(values, valid, q):
    return [torch.quantile(values[b][valid[b]], q).item() if valid[b].any() else 0.0 for b in range(len(values))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 0.97, 1.0])
def test_row_quantile_is_torch_quantile_with_ties_and_tiny_rows(dtype, q, gen):
    values = torch.randint(0, 6, (9, 13), generator=gen).to(dtype) / 7  # many ties
    valid = torch.rand(9, 13, generator=gen) > 0.4
    valid[0] = False  # empty
    valid[1] = False
    valid[1, 12] = True  # one value, last column
    valid[2] = False
    valid[2, :2] = True  # two values
    valid[3] = True  # full row
    values[~valid] = -5.0  # what invalid entries hold must not matter
    assert row_quantile(values, valid, q).tolist() == _torch_quantile_rows(values, valid, q)


def test_row_quantile_edge_shapes():
    assert row_quantile(torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool), 0.9).shape == (0,)
    assert row_quantile(torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.bool), 0.9).tolist() == [0.0] * 3
    one = torch.tensor([[0.25]])
    assert row_quantile(one, torch.tensor([[True]]), 0.9).tolist() == [0.25]


@pytest.mark.parametrize("scale", [1.0, 1.7])
def test_calibrated_delta_b_equals_clamped_torch_quantile(scale, gen):
    """Rows at the floor, at the cap, strictly inside, and with the quantile exactly on floor and cap."""
    cfg = LossParams(delta_b=0.02, delta_b_max_mult=2.0, delta_b_scale=scale)
    div = torch.rand(8, 31, generator=gen, dtype=torch.float64) * 0.01  # quantile below the floor
    div[1] = 0.03 + div[1]  # above the cap
    div[2] = torch.linspace(0.0, 0.035 / scale, 31, dtype=torch.float64)  # inside
    div[3] = 0.02 / scale  # exactly on the floor (after scaling up to rounding)
    div[4] = 0.04 / scale  # exactly on the cap
    div[5, :] = 0.0
    div[5, 28:] = 1.0  # a few large values above the 0.9 rank
    valid = torch.rand(8, 31, generator=gen) > 0.2
    valid[6] = False  # empty: the floor
    valid[7] = False
    valid[7, 3] = True
    got = calibrated_delta_b(div, valid, cfg)
    quant = torch.tensor(_torch_quantile_rows(div, valid, 0.9), dtype=torch.float64)
    want = (scale * quant).clamp(0.02, 0.04)
    want[6] = 0.02
    assert got.tolist() == want.tolist()
    assert 0.02 < got[2] < 0.04  # the selection path ran
    inside_free = div.clone()
    inside_free[2] = 0.001  # now every row is decided by counting alone
    want_free = want.clone()
    want_free[2] = 0.02
    assert calibrated_delta_b(inside_free, valid, cfg).tolist() == want_free.tolist()


def test_exclusive_cumsum_is_the_shifted_scan(gen):
    x = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    assert exclusive_cumsum(x).equal(F.pad(torch.cumsum(x, -1)[..., :-1], (1, 0)))
    assert exclusive_cumsum(x[:, ::2]).equal(F.pad(torch.cumsum(x[:, ::2], -1)[..., :-1], (1, 0)))  # strided
    b = torch.rand(3, 5, generator=gen) > 0.5
    assert exclusive_cumsum(b).tolist() == F.pad(torch.cumsum(b, -1)[..., :-1], (1, 0)).tolist()
    assert exclusive_cumsum(x[:, :0]).shape == (4, 0)


def test_response_lengths_of_any_mask_dtype():
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    for m in (mask, mask.bool(), mask.float()):
        assert response_lengths(m).tolist() == [3, 0, 4]
        assert response_lengths(m).dtype == torch.long
    assert response_lengths(torch.zeros(2, 0, dtype=torch.bool)).tolist() == [0, 0]


@pytest.mark.parametrize("setting", [{}, {"prefix_budget": False}, {"w_min": 0.5, "delta_b": 0.001}])
def test_hard_gate_one_scan_equals_prefix_gate(setting, gen):
    """The one-scan threshold and prefix_gate's S/W form reject the same tokens (random, not near ties)."""
    cfg = LossParams(**setting)
    div = torch.rand(6, 40, generator=gen, dtype=torch.float64) * 0.3
    valid = torch.rand(6, 40, generator=gen) > 0.1
    toward = torch.rand(6, 40, generator=gen) > 0.6
    w = torch.where(valid, position_weights(torch.arange(1, 41.0)[None].double(), 40.0, cfg.w_min), 0.0)
    z = w * torch.where(valid, div, 0.0)
    delta_b = torch.full((6,), cfg.delta_b, dtype=torch.float64)
    one = hard_gate(z, w, delta_b, toward, valid, cfg)
    two = prefix_gate(z, exclusive_cumsum(z), exclusive_cumsum(w), delta_b, toward, valid, cfg)
    for a, b in zip(one, two):
        assert a.equal(b)
    assert one[1].any() and (one[2].any() or not cfg.prefix_budget)


def test_all_finite_detects_any_non_finite_entry():
    x = torch.zeros(3, 4)
    assert _all_finite(x, x, None)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[2, 1] = bad
        assert not _all_finite(x, y)
    huge = torch.full((2,), 1e308, dtype=torch.float64)
    assert not _all_finite(huge)  # an overflowing sum only sends the loss down the sanitising path


def test_non_finite_padding_takes_the_sanitising_path_with_the_same_result(gen):
    old, new, adv, mask = random_case(gen, batch=4, width=15, holes=0.0, spread=0.5)
    mask[:, :4] = True
    mask[:, 12:] = False
    cfg = LossParams()
    clean = cppo_token_losses(old, new, adv, mask, cfg)
    dirty_new = new.clone()
    dirty_new[:, 12:] = float("nan")  # non-finite only where the response mask is off
    dirty = cppo_token_losses(old, dirty_new, adv, mask, cfg)
    assert dirty.pg_losses.equal(clean.pg_losses)
    assert dirty.gate.masked.equal(clean.gate.masked)
    assert not dirty.nonfinite.any()


def test_kernel_choice(monkeypatch):
    cpu = torch.zeros(2, 3)
    assert not use_triton("torch", cpu)
    assert not use_triton("auto", cpu)  # auto never runs Triton on CPU tensors, interpreter or not
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"cppo.kernel='triton' needs CUDA tensors .* got device cpu"):
        use_triton("triton", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton("triton", cpu)
    monkeypatch.setitem(sys.modules, "triton", None)  # as if triton were not installed
    with pytest.raises(RuntimeError, match="triton package is not installed"):
        use_triton("triton", cpu)
    assert not use_triton("auto", cpu)


def test_cppo_mask_with_clean_div_and_validf_equals_the_plain_call(gen):
    div = torch.rand(5, 23, generator=gen, dtype=torch.float64) * 0.4
    valid = torch.rand(5, 23, generator=gen) > 0.2
    toward = torch.rand(5, 23, generator=gen) > 0.5
    cfg = LossParams(delta_b_quantile=0.5, delta_b_max_mult=10.0)
    dirty = div.clone()
    dirty[~valid] = float("nan")  # the plain call zeroes whatever lies off valid
    plain = cppo_mask(dirty, valid, toward, cfg)
    clean = cppo_mask(div * valid, valid, toward, cfg, validf=valid.double())
    for a, b in zip(plain, clean):
        assert a.equal(b)
    assert plain.masked.any()


def test_response_lengths_of_wide_low_precision_masks():
    mask = torch.zeros(2, 3000, dtype=torch.bfloat16)
    mask[0, 2999] = 1  # column 3000 is not a bfloat16 number
    mask[1, 256] = 1
    assert response_lengths(mask).tolist() == [3000, 257]
