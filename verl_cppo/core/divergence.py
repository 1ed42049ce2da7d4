"""Per-token divergences D_t between the rollout policy mu and the trained policy pi (pure torch, no verl).

The divergence names are the ``Literal`` types below; every other module spells them through these.

The binary estimators see only the sampled token y_t: they compare the two-outcome distributions
{y_t, everything else} under mu and pi, a lower bound of the full-vocabulary divergence (DPPO, arXiv
2602.04879). Inputs are log-probs of the sampled token; outputs are finite and >= 0 wherever the inputs
are finite (the caller masks non-finite tokens before calling).
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
    """|mu_t - pi_t|, the binary total variation. Shapes: any, both the same; returns that shape."""
    return (torch.exp(log_pi) - torch.exp(log_mu)).abs()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and near -inf (Maechler 2012); -inf at x = 0."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def binary_kl(log_pi: torch.Tensor, log_mu: torch.Tensor) -> torch.Tensor:
    """KL(mu || pi) on {y_t, rest}: mu log(mu/pi) + (1-mu) log((1-mu)/(1-pi)), computed in log space.

    Log-probs above 0 (rounding) are treated as 0. The (1-mu) term is dropped where mu = 1 (0 * log 0 = 0),
    and the result is clamped to [0, KL_MAX]. Shapes: any, both the same; returns that shape.
    """
    log_pi = log_pi.clamp(max=0.0)
    log_mu = log_mu.clamp(max=0.0)
    mu = torch.exp(log_mu)
    head = mu * (log_mu - log_pi)
    rest = torch.where(log_mu < 0, -torch.expm1(log_mu) * (log1mexp(log_mu) - log1mexp(log_pi)), 0.0)
    return torch.nan_to_num(head + rest, nan=KL_MAX, posinf=KL_MAX).clamp(0.0, KL_MAX)


_BINARY_FUNCTIONS = {"binary_tv": binary_tv, "binary_kl": binary_kl}


def binary_divergence(name: BinaryDivergence, log_pi: torch.Tensor, log_mu: torch.Tensor) -> torch.Tensor:
    """Dispatch on the config name (``binary_tv`` or ``binary_kl``)."""
    try:
        fn = _BINARY_FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown binary divergence {name!r}; known: {list(BINARY_DIVERGENCES)}") from None
    return fn(log_pi, log_mu)
