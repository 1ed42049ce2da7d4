"""Independent float64 reference of the Top-K divergences (spec: topk_tv, topk_kl), one token at a time.

It shares no code with ``verl_cppo``: Python floats, the full-vocabulary softmax per row, and pi's "other" mass
summed directly over the ids outside A' (the implementation uses 1 - sum over A'). It applies the documented
rules of ``verl_cppo.core.topk_divergence``: padding ids < 0, first occurrence of a repeated id, the sampled
token added only when new, mu log-probs capped at 0, the other masses clamped to [0, 1], pi's other mass floored
at 1e-6 inside the KL's log, results clamped to [0, 1] (tv) and [0, 1e4] (kl), a row with a NaN / +inf logit,
all -inf logits or a NaN mu log-prob it uses at the maximum."""

from __future__ import annotations

import math

import torch

KL_MAX = 1.0e4
OTHER_FLOOR = 1.0e-6


def reference_topk_row(logits, sampled, topk_ids, topk_logprobs, sampled_logprob, kind: str) -> float:
    """D for one token. logits: V floats; topk_ids / topk_logprobs: K values; sampled_logprob: float or None."""
    top = 1.0 if kind == "tv" else KL_MAX
    if any(math.isnan(x) or x == math.inf for x in logits) or max(logits) == -math.inf:
        return top
    mx = max(logits)
    weights = [math.exp(x - mx) for x in logits]
    total = math.fsum(weights)
    log_total = math.log(total)

    log_mu: dict[int, float] = {}  # A' in order, with mu's log-prob
    for a, lp in zip(topk_ids, topk_logprobs):
        if a >= 0 and a not in log_mu:
            log_mu[a] = lp
    if sampled not in log_mu:
        log_mu[sampled] = sampled_logprob
    if any(math.isnan(lp) for lp in log_mu.values()):
        return top
    log_mu = {a: min(lp, 0.0) for a, lp in log_mu.items()}

    p_mu = {a: math.exp(lp) for a, lp in log_mu.items()}
    p_pi = {a: weights[a] / total for a in log_mu}
    other_mu = min(max(1.0 - math.fsum(p_mu.values()), 0.0), 1.0)
    other_pi = math.fsum(w for v, w in enumerate(weights) if v not in log_mu) / total

    if kind == "tv":
        d = 0.5 * (math.fsum(abs(p_mu[a] - p_pi[a]) for a in log_mu) + abs(other_mu - other_pi))
        return min(max(d, 0.0), 1.0)
    assert kind == "kl", kind
    terms = []
    for a, lp in log_mu.items():
        if p_mu[a] == 0.0:
            continue
        log_pi = logits[a] - mx - log_total
        if log_pi == -math.inf:
            return KL_MAX
        terms.append(p_mu[a] * (lp - log_pi))
    if other_mu > 0.0:
        terms.append(other_mu * (math.log(other_mu) - math.log(max(other_pi, OTHER_FLOOR))))
    return min(max(math.fsum(terms), 0.0), KL_MAX)


def reference_topk_divergence(logits, sampled_ids, topk_ids, topk_logprobs, kind, sampled_logprobs=None):
    """[N] list of floats from torch tensors (read as float64): logits [N, V], ids [N], [N, K], [N, K], [N]."""
    rows = logits.double().tolist()
    sampled = sampled_ids.tolist()
    ids = topk_ids.tolist()
    lps = topk_logprobs.double().tolist()
    lp_sampled = sampled_logprobs.double().tolist() if sampled_logprobs is not None else [None] * len(rows)
    return [reference_topk_row(rows[n], sampled[n], ids[n], lps[n], lp_sampled[n], kind) for n in range(len(rows))]


def random_topk_case(gen, n: int, v: int, k: int, *, dtype=None, scale: float = 3.0, noise: float = 0.3):
    """Random pi logits [N, V] and a nearby mu; mu's top-K ids / log-probs (fp32, as an engine returns them).

    The sampled token is one of mu's top-K in even rows and a token outside it in odd rows (needs V > K).
    Returns (logits, sampled_ids, topk_ids, topk_logprobs, sampled_logprobs); ``gen`` is a CPU generator.
    """
    logits = torch.randn(n, v, generator=gen, dtype=torch.float64) * scale  # [N, V]
    log_mu = torch.log_softmax(logits + noise * torch.randn(n, v, generator=gen, dtype=torch.float64), dim=-1)
    order = log_mu.argsort(dim=-1, descending=True)  # [N, V]
    inside = torch.randint(0, max(k, 1), (n,), generator=gen)  # [N] a rank within the top-K
    outside = torch.randint(k, max(v, k + 1), (n,), generator=gen).clamp(max=v - 1)  # [N] a rank after it
    rank = torch.where(torch.arange(n) % 2 == 0, inside, outside) if k > 0 else outside
    sampled = order.gather(1, rank[:, None])[:, 0]  # [N]
    topk_ids = order[:, :k]  # [N, K]
    topk_logprobs = log_mu.gather(1, topk_ids).float()  # [N, K]
    sampled_logprobs = log_mu.gather(1, sampled[:, None])[:, 0].float()  # [N]
    return logits.to(dtype or torch.float32), sampled, topk_ids, topk_logprobs, sampled_logprobs
