"""The CPPO mask and loss on shard-local tokens: a distributed prefix scan and an exact distributed quantile.

When a response is split across the ranks of a sequence-parallel group (Ulysses, Megatron CP), CPPO needs
per token the response's *global* exclusive prefix sums S_{t-1} = sum_{j<t} w_j D_j and W_{t-1} = sum_{j<t}
w_j, the token's global position t, the response's global length H and, for calibrated delta_b, the exact
quantile of the response's D values. verl 0.9.1 gets them by all-gathering every per-token log-prob to every
rank (O(tokens) per rank, and the whole loss recomputed on every rank). Here each rank keeps its shard
(``verl_cppo.sharding.layout`` says where each local token sits) and exchanges only per-response scalars:

1. one all_gather of a [B, K, 9] table: for each response and each of the K pieces this rank holds, the
   mask count, the last mask position, the valid count, the min / max key of D (below), and four moments
   (sum 1, sum (t-1), sum D, sum (t-1) D over valid tokens). With H known, w_t = 1 - a (t-1) and
   a = (1 - w_min) / max(H - 1, 1) (never clamped on valid tokens, t <= H), so a piece's sum of w is
   m0 - a m1 and its sum of w D is m2 - a m3, and a response's prefix offsets are an exclusive cumsum
   over its pieces. With a fixed horizon (or no position weight) w is local and the moments are the
   plain sums of w and w D. The within-piece part is a local scan, in float64.
2. calibrated delta_b only: the exact q-quantile of D (torch.quantile's linear interpolation) without
   gathering D. D >= 0, so the IEEE bit pattern of D is an order-preserving integer key. For each response
   the two order statistics floor(q (n-1)) and ceil(q (n-1)) are found by a radix search over keys: start
   from the global [min, max] key of step 1, cut the bracket into 2^radix_bits equal key intervals, all_gather
   the local counts per interval, keep the interval holding the target rank. Once a bracket holds at most
   2^radix_bits values (globally), the ranks send those values instead (same payload size) and the target is
   read off the sorted union. The two targets share one bracket until they part; closed brackets send
   nothing. A bracket shrinks 2^radix_bits-fold per round, so at most ceil(31 / radix_bits) rounds for
   float32 D (63 / radix_bits for float64), in practice 3-5; the result is the sorted value bit for bit.
   radix_bits = 1 is a bisection on counts.
3. (``verl_cppo.sharding.context``) one all_gather of the metric sums, so every rank reports the gathered metrics.

Messages per call: 1 + R + 1 (R quantile rounds, 0 with fixed delta_b). Bytes a rank sends per call:
8 * 9 * B * K (scan) + at most w * 2 * B * 2^radix_bits per quantile round (w = 4 for float32 D, 8 for float64)
+ 8 * 11 (metrics), and it receives (world - 1) times that: O(responses x ranks), nothing proportional to
tokens. K = pieces per rank (1 for Ulysses, 2 for the zigzag layouts).

The loss side (the ``cppo`` loss on shard-local tokens, verl's aggregation, metrics) is
``verl_cppo.sharding.context``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from verl_cppo.core.mask import position_weights
from verl_cppo.sharding.layout import ShardLayout

__all__ = ["CommStats", "ShardScan", "gather_rows", "shard_prefix_scan", "shard_quantile"]


@dataclass
class CommStats:
    """Collectives issued through a ShardContext (a rank's view)."""

    messages: int = 0
    bytes_sent: int = 0  # this rank's payload, summed over collectives
    bytes_received: int = 0  # the other ranks' payloads it receives
    log: list = field(default_factory=list)  # (tag, bytes sent) per collective


def gather_rows(x: torch.Tensor, group: dist.ProcessGroup | None, stats: CommStats | None, tag: str) -> torch.Tensor:
    """[*] -> [world, *]; a group of None (or of size 1) communicates nothing."""
    world = dist.get_world_size(group) if group is not None else 1
    if world == 1:
        return x[None]
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous(), group=group)
    if stats is not None:
        nbytes = x.numel() * x.element_size()
        stats.messages += 1
        stats.bytes_sent += nbytes
        stats.bytes_received += (world - 1) * nbytes
        stats.log.append((tag, nbytes))
    return torch.stack(out)


def _rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if group is not None else 0


@dataclass
class ShardScan:
    """Per-token global quantities of a shard ([N], flat local order) and per-response tables ([B])."""

    s_excl: torch.Tensor  # [N] float64 sum_{j<t} w_j D_j over the response's valid tokens
    w_excl: torch.Tensor  # [N] float64 sum_{j<t} w_j
    weight: torch.Tensor  # [N] w_t on valid tokens, 0 elsewhere (div's dtype)
    position: torch.Tensor  # [N] int64 global 1-based position, 0 outside responses
    length: torch.Tensor  # [N] int64 horizon H of the token's weights, 0 outside responses
    lengths: torch.Tensor  # [B] int64 position of each response's last mask token, 0 if none
    n_mask: torch.Tensor  # [B] int64 response-mask tokens of each response
    n_valid: torch.Tensor  # [B] int64 valid tokens of each response
    key_min: torch.Tensor  # [B] int64 smallest key of D over the response's valid tokens
    key_max: torch.Tensor  # [B] int64 largest
    keys: torch.Tensor  # [N] int64 keys of D (0 off valid)
    valid: torch.Tensor  # [N] bool valid tokens inside responses


def _keys(div: torch.Tensor) -> torch.Tensor:
    """Order-preserving int64 keys of non-negative floats (their IEEE bit patterns)."""
    if div.dtype == torch.float64:
        return (div + 0.0).view(torch.int64)  # + 0.0 turns -0.0 into +0.0
    if div.dtype == torch.float32:
        return (div + 0.0).view(torch.int32).long()
    raise TypeError(f"sharded quantile: div must be float32 or float64, got {div.dtype}")


def _values(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return keys.view(torch.float64) if dtype == torch.float64 else keys.int().view(torch.float32)


def _cell_table(cell, ncell, *columns, reduce="sum"):
    """Scatter per-token columns [N] into [ncell, C] by cell (tokens with cell -1 ignored)."""
    keep = cell >= 0
    idx = cell[keep]
    rows = []
    for col in columns:
        col = col[keep]
        init = {"sum": 0, "amax": torch.iinfo(torch.int64).min, "amin": torch.iinfo(torch.int64).max}[reduce]
        out = torch.full((ncell,), init, dtype=col.dtype, device=col.device)
        out = out.scatter_add(0, idx, col) if reduce == "sum" else out.scatter_reduce(0, idx, col, reduce)
        rows.append(out)
    return torch.stack(rows, dim=-1)  # [ncell, C]


def _segmented_exclusive_cumsum(x: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """sum of x over the earlier tokens of the same contiguous run of `cell`, float64. x, cell: [N]."""
    x = x.double()
    excl = torch.cumsum(x, 0) - x  # [N]
    if x.numel() == 0:
        return excl
    start = torch.cat([cell.new_ones(1, dtype=torch.bool), cell[1:] != cell[:-1]])  # [N]
    run = torch.cumsum(start.long(), 0) - 1  # [N]
    return excl - excl[start][run]


def shard_prefix_scan(
    div: torch.Tensor,
    valid: torch.Tensor,
    in_mask: torch.Tensor,
    layout: ShardLayout,
    group: dist.ProcessGroup | None = None,
    *,
    w_min: float,
    position_horizon: int | None = None,
    position_weight: bool = True,
    stats: CommStats | None = None,
) -> ShardScan:
    """Global exclusive prefix sums of w*D and w for every local token, with positions and lengths.

    div [N] float (D >= 0; any value off `valid`), valid [N] bool (tokens in the sums and the quantile),
    in_mask [N] bool (response-mask tokens: H = position of the last one), all flat in the layout's order.
    One all_gather of [B, K, 9] int64 (float64 sums bit-cast).
    """
    n_rows, n_pieces = layout.num_rows, layout.num_pieces
    cell = layout.cell  # [N]
    pos = layout.position  # [N]
    dtype = div.dtype
    valid = valid & (cell >= 0)
    in_mask = in_mask & (cell >= 0)
    div = torch.where(valid, div, 0.0)  # [N]
    if bool((div < 0).any()):
        raise ValueError(f"sharded CPPO mask: divergences must be >= 0, got min {float(div.min())}")
    keys = _keys(div)  # [N]
    own_length = position_weight and position_horizon is None
    if own_length:  # w depends on the global H: send moments
        local_w = None
        tm1 = (pos - 1).clamp(min=0).double()
        moments = (valid.double(), tm1 * valid, div.double(), tm1 * div.double())
    else:
        w = position_weights(pos.to(dtype), position_horizon, w_min) if position_weight else torch.ones_like(div)
        local_w = torch.where(valid, w, 0.0)  # [N]
        zeros = torch.zeros_like(div, dtype=torch.float64)
        moments = (local_w.double(), zeros, (local_w * div).double(), zeros)
    ncell = n_rows * n_pieces
    counts = _cell_table(cell, ncell, in_mask.long(), valid.long())  # [cells, 2]
    last = _cell_table(cell, ncell, torch.where(in_mask, pos, 0), reduce="amax").clamp(min=0)  # [cells, 1]
    big = torch.iinfo(torch.int64).max
    kmin = _cell_table(cell, ncell, torch.where(valid, keys, big), reduce="amin")  # [cells, 1]
    kmax = _cell_table(cell, ncell, torch.where(valid, keys, -1), reduce="amax")  # [cells, 1]
    sums = _cell_table(cell, ncell, *moments).view(torch.int64)  # [cells, 4] float64 bits
    table = torch.cat([counts, last, kmin, kmax, sums], dim=-1).view(n_rows, n_pieces, 9)  # [B, P, 9]
    mine = layout.rank_pieces[_rank(group)].to(table.device)  # [K]
    gathered = gather_rows(table[:, mine], group, stats, "scan")  # [world, B, K, 9]
    full = table.new_zeros(n_rows, n_pieces, 9)
    for r in range(gathered.shape[0]):  # each piece is held by exactly one rank
        full[:, layout.rank_pieces[r].to(table.device)] = gathered[r]
    n_mask, n_valid = full[..., 0].sum(-1), full[..., 1].sum(-1)  # [B]
    lengths = full[..., 2].amax(-1)  # [B]
    key_min, key_max = full[..., 3].amin(-1), full[..., 4].amax(-1)  # [B]
    m = full[..., 5:].contiguous().view(torch.float64)  # [B, P, 4]

    row = layout.row.clamp(min=0)  # [N]
    if own_length:
        span = (lengths - 1).clamp(min=1).double()  # [B]
        slope = (1 - w_min) / span  # [B]
        piece_w = m[..., 0] - slope[:, None] * m[..., 1]  # [B, P]
        piece_z = m[..., 2] - slope[:, None] * m[..., 3]  # [B, P]
        length_tok = lengths[row]  # [N]
        w = position_weights(pos.to(dtype), length_tok.to(dtype), w_min)  # [N] as mask.cppo_mask computes it
        local_w = torch.where(valid, w, 0.0)  # [N]
    else:
        piece_w, piece_z = m[..., 0], m[..., 2]
        length_tok = lengths[row] if position_horizon is None else torch.full_like(row, position_horizon)
    off_w = torch.cumsum(piece_w, -1) - piece_w  # [B, P] exclusive over pieces
    off_z = torch.cumsum(piece_z, -1) - piece_z
    flat_cell = cell.clamp(min=0)
    s_excl = off_z.reshape(-1)[flat_cell] + _segmented_exclusive_cumsum(local_w * div, cell)  # [N]
    w_excl = off_w.reshape(-1)[flat_cell] + _segmented_exclusive_cumsum(local_w, cell)  # [N]
    inside = cell >= 0
    return ShardScan(
        s_excl=torch.where(inside, s_excl, 0.0),
        w_excl=torch.where(inside, w_excl, 0.0),
        weight=local_w,
        position=pos,
        length=torch.where(inside, length_tok, 0),
        lengths=lengths,
        n_mask=n_mask,
        n_valid=n_valid,
        key_min=key_min,
        key_max=key_max,
        keys=keys,
        valid=valid,
    )


def _slots(selected: torch.Tensor, shared: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Number the selected (response, target) brackets; a shared upper target reuses the lower one's slot."""
    count = int(selected.sum())
    slot = torch.full(selected.shape, -1, dtype=torch.long, device=selected.device)
    slot[selected] = torch.arange(count, device=selected.device)
    slot[:, 1] = torch.where(shared, slot[:, 0], slot[:, 1])
    return slot, count


def shard_quantile(
    scan: ShardScan,
    layout: ShardLayout,
    q: float,
    dtype: torch.dtype,
    group: dist.ProcessGroup | None = None,
    *,
    radix_bits: int = 4,
    stats: CommStats | None = None,
) -> torch.Tensor:
    """Exact per-response torch.quantile(D[valid], q) (linear interpolation) by a radix search on key counts.

    Each round, every open bracket either sends 2^radix_bits interval counts or, once it holds at most
    2^radix_bits values (globally), the values themselves (padded to 2^radix_bits), which closes it: both
    payloads are the same size. Returns [B] in `dtype`, 0 for responses without valid tokens; identical on
    every rank of the group.
    """
    n = scan.n_valid  # [B]
    rank = q * (n - 1).clamp(min=0).to(dtype)  # [B] exactly as mask.row_quantile
    below_i, above_i = rank.floor().long(), rank.ceil().long()  # [B]
    target = torch.stack([below_i, above_i], -1)  # [B, 2]
    empty = n == 0
    lo = torch.where(empty, 0, scan.key_min)[:, None].repeat(1, 2)  # [B, 2] bracket of each target's key
    hi = torch.where(empty, 0, scan.key_max)[:, None].repeat(1, 2)
    before = torch.zeros_like(lo)  # [B, 2] values with key < lo
    inside_n = torch.where(empty, 0, n)[:, None].repeat(1, 2)  # [B, 2] values with lo <= key <= hi
    parts = 1 << radix_bits
    wire = torch.int32 if dtype == torch.float32 else torch.int64  # float32 keys and all counts fit int32
    pad = torch.iinfo(wire).max
    row = layout.row.clamp(min=0)
    keys, valid = scan.keys, scan.valid
    dev = keys.device
    ladder = torch.arange(parts, device=dev)
    while True:
        open_ = lo < hi  # [B, 2]; the same on every rank: brackets come from gathered counts
        if not bool(open_.any()):
            break
        # One payload per distinct open bracket: the upper target shares the lower one's until they part.
        shared = open_.all(-1) & (lo[:, 0] == lo[:, 1]) & (hi[:, 0] == hi[:, 1])  # [B]
        own = open_ & torch.stack([torch.ones_like(shared), ~shared], -1)  # [B, 2]
        few = inside_n <= parts  # [B, 2] brackets small enough to send their values
        slot_h, n_hist = _slots(own & ~few, shared)
        slot_v, n_vals = _slots(own & few, shared)
        tlo, thi = lo[row], hi[row]  # [N, 2]
        in_bracket = valid[:, None] & (keys[:, None] >= tlo) & (keys[:, None] <= thi)  # [N, 2]
        width = (hi - lo) // parts + 1  # [B, 2] ceil((hi - lo + 1) / parts)
        hist = in_bracket & (own & ~few)[row]  # [N, 2] token counted in its target's histogram
        idx = slot_h[row] * parts + torch.where(hist, (keys[:, None] - tlo) // width[row], 0)  # [N, 2]
        local_h = torch.zeros(n_hist * parts, dtype=wire, device=dev)
        local_h.scatter_add_(0, idx[hist], torch.ones_like(idx[hist], dtype=wire))
        vals = in_bracket & (own & few)[row]  # [N, 2] token sent as a value
        v_slot, v_key = slot_v[row][vals], keys[:, None].expand(-1, 2)[vals]  # [M]
        order = torch.argsort(v_slot, stable=True)
        v_slot, v_key = v_slot[order], v_key[order]
        first = torch.searchsorted(v_slot, v_slot)  # [M] index of each slot's first entry
        local_v = torch.full((n_vals * parts,), pad, dtype=wire, device=dev)
        local_v[v_slot * parts + torch.arange(v_slot.numel(), device=dev) - first] = v_key.to(wire)
        got = gather_rows(torch.cat([local_h, local_v]), group, stats, "quantile")  # [world, (H + V) * parts]
        counts = got[:, : n_hist * parts].sum(0, dtype=torch.int64).view(n_hist, parts)  # [H, parts]
        counts = counts[slot_h.clamp(min=0)] if n_hist else lo.new_zeros(*lo.shape, parts)  # [B, 2, parts]
        world = got.shape[0]
        values = got[:, n_hist * parts :].reshape(world, n_vals, parts).transpose(0, 1).reshape(n_vals, world * parts)
        values = values.long().sort(-1).values  # [V, world * parts] ascending, pads last
        values = values[slot_v.clamp(min=0)] if n_vals else lo.new_zeros(*lo.shape, 1)  # [B, 2, world * parts]
        # histogram brackets: keep the interval holding the target
        cum = before[..., None] + torch.cumsum(counts, -1)  # [B, 2, parts]
        j = (cum <= target[..., None]).sum(-1).clamp(max=parts - 1)  # [B, 2]
        step = open_ & ~few
        new_lo = lo + j * width
        new_hi = torch.minimum(new_lo + width - 1, hi)
        new_n = counts.gather(-1, j[..., None]).squeeze(-1)
        before = torch.where(step, before + (counts * (ladder < j[..., None])).sum(-1), before)
        # value brackets: the target is the (target - before)-th of the gathered values
        pick = (target - before).clamp(0, values.shape[-1] - 1)
        exact = values.gather(-1, pick[..., None]).squeeze(-1)  # [B, 2]
        done = open_ & few
        lo = torch.where(step, new_lo, torch.where(done, exact, lo))
        hi = torch.where(step, new_hi, torch.where(done, exact, hi))
        inside_n = torch.where(step, new_n, inside_n)
    values = _values(lo, dtype)  # [B, 2]
    quant = torch.lerp(values[:, 0], values[:, 1], rank - below_i.to(dtype))  # [B]
    return torch.where(empty, torch.zeros_like(quant), quant)
