"""The CPPO trust-region mask (arXiv 2606.10968, Algorithm 1), pure torch, no verl.

For one response with per-token divergence D_t (t = 1..T, 1-based positions counting every response token,
masked interior tokens included):

    w_t = clamp(1 - (1 - w_min) (t - 1) / (H - 1), w_min, 1)          position weight, H = horizon
    Z_t = w_t D_t,   S_t = sum_{j<=t} Z_j,   W_t = sum_{j<=t} w_j          over valid tokens only
    c_t = min(delta, delta + delta_b W_{t-1} - S_{t-1})                 token threshold under the budget
    keep_t = toward_mu_t  or  Z_t <= c_t                                 toward_mu_t: A_t (rho_t - 1) <= 0

So the first token gets the full delta, later tokens a looser delta / w_t, and once the weighted running
average of D exceeds delta_b the threshold shrinks (possibly below 0) until small-D tokens restore it.
delta_b is fixed or calibrated per response from a quantile of its D. The soft gate replaces 0/1 by
min(1, 1/x_t), x_t = max(Z_t / delta, S_t / (delta + delta_b W_{t-1})).

The pieces are separate functions so that the sharded path (shard-local rows, global prefix sums from a
distributed scan) reuses ``position_weights`` and ``prefix_gate`` unchanged. All tensors are [B, T] rows
that start at column 0 unless noted; everything here runs without gradient.

Speed without changing a result: the loss is launch-bound, so every [B, T] pass counts. The calibrated
delta_b is usually decided by the clamp, which two counts settle; the exact quantile, when needed, comes from
one kthvalue over all rows (``row_quantile``), never a sort. The hard gate needs one prefix scan
(``hard_gate``), not two. Comparisons that feed counts write floats (``compare``), masks become floats through
a uint8 view (``as_float``); both are several times faster than their bool forms on CPU.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

__all__ = [
    "CPPOMask",
    "MaskParams",
    "as_float",
    "calibrated_delta_b",
    "compare",
    "cppo_mask",
    "exclusive_cumsum",
    "hard_gate",
    "position_weights",
    "prefix_gate",
    "response_lengths",
    "row_quantile",
    "shuffled_positions",
]


class MaskParams(Protocol):
    """The fields of ``verl_cppo.config.CPPOConfig`` that the mask reads (documented there)."""

    delta: float
    w_min: float
    delta_b: float
    delta_b_quantile: float | None
    delta_b_scale: float
    delta_b_max_mult: float
    position_horizon: int | None
    gate: str
    position_weight: bool
    prefix_budget: bool


class CPPOMask(NamedTuple):
    weight: torch.Tensor  # [B, T] gate weight in [0, 1] (hard: 0/1); 0 wherever `valid` is False
    masked: torch.Tensor  # [B, T] bool, valid away-moving tokens the hard rule rejects (Z_t > c_t)
    masked_by_budget: torch.Tensor  # [B, T] bool, the masked tokens with Z_t <= delta (the budget rejected them)
    delta_b: torch.Tensor  # [B] delta_b in effect for each response


def as_float(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as 0/1 floats (through a uint8 view: several times faster than bool -> float on CPU)."""
    return mask.view(torch.uint8).to(dtype) if mask.dtype == torch.bool else mask.to(dtype)


def compare(op, a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    """op(a, b) (torch.gt, torch.le, ...) as 0/1 in a's float dtype and shape; `.bool()` of it is the mask.

    On CPU, torch compares into a float tensor about 3x faster than into a bool one, and the float result
    is what counting wants anyway. a [B, T] float, b broadcastable to it."""
    return op(a, b, out=torch.empty_like(a))


def response_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Position (1-based) of each row's last True entry, 0 for an empty row. mask [B, T] -> [B] int64.

    A float32 / float64 mask must hold 0/1 and is used as it is (no conversion)."""
    width = mask.shape[-1]
    if width == 0:
        return mask.new_zeros(mask.shape[:-1], dtype=torch.long)
    if (mask.dtype == torch.float32 and width < 2**24) or mask.dtype == torch.float64:
        maskf = mask  # column numbers below are exact in this dtype
    else:
        maskf = as_float(mask.bool(), torch.float32 if width < 2**24 else torch.float64)
    cols = torch.arange(1, width + 1, device=mask.device, dtype=maskf.dtype)  # [T]
    return (maskf * cols).amax(dim=-1).long()


def shuffled_positions(
    lengths: torch.Tensor, width: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.int64
):
    """1-based positions with each row's first `lengths[b]` positions randomly permuted (shuffle ablation).

    lengths [B] int64 -> positions [B, width] in `dtype` (int64, or a float dtype that holds `width` exactly);
    columns at or past the length keep their own position. On CPU each row is one ``torch.randperm`` of its own
    length (Fisher-Yates: about a tenth of a sort's cost there; the same permutation in every dtype for the
    same generator state); elsewhere one argsort of random keys for all rows (a few launches, not one a row).
    """
    if lengths.device.type == "cpu":
        positions = torch.arange(width, dtype=dtype).repeat(lengths.shape[0], 1)  # [B, T] 0-based
        for row, n in zip(positions, lengths.tolist(), strict=True):
            if n > 1:
                torch.randperm(min(n, width), generator=generator, dtype=dtype, out=row[:n])  # [n] into the row
        return positions.add_(1)
    return _shuffled_by_sort(lengths, width, generator).to(dtype)


def _shuffled_by_sort(lengths: torch.Tensor, width: int, generator: torch.Generator | None) -> torch.Tensor:
    """shuffled_positions as int64 from one argsort of random keys (any device)."""
    cols = torch.arange(width, device=lengths.device)  # [T]
    inside = cols < lengths[:, None]  # [B, T]
    keys = torch.rand(lengths.shape[0], width, device=lengths.device, generator=generator)  # [B, T]
    keys = torch.where(inside, keys, 2.0 + cols.to(keys.dtype))  # outside columns sort last, in order
    order = keys.argsort(dim=-1)  # [B, T]: order[b, i] = the column that gets position i + 1
    positions = torch.empty_like(order)
    positions.scatter_(-1, order, (cols + 1).expand_as(order).contiguous())  # [B, T]
    return positions


def position_weights(positions: torch.Tensor, horizon: torch.Tensor | float, w_min: float) -> torch.Tensor:
    """w_t = 1 - (1 - w_min)(t - 1)/(H - 1) clamped to [w_min, 1]; H <= 1 gives w = 1 at t = 1.

    positions [B, T] (1-based, float), horizon [B, 1] or a number -> [B, T] in positions' dtype.
    """
    span = horizon - 1
    span = span.clamp(min=1) if isinstance(span, torch.Tensor) else max(span, 1)
    return (1 - (1 - w_min) * (positions - 1) / span).clamp(w_min, 1.0)


def exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    """sum_{j<t} x_j along the last dim, as a shifted inclusive scan (exactly the sequential partial sums)."""
    if x.shape[-1] == 0:
        return torch.cumsum(x, dim=-1)
    if not x.is_floating_point():
        return F.pad(torch.cumsum(x, dim=-1)[..., :-1], (1, 0))
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    out[..., :1].zero_()
    torch.cumsum(x[..., :-1], dim=-1, out=out[..., 1:])  # written in place: no padded copy
    return out


def row_quantile(values: torch.Tensor, valid: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row torch.quantile(values[b][valid[b]], q) with linear interpolation; NaN-free, 0 for empty rows.

    values [B, T] float (finite where valid), valid [B, T] bool -> [B]. Exact, by selection instead of a
    sort: row b needs its order statistics of ranks r_b = floor(q (n_b - 1)) and r_b + 1. A lead block of
    -inf / +inf entries, P - r_b of them -inf (P = max r), puts every row's rank-r_b value in column P, so
    one kthvalue serves all rows; the lead is max r - min r wide. Counting from the top instead (kthvalue
    of -values) makes it narrow for q near 1. The rank r_b + 1 value follows from one counting pass.
    """
    batch, width = values.shape
    count = valid.sum(dim=-1)  # [B]
    last = (count - 1).clamp(min=0).to(values.dtype)  # [B]
    rank = q * last  # [B] as torch.quantile computes it
    below = rank.floor()  # [B] ascending rank of the lower value
    if width == 0 or batch == 0:
        return torch.zeros_like(rank)
    from_top = last - below  # [B] the same value's rank from the top
    frac = rank - below  # [B]
    ranks = torch.stack([below.amin(), below.amax(), from_top.amin(), from_top.amax(), frac.amax()]).tolist()
    lo_up, hi_up, lo_down, hi_down, interpolate = ranks  # one host sync: kthvalue takes a Python k
    down = hi_down - lo_down < hi_up - lo_up
    sign, r, top, lo = (-1.0, from_top, hi_down, lo_down) if down else (1.0, below, hi_up, lo_up)
    keys = torch.where(valid, -values if down else values, torch.inf)  # [B, T] ascending; invalid sort last
    cols = torch.arange(int(top - lo), device=values.device, dtype=values.dtype)  # [L]
    lead = torch.where(cols < (top - r)[:, None], -torch.inf, torch.inf).to(values.dtype)  # [B, L]
    key = torch.cat([lead, keys], dim=-1).kthvalue(int(top) + 1, dim=-1).values  # [B] r_b-th key of row b
    v_below = key * sign  # [B]
    v_above = v_below
    if interpolate > 0:  # rank below + 1: v_below again if it repeats, else the next larger valid value
        beyond = compare(torch.lt if down else torch.gt, keys, key[:, None]).bool()  # [B, T] values > v_below
        n_beyond = beyond.view(torch.uint8).sum(dim=-1, dtype=torch.int32)  # [B] (up: the +inf invalid too)
        n_not_above = (count if down else width) - n_beyond  # [B] valid values <= v_below
        if down:
            next_key = torch.where(beyond, keys, -torch.inf).amax(dim=-1)  # [B]
        else:
            next_key = torch.where(beyond, keys, torch.inf).amin(dim=-1)  # [B]
        repeats = (n_not_above >= below + 2) | (frac == 0)  # [B]
        v_above = torch.where(repeats, v_below, next_key * sign)
    quant = torch.lerp(v_below, v_above, frac)  # [B]
    return torch.where(count > 0, quant, torch.zeros_like(quant))


def calibrated_delta_b(div: torch.Tensor, valid: torch.Tensor, params: MaskParams) -> torch.Tensor:
    """clamp(k * quantile_q(D), delta_b, max_mult * delta_b) per response; delta_b for empty rows.

    div [B, T], valid [B, T] bool -> [B]. Fixed delta_b when params.delta_b_quantile is None.
    The clamp usually decides the value: a row whose (k-scaled) order statistic of rank ceil(q (n - 1)) is
    <= delta_b gets delta_b, one whose rank floor(q (n - 1)) is >= the cap gets the cap, and both are
    decided by counting. Only when some row lies strictly inside is the exact quantile selected.
    """
    if params.delta_b_quantile is None or div.shape[-1] == 0 or params.delta_b_max_mult == 1.0:
        return torch.full(div.shape[:-1], params.delta_b, dtype=div.dtype, device=div.device)
    count = as_float(valid, div.dtype).sum(dim=-1)  # [B]
    return _calibrated_delta_b(torch.where(valid, div, 0.0), valid, count, params)


def _calibrated_delta_b(div0: torch.Tensor, valid: torch.Tensor, count: torch.Tensor, params: MaskParams):
    """calibrated_delta_b for div0 [B, T] that is 0 off `valid`, count [B] = valid tokens per row (float)."""
    floor = params.delta_b
    cap = params.delta_b_max_mult * floor
    if cap == floor:  # delta_b = 0
        return torch.full_like(count, floor)
    scaled = div0 if params.delta_b_scale == 1.0 else params.delta_b_scale * div0  # [B, T]
    invalid = div0.shape[-1] - count  # [B] zeros off valid, counted below as <= floor and < cap (cap > 0)
    n_low = compare(torch.le, scaled, floor).sum(dim=-1) - invalid  # [B] valid values that clamp to the floor
    n_under_cap = compare(torch.lt, scaled, cap).sum(dim=-1) - invalid  # [B]
    rank = params.delta_b_quantile * (count - 1).clamp(min=0)  # [B] as row_quantile computes it
    at_floor = (n_low > rank.ceil()) | (count == 0)  # [B] order statistic ceil(rank) <= floor
    at_cap = n_under_cap <= rank.floor()  # [B] order statistic floor(rank) >= cap
    result = torch.full_like(count, cap).masked_fill_(at_floor, floor)  # [B]
    inside = (~(at_floor | at_cap)).nonzero().squeeze(-1)  # [R] rows whose quantile the clamp does not decide
    if inside.numel() == 0:
        return result
    if inside.numel() < div0.shape[0]:
        div0, valid = div0[inside], valid[inside]
    quant = row_quantile(div0, valid, params.delta_b_quantile)  # [R]
    result[inside] = (params.delta_b_scale * quant).clamp(floor, cap)  # non-empty rows only
    return result


def prefix_gate(
    z: torch.Tensor,
    s_excl: torch.Tensor,
    w_excl: torch.Tensor,
    delta_b: torch.Tensor,
    toward_mu: torch.Tensor,
    valid: torch.Tensor,
    params: MaskParams,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The keep rule from the weighted divergence Z and its exclusive prefix sums S_{t-1}, W_{t-1}.

    z, s_excl, w_excl [B, T] float; delta_b [B]; toward_mu, valid [B, T] bool.
    Returns (weight [B, T] float, masked [B, T] bool, masked_by_budget [B, T] bool).
    """
    delta = params.delta
    over_token = compare(torch.gt, z, delta).bool()  # [B, T] the position-weighted threshold alone rejects
    if params.prefix_budget:
        allowance = delta + delta_b[:, None] * w_excl  # [B, T] delta + delta_b W_{t-1}
        over_budget = compare(torch.gt, z, allowance - s_excl).bool()  # [B, T] Z_t > delta + delta_b W_{t-1} - S_{t-1}
        rejected = over_token | over_budget  # [B, T] Z_t > c_t
    else:
        rejected = over_token
    masked = valid & ~toward_mu & rejected  # [B, T]
    keep = valid & ~masked  # [B, T]
    keepf = as_float(keep, z.dtype)  # [B, T]
    if params.gate == "hard":
        weight = keepf
    else:  # where(keep, 1, 1 / max(x, 1)) on valid, 0 off it, as keep + (valid - keep) / max(x, 1): the
        # products are by 0 or 1 and 1 / max(x, 1) is finite (x is, for finite z and s), so this is exact
        x = z / delta  # [B, T]
        if params.prefix_budget:
            x = torch.maximum(x, (s_excl + z) / allowance)  # S_t / (delta + delta_b W_{t-1})
        soft = x.clamp_(min=1.0).reciprocal_()  # [B, T] (1.0 / x in torch is reciprocal(x) * 1.0)
        weight = keepf + (as_float(valid, z.dtype) - keepf).mul_(soft)  # [B, T]
    return weight, masked, masked & ~over_token


def hard_gate(
    z: torch.Tensor,
    weights: torch.Tensor,
    delta_b: torch.Tensor,
    toward_mu: torch.Tensor,
    valid: torch.Tensor,
    params: MaskParams,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hard keep rule from Z and the weights, with ONE prefix scan.

    c_t = min(delta, delta + delta_b W_{t-1} - S_{t-1}) = delta + min(0, sum_{j<t} (delta_b w_j - Z_j)):
    the same threshold as ``prefix_gate`` (which takes S and W separately, e.g. from a distributed scan),
    up to rounding in the last bits. z, weights [B, T] (0 off `valid`); delta_b [B]; toward_mu, valid
    [B, T] bool. Returns (weight [B, T] 0/1 float, masked [B, T] bool, masked_by_budget [B, T] bool).
    """
    over_token = compare(torch.gt, z, params.delta).bool()  # [B, T]
    if params.prefix_budget:
        room = exclusive_cumsum(delta_b[:, None] * weights - z).clamp_(max=0.0)  # [B, T] min(0, budget left)
        rejected = compare(torch.gt, z, room.add_(params.delta)).bool()  # [B, T] Z_t > c_t
    else:
        rejected = over_token
    masked = rejected & valid & ~toward_mu  # [B, T]
    weight = as_float(valid & ~masked, z.dtype)  # [B, T]
    return weight, masked, masked & ~over_token


@torch.no_grad()
def cppo_mask(
    div: torch.Tensor,
    valid: torch.Tensor,
    toward_mu: torch.Tensor,
    params: MaskParams,
    *,
    lengths: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    validf: torch.Tensor | None = None,
) -> CPPOMask:
    """CPPO mask for [B, T] rows (Algorithm 1 of the paper).

    div [B, T] float: D_t (any value off `valid`; it is zeroed there).
    valid [B, T] bool: tokens that enter the prefix sums, the quantile and the loss.
    toward_mu [B, T] bool: A_t (rho_t - 1) <= 0, never masked.
    lengths [B] int64: each response's own length H (default: last valid position).
    positions [B, T]: 1-based positions for the weights (default: column + 1; the shuffle ablation permutes).
    validf [B, T]: `valid` as 0/1 in div's dtype, from a caller whose div is already 0 off valid (skips a pass).
    """
    width = div.shape[-1]
    if validf is None:
        div = torch.where(valid, div, 0.0)  # [B, T]
        validf = as_float(valid, div.dtype)  # [B, T]
    if params.position_weight:
        if positions is None:
            positions = torch.arange(1, width + 1, device=div.device, dtype=div.dtype)[None, :]  # [1, T]
        positions = positions.to(div.dtype)
        if params.position_horizon is not None:
            horizon = params.position_horizon
        else:
            lengths = response_lengths(valid) if lengths is None else lengths
            horizon = lengths[:, None].to(div.dtype)  # [B, 1]
        weights = position_weights(positions, horizon, params.w_min) * validf  # [B, T] 0 off valid
    else:
        weights = validf  # [B, T]
    z = weights * div  # [B, T] Z_t
    if params.delta_b_quantile is None or width == 0 or params.delta_b_max_mult == 1.0:
        delta_b = torch.full(div.shape[:-1], params.delta_b, dtype=div.dtype, device=div.device)  # [B]
    else:
        delta_b = _calibrated_delta_b(div, valid, validf.sum(dim=-1), params)  # [B]
    if params.gate == "hard":
        weight, masked, by_budget = hard_gate(z, weights, delta_b, toward_mu, valid, params)
    else:
        s_excl, w_excl = exclusive_cumsum(z), exclusive_cumsum(weights)
        weight, masked, by_budget = prefix_gate(z, s_excl, w_excl, delta_b, toward_mu, valid, params)
    return CPPOMask(weight, masked, by_budget, delta_b)
