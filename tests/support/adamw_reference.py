"""A float64 replay of ``torch.optim.AdamW`` with a bound on the float32 rounding of torch's own update.

The multi-rank equivalence tests do not compare weights after AdamW steps across layouts: Adam divides the first
moment by the root of the second, so a gradient entry near its rounding level (where layouts legitimately differ
by a few ulps of the sum) becomes an update of up to ~lr, a difference that depends on the CPU's summation order.
They compare the gradients (sums: a reordering bound holds) and check each layout's update against this replay.

The bound follows torch's float32 arithmetic (``_multi_tensor_adam`` with decoupled weight decay, unit roundoff
u = 2^-24), one rounding per operation, carried across steps:
  decay     p (1 - lr wd)                     error <= u |p|
  first     m <- m + (1 - b1)(g - m)  (lerp)  error <= b1 dm + 3u (|m| + |g|)      (absolute: it may cancel)
  second    v <- b2 v + (1 - b2) g^2          relative error <= rv + 4u            (no cancellation)
  denom     sqrt(v) / sqrt(bc2) + eps         relative error <= rv / 2 + 3u
  update    p + (-lr / bc1) * m / denom        error <= u |p'| + (lr / bc1) dm / denom + |step| (rv / 2 + 5u)
where bc1 = 1 - b1^t, bc2 = 1 - b2^t. The test allows twice this bound.
"""

from __future__ import annotations

import torch

UNIT_ROUNDOFF = 2.0**-24  # float32


def replay_adamw(steps: list[dict]) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per recorded step (``grads``, ``before``, ``hyper`` keyed by parameter name, as
    tests/support/multirank_update.record_optimizer_steps writes them), the float64 parameters AdamW produces
    from that step's float32 parameters and gradients and the moments of the steps before, with the bound on
    torch's float32 rounding of the same update: ``{name: (expected, bound)}`` per step, both float64.
    """
    u = UNIT_ROUNDOFF
    state: dict[str, dict[str, torch.Tensor | float]] = {}
    out = []
    for t, record in enumerate(steps, start=1):
        expected = {}
        for name, grad in record["grads"].items():
            hyper = record["hyper"][name]
            lr, eps, wd, (b1, b2) = hyper["lr"], hyper["eps"], hyper["weight_decay"], hyper["betas"]
            g = grad.double()  # [*shape]
            p = record["before"][name].double()  # [*shape]
            s = state.setdefault(name, {"m": torch.zeros_like(g), "v": torch.zeros_like(g), "dm": 0.0, "rv": 0.0})
            s["dm"] = b1 * s["dm"] + 3 * u * (s["m"].abs() + g.abs())
            s["m"] = b1 * s["m"] + (1 - b1) * g
            s["v"] = b2 * s["v"] + (1 - b2) * g * g
            s["rv"] = s["rv"] + 4 * u
            bc1, bc2 = 1 - b1**t, 1 - b2**t
            denom = s["v"].sqrt() / bc2**0.5 + eps  # [*shape]
            step = (lr / bc1) * s["m"] / denom  # [*shape]
            new = p * (1 - lr * wd) - step  # [*shape]
            bound = u * new.abs() + u * p.abs() * (wd != 0) + (lr / bc1) * s["dm"] / denom
            bound = bound + step.abs() * (s["rv"] / 2 + 5 * u)
            expected[name] = (new, bound)
        out.append(expected)
    return out
