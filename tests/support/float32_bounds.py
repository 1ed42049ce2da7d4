"""Float32 rounding bounds that the multi-process and engine tests derive their tolerances from.

A tolerance here is not a measured maximum (float32 sums land differently on CPUs of one kind); it follows
from the arithmetic, with unit roundoff u = 2^-24:

* one rounded operation (or a float64 value rounded to float32): relative error <= u; torch's float32 ``exp``
  on CPU (SLEEF, 1 ulp): <= 2u relative;
* a float32 sum of n terms in any order: error <= (n - 1) u sum|terms|, so two orders differ by at most
  ``reorder_bound(n, sum|terms|)`` = 2 n u sum|terms| (with cancellation the scale is the absolute sum, not
  the sum);
* ``exp(x)`` of an argument x rounded once: relative error <= (|x| + 2) u.

``topk_divergence_bound`` applies these to ``verl_cppo.core.topk_divergence`` (the Top-K TV / KL from pi's
logits, computed from float32 logits); ``float32_forward_bound`` gives the order of a float32 transformer
forward's error where no bound can be derived (two different kernels).
"""

from __future__ import annotations

import math

import torch

from tests.support.adamw_reference import UNIT_ROUNDOFF

__all__ = [
    "UNIT_ROUNDOFF",
    "float32_forward_bound",
    "float32_forward_tolerance",
    "reorder_bound",
    "topk_divergence_bound",
]


def reorder_bound(n: int, abs_sum: float) -> float:
    """|a - b| for two float32 sums of the same n terms in different orders: <= 2 n u sum|terms|."""
    return 2 * n * UNIT_ROUNDOFF * abs_sum


def topk_divergence_bound(logits: torch.Tensor, kind: str, d: torch.Tensor | None = None) -> torch.Tensor:
    """[N] float64: a bound on |D - D_exact| for ``topk_divergence`` of the float32 rounding of ``logits``.

    logits [N, V] (float64 or float32); D_exact is D of the unrounded logits; d [N] (optional) the D values,
    for the final rounding. Per row, with R = max - min of the finite logits (every exp argument z - shift,
    also a vocab shard's, lies in [-R, 0]) and Z = max |z| (rounding the logits to float32 moves each by
    <= u Z, so every log pi by <= 2 u Z):
      * each term exp(z_v - shift) has relative error <= (R + 2) u, and the float32 sum of the V terms (of a
        shard; shards are combined in float64) adds <= (V - 1) u relative: s, the ids' terms e_a and pi's other
        mass (s - sum e_a, exact) carry a relative error <= r = (R + V + 1) u each, so p_pi = e / s and
        other_pi <= 2 r relative and log pi <= r absolute; the rest is float64;
      * tv = 1/2 sum |p_mu - p_pi| over A' and other: |dtv| <= 1/2 * 2 r * (sum p_pi + other_pi) = r;
      * kl = sum p_mu (log mu - log pi) + other_mu (log other_mu - log other_pi): |dkl| <= r sum p_mu +
        other_mu 2 r <= 2 r;
      * plus the logits' rounding (2 u Z for tv, 4 u Z for kl's two terms), the float32 result (u |D|), and
        u for mu's sampled log-prob passed in float32 instead of float64 (p_mu |d log mu| <= u |p log p| < u).
    Two float32 computations of D (sharded and unsharded) differ by at most twice this.
    """
    u = UNIT_ROUNDOFF
    x = logits.double()
    finite = torch.isfinite(x)
    hi = torch.where(finite, x, -math.inf).amax(dim=1)  # [N]
    lo = torch.where(finite, x, math.inf).amin(dim=1)  # [N]
    spread = torch.where(finite.any(dim=1), hi - lo, 0.0)  # [N] R
    size = torch.where(finite, x.abs(), 0.0).amax(dim=1)  # [N] Z
    r = (spread + x.shape[1] + 1) * u  # [N]
    bound = (r + 2 * u * size) if kind == "tv" else 2 * (r + 2 * u * size)
    final = u * (d.double().abs() if d is not None else 1.0)
    return bound + final + u


def float32_forward_bound(config, seq_len: int, logit_scale: float) -> float:
    """The order of a float32 decoder forward's error in a log-prob, for comparing two different kernels.

    Not a proven bound: two implementations (vLLM's CPU attention and paged KV cache against HF's eager
    forward) share no summation order, so each rounding differs. Each inner product of n float32 terms is off
    by <= n u sum|terms|; along the forward a logit is the end of a chain of inner products (per layer: the
    q/k/v projections over the hidden size, q.k over the head size, the attention sum over <= seq_len
    positions, o_proj over heads x head size, the MLP's up over the hidden size and down over the
    intermediate size; then the LM head over the hidden size), with RMSNorm keeping each stage's scale near
    the activations'. Their lengths summed, times u, times the logits' scale (the log-softmax's shift and
    log-sum-exp add about one more logit scale), is the first-order error of a log-prob.
    """
    hidden, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    per_layer = 3 * hidden + head_dim + seq_len + heads * head_dim + hidden + inter
    chain = config.num_hidden_layers * per_layer + hidden + config.vocab_size  # the log-softmax's sum last
    return chain * UNIT_ROUNDOFF * 2 * logit_scale


def float32_forward_tolerance(model_dir: str, seq_len: int, reference: torch.Tensor) -> float:
    """The tolerance of a float32 engine's log-probs against a float64 HF forward of the model in ``model_dir``:
    ``float32_forward_bound`` at the logits' spread (max - min of a row of ``reference``, the float64
    log-softmax rows [len, vocab]), with a 2x margin. An estimate, not a bound (see there)."""
    from transformers import AutoConfig

    spread = float((reference.amax(dim=-1) - reference.amin(dim=-1)).max())
    return 2 * float32_forward_bound(AutoConfig.from_pretrained(model_dir), seq_len, spread)
