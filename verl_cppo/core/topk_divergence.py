"""Top-K divergences D_t between mu and pi from pi's logits, without a float32 [tokens, vocab] copy.

The paper's main setting (arXiv 2606.10968, K = 20) compares mu and pi on a reduced support per token:
A'_t = TopK(mu(.|s_t)) U {y_t} and A''_t = A'_t U {other}, where "other" holds the remaining mass.

    tv = 1/2 * sum_{a in A''} |p_mu(a) - p_pi(a)|          kl = sum_{a in A''} p_mu(a) log(p_mu(a) / p_pi(a))

mu arrives as log-probs from the rollout engine (its top-K, plus y_t's own log-prob); pi's probabilities
at those ids need the log-sum-exp of the full logits row. One pass over the logits gives, per row, a shift
c near the row max, s = sum_v exp(z_v - c), and for the K+1 ids their logits z_a and the terms
e_a = exp(z_a - c) exactly as summed into s (RowStatistics), so that pi's "other" mass (s - sum e_a) / s
cancels exactly; everything after that works on [N, K+1] tensors in fp64. Two backends compute them:
  torch   chunks of rows upcast to fp32 (fp64 for fp64 logits); extra memory one chunk, CHUNK_BYTES. It
          sums the terms outside the ids directly and adds the ids' terms in fp64: the same exact other mass.
  triton  ``verl_cppo.kernels.topk_statistics``: one program per row reads the logits once and gathers the
          K+1 logits; extra memory O(N * K).
Under Megatron tensor parallelism each rank holds a vocab shard; the statistics combine with one MAX
all-reduce of [N, K+2] and one SUM all-reduce of [N, 2K+3] values (the pattern of Megatron's vocab-parallel
cross entropy). Under Ulysses SP / context parallelism rows are simply split: D_t depends on row t only.

Rules (each test-covered), making D finite and NaN-free for any finite or -inf input:
  * ids < 0 in ``mu_topk_ids`` are padding ("no entry"); a repeated id counts once, with its first log-prob.
  * The sampled token joins A' only when it is not among the row's top-K ids; its mu probability is then
    exp(mu_sampled_logprobs) (verl's rollout_log_probs), else the top-K value (mu_sampled_logprobs ignored).
  * mu log-probs above 0 (rounding) count as 0; -inf means probability 0.
  * mu's other mass is 1 - sum over A' of exp(log-prob), clamped to [0, 1] (rounding can make it negative);
    pi's is the mass outside A' (clamped to [0, 1] as well). mu's log-probs come from an fp32 engine, so
    masses below ~1e-6 are noise: in the KL pi's other mass is floored at OTHER_FLOOR, which keeps the term
    finite (no KL_MAX from an underflowed tail) and only lowers it, so topk_kl stays a lower bound of the
    full KL.
  * KL terms with p_mu = 0 are 0; a term with p_mu > 0 and p_pi = 0 (a -inf logit) is infinite, and the
    result is capped at divergence.KL_MAX as for binary_kl. tv is clamped to [0, 1], kl to [0, KL_MAX].
  * A row with a NaN (or +inf) logit or a NaN mu log-prob it uses, or whose logits are all -inf, gets the
    maximum value (1 for tv, KL_MAX for kl), so that the token is masked rather than a NaN spreading.
Logits must already be divided by the sampling temperature (verl's engines do this in place before their
log-softmax); every column given counts in the log-sum-exp (Megatron's padded vocab too, as in verl's own
log-probs). The result carries no gradient (computed under no_grad): CPPO's mask is built without one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist

from verl_cppo.core.divergence import KL_MAX

__all__ = [
    "CHUNK_BYTES",
    "OTHER_FLOOR",
    "TOPK_KINDS",
    "RowStatistics",
    "RowStatisticsFn",
    "TopKKind",
    "divergence_from_statistics",
    "topk_divergence",
    "torch_row_statistics",
]

TopKKind = Literal["tv", "kl"]
TOPK_KINDS = ("tv", "kl")

OTHER_FLOOR = 1.0e-6
"""Lower bound on pi's "other" mass inside the KL's log (mu's, from fp32 log-probs, is noise below ~1e-6)."""

CHUNK_BYTES = 64 * 2**20
"""The torch backend upcasts this many bytes of logits rows at a time (at least one row)."""


@torch.no_grad()
def topk_divergence(
    logits: torch.Tensor,
    sampled_ids: torch.Tensor,
    mu_topk_ids: torch.Tensor,
    mu_topk_logprobs: torch.Tensor,
    kind: TopKKind,
    *,
    mu_sampled_logprobs: torch.Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start_index: int = 0,
    row_statistics: RowStatisticsFn | None = None,
    chunk_rows: int | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Top-K TV or KL(mu || pi) per token, float32 [N], detached.

    Args:
        logits: [N, V_local] pi's logits (any float dtype; already divided by the temperature). Without
            ``tp_group``, V_local is the whole vocabulary.
        sampled_ids: [N] int, the sampled token y_t (global vocabulary id).
        mu_topk_ids: [N, K] int, mu's top-K ids (global); ids < 0 are padding. K may be 0.
        mu_topk_logprobs: [N, K] float, mu's log-probs at those ids.
        kind: "tv" or "kl".
        mu_sampled_logprobs: [N] float, mu's log-prob of y_t; required where y_t is not among the row's ids.
        tp_group: the tensor-parallel group holding the vocab shards; every rank holds the same N rows,
            calls this function with the same arguments except ``logits`` and ``vocab_start_index``::

                global vocab  [0 ................................................. V)
                rank 0        [0, V_0)           logits[:, 0 : V_0]        vocab_start_index = 0
                rank 1        [V_0, V_0 + V_1)   logits[:, 0 : V_1]        vocab_start_index = V_0
                ...           shards may differ in size; together they tile [0, V) exactly

        vocab_start_index: the global id of this rank's column 0 (0 without ``tp_group``).
        row_statistics: the backend of the one pass over the logits, ``(logits, ids, vocab_start_index) ->
            RowStatistics``; None = ``torch_row_statistics`` (``verl_cppo.kernels.topk_divergence`` passes
            the Triton kernel where it applies).
        chunk_rows: rows per chunk of the torch backend (default: CHUNK_BYTES of fp32 rows).
        validate: check ids against the vocabulary and the presence of mu_sampled_logprobs (one host sync);
            a ValueError names the tensor, row and value.
    Returns:
        D: float32 [N] on logits' device, in [0, 1] for tv and [0, KL_MAX] for kl.
    """
    _check_arguments(logits, sampled_ids, mu_topk_ids, mu_topk_logprobs, kind, mu_sampled_logprobs)
    if tp_group is None and vocab_start_index != 0:
        raise ValueError(f"topk_divergence: vocab_start_index={vocab_start_index} needs a tp_group")
    n, k = mu_topk_ids.shape
    if n == 0:
        return torch.zeros(0, dtype=torch.float32, device=logits.device)
    ids = torch.cat([mu_topk_ids.long(), sampled_ids.long()[:, None]], dim=1)  # [N, K+1] topk ids, then y_t
    if row_statistics is None:
        stats = torch_row_statistics(logits, ids, vocab_start_index, chunk_rows=chunk_rows)
    else:
        stats = RowStatistics(*row_statistics(logits, ids, vocab_start_index))
    found = _is_local(ids, vocab_start_index, logits.shape[1])  # [N, K+1] where this rank holds the id
    if tp_group is not None:
        stats, found = _combine_shards(stats, found, tp_group)
    in_support = _support(ids)  # [N, K+1] the columns forming A'
    if validate:
        _check_ids(ids, found, in_support, k, mu_sampled_logprobs is None, tp_group is not None, logits.shape[1])
    return _divergence(kind, stats, in_support, mu_topk_logprobs, mu_sampled_logprobs)


@torch.no_grad()
def divergence_from_statistics(
    kind: str,
    stats: RowStatistics,
    sampled_ids: torch.Tensor,
    mu_topk_ids: torch.Tensor,
    mu_topk_logprobs: torch.Tensor,
    mu_sampled_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """D float32 [N] from full-vocabulary RowStatistics at the ids [mu_topk_ids, sampled_ids] (no validation).

    The second half of topk_divergence, for tools that obtain the statistics otherwise (e.g. the benchmark's
    naive full log-softmax: shift = 0, s = 1, z = e.log() = log-probs).
    """
    in_support = _support(torch.cat([mu_topk_ids.long(), sampled_ids.long()[:, None]], dim=1))  # [N, K+1]
    return _divergence(kind, stats, in_support, mu_topk_logprobs, mu_sampled_logprobs)


def _divergence(kind, stats, in_support, mu_topk_logprobs, mu_sampled_logprobs) -> torch.Tensor:
    n = in_support.shape[0]
    mu_sampled = mu_sampled_logprobs if mu_sampled_logprobs is not None else mu_topk_logprobs.new_zeros(n)
    log_mu = torch.cat([mu_topk_logprobs, mu_sampled[:, None]], dim=1).double()  # [N, K+1]
    return _divergence_from_stats(kind, stats, log_mu, in_support).float()


class RowStatistics(NamedTuple):
    """Full-row softmax statistics of a logits shard at a row's J candidate ids.

    log softmax(logits)[id_j] = z_j - shift - log(s);  softmax(logits)[id_j] = e_j / s;
    mass outside the candidates = (s - sum_j e_j) / s (each id once), exact: e_j are the very terms of s.
    """

    shift: torch.Tensor  # [N] a finite reference near the row max (0 for an all -inf row)
    s: torch.Tensor  # [N] fp64, sum_v exp(logits[:, v] - shift)
    z: torch.Tensor  # [N, J] logits at the ids held by this shard, -inf elsewhere
    e: torch.Tensor  # [N, J] exp(z - shift), 0 where not held


RowStatisticsFn = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, ...]]
"""A backend of the pass over the logits: (logits [N, V], ids [N, J], vocab_start_index) -> RowStatistics."""


def torch_row_statistics(
    logits: torch.Tensor, ids: torch.Tensor, vocab_start_index: int = 0, *, chunk_rows: int | None = None
) -> RowStatistics:
    """One pass over local logits [N, V] for global ids [N, J] (ids < 0: none); see RowStatistics."""
    return _row_statistics_torch(logits, ids, vocab_start_index, chunk_rows)


def _shift(m: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp shift: the row max, or 0 for a row of -inf (keeps exp(-inf - shift) = 0, not NaN)."""
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


def _is_local(ids: torch.Tensor, start: int, width: int) -> torch.Tensor:
    return (ids >= 0) & (ids >= start) & (ids < start + width)


def _row_statistics_torch(logits, ids, start, chunk_rows) -> RowStatistics:
    n, v = logits.shape
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows = chunk_rows or max(1, CHUNK_BYTES // (v * torch.finfo(dtype).bits // 8))
    held = _is_local(ids, start, v)  # [N, J]
    once = held & _support(ids)  # [N, J] each held id once
    cols = (ids - start).clamp(0, v - 1)  # [N, J]
    shift = torch.empty(n, dtype=dtype, device=logits.device)  # [N]
    rest = torch.empty(n, dtype=dtype, device=logits.device)  # [N] the terms outside the ids
    e = torch.empty(ids.shape, dtype=dtype, device=logits.device)  # [N, J]
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        x = logits[r0:r1].to(dtype, copy=True)  # [c, V] the only large buffer
        shift[r0:r1] = _shift(x.amax(dim=1))
        x.sub_(shift[r0:r1, None]).exp_()  # [c, V] the terms of s
        e[r0:r1] = x.gather(1, cols[r0:r1]).masked_fill_(~held[r0:r1], 0.0)
        x.scatter_add_(1, cols[r0:r1], -e[r0:r1].masked_fill(~once[r0:r1], 0.0))  # the held ids' terms -> 0
        rest[r0:r1] = x.sum(dim=1)
        del x
    s = rest.double() + e.double().masked_fill(~once, 0.0).sum(dim=1)  # [N] fp64: rest is kept exact
    z = logits.gather(1, cols).to(dtype).masked_fill(~held, float("-inf"))  # [N, J]
    return RowStatistics(shift, s, z, e)


def _combine_shards(
    stats: RowStatistics, found: torch.Tensor, group: dist.ProcessGroup
) -> tuple[RowStatistics, torch.Tensor]:
    """Full-vocabulary statistics from vocab shards: MAX of (shift, z), then SUM of rescaled (s, e) and found."""
    shift, s, z, e = stats
    has_mass = s > 0  # [N] False for a shard of -inf only: it must not raise the common shift
    sz = torch.cat([torch.where(has_mass, shift, float("-inf"))[:, None], z], dim=1)  # [N, 1+J]
    dist.all_reduce(sz, op=dist.ReduceOp.MAX, group=group)
    common = _shift(sz[:, 0])  # [N]
    scale = torch.exp(shift.double() - common.double())  # [N] <= 1 wherever this shard has mass
    scale = torch.where(has_mass, scale, torch.zeros_like(scale))  # no 0 * inf
    sef = torch.cat([(s * scale)[:, None], e.double() * scale[:, None], found.double()], dim=1)  # [N, 1+2J]
    dist.all_reduce(sef, op=dist.ReduceOp.SUM, group=group)
    j = z.shape[1]
    return RowStatistics(common, sef[:, 0], sz[:, 1:], sef[:, 1 : 1 + j]), sef[:, 1 + j :]


def _support(ids: torch.Tensor) -> torch.Tensor:
    """[N, J] bool: the columns holding the first occurrence of an id >= 0 in their row.

    For ids = [top-K ids, y_t] these are the columns forming A': the top-K ids once each, then y_t if new.
    """
    sorted_ids, order = torch.sort(ids, dim=1, stable=True)  # [N, J]
    repeat = torch.zeros_like(ids, dtype=torch.bool)  # [N, J] in sorted order
    repeat[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    return torch.zeros_like(repeat).scatter_(1, order, repeat).logical_not_() & (ids >= 0)


def _divergence_from_stats(kind, stats: RowStatistics, log_mu, in_support) -> torch.Tensor:
    """D [N] float64 from full-vocabulary statistics and mu's log-probs [N, K+1] (columns as in `in_support`)."""
    shift, s, z, e = (t.double() for t in stats)
    log_mu = log_mu.clamp(max=0.0)  # [N, K+1]
    log_pi = z - shift[:, None] - torch.log(s)[:, None]  # [N, K+1]
    zero = torch.zeros((), dtype=torch.float64, device=z.device)
    e = torch.where(in_support, e, zero)  # [N, K+1]
    p_mu = torch.where(in_support, log_mu.exp(), zero)  # [N, K+1]
    p_pi = e / s[:, None]  # [N, K+1]
    other_mu = (1.0 - p_mu.sum(dim=1)).clamp(0.0, 1.0)  # [N]
    other_pi = ((s - e.sum(dim=1)) / s).clamp(0.0, 1.0)  # [N] exact: e are the terms of s
    broken = (in_support & (log_mu.isnan() | log_pi.isnan())).any(dim=1) | s.isnan() | (s == 0)  # [N]
    if kind == "tv":
        d = 0.5 * ((p_mu - p_pi).abs().sum(dim=1) + (other_mu - other_pi).abs())  # [N]
        top = 1.0
    else:
        terms = torch.where(in_support & (p_mu > 0), p_mu * (log_mu - log_pi), zero)  # [N, K+1]; +inf if p_pi = 0
        log_ratio_other = other_mu.log() - other_pi.clamp(min=OTHER_FLOOR).log()  # [N]
        d = terms.sum(dim=1) + torch.where(other_mu > 0, other_mu * log_ratio_other, zero)  # [N]
        top = KL_MAX
    d = torch.where(broken, torch.full_like(d, top), d)
    return torch.nan_to_num(d, nan=top, posinf=top).clamp(0.0, top)


def _check_arguments(logits, sampled_ids, topk_ids, topk_logprobs, kind, sampled_logprobs) -> None:
    if kind not in TOPK_KINDS:
        raise ValueError(f"topk_divergence: kind={kind!r}; known: {TOPK_KINDS}")
    if logits.dim() != 2 or not logits.is_floating_point() or logits.shape[1] == 0:
        shape = tuple(logits.shape)
        raise ValueError(f"topk_divergence: logits must be a float [N, V>0] tensor, got {logits.dtype} {shape}")
    n, k = logits.shape[0], topk_ids.shape[-1] if topk_ids.dim() == 2 else -1
    expect = {
        "sampled_ids": (sampled_ids, (n,), False),
        "mu_topk_ids": (topk_ids, (n, k), False),
        "mu_topk_logprobs": (topk_logprobs, (n, k), True),
        "mu_sampled_logprobs": (sampled_logprobs, (n,), True),
    }
    for name, (t, shape, is_float) in expect.items():
        if t is None:
            continue
        if tuple(t.shape) != shape or t.is_floating_point() != is_float or t.is_complex():
            kind_word = "float" if is_float else "integer"
            raise ValueError(
                f"topk_divergence: {name} must be a {kind_word} tensor of shape {shape} "
                f"(logits {tuple(logits.shape)}), got {t.dtype} {tuple(t.shape)}"
            )
        if t.device != logits.device:
            raise ValueError(f"topk_divergence: {name} is on {t.device}, logits on {logits.device}")


def _check_ids(ids, found, in_support, k, no_sampled_logprobs, sharded, width) -> None:
    """One host sync: every valid id is held by exactly one shard; y_t outside the top-K needs its log-prob."""
    bad_id = ((ids >= 0) | (torch.arange(k + 1, device=ids.device) == k)) & (found != 1)  # [N, K+1]
    missing = in_support[:, k] if no_sampled_logprobs else torch.zeros_like(in_support[:, k])  # [N]
    flags = torch.stack([bad_id.any(), missing.any()]).tolist()
    if flags[0]:
        row, col = (int(i) for i in bad_id.nonzero()[0])
        name, where = ("sampled_ids", f"[{row}]") if col == k else ("mu_topk_ids", f"[{row}, {col}]")
        vocab = "no rank of tp_group holds it (or several do)" if sharded else f"the vocabulary is [0, {width})"
        raise ValueError(f"topk_divergence: {name}{where} = {int(ids[row, col])} is not a valid id: {vocab}")
    if flags[1]:
        row = int(missing.nonzero()[0])
        raise ValueError(
            f"topk_divergence: mu_sampled_logprobs is None but sampled_ids[{row}] = {int(ids[row, k])} "
            "is not among mu_topk_ids of that row; pass the rollout log-prob of the sampled token"
        )
