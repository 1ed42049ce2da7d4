"""The fused Triton kernel against the float64 loop reference, run by Triton's interpreter on CPU tensors.

conftest.py sets TRITON_INTERPRET=1 before triton is imported; small rows and 16-element blocks make every
row cross block borders. benchmarks/bench_loss.py --check runs the same comparison with the compiled kernel
on a GPU (float64 and float32).
"""

import os

import pytest
import torch

from tests.support.float32_bounds import UNIT_ROUNDOFF
from tests.support.loss_call import call_loss
from tests.support.reference import RefParams, near_threshold_row, random_case, reference_cppo, reference_loss_and_grad
from tests.support.verl_inputs import AGG_MODES, actor_config
from verl_cppo.config import CPPOConfig
from verl_cppo.core.token_loss import STAT_NAMES, cppo_token_losses, torch_stats

BLOCK = 16
DELTA_B = STAT_NAMES.index("delta_b_sum")
SETTINGS = [
    {},
    {"delta_b_quantile": None, "delta_b": 0.015},
    {"delta_b_quantile": 0.5, "delta_b_scale": 1.5, "delta_b_max_mult": 50.0},  # quantiles inside the clamp
    {"position_horizon": 7, "gate": "soft"},
    {"gate": "soft", "delta_b_quantile": None},
    {"divergence": "binary_kl", "delta": 0.05},
    {"position_weight": False, "prefix_budget": False},
    {"w_min": 0.3, "delta": 0.1, "delta_b": 0.005},
]


@pytest.fixture
def fused():
    assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py turns on Triton's interpreter"
    from verl_cppo.kernels.fused_loss import fused_cppo_token_losses

    return fused_cppo_token_losses


def _run_fused(fused, old, new, adv, mask, cfg, is_weights=None):
    leaf = new.clone().requires_grad_(True)
    loss, stats, (weight, flags, rows) = fused(old, leaf, adv, mask, cfg, is_weights, block=BLOCK, debug=True)
    return leaf, loss, stats, weight, flags, rows


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # numpy's log(0) inside the interpreter
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_fused_mask_loss_and_stats_match_reference_and_torch_path(setting, fused, gen):
    cfg, p = CPPOConfig(**setting), RefParams(**setting)
    old, new, adv, mask = random_case(gen, batch=5, width=37, spread=0.4)
    leaf, loss, stats, weight, flags, rows = _run_fused(fused, old, new, adv, mask, cfg)
    ref = reference_cppo(old, new, adv, mask, p)
    assert (flags & 1).bool().tolist() == ref.masked
    assert (flags & 2).bool().tolist() == ref.by_budget
    torch.testing.assert_close(weight, torch.tensor(ref.weight, dtype=torch.float64), rtol=1e-12, atol=0)
    nonempty = mask.any(dim=-1)
    want_db = torch.tensor(ref.delta_b, dtype=torch.float64) * nonempty
    torch.testing.assert_close(rows[:, DELTA_B], want_db, rtol=1e-12, atol=0)
    if "delta_b_max_mult" in setting:  # the bisection path ran: some quantile lies strictly inside the clamp
        inside = (want_db > p.delta_b) & (want_db < p.delta_b * p.delta_b_max_mult)
        assert inside.sum() >= 2
    coef = torch.tensor(ref.coef, dtype=torch.float64)
    torch.testing.assert_close(loss.detach(), coef * torch.where(coef != 0, new, 0.0), rtol=1e-12, atol=1e-15)
    loss.sum().backward()
    torch.testing.assert_close(leaf.grad, coef, rtol=1e-12, atol=1e-15)
    terms = cppo_token_losses(old, new, adv, mask, cfg)
    torch.testing.assert_close(stats, torch_stats(terms, mask, cfg.ratio_cap), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("calibrated", [False, True])
def test_fusednear_threshold_rows(calibrated, fused, gen):
    setting = {"delta_b_quantile": 0.9 if calibrated else None, "delta_b": 0.02}
    cfg, p = CPPOConfig(**setting), RefParams(**setting)
    rows = [near_threshold_row(gen, 40, p, 0.04 if calibrated else 0.02, 1e-9) for _ in range(3)]
    old = torch.stack([r[0] for r in rows])
    new = torch.stack([r[1] for r in rows])
    adv = torch.ones_like(old)
    mask = torch.ones_like(old, dtype=torch.bool)
    flags = _run_fused(fused, old, new, adv, mask, cfg)[4]
    ref = reference_cppo(old, new, adv, mask, p)
    assert (flags & 1).bool().tolist() == ref.masked
    assert 0.2 < sum(map(sum, ref.masked)) / mask.numel() < 0.8


def _registered_cppo(old, new, adv, mask, mode, kernel, is_weights=None):
    loss, grad, metrics = call_loss(
        old, new, adv, mask, mode, actor_config(mode, cppo={"kernel": kernel}), rollout_is_weights=is_weights
    )
    return loss.item(), grad, metrics


@pytest.mark.parametrize("mode", AGG_MODES)
def test_registered_loss_with_kernel_triton_matches_reference(mode, fused, gen):
    """loss_mode=cppo with cppo.kernel=triton: loss and gradient through verl's agg_loss, every mode."""
    old, new, adv, mask = random_case(gen, batch=4, width=21, spread=0.5)
    loss, grad, _ = _registered_cppo(old, new, adv, mask, mode, "triton")
    ref_loss, ref_grad, _ = reference_loss_and_grad(old, new, adv, mask, RefParams(), mode)
    tol = 1e-7 if mode == "seq-mean-token-mean" else 1e-12  # verl adds 1e-8 to per-sequence token counts
    assert loss == pytest.approx(ref_loss, rel=tol, abs=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=1e-14)


def test_registered_loss_kernels_agree_with_is_weights_and_metrics(fused, gen):
    old, new, adv, mask = random_case(gen, batch=4, width=21, spread=0.5)
    is_weights = torch.rand(old.shape, generator=gen, dtype=old.dtype) * 2
    loss, grad, metrics = _registered_cppo(old, new, adv, mask, "token-mean", "triton", is_weights)
    t_loss, t_grad, t_metrics = _registered_cppo(old, new, adv, mask, "token-mean", "torch", is_weights)
    assert loss == pytest.approx(t_loss, rel=1e-12, abs=1e-15)
    torch.testing.assert_close(grad, t_grad, rtol=1e-12, atol=1e-15)
    assert tuple(metrics) == tuple(t_metrics)
    assert metrics == pytest.approx(t_metrics, rel=1e-12, abs=1e-15)
    assert 0 < metrics["actor/cppo_masked_frac"] < 1


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf - inf in the interpreter's finite test
def test_fused_hostile_inputs_match_torch_path(fused, gen):
    """Non-finite entries, empty rows, a length-1 response, log-ratios past +-20, NaN IS weights."""
    old, new, adv, mask = random_case(gen, batch=6, width=20, holes=0.2, spread=0.6)
    mask[0] = False  # empty row
    mask[1] = False
    mask[1, 0] = True  # length-1 response
    new[2, 3], old[3, 4], adv[4, 5] = float("nan"), float("-inf"), float("inf")
    old[5, :3] = -60.0  # rho clamped at exp(20), truncated by the cap
    is_weights = torch.rand(old.shape, generator=gen, dtype=old.dtype)
    is_weights[2, 7] = float("nan")
    cfg = CPPOConfig()
    leaf, loss, stats, _, flags, _ = _run_fused(fused, old, new, adv, mask, cfg, is_weights)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    t_leaf = new.clone().requires_grad_(True)
    terms = cppo_token_losses(old, t_leaf, adv, mask, cfg, is_weights)
    terms.pg_losses.sum().backward()
    torch.testing.assert_close(loss.detach(), terms.pg_losses.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(leaf.grad, t_leaf.grad, rtol=1e-12, atol=1e-15)
    assert (leaf.grad[2, 3] == 0) and (leaf.grad[2, 7] == 0) and torch.isfinite(leaf.grad).all()
    assert (flags & 1).bool().equal(terms.gate.masked)
    torch.testing.assert_close(stats, torch_stats(terms, mask, cfg.ratio_cap), rtol=1e-12, atol=1e-12)
    assert stats[STAT_NAMES.index("valid_tokens")] < stats[STAT_NAMES.index("response_tokens")]


def test_fused_float32_and_bf16_follow_the_torch_path(fused, gen):
    old, new, adv, mask = random_case(gen, batch=4, width=33, spread=0.3)
    for dtype in (torch.float32, torch.bfloat16):
        o, n, a = old.to(dtype), new.to(dtype), adv.to(dtype)
        leaf, loss, _, _, flags, _ = _run_fused(fused, o, n, a, mask, CPPOConfig())
        loss.sum().backward()
        t_leaf = n.clone().requires_grad_(True)
        terms = cppo_token_losses(o, t_leaf, a, mask, CPPOConfig())
        terms.pg_losses.sum().backward()
        assert loss.dtype == torch.float32 and leaf.grad.dtype == dtype
        assert (flags & 1).bool().equal(terms.gate.masked)  # these rows have no token within float32 rounding
        # Both compute -M min(rho, cap) A log pi in float32 from the same (upcast) inputs with the same rounded
        # log-ratio; exp differs by <= 2 ulp (4u, each within 1 ulp), and each of <= 3 products rounds a
        # value that differs (2u): <= 10u relative per token (u = 2^-24), 2x margin. The gradient (the
        # coefficient, 2 products) likewise <= 8u, then rounded to the input dtype (bf16: the two may land one
        # ulp apart, 2^-7 relative). A wrong gate or rho moves a token's loss by far more than 1e-5.
        u, eps = UNIT_ROUNDOFF, torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
        torch.testing.assert_close(loss.detach(), terms.pg_losses.detach(), rtol=2 * 10 * u, atol=0)
        torch.testing.assert_close(leaf.grad, t_leaf.grad, rtol=2 * 8 * u + eps, atol=0)


def test_fused_shuffled_positions_match_torch_path(fused, gen):
    old, new, adv, mask = random_case(gen, batch=4, width=19, holes=0.0, spread=0.5)
    cfg = CPPOConfig(shuffle_positions=True)
    torch.manual_seed(7)
    _, _, _, weight, flags, _ = _run_fused(fused, old, new, adv, mask, cfg)
    torch.manual_seed(7)  # both paths draw the permutation from the global generator
    terms = cppo_token_losses(old, new, adv, mask, cfg)
    assert (flags & 1).bool().equal(terms.gate.masked)
    torch.testing.assert_close(weight, terms.gate.weight, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("q", [0.9, 0.5, 0.0, 1.0])
def test_fused_quantile_selection_with_ties_equals_torch_path(dtype, q, fused, gen):
    """Every row's quantile inside the clamp (every row runs the radix select), D with many ties."""
    cfg = CPPOConfig(delta_b=1e-6, delta_b_max_mult=1e9, delta_b_quantile=q)
    old = torch.full((6, 40), 0.5, dtype=torch.float64).log()
    steps = torch.randint(1, 6, (6, 40), generator=gen).double()
    new = (0.5 + 0.01 * steps).log()  # D takes five distinct values
    adv = torch.ones_like(old)
    mask = torch.rand(6, 40, generator=gen) > 0.2
    mask[0, 1:] = False
    mask[0, 0] = True  # one valid token
    old, new, adv = old.to(dtype), new.to(dtype), adv.to(dtype)
    rows = _run_fused(fused, old, new, adv, mask, cfg)[5]
    want = cppo_token_losses(old, new, adv, mask, cfg).gate.delta_b
    if dtype == torch.float64:  # the same order statistics and interpolation, bit for bit
        assert rows[:, DELTA_B].tolist() == want.tolist()
    else:  # exp differs in the last bit between numpy (the interpreter) and torch
        # D = |pi - mu| cancels: each exp within 1 ulp in both, so D's differ by <= 4u (pi + mu) + 2u D (their
        # own subtraction); the quantile's interpolation adds <= 6u D, delta_b_scale (1.0 here) 2u delta_b.
        # u = 2^-24; 2x margin. The order statistic one place off moves delta_b by ~1e-2 (five D values).
        p, m = new.double().exp(), old.double().exp()  # [6, 40]
        d = (p - m).abs()  # [6, 40]
        gap = float((4 * (p + m) + 8 * d)[mask].max()) * UNIT_ROUNDOFF + 2 * UNIT_ROUNDOFF * float(want.abs().max())
        torch.testing.assert_close(rows[:, DELTA_B], want, rtol=0, atol=2 * gap)
    assert (want > 1e-6).sum() >= 5


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # numpy's log(0) inside the interpreter
@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.parametrize("divergence", ["binary_tv", "binary_kl"])
def test_fused_counts_log_probs_above_0_as_0_like_the_torch_path(divergence, fused, gen):
    """Finite log-probs above 0 (0.5, 88.8, 1e30): the kernel's D, loss and statistics stay finite and match."""
    cfg = CPPOConfig(divergence=divergence)
    old, new, adv, mask = random_case(gen, batch=3, width=20, spread=0.4)
    old[0, 3], new[1, 4], old[2, 5], new[2, 5] = 0.5, 88.8, 1e30, 1e30
    _, loss, stats, *_ = _run_fused(fused, old, new, adv, mask, cfg)
    terms = cppo_token_losses(old, new, adv, mask, cfg)
    assert torch.isfinite(stats).all() and torch.isfinite(loss).all()
    torch.testing.assert_close(stats, torch_stats(terms, mask, cfg.ratio_cap), rtol=1e-12, atol=1e-12)
