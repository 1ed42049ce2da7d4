"""CPPO's per-token loss terms and the sums its metrics are formed from (pure torch, no verl).

For [B, T] rows of log-probs (pi with grad, mu without), advantages and the response mask, with D_t from
``verl_cppo.core.divergence`` (binary) or given (Top-K):

    rho_t = exp(clamp(log pi - log mu, +-LOG_RATIO_BOUND))      toward_mu_t = A_t (rho_t - 1) <= 0
    M_t   = the gate of ``verl_cppo.core.mask`` (0/1, or the soft weight)
    loss_t = -M_t sg(min(rho_t, ratio_cap)) A_t * log pi_t     (x IS weight): the gradient of -M_t rho_t A_t

Where the rows come from is the one thing that differs between callers, and it is behind a small interface,
``Rows``: how the gate's positions, lengths and prefix sums are found, and which responses are non-empty.
``WHOLE_ROWS`` is the ordinary case (each row one right-padded response, as every verl 0.9.1 engine hands the
loss); ``verl_cppo.sharding.context.ShardContext`` implements the same interface for a rank's shard-local
tokens with a distributed scan. The adapter (``verl_cppo.loss``) adds verl's aggregation and the metrics.

Tokens whose log-probs, advantages, IS weights or Top-K D are not finite are dropped: they enter neither the
prefix sums nor the loss, get exactly zero gradient (routed through ``torch.where``), and are counted.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch

from verl_cppo.core.divergence import KL_MAX, Divergence, binary_divergence
from verl_cppo.core.mask import (
    CPPOMask,
    MaskParams,
    as_float,
    compare,
    cppo_mask,
    response_lengths,
    shuffled_positions,
)

__all__ = [
    "LOG_RATIO_BOUND",
    "METRIC_KEYS",
    "STAT_NAMES",
    "WHOLE_ROWS",
    "CPPOTerms",
    "Rows",
    "TokenLossParams",
    "WholeRows",
    "check_shapes",
    "cppo_token_losses",
    "metrics_from_sums",
    "torch_stats",
]

LOG_RATIO_BOUND = 20.0
"""|log pi - log mu| is clamped to this before exp, as in verl's ratio-based losses."""

STAT_NAMES = (
    "response_tokens",
    "valid_tokens",
    "masked",
    "masked_by_budget",
    "ratio_truncated",  # valid tokens with rho > ratio_cap
    "div_sum",
    "rho_sum",
    "rho_max",
    "gate_weight_sum",
    "neg_log_ratio_sum",
    "delta_b_sum",  # over responses with at least one valid token
    "nonempty_responses",
)
"""The sums the metrics are formed from, in this order (``torch_stats`` and the fused kernel's row stats)."""

RHO_MAX = STAT_NAMES.index("rho_max")
PER_RESPONSE = STAT_NAMES.index("delta_b_sum")
"""Index of the first per-response sum; the entries before it are token sums (rho_max a maximum)."""

METRIC_KEYS = (
    "actor/cppo_masked_frac",  # rule-masked tokens / response tokens
    "actor/cppo_masked_by_budget_share",  # of the masked tokens: rejected by the prefix budget
    "actor/cppo_masked_by_token_share",  # of the masked tokens: rejected by the position-weighted threshold
    "actor/cppo_delta_b_mean",  # mean delta_b in effect over non-empty responses
    "actor/cppo_div_mean",  # mean D over valid tokens
    "actor/cppo_rho_mean",  # mean rho = pi / mu over valid tokens
    "actor/cppo_rho_max",
    "actor/cppo_ratio_truncated_frac",  # valid tokens with rho > ratio_cap
    "actor/cppo_nonfinite_frac",  # response tokens dropped for non-finite inputs
    "actor/cppo_gate_weight_mean",  # mean gate weight over valid tokens (1 - masked share for the hard gate)
    "actor/pg_clipfrac",  # = masked_frac, under verl's usual name
    "actor/ppo_kl",  # mean log mu - log pi over valid tokens, as verl reports it
)


class TokenLossParams(MaskParams, Protocol):
    """The fields of ``verl_cppo.config.CPPOConfig`` the token loss reads beyond the mask's (documented there)."""

    divergence: Divergence
    ratio_cap: float
    shuffle_positions: bool


class Rows(Protocol):
    """Where the [B, T] tensors' tokens sit in their responses: what the gate and the per-response stats need."""

    def mask(
        self,
        div: torch.Tensor,
        valid: torch.Tensor,
        toward_mu: torch.Tensor,
        params: TokenLossParams,
        response_mask: torch.Tensor,
        validf: torch.Tensor,
        maskf: torch.Tensor,
    ) -> CPPOMask:
        """The CPPO gate of the tokens. div [B, T] is already 0 off `valid`; validf / maskf are `valid` /
        `response_mask` as 0/1 floats of div's dtype."""
        ...

    def nonempty(self, valid_per_row: torch.Tensor) -> torch.Tensor:
        """[B] float 0/1 (or [responses]): the responses with at least one valid token, aligned with the
        CPPOMask.delta_b the gate returned. valid_per_row [B] float: valid tokens per row of the tensors."""
        ...


class WholeRows:
    """Each row is one whole response starting at column 0 (verl's gathered, right-padded rows)."""

    def mask(self, div, valid, toward_mu, params, response_mask, validf, maskf) -> CPPOMask:
        lengths = response_lengths(maskf)  # [B] H counts interior holes and dropped tokens
        positions = None
        if params.shuffle_positions:  # float positions straight away where they are exact
            exact = div.dtype == torch.float64 or div.shape[-1] < 2**24
            positions = shuffled_positions(lengths, div.shape[-1], dtype=div.dtype if exact else torch.int64)
        return cppo_mask(div, valid, toward_mu, params, lengths=lengths, positions=positions, validf=validf)

    def nonempty(self, valid_per_row: torch.Tensor) -> torch.Tensor:
        return valid_per_row.clamp(max=1.0)  # [B]


WHOLE_ROWS = WholeRows()


class CPPOTerms(NamedTuple):
    pg_losses: torch.Tensor  # [B, T] per-token loss, exactly 0 (and zero gradient) off the kept tokens
    gate: CPPOMask  # the mask and its diagnostics
    div: torch.Tensor  # [B, T] D_t (0 off `valid`)
    rho: torch.Tensor  # [B, T] pi / mu from the clamped log-ratio
    log_ratio: torch.Tensor  # [B, T] clamp(log pi - log mu, +-20)
    valid: torch.Tensor  # [B, T] bool, response tokens with finite inputs
    nonfinite: torch.Tensor  # [B, T] bool, response tokens dropped for non-finite inputs


def check_shapes(**tensors: torch.Tensor | None) -> None:
    """Every given tensor has log_prob's shape, and that shape is [batch, response_len]."""
    shape = tensors["log_prob"].shape
    for name, t in tensors.items():
        if t is not None and t.shape != shape:
            raise ValueError(f"cppo loss: {name} has shape {tuple(t.shape)}, log_prob has {tuple(shape)}")
    if len(shape) != 2:
        raise ValueError(f"cppo loss: expected [batch, response_len] tensors, log_prob has shape {tuple(shape)}")


def _all_finite(*tensors: torch.Tensor | None) -> bool:
    """True when every entry is finite: an inf or NaN anywhere makes the sum non-finite (one sync on GPU).

    A sum that overflows only sends the caller down the sanitising path, which is exact for any input."""
    sums = [t.sum() for t in tensors if t is not None]  # in each tensor's dtype: no converted copy
    total = sums[0]
    for x in sums[1:]:
        total = total + x
    return math.isfinite(total.item())


def _finite(*tensors: torch.Tensor | None) -> torch.Tensor:
    """Where every given tensor is finite, as a bool mask of their (common) shape.

    x * 0 is 0 for a finite x and NaN for inf or NaN, so the sum of the products is 0 exactly where all are
    finite: one float compare instead of an isfinite per tensor (each several times slower on CPU)."""
    given = [t for t in tensors if t is not None]
    probe = given[0] * 0.0
    for t in given[1:]:
        probe += t * 0.0
    return compare(torch.eq, probe, 0.0).bool()


def _zero_off(x: torch.Tensor, validf: torch.Tensor) -> torch.Tensor:
    """torch.where(valid, x, 0.0) for validf = valid as 0/1 floats, up to the sign of the zeros off valid:
    non-finite entries become 0 first, then a product by 1 is exact (a new tensor; x is not changed)."""
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).mul_(validf)


class _FiniteOrZero(torch.autograd.Function):
    """log pi with its inf / NaN entries replaced by 0, and the identity as backward.

    In the graph (log pi * coef) this equals torch.where(valid, log pi, 0) * coef in value and gradient, up
    to the sign of zeros: coef is 0 off `valid` (gate weight 0), so the gradient reaching every dropped token
    is already 0, and the loss there is 0 either way. A bool where and its backward are several times slower
    on CPU than nan_to_num and nothing."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def cppo_token_losses(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    params: TokenLossParams,
    rollout_is_weights: torch.Tensor | None = None,
    rows: Rows = WHOLE_ROWS,
    topk_divergence: torch.Tensor | None = None,
) -> CPPOTerms:
    """Per-token CPPO losses and mask for [B, T] tensors (the torch path); the adapter aggregates them.

    The loss is linear in log pi with a detached coefficient, so the graph is one multiply (two with IS
    weights) in verl's order: (-A sg(min(rho, cap)) M) * log pi * IS weight.

    ``rows`` says where the tokens sit (``Rows``; default: whole responses). ``topk_divergence`` [B, T] is D
    for ``divergence=topk_*`` (NaN = no D for the token: dropped; +inf capped like binary_kl); it is
    required for those and unused otherwise."""
    check_shapes(
        log_prob=log_prob,
        old_log_prob=old_log_prob,
        advantages=advantages,
        response_mask=response_mask,
        rollout_is_weights=rollout_is_weights,
        topk_divergence=topk_divergence,
    )
    dtype = torch.promote_types(log_prob.dtype, torch.float32)
    response_mask = response_mask.bool()
    is_weights = rollout_is_weights
    with torch.no_grad():
        log_pi, log_mu, adv = _to(log_prob.detach(), dtype), _to(old_log_prob, dtype), _to(advantages, dtype)
        if is_weights is not None:
            is_weights = _to(is_weights, dtype)
        all_finite = _all_finite(log_pi, log_mu, adv, is_weights)
        topk_missing = topk_divergence.isnan() if topk_divergence is not None else None  # [B, T]
        if topk_missing is not None and all_finite:
            all_finite = not bool(topk_missing.any())
        maskf = as_float(response_mask, dtype)  # [B, T]
        if all_finite:
            valid, validf = response_mask, maskf  # [B, T] each
            nonfinite = torch.zeros_like(response_mask)
        else:  # zero every entry that is not valid, so that no inf or NaN reaches a sum or a product
            finite = _finite(log_pi, log_mu, adv, is_weights)  # [B, T]
            if topk_missing is not None:
                finite &= ~topk_missing
            valid = response_mask & finite  # [B, T]
            nonfinite = response_mask & ~finite  # [B, T]
            validf = as_float(valid, dtype)  # [B, T]
            log_pi, log_mu, adv = (_zero_off(x, validf) for x in (log_pi, log_mu, adv))  # [B, T] each
            if is_weights is not None:
                is_weights = _zero_off(is_weights, validf)  # [B, T]
        log_ratio = (log_pi - log_mu).clamp_(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)  # [B, T]
        rho = torch.exp(log_ratio)  # [B, T]
        change = (rho - 1).mul_(adv)  # [B, T] A_t (rho_t - 1)
        toward_mu = torch.le(change, 0.0, out=change).bool()  # [B, T] (a float compare is faster on CPU)
        if topk_divergence is not None:
            div = topk_divergence.to(dtype).nan_to_num(nan=0.0, posinf=KL_MAX).clamp_(0.0, KL_MAX).mul_(validf)
        else:
            div = binary_divergence(params.divergence, log_pi, log_mu).mul_(validf)  # [B, T] 0 off valid
        gate = rows.mask(div, valid, toward_mu, params, response_mask, validf, maskf)
        coef = rho.clamp(max=params.ratio_cap).mul_(adv).mul_(gate.weight).neg_()  # [B, T] -w sg(min(rho, cap)) A

    # the graph: d pg / d log pi = coef (* IS weight); a dropped non-finite log pi enters as 0 (_FiniteOrZero)
    pg_losses = (log_prob if all_finite else _FiniteOrZero.apply(log_prob)) * coef  # [B, T]
    if is_weights is not None:
        pg_losses = pg_losses * is_weights
    return CPPOTerms(pg_losses, gate, div, rho, log_ratio, valid, nonfinite)


@torch.no_grad()
def torch_stats(terms: CPPOTerms, response_mask: torch.Tensor, ratio_cap: float, rows: Rows = WHOLE_ROWS):
    """The STAT_NAMES sums of the torch path as one [len(STAT_NAMES)] tensor (no host sync).

    The token sums are over the given tensors; the per-response ones (delta_b, non-empty responses) over the
    responses ``rows`` reports (for shard-local rows, the group's)."""
    gate, div, rho, log_ratio, valid = terms[1:6]
    dtype = rho.dtype
    validf = as_float(valid, dtype)  # [B, T]
    rho_v = rho * validf  # [B, T] 0 off valid
    flags = torch.stack([response_mask.bool(), valid, gate.masked, gate.masked_by_budget])  # [4, B, T] bool
    per_row = flags.view(torch.uint8).sum(dim=-1, dtype=torch.int32).to(dtype)  # [4, B] counts per row
    nonempty = rows.nonempty(per_row[1]).to(dtype)  # [responses] 1 for a response with a valid token
    sums = [
        compare(torch.gt, rho_v, ratio_cap).sum(),
        div.sum(),
        rho_v.sum(),
        rho_v.amax() if rho_v.numel() else rho_v.new_zeros(()),
        gate.weight.sum(),
        -torch.dot(log_ratio.reshape(-1), validf.reshape(-1)),
        torch.dot(gate.delta_b.to(dtype), nonempty),
        nonempty.sum(),
    ]
    return torch.cat([per_row.sum(dim=-1), torch.stack(sums)])


def metrics_from_sums(sums: list[float]) -> dict[str, float]:
    """The METRIC_KEYS values from the STAT_NAMES sums (host floats, in that order)."""
    s = dict(zip(STAT_NAMES, sums, strict=True))
    n_resp, n_valid, n_masked = s["response_tokens"], s["valid_tokens"], s["masked"]
    masked_frac = n_masked / max(n_resp, 1.0)
    metrics = {
        "actor/cppo_masked_frac": masked_frac,
        "actor/cppo_masked_by_budget_share": s["masked_by_budget"] / max(n_masked, 1.0),
        "actor/cppo_masked_by_token_share": (n_masked - s["masked_by_budget"]) / max(n_masked, 1.0),
        "actor/cppo_delta_b_mean": s["delta_b_sum"] / max(s["nonempty_responses"], 1.0),
        "actor/cppo_div_mean": s["div_sum"] / max(n_valid, 1.0),
        "actor/cppo_rho_mean": s["rho_sum"] / max(n_valid, 1.0),
        "actor/cppo_rho_max": s["rho_max"],
        "actor/cppo_ratio_truncated_frac": s["ratio_truncated"] / max(n_valid, 1.0),
        "actor/cppo_nonfinite_frac": (n_resp - n_valid) / max(n_resp, 1.0),
        "actor/cppo_gate_weight_mean": s["gate_weight_sum"] / max(n_valid, 1.0),
        "actor/pg_clipfrac": masked_frac,
        "actor/ppo_kl": s["neg_log_ratio_sum"] / max(n_valid, 1.0),
    }
    assert tuple(metrics) == METRIC_KEYS
    return metrics
