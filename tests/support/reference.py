"""Independent float64 reference of CPPO (Algorithm 1 of arXiv 2606.10968), written as plain Python loops.

It shares no code with ``verl_cppo``: one response at a time, one token at a time, Python floats, numpy's
linear quantile, and its own loss aggregation. Tests and benchmarks compare the vectorised loss with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class RefParams:
    delta: float = 0.15
    w_min: float = 0.8
    delta_b: float = 0.02
    delta_b_quantile: float | None = 0.9
    delta_b_scale: float = 1.0
    delta_b_max_mult: float = 2.0
    position_horizon: int | None = None
    divergence: str = "binary_tv"
    gate: str = "hard"
    ratio_cap: float = 20.0
    position_weight: bool = True
    prefix_budget: bool = True


@dataclass
class LossParams(RefParams):
    """Plain values of every field the core reads (``verl_cppo.core.token_loss.TokenLossParams``, which extends
    ``verl_cppo.core.mask.MaskParams``): what core tests hand the code under test instead of the verl-bound
    ``CPPOConfig`` (tests/test_config.py checks that the defaults are CPPOConfig's). ``shuffle_positions`` is
    read by the code only: the reference takes the positions it is given."""

    shuffle_positions: bool = False


@dataclass
class RefResult:
    weight: list[list[float]] = field(default_factory=list)  # gate weight per token (0 off the valid tokens)
    masked: list[list[bool]] = field(default_factory=list)  # away-moving valid tokens rejected by the rule
    by_budget: list[list[bool]] = field(default_factory=list)  # rejected although w_t D_t <= delta
    delta_b: list[float] = field(default_factory=list)
    coef: list[list[float]] = field(default_factory=list)  # d loss_t / d log pi_t before aggregation


def ref_divergence(name: str, log_pi: float, log_mu: float) -> float:
    pi, mu = math.exp(min(log_pi, 0.0)), math.exp(min(log_mu, 0.0))
    if name == "binary_tv":
        return abs(math.exp(log_pi) - math.exp(log_mu))
    assert name == "binary_kl"
    head = mu * (min(log_mu, 0.0) - min(log_pi, 0.0))
    if mu >= 1.0:
        return max(head, 0.0)
    if pi >= 1.0:
        return 1.0e4
    rest = (1.0 - mu) * (math.log1p(-mu) - math.log1p(-pi))
    return min(max(head + rest, 0.0), 1.0e4)


def _weight(pos: int, horizon: int, w_min: float) -> float:
    if horizon <= 1:
        return 1.0 if pos == 1 else w_min
    return min(1.0, max(w_min, 1.0 - (1.0 - w_min) * (pos - 1) / (horizon - 1)))


def _is_valid(mask_t, *values) -> bool:
    return bool(mask_t) and all(math.isfinite(v) for v in values)


def ref_delta_b(p: RefParams, divs: list[float], valid: list[bool]) -> float:
    """The response's budget delta_b: fixed, or the clamped quantile of its valid tokens' divergences."""
    if p.delta_b_quantile is None or not any(valid):
        return p.delta_b
    q = float(np.quantile(np.array([d for d, v in zip(divs, valid) if v]), p.delta_b_quantile))
    return min(max(p.delta_b_scale * q, p.delta_b), p.delta_b_max_mult * p.delta_b)


def reference_cppo(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    p: RefParams,
    positions=None,
    divergences=None,
    is_weights=None,
) -> RefResult:
    """Loop implementation over [B, T] tensors (any dtype; read as float64). positions: optional [B, T].

    divergences: optional [B, T] D_t computed elsewhere (the Top-K divergences; tests/support/topk_batches.py):
    NaN = no D for the token (dropped), +inf and anything above 1e4 capped at 1e4. is_weights: optional [B, T]
    rollout IS weights multiplied into each token's coefficient; a non-finite weight drops the token.
    """
    old = old_log_prob.double().tolist()
    new = log_prob.double().tolist()
    adv = advantages.double().tolist()
    mask = response_mask.bool().tolist()
    pos_rows = positions.tolist() if positions is not None else None
    isw = is_weights.double().tolist() if is_weights is not None else None
    out = RefResult()
    for b in range(len(mask)):
        width = len(mask[b])
        valid = [_is_valid(mask[b][t], old[b][t], new[b][t], adv[b][t]) for t in range(width)]
        if divergences is not None:
            valid = [v and not math.isnan(float(divergences[b][t])) for t, v in enumerate(valid)]
        if isw is not None:
            valid = [v and math.isfinite(isw[b][t]) for t, v in enumerate(valid)]
        length = max((t + 1 for t in range(width) if mask[b][t]), default=0)
        horizon = p.position_horizon if p.position_horizon is not None else length
        if divergences is not None:
            divs = [min(float(divergences[b][t]), 1.0e4) if valid[t] else 0.0 for t in range(width)]
        else:
            divs = [ref_divergence(p.divergence, new[b][t], old[b][t]) if valid[t] else 0.0 for t in range(width)]
        db = ref_delta_b(p, divs, valid)
        s_prev = w_prev = 0.0
        row_w, row_m, row_bb, row_c = [], [], [], []
        for t in range(width):
            if not valid[t]:
                row_w.append(0.0), row_m.append(False), row_bb.append(False), row_c.append(0.0)
                continue
            pos = pos_rows[b][t] if pos_rows is not None else t + 1
            w = _weight(pos, horizon, p.w_min) if p.position_weight else 1.0
            z = w * divs[t]
            rho = math.exp(min(max(new[b][t] - old[b][t], -20.0), 20.0))
            toward = adv[b][t] * (rho - 1.0) <= 0.0
            c = min(p.delta, p.delta + db * w_prev - s_prev) if p.prefix_budget else p.delta
            keep = toward or z <= c
            if keep:
                gate = 1.0
            elif p.gate == "hard":
                gate = 0.0
            else:
                x = z / p.delta
                if p.prefix_budget:
                    x = max(x, (s_prev + z) / (p.delta + db * w_prev))
                gate = min(1.0, 1.0 / x)
            row_w.append(gate)
            row_m.append(not keep)
            row_bb.append(not keep and z <= p.delta)
            row_c.append(-gate * min(rho, p.ratio_cap) * adv[b][t] * (isw[b][t] if isw is not None else 1.0))
            s_prev += z
            w_prev += w
        out.weight.append(row_w), out.masked.append(row_m), out.by_budget.append(row_bb)
        out.delta_b.append(db), out.coef.append(row_c)
    return out


def reference_aggregate(
    per_token,
    response_mask,
    mode: str,
    loss_scale_factor=None,
    batch_num_tokens=None,
    global_batch_size=None,
    dp_size=1,
) -> float:
    """verl's loss_agg_mode semantics on one micro-batch, written out as loops: the micro-batch's own counts
    unless the global ones are given (then x dp_size, as DP averages the ranks' gradients). A count of 0 (no
    token, no response) leaves an empty sum: 0."""
    mask = response_mask.bool().tolist()
    rows = [[x for x, m in zip(r, mr) if m] for r, mr in zip(per_token, mask)]
    nonempty = [r for r in rows if r]
    tokens = sum(len(r) for r in rows) if batch_num_tokens is None else batch_num_tokens
    seqs = len(nonempty) if global_batch_size is None else global_batch_size
    if mode == "token-mean":
        return sum(sum(r) for r in rows) / max(tokens, 1) * dp_size
    if mode == "token-sum":
        return sum(sum(r) for r in rows) * dp_size
    if mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        value = sum(sum(r) for r in nonempty) / max(seqs, 1) * dp_size
        if mode == "seq-mean-token-sum-norm":
            value /= loss_scale_factor if loss_scale_factor is not None else max(len(mask[0]) if mask else 0, 1)
        return value
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in nonempty) / max(seqs, 1) * dp_size
    raise ValueError(mode)


def reference_loss_and_grad(old_log_prob, log_prob, advantages, response_mask, p: RefParams, mode: str, **kw):
    """(loss, d loss / d log_prob as a [B, T] float64 tensor) of the reference."""
    res = reference_cppo(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        p,
        positions=kw.pop("positions", None),
        divergences=kw.pop("divergences", None),
        is_weights=kw.pop("is_weights", None),
    )
    lp = log_prob.double().tolist()
    per_token = [[c * (x if c != 0.0 else 0.0) for c, x in zip(rc, rl)] for rc, rl in zip(res.coef, lp)]
    loss = reference_aggregate(per_token, response_mask, mode, **kw)
    grad = torch.zeros(log_prob.shape, dtype=torch.float64)
    for b in range(log_prob.shape[0]):
        basis = [[0.0] * log_prob.shape[1] for _ in range(log_prob.shape[0])]
        for t in range(log_prob.shape[1]):
            if res.coef[b][t] != 0.0:
                basis[b][t] = res.coef[b][t]
                grad[b, t] = reference_aggregate(basis, response_mask, mode, **kw)
                basis[b][t] = 0.0
    return loss, grad, res


def random_case(gen: torch.Generator, batch: int, width: int, *, holes: float = 0.1, spread: float = 0.5):
    """Random right-padded rows: lengths 0..width, interior holes, log-probs with pi close to mu."""
    lengths = torch.randint(0, width + 1, (batch,), generator=gen)
    cols = torch.arange(width)
    mask = cols[None, :] < lengths[:, None]
    mask &= torch.rand(batch, width, generator=gen) > holes
    old = torch.log(torch.rand(batch, width, generator=gen).clamp(min=1e-4))
    new = (old + spread * torch.randn(batch, width, generator=gen)).clamp(max=0.0)
    adv = torch.randn(batch, 1, generator=gen).expand(batch, width).clone()
    return old.double(), new.double(), adv.double(), mask


def near_threshold_row(gen, width, p: RefParams, db: float, rel: float):
    """One row built token by token so that w_t D_t lands rel-close to c_t (alternately above and below)."""
    old = torch.log(torch.rand(width, generator=gen, dtype=torch.float64) * 0.4 + 0.05).tolist()
    new, s_prev, w_prev = [], 0.0, 0.0
    for t in range(width):
        w = min(1.0, max(p.w_min, 1.0 - (1.0 - p.w_min) * t / (width - 1)))
        c = min(p.delta, p.delta + db * w_prev - s_prev)
        if c > 1e-3:  # place Z just above or just below the threshold
            z = c * (1.0 + rel if t % 2 else 1.0 - rel)
        else:  # budget exhausted: small divergences restore it
            z = 1e-3 * w
        d = z / w
        new.append(torch.log(torch.tensor(torch.e ** old[t] + d, dtype=torch.float64)).item())
        s_prev += w * d
        w_prev += w
    return torch.tensor(old, dtype=torch.float64), torch.tensor(new, dtype=torch.float64)
