"""The verl adapter: the registered policy loss ``cppo``.

verl's ``ppo_loss`` (verl/workers/utils/losses.py) calls it for every engine with gathered, right-padded
[B, T] rows. It reads ``config.policy_loss.cppo`` (defaults for verl's plain PolicyLossConfig), builds the
mask of ``verl_cppo.mask`` from the binary divergence, and returns DPPO's surrogate on the kept tokens:

    L = - sum_t M_t * sg(min(rho_t, ratio_cap)) * A_t * log pi_t      aggregated by verl's agg_loss

Tokens whose log-probs, advantages or IS weights are not finite are treated as masked (they enter neither
the prefix sums nor the loss, and get exactly zero gradient) and reported as ``actor/cppo_nonfinite_frac``.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from verl.trainer.ppo.core_algos import agg_loss, register_policy_loss

from verl_cppo.config import TOPK_DIVERGENCES, CPPOConfig, cppo_config_of
from verl_cppo.divergence import KL_MAX, binary_divergence
from verl_cppo.kernels import use_triton
from verl_cppo.mask import CPPOMask, as_float, compare, cppo_mask, response_lengths, shuffled_positions
from verl_cppo.topk_loss import topk_divergence_input

if TYPE_CHECKING:
    from verl_cppo.shard_loss import ShardContext

__all__ = ["METRIC_KEYS", "STAT_NAMES", "CPPOTerms", "compute_policy_loss_cppo", "cppo_token_losses", "torch_stats"]

logger = logging.getLogger(__name__)

LOG_RATIO_BOUND = 20.0
"""|log pi - log mu| is clamped to this before exp, as in verl's ratio-based losses."""

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


def _check_shapes(**tensors: torch.Tensor | None) -> None:
    shape = tensors["log_prob"].shape
    for name, t in tensors.items():
        if t is not None and t.shape != shape:
            raise ValueError(f"cppo loss: {name} has shape {tuple(t.shape)}, log_prob has {tuple(shape)}")
    if len(shape) != 2:
        raise ValueError(f"cppo loss: expected [batch, response_len] tensors, log_prob has shape {tuple(shape)}")


def _finite_batch_info(global_batch_info: dict, mask: torch.Tensor, loss_agg_mode: str) -> dict:
    """verl's agg_loss divides by local counts when no global count is given; keep 0/0 from becoming NaN."""
    info = dict(global_batch_info)
    if loss_agg_mode == "token-mean" and info.get("batch_num_tokens") is None:
        info["batch_num_tokens"] = mask.sum().clamp(min=1)
    if loss_agg_mode.startswith("seq-mean") and info.get("global_batch_size") is None:
        info["global_batch_size"] = mask.any(dim=-1).sum().clamp(min=1)
    return info


class CPPOTerms(NamedTuple):
    pg_losses: torch.Tensor  # [B, T] per-token loss, exactly 0 (and zero gradient) off the kept tokens
    gate: CPPOMask  # the mask and its diagnostics
    div: torch.Tensor  # [B, T] D_t (0 off `valid`)
    rho: torch.Tensor  # [B, T] pi / mu from the clamped log-ratio
    log_ratio: torch.Tensor  # [B, T] clamp(log pi - log mu, +-20)
    valid: torch.Tensor  # [B, T] bool, response tokens with finite inputs
    nonfinite: torch.Tensor  # [B, T] bool, response tokens dropped for non-finite inputs


def _all_finite(*tensors: torch.Tensor | None) -> bool:
    """True when every entry is finite: an inf or NaN anywhere makes the sum non-finite (one sync on GPU).

    A sum that overflows only sends the caller down the sanitising path, which is exact for any input."""
    sums = [t.sum() for t in tensors if t is not None]  # in each tensor's dtype: no converted copy
    total = sums[0]
    for x in sums[1:]:
        total = total + x
    return math.isfinite(total.item())


def _to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def cppo_token_losses(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cfg: CPPOConfig,
    rollout_is_weights: torch.Tensor | None = None,
    shard: ShardContext | None = None,
    topk_divergence: torch.Tensor | None = None,
) -> CPPOTerms:
    """Per-token CPPO losses and mask for [B, T] rows (the torch path); the registered loss aggregates them.

    The loss is linear in log pi with a detached coefficient, so the graph is one multiply (two with IS
    weights) in verl's order: (-A sg(min(rho, cap)) M) * log pi * IS weight.

    With ``shard`` the tensors are one rank's shard-local tokens of a sequence-parallel group (any 2-D shape,
    flattened in ``shard.layout``'s order) and the mask uses global prefix sums (``verl_cppo.sharding``).
    ``topk_divergence`` [B, T] is D for ``divergence=topk_*`` (see ``verl_cppo.topk_loss``); unused otherwise."""
    _check_shapes(
        log_prob=log_prob,
        old_log_prob=old_log_prob,
        advantages=advantages,
        response_mask=response_mask,
        rollout_is_weights=rollout_is_weights,
    )
    dtype = torch.promote_types(log_prob.dtype, torch.float32)
    response_mask = response_mask.bool()
    # --- Top-K divergences (issue 7): D comes from the engine, not from the sampled token's log-probs -------
    topk_div = None
    if cfg.divergence in TOPK_DIVERGENCES:
        topk_div = topk_divergence_input(topk_divergence, log_prob, cfg.divergence)
    # --- end Top-K divergences ---------------------------------------------------------------------------------
    is_weights = rollout_is_weights
    with torch.no_grad():
        log_pi, log_mu, adv = _to(log_prob.detach(), dtype), _to(old_log_prob, dtype), _to(advantages, dtype)
        if is_weights is not None:
            is_weights = _to(is_weights, dtype)
        all_finite = _all_finite(log_pi, log_mu, adv, is_weights)
        # Top-K: NaN = no D for the token (dropped); +inf (KL) is a huge divergence, capped below
        topk_missing = topk_div.isnan() if topk_div is not None else None  # [B, T]
        if topk_missing is not None and all_finite:
            all_finite = not bool(topk_missing.any())
        if all_finite:
            valid = response_mask  # [B, T]
            nonfinite = torch.zeros_like(response_mask)
        else:  # zero every entry that is not valid, so that no inf or NaN reaches a sum or a product
            finite = log_pi.isfinite() & log_mu.isfinite() & adv.isfinite()  # [B, T]
            if is_weights is not None:
                finite &= is_weights.isfinite()
            if topk_missing is not None:
                finite &= ~topk_missing
            valid = response_mask & finite  # [B, T]
            nonfinite = response_mask & ~finite  # [B, T]
            log_pi, log_mu, adv = (torch.where(valid, x, 0.0) for x in (log_pi, log_mu, adv))
            if is_weights is not None:
                is_weights = torch.where(valid, is_weights, 0.0)
        log_ratio = (log_pi - log_mu).clamp_(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)  # [B, T]
        rho = torch.exp(log_ratio)  # [B, T]
        change = (rho - 1).mul_(adv)  # [B, T] A_t (rho_t - 1)
        toward_mu = torch.le(change, 0.0, out=change).bool()  # [B, T] (a float compare is faster on CPU)
        maskf = as_float(response_mask, dtype)  # [B, T]
        validf = maskf if all_finite else as_float(valid, dtype)  # [B, T]
        if topk_div is not None:  # Top-K divergences (issue 7), capped like binary_kl
            div = topk_div.to(dtype).nan_to_num(nan=0.0, posinf=KL_MAX).clamp_(0.0, KL_MAX).mul_(validf)  # [B, T]
        else:
            div = binary_divergence(cfg.divergence, log_pi, log_mu).mul_(validf)  # [B, T] finite, 0 off valid
        if shard is None:
            lengths = response_lengths(maskf)  # [B] H counts interior holes and dropped tokens
            positions = shuffled_positions(lengths, log_pi.shape[-1]) if cfg.shuffle_positions else None
            gate = cppo_mask(div, valid, toward_mu, cfg, lengths=lengths, positions=positions, validf=validf)
        else:  # shard-local tokens: global positions, lengths, prefix sums and quantiles (verl_cppo.sharding)
            gate = shard.cppo_mask(div, valid, toward_mu, cfg, response_mask)
        coef = rho.clamp(max=cfg.ratio_cap).mul_(adv).mul_(gate.weight).neg_()  # [B, T] -w_t sg(min(rho, cap)) A_t

    # the graph: d pg / d log pi = coef (* IS weight); a dropped non-finite log pi is routed through where()
    pg_losses = (log_prob if all_finite else torch.where(valid, log_prob, 0.0)) * coef  # [B, T]
    if is_weights is not None:
        pg_losses = pg_losses * is_weights
    return CPPOTerms(pg_losses, gate, div, rho, log_ratio, valid, nonfinite)


@register_policy_loss("cppo")
def compute_policy_loss_cppo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
    shard: ShardContext | None = None,
    **unused: Any,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CPPO policy loss (arXiv 2606.10968) with verl's registered signature.

    Args:
        old_log_prob: [B, T] log mu(y_t) of the rollout policy (bypass mode: the rollout log-probs).
        log_prob: [B, T] log pi(y_t) of the trained policy, with grad.
        advantages: [B, T].
        response_mask: [B, T] bool, response tokens that count (interior holes allowed).
        loss_agg_mode: verl's aggregation mode, passed to ``agg_loss``.
        config: the worker's actor config (``config.policy_loss.cppo``, ``config.global_batch_info``).
        rollout_is_weights: [B, T] or None, multiplied into the per-token loss as verl's losses do.
        shard: None for gathered rows (every verl engine in 0.9.1). A ``verl_cppo.shard_loss.ShardContext``
            when the tensors are this rank's shard-local tokens: the returned loss then has the gathered
            loss's value and, w.r.t. this rank's log-probs, its gradient; metrics are the gathered ones.
        **unused: ``topk_divergence`` [B, T], D of ``divergence=topk_*`` (else taken from the engine hook's
            channel, ``verl_cppo.topk_loss``); other keywords are ignored.

    Returns:
        (loss: 0-dim float tensor, metrics: dict with the keys of METRIC_KEYS on every call)
    """
    cfg = cppo_config_of(config)
    topk_div = unused.get("topk_divergence")  # Top-K divergences (issue 7): [B, T], see verl_cppo.topk_loss
    response_mask = response_mask.bool()
    fusable = shard is None and cfg.divergence not in TOPK_DIVERGENCES  # the kernel computes binary D itself
    if fusable and use_triton(cfg.kernel, log_prob):  # the fused kernel: same losses, per-row sums
        from verl_cppo.kernels.fused_loss import fused_cppo_token_losses

        pg_losses, stats = fused_cppo_token_losses(
            old_log_prob, log_prob, advantages, response_mask, cfg, rollout_is_weights
        )
    else:
        terms = cppo_token_losses(
            old_log_prob, log_prob, advantages, response_mask, cfg, rollout_is_weights, shard, topk_divergence=topk_div
        )
        pg_losses, stats = terms.pg_losses, torch_stats(terms, response_mask, cfg.ratio_cap, shard)
    if shard is not None:  # shard-local tokens: this rank's share of the gathered loss (verl_cppo.shard_loss)
        local = shard.agg_loss(pg_losses, response_mask, loss_agg_mode, getattr(config, "global_batch_info", {}))
        metrics = _metrics(local, stats, shard)
        return shard.whole_loss(local), metrics
    info = getattr(config, "global_batch_info", None) or {}
    batch_info = _finite_batch_info(info, response_mask, loss_agg_mode)
    pg_loss = agg_loss(loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **batch_info)
    return pg_loss, _metrics(pg_loss, stats)


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


@torch.no_grad()
def torch_stats(terms: CPPOTerms, response_mask: torch.Tensor, ratio_cap: float, shard=None) -> torch.Tensor:
    """The STAT_NAMES sums of the torch path as one [len(STAT_NAMES)] tensor (no host sync).

    With ``shard`` (shard-local tokens) the token sums are this rank's and the per-response ones (delta_b,
    non-empty responses) the group's: ``_metrics`` reduces the former over the group."""
    gate, div, rho, log_ratio, valid = terms[1:6]
    dtype = rho.dtype
    validf = as_float(valid, dtype)  # [B, T]
    rho_v = rho * validf  # [B, T] 0 off valid
    flags = torch.stack([response_mask, valid, gate.masked, gate.masked_by_budget])  # [4, B, T] bool
    per_row = flags.view(torch.uint8).sum(dim=-1, dtype=torch.int32).to(dtype)  # [4, B] counts per row
    if shard is None:
        nonempty = per_row[1].clamp(max=1.0)  # [B] 1 for a response with a valid token
    else:  # rows of shard-local tokens are not responses: the group's per-response flags
        nonempty = as_float(shard.nonempty, dtype)  # [B]
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


_RHO_MAX = STAT_NAMES.index("rho_max")
_PER_RESPONSE = STAT_NAMES.index("delta_b_sum")  # this and later entries are per-response sums


def _metrics(pg_loss: torch.Tensor, stats: torch.Tensor, shard=None) -> dict:
    """All metrics from the STAT_NAMES sums in one device-to-host copy; raises if the loss is not finite.

    With ``shard`` the token sums and this rank's loss share are reduced over the group first (one message),
    so that every rank reports the gathered values and the gathered loss."""
    stats = stats.to(torch.float64)
    loss = pg_loss.detach().reshape(1).to(torch.float64)
    if shard is not None:
        token = torch.cat([stats[:_RHO_MAX], stats[_RHO_MAX + 1 : _PER_RESPONSE], loss])
        total, rho_max = shard.reduce_metric_sums(token, stats[_RHO_MAX])
        stats = torch.cat([total[:_RHO_MAX], rho_max.reshape(1), total[_RHO_MAX:-1], stats[_PER_RESPONSE:]])
        loss = total[-1:]
    *sums, loss_value = torch.cat([stats, loss]).tolist()
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
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"cppo loss is {loss_value}; metrics of this micro-batch: {metrics}")
    if metrics["actor/cppo_nonfinite_frac"] > 0:
        _warn_nonfinite(metrics["actor/cppo_nonfinite_frac"])
    return metrics


_warned_nonfinite = False


def _warn_nonfinite(frac: float) -> None:
    global _warned_nonfinite
    if not _warned_nonfinite:
        _warned_nonfinite = True
        logger.warning(
            "cppo: %.4g of the response tokens had non-finite log-probs, advantages or IS weights and were masked; "
            "later occurrences are only reported in actor/cppo_nonfinite_frac",
            frac,
        )
