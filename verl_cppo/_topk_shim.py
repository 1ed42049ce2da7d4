"""TEMPORARY stand-in for ``verl_cppo.divergence.topk_divergence`` (issue 7a writes the real, memory-lean one).

It has 7a's contract and semantics but none of its economy: a float64 full softmax per chunk of rows. The
engine hook resolves the function at call time (``verl_cppo.engine_hook.resolve_topk_divergence``) and uses this
only while ``verl_cppo.divergence`` has no ``topk_divergence``; delete this file once 7a's branch is merged.

Semantics: A'' = mu's top-K ids U {sampled id} U {other}. p_mu at the top-K ids is exp(mu_topk_logprobs),
p_mu(sampled) is exp(mu_sampled_logprobs) when the sampled id is not among the row's top-K ids, and "other"
holds the rest of the mass (clamped at 0). Ids < 0 mean "no entry". Under vocab-parallel TP each rank passes its
vocab shard of logits and ``vocab_start_index``; the log-sum-exp and the gathered logits are all-reduced over
``tp_group``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["topk_divergence"]

_ROWS = 1024
"""Rows per chunk: bounds the float64 copy of the logits to _ROWS x V."""


@torch.no_grad()
def topk_divergence(
    logits: torch.Tensor,
    sampled_ids: torch.Tensor,
    mu_topk_ids: torch.Tensor,
    mu_topk_logprobs: torch.Tensor,
    kind: str,
    *,
    mu_sampled_logprobs: torch.Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start_index: int = 0,
) -> torch.Tensor:
    """D [N] float32 for logits [N, V_local], sampled_ids [N], mu_topk_ids / mu_topk_logprobs [N, K]."""
    if kind not in ("tv", "kl"):
        raise ValueError(f"topk_divergence: kind must be 'tv' or 'kl', got {kind!r}")
    n = logits.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=logits.device)
    if mu_sampled_logprobs is None:
        mu_sampled_logprobs = torch.zeros(n, dtype=torch.float64, device=logits.device)
    for s in range(0, n, _ROWS):
        e = min(s + _ROWS, n)
        out[s:e] = _rows(
            logits[s:e],
            sampled_ids[s:e],
            mu_topk_ids[s:e],
            mu_topk_logprobs[s:e],
            mu_sampled_logprobs[s:e],
            kind,
            tp_group,
            vocab_start_index,
        )
    return out


def _rows(logits, sampled, ids, mu_lp, mu_sampled_lp, kind, tp_group, vocab_start):
    x = logits.double()  # [n, V_local]
    v_local = x.shape[-1]
    m = x.amax(dim=-1)  # [n]
    if tp_group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    z = torch.exp(x - m[:, None]).sum(dim=-1)  # [n]
    if tp_group is not None:
        dist.all_reduce(z, group=tp_group)
    lse = m + torch.log(z)  # [n]

    all_ids = torch.cat([ids, sampled[:, None]], dim=-1).long()  # [n, K+1]
    local = all_ids - vocab_start
    owned = (all_ids >= 0) & (local >= 0) & (local < v_local)
    picked = torch.where(owned, x.gather(-1, local.clamp(0, v_local - 1)), 0.0)  # [n, K+1]
    if tp_group is not None:
        dist.all_reduce(picked, group=tp_group)
    pi_lp = picked - lse[:, None]  # [n, K+1] log pi at A' (garbage where the id is < 0)

    in_topk = (ids == sampled[:, None]) & (ids >= 0)  # [n, K]
    sampled_extra = ~in_topk.any(dim=-1) & (sampled >= 0)  # [n]
    present = torch.cat([ids >= 0, sampled_extra[:, None]], dim=-1)  # [n, K+1]
    mu_all = torch.cat([mu_lp.double(), mu_sampled_lp.double()[:, None]], dim=-1)  # [n, K+1]
    p_mu = torch.where(present, torch.exp(mu_all), 0.0)
    p_pi = torch.where(present, torch.exp(pi_lp), 0.0)
    other_mu = (1.0 - p_mu.sum(-1)).clamp(min=0.0)  # [n]
    other_pi = (1.0 - p_pi.sum(-1)).clamp(min=0.0)
    if kind == "tv":
        d = 0.5 * ((p_mu - p_pi).abs().sum(-1) + (other_mu - other_pi).abs())
    else:
        terms = torch.where(present & (p_mu > 0), p_mu * (mu_all - pi_lp), 0.0).sum(-1)
        other = torch.where(other_mu > 0, other_mu * (torch.log(other_mu) - torch.log(other_pi)), 0.0)
        d = terms + other
    return d.float()
