"""Per-token divergences D_t between the rollout policy mu and the trained policy pi (pure torch, no verl).

The binary estimators see only the sampled token y_t: they compare the two-outcome distributions
{y_t, everything else} under mu and pi, a lower bound of the full-vocabulary divergence (DPPO, arXiv
2602.04879). Inputs are log-probs of the sampled token; outputs are finite and >= 0 wherever the inputs
are finite (the caller masks non-finite tokens before calling).
"""

from __future__ import annotations

import math

import torch

__all__ = ["BINARY_DIVERGENCES", "binary_divergence", "binary_kl", "binary_tv", "log1mexp", "topk_divergence"]

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


BINARY_DIVERGENCES = {"binary_tv": binary_tv, "binary_kl": binary_kl}


def binary_divergence(name: str, log_pi: torch.Tensor, log_mu: torch.Tensor) -> torch.Tensor:
    """Dispatch on the config name (``binary_tv`` or ``binary_kl``)."""
    try:
        fn = BINARY_DIVERGENCES[name]
    except KeyError:
        raise ValueError(f"unknown binary divergence {name!r}; known: {sorted(BINARY_DIVERGENCES)}") from None
    return fn(log_pi, log_mu)


from verl_cppo.topk import topk_divergence  # noqa: E402  (Top-K: their own module)
