"""Host side of the fused CPPO loss: launches ``cppo_triton.cppo_fwd_kernel`` (one program per response) and
wraps it in an autograd function whose backward is grad * coefficient, the only saved tensor.

d loss_t / d log pi_t is the per-token coefficient -w_t sg(min(rho_t, cap)) A_t (times the IS weight), so
nothing else is kept for the backward. Scalars travel in a tensor of the compute dtype (Triton passes
Python floats as fp32), so float64 inputs are computed in float64 throughout, which is how the tests compare
the kernel with the float64 reference.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from verl_cppo.core.mask import response_lengths, shuffled_positions
from verl_cppo.core.token_loss import RHO_MAX, TokenLossParams, check_shapes
from verl_cppo.kernels import interpreting
from verl_cppo.kernels.cppo_triton import N_STATS, cppo_fwd_kernel

__all__ = ["fused_cppo_token_losses"]


@functools.lru_cache(maxsize=64)
def _params(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The scalars as a tensor of the compute dtype, cached: no host-to-device copy per call."""
    return torch.tensor(values, dtype=dtype, device=device)


def _row_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(old_log_prob, log_prob, advantages, response_mask, cfg: TokenLossParams, rollout_is_weights, block, debug):
    batch, width = log_prob.shape
    dtype = torch.promote_types(log_prob.dtype, torch.float32)
    device = log_prob.device
    lp, old, adv = (_row_major(t.detach()) for t in (log_prob, old_log_prob, advantages))
    mask = _row_major(response_mask.bool()).view(torch.uint8)
    isw = _row_major(rollout_is_weights.detach()) if rollout_is_weights is not None else None
    positions = None
    if cfg.shuffle_positions and cfg.position_weight:
        positions = shuffled_positions(response_lengths(response_mask), width)  # [B, T] int64
    cap = cfg.delta_b_max_mult * cfg.delta_b
    values = (cfg.delta, cfg.w_min, 1 - cfg.w_min, cfg.delta_b, cap, cfg.delta_b_quantile or 0.0)
    params = _params((*values, cfg.delta_b_scale, cfg.ratio_cap), dtype, device)
    calibrated = cfg.delta_b_quantile is not None and cap != cfg.delta_b and width > 0

    coef = torch.empty(batch, width, dtype=dtype, device=device)
    loss = torch.empty(batch, width, dtype=dtype, device=device)
    stats = torch.empty(batch, N_STATS, dtype=dtype, device=device)
    weight = torch.empty(batch, width, dtype=dtype, device=device) if debug else coef
    flags = torch.empty(batch, width, dtype=torch.int8, device=device) if debug else mask
    if block is None:  # 2048 x fp32 over 8 warps: 8 values per thread per vector, no register spills (sm_90)
        block = min(2048, max(128, triton.next_power_of_2(max(width, 1))))
    if batch > 0:
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            cppo_fwd_kernel[(batch,)](
                lp,
                old,
                adv,
                mask,
                isw if isw is not None else lp,
                positions if positions is not None else mask,
                params,
                coef,
                loss,
                stats,
                weight,
                flags,
                width,
                lp.stride(0),
                old.stride(0),
                adv.stride(0),
                mask.stride(0),
                isw.stride(0) if isw is not None else 0,
                positions.stride(0) if positions is not None else 0,
                cfg.position_horizon or 0,
                N_STATS=N_STATS,
                KL=cfg.divergence == "binary_kl",
                CALIBRATED=calibrated,
                POSITION_WEIGHT=cfg.position_weight,
                PREFIX_BUDGET=cfg.prefix_budget,
                SOFT=cfg.gate == "soft",
                HAS_ISW=isw is not None,
                HAS_POS=positions is not None,
                DEBUG=debug,
                LIBDEVICE=not interpreting(),
                KEY=tl.int64 if dtype == torch.float64 else tl.int32,
                KEY_BITS=64 if dtype == torch.float64 else 32,
                BLOCK=block,
                num_warps=8 if block >= 2048 else 4,
                enable_fp_fusion=False,  # no fma contraction: the same roundings as the torch path's separate ops
            )
    debug_out = (weight, flags) if debug else None
    return coef, loss, stats, debug_out


class _FusedCPPOLoss(torch.autograd.Function):
    """Forward: the kernel. Backward: grad * coefficient, the only saved tensor."""

    @staticmethod
    def forward(ctx, log_prob, old_log_prob, advantages, response_mask, cfg, rollout_is_weights, block, debug):
        coef, loss, stats, debug_out = _launch(
            old_log_prob, log_prob, advantages, response_mask, cfg, rollout_is_weights, block, debug
        )
        ctx.save_for_backward(coef)
        ctx.grad_dtype = log_prob.dtype
        extras = debug_out if debug_out is not None else ()
        ctx.mark_non_differentiable(stats, *extras)
        return loss, stats, *extras

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        (coef,) = ctx.saved_tensors
        return (grad_loss * coef).to(ctx.grad_dtype), None, None, None, None, None, None, None


def fused_cppo_token_losses(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cfg: TokenLossParams,
    rollout_is_weights: torch.Tensor | None = None,
    *,
    block: int | None = None,
    debug: bool = False,
):
    """The fused twin of ``verl_cppo.core.token_loss.cppo_token_losses`` + ``torch_stats`` (whole rows).

    Inputs as ``cppo_token_losses`` ([B, T] each). Returns (pg_losses [B, T] with grad to log_prob,
    stats [len(STAT_NAMES)] float64 sums for the metrics) and, with debug=True, also (gate weight [B, T],
    flags [B, T] int8: 1 = masked, 2 = masked by the budget, row_stats [B, len(STAT_NAMES)]).
    block: elements per program step (a power of 2; tests use small blocks to cross block borders).
    """
    check_shapes(
        log_prob=log_prob,
        old_log_prob=old_log_prob,
        advantages=advantages,
        response_mask=response_mask,
        rollout_is_weights=rollout_is_weights,
    )
    if block is not None and (block < 16 or block & (block - 1)):
        raise ValueError(f"block must be a power of 2 >= 16, got {block}")
    loss, row_stats, *extras = _FusedCPPOLoss.apply(
        log_prob, old_log_prob, advantages, response_mask, cfg, rollout_is_weights, block, debug
    )
    stats = row_stats.sum(dim=0, dtype=torch.float64)  # [N_STATS]
    if row_stats.shape[0] > 0:
        stats[RHO_MAX] = row_stats[:, RHO_MAX].amax()
    if debug:
        return loss, stats, (*extras, row_stats)
    return loss, stats
