"""Per-token divergences D_t between the rollout policy mu and the trained policy pi (pure torch, no verl).

The divergence names are the ``Literal`` types below; every other module spells them through these.

The binary estimators see only the sampled token y_t: they compare the two-outcome distributions
{y_t, everything else} under mu and pi, a lower bound of the full-vocabulary divergence (DPPO, arXiv
2602.04879). Inputs are log-probs of the sampled token; outputs are finite and >= 0 wherever the inputs
are finite (the caller masks non-finite tokens before calling); log-probs above 0 count as 0 (every
divergence, Top-K included, so no finite input, however out of range, makes D non-finite or above its cap).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

__all__ = [
    "BINARY_DIVERGENCES",
    "DIVERGENCES",
    "KL_MAX",
    "TOPK_DIVERGENCES",
    "BinaryDivergence",
    "Divergence",
    "TopKDivergence",
    "binary_divergence",
    "binary_kl",
    "binary_tv",
    "log1mexp",
]

BinaryDivergence = Literal["binary_tv", "binary_kl"]
"""Divergences computed from the sampled token's log-probs alone (sampled token vs everything else)."""

TopKDivergence = Literal["topk_tv", "topk_kl"]
"""Divergences over mu's top-K tokens + the sampled token + "other": they need mu's top-K log-probs from the
rollout and pi's logits in the engine (``verl_cppo.core.topk_divergence``)."""

Divergence = Literal[BinaryDivergence, TopKDivergence]

BINARY_DIVERGENCES: tuple[str, ...] = get_args(BinaryDivergence)
TOPK_DIVERGENCES: tuple[str, ...] = get_args(TopKDivergence)
DIVERGENCES: tuple[str, ...] = BINARY_DIVERGENCES + TOPK_DIVERGENCES

KL_MAX = 1.0e4
"""Binary KL is infinite when pi puts all its mass on y_t and mu does not; it is capped here so that the
prefix sums stay finite (any cap far above every sensible delta masks the token all the same)."""


def binary_tv(log_pi: torch.Tensor, log_mu: torch.Tensor) -> torch.Tensor:
    """|mu_t - pi_t|, the binary total variation, in [0, 1]. Shapes: any, both the same; returns that shape.

    Log-probs above 0 (rounding, or a finite out-of-range input) are treated as 0, as in binary_kl: a
    probability above 1 would give D > 1, and exp of a large one inf."""
    return (torch.exp(log_pi.clamp(max=0.0)) - torch.exp(log_mu.clamp(max=0.0))).abs()


LOG_HALF = -math.log(2.0)
"""log1mexp's branch point (Maechler 2012): log(-expm1(x)) above it, log1p(-exp(x)) at or below it."""


def _log1mexp_into(near: torch.Tensor, one_minus_p: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """log1mexp(x) from near = (x > -log 2) as 0/1 floats, one_minus_p = -expm1(x) and p = exp(x), computed in
    those three buffers, which it overwrites (the result is one_minus_p's). Shapes: any, all the same.

    Bit for bit torch.where(near, log(one_minus_p), log1p(-p)) except at x = 0, where it is log of the smallest
    positive float (finite) instead of -inf; several times faster on CPU than a bool where and log(0). Both
    branches are evaluated everywhere, their arguments clamped to [that float, 3/4], which changes no other used
    value (1 - p < 1/2 above the branch point and 0 only at x = 0, p <= 1/2 at or below it) and makes each unused
    one finite and < 0; then a product by 1 keeps the used value and a product by 0 a zero that adding ignores.
    (Under flushed denormals the lower clamp is 0 and x = 0 gives -inf, as log1mexp does.)
    """
    finfo = torch.finfo(one_minus_p.dtype)
    above = one_minus_p.clamp_(finfo.tiny * finfo.eps, 0.75).log_()  # log(-expm1(x)) where near
    below = p.clamp_(max=0.75).neg_().log1p_()  # log1p(-exp(x)) where not near
    above.mul_(near)
    far = near.sub_(1.0).neg_()  # 1 - near, in near's buffer: 1 or -0 (below * -0 = +0 where below < 0)
    return above.add_(below.mul_(far))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and near -inf (Maechler 2012); -inf at x = 0."""
    return torch.where(x > LOG_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def binary_kl(log_pi: torch.Tensor, log_mu: torch.Tensor) -> torch.Tensor:
    """KL(mu || pi) on {y_t, rest}: mu log(mu/pi) + (1-mu) log((1-mu)/(1-pi)), computed in log space.

    Log-probs above 0 (rounding) are treated as 0. The (1-mu) term is dropped where mu = 1 (0 * log 0 = 0),
    and the result is clamped to [0, KL_MAX]. Shapes: any, both the same; returns that shape.

    The values of mu (log mu - log pi) + where(log mu < 0, -expm1(log mu) (log1mexp(log mu) - log1mexp(log pi)),
    0) with mu = exp(log mu), capped as above (bit for bit, up to the sign of a zero D). The mu and pi halves
    share each pass ([2, ...] tensors), each intermediate is written into a buffer no longer needed, and
    log1mexp's -inf at 0 (slow on CPU) is kept out of the sums:
    where log mu = 0 the term is (1 - mu) * finite = 0, and where pi = 1 > mu (the infinite KL) D is set last.
    """
    x = torch.stack([log_mu, log_pi]).clamp_(max=0.0)  # [2, ...] log mu, log pi (a copy, overwritten below)
    p = torch.exp(x)  # [2, ...] mu, pi
    head = (x[0] - x[1]).mul_(p[0])  # [...] mu (log mu - log pi)
    near = torch.gt(x, LOG_HALF, out=torch.empty_like(x))  # [2, ...] 0/1
    infinite = torch.eq(x, 0.0, out=torch.empty_like(x))  # [2, ...] 0/1: log mu = 0, log pi = 0
    infinite = torch.gt(infinite[1], infinite[0], out=infinite[1]).mul_(KL_MAX)  # [...] pi = 1 > mu: KL_MAX, else 0
    one_minus = x.expm1_().neg_()  # [2, ...] -expm1(log mu), -expm1(log pi), in x's buffer
    one_minus_mu = one_minus[0].clone()  # [...]
    logs = _log1mexp_into(near, one_minus, p)  # [2, ...] log1mexp of log mu and log pi, finite
    rest = logs[0].sub_(logs[1]).mul_(one_minus_mu)  # [...] finite
    # were denormals flushed, log(0) = -inf comes back (_log1mexp_into): NaN where mu = 1 is the dropped term
    rest = rest.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
    kl = head.add_(rest).nan_to_num_(nan=KL_MAX, posinf=KL_MAX).clamp_(0.0, KL_MAX)
    return torch.maximum(kl, infinite, out=kl)


_BINARY_FUNCTIONS = {"binary_tv": binary_tv, "binary_kl": binary_kl}


def binary_divergence(name: BinaryDivergence, log_pi: torch.Tensor, log_mu: torch.Tensor) -> torch.Tensor:
    """Dispatch on the config name (``binary_tv`` or ``binary_kl``)."""
    try:
        fn = _BINARY_FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown binary divergence {name!r}; known: {list(BINARY_DIVERGENCES)}") from None
    return fn(log_pi, log_mu)
