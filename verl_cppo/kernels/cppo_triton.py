"""The CPPO mask and loss as one Triton program per response (the device code; ``fused_loss.py`` launches it).

The torch path (``verl_cppo.core.token_loss.cppo_token_losses`` over ``verl_cppo.core.mask``) is the reference;
this kernel computes the same per-token losses and the same per-row sums for the metrics, in three steps per row:

  pass 1     validity (response mask and finite inputs), the response's length, D_t (stored in the
             coefficient buffer, -1 off valid), the valid count, and the two counts that decide a calibrated
             delta_b whenever the clamp binds (quantile <= delta_b, or >= the cap);
  select     only for a row whose quantile lies strictly inside the clamp: its order statistic by a radix
             select on the bit patterns of D (non-negative floats order like their integer bits; 8 bits a
             pass, a 256-bin histogram each: 4 passes in fp32), the next one by one more pass, no sort;
  pass 2     blocks of the row with running prefix sums carried across blocks: weights, Z, the threshold,
             the gate, the coefficient -w_t sg(min(rho_t, cap)) A_t (times the IS weight, overwriting D), the
             per-token loss coefficient * log pi, and the row's metric sums.

Each step mirrors a torch function of ``verl_cppo.core``: ``_divergence`` = divergence, the weights = position_weights,
the one-scan hard threshold = mask.hard_gate, the soft gate = mask.prefix_gate, the clamp decided by counting
= mask._calibrated_delta_b, and the selected quantile = mask.row_quantile (torch.lerp's two forms).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from verl_cppo.core.divergence import KL_MAX
from verl_cppo.core.token_loss import LOG_RATIO_BOUND, STAT_NAMES

__all__ = ["N_STATS", "cppo_fwd_kernel"]

N_STATS = len(STAT_NAMES)
assert STAT_NAMES == (  # the order of the kernel's row stores below
    "response_tokens",
    "valid_tokens",
    "masked",
    "masked_by_budget",
    "ratio_truncated",
    "div_sum",
    "rho_sum",
    "rho_max",
    "gate_weight_sum",
    "neg_log_ratio_sum",
    "delta_b_sum",
    "nonempty_responses",
)
_KL_MAX = tl.constexpr(KL_MAX)
_LOG_RATIO_BOUND = tl.constexpr(LOG_RATIO_BOUND)


@triton.jit
def _expm1(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.expm1(x)
    u = tl.exp(x)  # Kahan: (u - 1) x / log u is accurate wherever exp and log are
    um1 = u - 1.0
    return tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, um1 * x / tl.log(tl.where(u == 1.0, 2.0, u))))


@triton.jit
def _log1p(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.log1p(x)
    u = 1.0 + x  # Goldberg: log(u) x / (u - 1)
    return tl.where(u == 1.0, x, tl.log(u) * x / tl.where(u == 1.0, 1.0, u - 1.0))


@triton.jit
def _log1mexp(x, LIBDEVICE: tl.constexpr):
    """log(1 - exp(x)) for x <= 0, as verl_cppo.core.divergence.log1mexp."""
    return tl.where(x > -0.6931471805599453, tl.log(-_expm1(x, LIBDEVICE)), _log1p(-tl.exp(x), LIBDEVICE))


@triton.jit
def _divergence(log_pi, log_mu, KL: tl.constexpr, LIBDEVICE: tl.constexpr):
    """binary_tv or binary_kl of verl_cppo.core.divergence, elementwise (finite inputs)."""
    if KL:
        log_pi = tl.minimum(log_pi, 0.0)
        log_mu = tl.minimum(log_mu, 0.0)
        mu = tl.exp(log_mu)
        head = mu * (log_mu - log_pi)
        rest_mu = tl.where(log_mu < 0, log_mu, -1.0)  # keeps the unused branch finite
        rest = -_expm1(rest_mu, LIBDEVICE) * (_log1mexp(rest_mu, LIBDEVICE) - _log1mexp(log_pi, LIBDEVICE))
        d = head + tl.where(log_mu < 0, rest, 0.0)
        d = tl.where(d == d, d, _KL_MAX)  # NaN (inf - inf) -> the cap; +-inf are clamped below
        d = tl.minimum(tl.maximum(d, 0.0), _KL_MAX)
    else:
        d = tl.abs(tl.exp(tl.minimum(log_pi, 0.0)) - tl.exp(tl.minimum(log_mu, 0.0)))  # log-probs > 0 count as 0
    return d + 0.0  # -0 -> +0, so that the bit patterns of D order like its values


@triton.jit
def _select(d_row, T, rank, KEY: tl.constexpr, KEY_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """The bit pattern of the valid D of the given 0-based ascending rank: a radix select, 8 bits a pass from
    the top (non-negative floats order like their bits), each pass a 256-bin histogram of the next digit over
    the values that match the digits chosen so far. Invalid entries hold -1 and are skipped."""
    prefix = rank * 0
    remaining = rank
    bins = tl.arange(0, 256)
    for p in tl.static_range(KEY_BITS // 8):
        shift = KEY_BITS - 8 * (p + 1)
        hist = tl.zeros([256], dtype=tl.int32)
        for start in range(0, T, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            d = tl.load(d_row + offs, mask=offs < T, other=-1.0)
            key = d.to(KEY, bitcast=True)
            candidate = d >= 0
            if p > 0:
                candidate = candidate & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
            hist += tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=candidate)
        chosen = tl.sum((tl.cumsum(hist, axis=0) <= remaining).to(tl.int32), axis=0)  # the digit holding rank
        remaining -= tl.sum(tl.where(bins < chosen, hist, 0), axis=0)
        prefix = prefix | (chosen.to(KEY) << shift)
    return prefix


@triton.jit
def _next_order_statistic(d_row, T, v, rank, d_max, BLOCK: tl.constexpr):
    """The valid D of ascending rank `rank` + 1 given v, the one of rank `rank`: v again if it repeats,
    else the smallest valid D above v (as mask.row_quantile)."""
    n_le = tl.zeros([BLOCK], dtype=tl.int32)
    above = tl.zeros([BLOCK], dtype=v.dtype) + d_max
    for start in range(0, T, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        d = tl.load(d_row + offs, mask=offs < T, other=-1.0)
        valid = d >= 0
        n_le += (valid & (d <= v)).to(tl.int32)
        above = tl.minimum(above, tl.where(valid & (d > v), d, d_max))
    result = v
    if tl.sum(n_le, axis=0) < rank + 2:
        result = tl.min(above, axis=0)
    return result


@triton.jit
def cppo_fwd_kernel(
    lp_ptr,  # [B, T] log pi
    old_ptr,  # [B, T] log mu
    adv_ptr,  # [B, T] advantages
    mask_ptr,  # [B, T] uint8 response mask
    isw_ptr,  # [B, T] IS weights (HAS_ISW)
    pos_ptr,  # [B, T] int64 1-based positions (HAS_POS)
    prm_ptr,  # [8] compute dtype: delta, w_min, 1 - w_min, delta_b, cap, q, scale, ratio_cap
    coef_ptr,  # [B, T] out: d loss / d log pi (holds D between the passes)
    loss_ptr,  # [B, T] out: per-token loss
    stats_ptr,  # [B, N_STATS] out: the row's STAT_NAMES sums
    weight_ptr,  # [B, T] out (DEBUG): gate weight
    flags_ptr,  # [B, T] out (DEBUG): int8, 1 = masked, 2 = masked by the budget
    T,
    s_lp,
    s_old,
    s_adv,
    s_mask,
    s_isw,
    s_pos,
    horizon,  # fixed H, or 0 for each response's own length
    N_STATS: tl.constexpr,
    KL: tl.constexpr,
    CALIBRATED: tl.constexpr,
    POSITION_WEIGHT: tl.constexpr,
    PREFIX_BUDGET: tl.constexpr,
    SOFT: tl.constexpr,
    HAS_ISW: tl.constexpr,
    HAS_POS: tl.constexpr,
    DEBUG: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    KEY: tl.constexpr,
    KEY_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lp_row = lp_ptr + row * s_lp
    old_row = old_ptr + row * s_old
    adv_row = adv_ptr + row * s_adv
    mask_row = mask_ptr + row * s_mask
    isw_row = isw_ptr + row * s_isw
    out_row = row * T
    delta = tl.load(prm_ptr + 0)
    cdt = delta.dtype
    w_min = tl.load(prm_ptr + 1)
    one_minus_w_min = tl.load(prm_ptr + 2)
    floor = tl.load(prm_ptr + 3)
    cap = tl.load(prm_ptr + 4)
    q = tl.load(prm_ptr + 5)
    scale = tl.load(prm_ptr + 6)
    ratio_cap = tl.load(prm_ptr + 7)
    zero = tl.zeros([BLOCK], dtype=cdt)
    izero = tl.zeros([BLOCK], dtype=tl.int32)

    # pass 1: validity, length, D, counts
    length_v = izero
    n_resp_v = izero
    n_valid_v = izero
    n_low_v = izero
    n_under_v = izero
    d_max_v = zero
    for start in range(0, T, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < T
        resp = (tl.load(mask_row + offs, mask=inb, other=0) != 0) & inb
        lp = tl.load(lp_row + offs, mask=inb, other=0.0).to(cdt)
        lm = tl.load(old_row + offs, mask=inb, other=0.0).to(cdt)
        a = tl.load(adv_row + offs, mask=inb, other=0.0).to(cdt)
        valid = resp & (lp - lp == 0) & (lm - lm == 0) & (a - a == 0)  # x - x == 0: x is finite
        if HAS_ISW:
            isw = tl.load(isw_row + offs, mask=inb, other=0.0).to(cdt)
            valid = valid & (isw - isw == 0)
        length_v = tl.maximum(length_v, tl.where(resp, offs + 1, 0))
        n_resp_v += resp.to(tl.int32)
        n_valid_v += valid.to(tl.int32)
        d = _divergence(tl.where(valid, lp, 0.0), tl.where(valid, lm, 0.0), KL, LIBDEVICE)
        d = tl.where(valid, d, -1.0)
        tl.store(coef_ptr + out_row + offs, d, mask=inb)
        if CALIBRATED:
            scaled = scale * d
            n_low_v += (valid & (scaled <= floor)).to(tl.int32)
            n_under_v += (valid & (scaled < cap)).to(tl.int32)
            d_max_v = tl.maximum(d_max_v, d)
    length = tl.max(length_v, axis=0)
    n_valid = tl.sum(n_valid_v, axis=0)
    tl.debug_barrier()

    # delta_b: fixed, decided by the clamp, or the exact quantile by selection
    delta_b = floor
    if CALIBRATED:
        rank = q * tl.maximum(n_valid.to(cdt) - 1.0, 0.0)
        below = tl.floor(rank)
        above = tl.ceil(rank)
        at_floor = (tl.sum(n_low_v, axis=0).to(cdt) > above) | (n_valid == 0)
        at_cap = tl.sum(n_under_v, axis=0).to(cdt) <= below
        if at_floor:
            delta_b = floor
        elif at_cap:
            delta_b = cap
        else:
            d_row = coef_ptr + out_row
            v_below = _select(d_row, T, below.to(KEY), KEY, KEY_BITS, BLOCK).to(cdt, bitcast=True)
            v_above = v_below
            if above > below:
                d_max = tl.max(d_max_v, axis=0)
                v_above = _next_order_statistic(d_row, T, v_below, below.to(tl.int32), d_max, BLOCK)
            frac = rank - below  # torch.lerp's two forms
            if frac < 0.5:
                quant = v_below + frac * (v_above - v_below)
            else:
                quant = v_above - (v_above - v_below) * (1.0 - frac)
            delta_b = tl.minimum(tl.maximum(scale * quant, floor), cap)

    # pass 2: weights, prefix sums, gate, loss
    if horizon > 0:
        span = tl.maximum(horizon - 1, 1).to(cdt)
    else:
        span = tl.maximum(length - 1, 1).to(cdt)
    carry_z = tl.sum(zero, axis=0)
    carry_w = carry_z
    carry_e = carry_z
    masked_v = izero
    by_budget_v = izero
    trunc_v = izero
    div_v = zero
    rho_v = zero
    rho_max_v = zero
    gate_v = zero
    neg_lr_v = zero
    for start in range(0, T, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < T
        d = tl.load(coef_ptr + out_row + offs, mask=inb, other=-1.0)
        valid = d >= 0
        d = tl.maximum(d, 0.0)
        lp = tl.where(valid, tl.load(lp_row + offs, mask=inb, other=0.0).to(cdt), 0.0)
        lm = tl.where(valid, tl.load(old_row + offs, mask=inb, other=0.0).to(cdt), 0.0)
        a = tl.where(valid, tl.load(adv_row + offs, mask=inb, other=0.0).to(cdt), 0.0)
        log_ratio = tl.minimum(tl.maximum(lp - lm, -_LOG_RATIO_BOUND), _LOG_RATIO_BOUND)
        rho = tl.exp(log_ratio)
        away = (rho - 1.0) * a > 0
        if POSITION_WEIGHT:
            if HAS_POS:
                pos = tl.load(pos_ptr + row * s_pos + offs, mask=inb, other=1).to(cdt)
            else:
                pos = (offs + 1).to(cdt)
            w = 1.0 - one_minus_w_min * (pos - 1.0) / span
            w = tl.where(valid, tl.minimum(tl.maximum(w, w_min), 1.0), 0.0)
        else:
            w = tl.where(valid, 1.0, 0.0).to(cdt)
        z = w * d
        over_token = z > delta
        if SOFT:  # S and W separately, as verl_cppo.core.mask.prefix_gate
            s_excl = carry_z + (tl.cumsum(z, axis=0) - z)
            w_excl = carry_w + (tl.cumsum(w, axis=0) - w)
            allowance = delta + delta_b * w_excl
            rejected = over_token
            if PREFIX_BUDGET:
                rejected = over_token | (z > allowance - s_excl)
        else:  # one scan of delta_b w - Z, as verl_cppo.core.mask.hard_gate
            e = delta_b * w - z
            room = tl.minimum(carry_e + (tl.cumsum(e, axis=0) - e), 0.0)
            rejected = over_token
            if PREFIX_BUDGET:
                rejected = z > delta + room
            carry_e += tl.sum(e, axis=0)
        masked = valid & away & rejected
        keep = valid & (masked == 0)
        if SOFT:
            x = z / delta
            if PREFIX_BUDGET:
                x = tl.maximum(x, (s_excl + z) / allowance)
            gate = tl.where(keep, 1.0, tl.where(valid, 1.0 / tl.maximum(x, 1.0), 0.0))
        else:
            gate = tl.where(keep, 1.0, 0.0).to(cdt)
        coef = -(tl.minimum(rho, ratio_cap) * a * gate)
        loss = coef * lp
        if HAS_ISW:
            isw = tl.where(valid, tl.load(isw_row + offs, mask=inb, other=0.0).to(cdt), 0.0)
            loss = loss * isw
            coef = coef * isw
        tl.store(coef_ptr + out_row + offs, coef, mask=inb)
        tl.store(loss_ptr + out_row + offs, loss, mask=inb)
        if DEBUG:
            tl.store(weight_ptr + out_row + offs, gate, mask=inb)
            flags = masked.to(tl.int8) + 2 * (masked & (over_token == 0)).to(tl.int8)
            tl.store(flags_ptr + out_row + offs, flags, mask=inb)
        carry_z += tl.sum(z, axis=0)
        carry_w += tl.sum(w, axis=0)
        masked_v += masked.to(tl.int32)
        by_budget_v += (masked & (over_token == 0)).to(tl.int32)
        rho_valid = tl.where(valid, rho, 0.0)
        trunc_v += (rho_valid > ratio_cap).to(tl.int32)
        div_v += d
        rho_v += rho_valid
        rho_max_v = tl.maximum(rho_max_v, rho_valid)
        gate_v += gate
        neg_lr_v -= tl.where(valid, log_ratio, 0.0)

    # the row's sums, in the order of verl_cppo.core.token_loss.STAT_NAMES
    nonempty = (n_valid > 0).to(cdt)
    stats_row = stats_ptr + row * N_STATS
    tl.store(stats_row + 0, tl.sum(n_resp_v, axis=0).to(cdt))
    tl.store(stats_row + 1, n_valid.to(cdt))
    tl.store(stats_row + 2, tl.sum(masked_v, axis=0).to(cdt))
    tl.store(stats_row + 3, tl.sum(by_budget_v, axis=0).to(cdt))
    tl.store(stats_row + 4, tl.sum(trunc_v, axis=0).to(cdt))
    tl.store(stats_row + 5, tl.sum(div_v, axis=0))
    tl.store(stats_row + 6, tl.sum(rho_v, axis=0))
    tl.store(stats_row + 7, tl.max(rho_max_v, axis=0))
    tl.store(stats_row + 8, tl.sum(gate_v, axis=0))
    tl.store(stats_row + 9, tl.sum(neg_lr_v, axis=0))
    tl.store(stats_row + 10, delta_b * nonempty)
    tl.store(stats_row + 11, nonempty)
