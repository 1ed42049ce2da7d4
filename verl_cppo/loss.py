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
from verl_cppo.mask import CPPOMask, cppo_mask, response_lengths, shuffled_positions
from verl_cppo.topk_loss import topk_divergence_input

if TYPE_CHECKING:
    from verl_cppo.shard_loss import ShardContext

__all__ = ["METRIC_KEYS", "CPPOTerms", "compute_policy_loss_cppo", "cppo_token_losses"]

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


def _finite_batch_info(global_batch_info: dict, mask: torch.Tensor) -> dict:
    """verl's agg_loss divides by local counts when no global count is given; keep 0/0 from becoming NaN."""
    info = dict(global_batch_info)
    if info.get("batch_num_tokens") is None:
        info["batch_num_tokens"] = mask.sum().clamp(min=1)
    if info.get("global_batch_size") is None:
        info["global_batch_size"] = mask.any(dim=-1).sum().clamp(min=1)
    return info


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num / den.clamp(min=1)


class CPPOTerms(NamedTuple):
    pg_losses: torch.Tensor  # [B, T] per-token loss, exactly 0 (and zero gradient) off the kept tokens
    gate: CPPOMask  # the mask and its diagnostics
    div: torch.Tensor  # [B, T] D_t (0 off `valid`)
    rho: torch.Tensor  # [B, T] pi / mu from the clamped log-ratio
    log_ratio: torch.Tensor  # [B, T] clamp(log pi - log mu, +-20)
    valid: torch.Tensor  # [B, T] bool, response tokens with finite inputs
    nonfinite: torch.Tensor  # [B, T] bool, response tokens dropped for non-finite inputs


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
    """Per-token CPPO losses and mask for [B, T] rows; the registered loss aggregates them.

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
    finite = log_prob.isfinite() & old_log_prob.isfinite() & advantages.isfinite()  # [B, T]
    if rollout_is_weights is not None:
        finite &= rollout_is_weights.isfinite()
    # --- Top-K divergences (issue 7): D comes from the engine, not from the sampled token's log-probs -------
    if cfg.divergence in TOPK_DIVERGENCES:
        topk_divergence = topk_divergence_input(topk_divergence, log_prob, cfg.divergence)
        finite &= ~topk_divergence.isnan()  # +inf (KL) is a huge divergence, capped below, not missing data
    # --- end Top-K divergences ---------------------------------------------------------------------------------
    valid = response_mask & finite  # [B, T]

    # Sanitise before anything enters the graph: where() routes exactly zero gradient to dropped entries.
    log_pi = torch.where(valid, log_prob.to(dtype), 0.0)  # [B, T] with grad
    log_mu = torch.where(valid, old_log_prob.to(dtype), 0.0)  # [B, T]
    adv = torch.where(valid, advantages.to(dtype), 0.0)  # [B, T]

    with torch.no_grad():
        log_ratio = (log_pi.detach() - log_mu).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)  # [B, T]
        rho = torch.exp(log_ratio)  # [B, T]
        toward_mu = adv * (rho - 1) <= 0  # [B, T]
        if cfg.divergence in TOPK_DIVERGENCES:  # Top-K divergences (issue 7), capped like binary_kl
            div = torch.where(valid, topk_divergence.to(dtype).nan_to_num(posinf=KL_MAX).clamp(0.0, KL_MAX), 0.0)
        else:
            div = torch.where(valid, binary_divergence(cfg.divergence, log_pi.detach(), log_mu), 0.0)  # [B, T]
        if shard is None:
            lengths = response_lengths(response_mask)  # [B] H counts interior holes and dropped tokens
            positions = shuffled_positions(lengths, log_pi.shape[-1]) if cfg.shuffle_positions else None
            gate = cppo_mask(div, valid, toward_mu, cfg, lengths=lengths, positions=positions)
        else:  # shard-local tokens: global positions, lengths, prefix sums and quantiles (verl_cppo.sharding)
            gate = shard.cppo_mask(div, valid, toward_mu, cfg, response_mask)
        coef = -adv * rho.clamp(max=cfg.ratio_cap)  # [B, T] -A_t sg(min(rho_t, cap))

    pg_losses = torch.where(gate.weight > 0, coef * log_pi * gate.weight, 0.0)  # [B, T]
    if rollout_is_weights is not None:
        pg_losses = pg_losses * torch.where(valid, rollout_is_weights.to(dtype), 0.0)
    return CPPOTerms(pg_losses, gate, div, rho, log_ratio, valid, response_mask & ~finite)


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
    terms = cppo_token_losses(
        old_log_prob, log_prob, advantages, response_mask, cfg, rollout_is_weights, shard, topk_divergence=topk_div
    )
    response_mask = response_mask.bool()
    if shard is not None:  # shard-local tokens: this rank's share of the gathered loss (verl_cppo.shard_loss)
        local = shard.agg_loss(terms.pg_losses, response_mask, loss_agg_mode, getattr(config, "global_batch_info", {}))
        metrics = _metrics(local, terms, response_mask, cfg.ratio_cap, shard)
        return shard.whole_loss(local), metrics
    batch_info = _finite_batch_info(getattr(config, "global_batch_info", None) or {}, response_mask)
    pg_loss = agg_loss(loss_mat=terms.pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **batch_info)
    return pg_loss, _metrics(pg_loss, terms, response_mask, cfg.ratio_cap)


def _masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, 0.0).sum()  # no boolean indexing: it would sync the device


@torch.no_grad()
def _metrics(
    pg_loss: torch.Tensor, terms: CPPOTerms, response_mask: torch.Tensor, ratio_cap: float, shard=None
) -> dict:
    """All metrics in one device-to-host copy; raises if the loss is not finite.

    Every metric is a ratio of sums over tokens (or responses); with ``shard`` the token sums are reduced
    over the group before the ratios are formed, so each rank reports the gathered values."""
    gate, div, rho, log_ratio, valid, nonfinite = terms[1:]
    token_sums = torch.stack(
        [
            x.to(torch.float64)
            for x in (
                response_mask.sum(),
                valid.sum(),
                gate.masked.sum(),
                gate.masked_by_budget.sum(),
                _masked_sum(div, valid),
                _masked_sum(rho, valid),
                (valid & (rho > ratio_cap)).sum(),
                nonfinite.sum(),
                gate.weight.sum(),
                _masked_sum(-log_ratio, valid),
                pg_loss.detach(),
            )
        ]
    )
    rho_max = torch.where(valid, rho, 0.0).amax() if rho.numel() else rho.new_zeros(())
    nonempty = valid.any(dim=-1)  # [B]
    if shard is not None:  # sum over the group; per-response values are already global ([B] on every rank)
        token_sums, rho_max = shard.reduce_metric_sums(token_sums, rho_max)
        nonempty = shard.nonempty
    n_resp, n_valid, n_masked, n_by_budget, div_sum, rho_sum, n_truncated, n_nonfinite, gate_sum, kl_sum, loss = (
        token_sums.unbind()
    )
    masked_frac = _ratio(n_masked, n_resp)
    stats = {
        "actor/cppo_masked_frac": masked_frac,
        "actor/cppo_masked_by_budget_share": _ratio(n_by_budget, n_masked),
        "actor/cppo_masked_by_token_share": _ratio(n_masked - n_by_budget, n_masked),
        "actor/cppo_delta_b_mean": _ratio(_masked_sum(gate.delta_b, nonempty), nonempty.sum()),
        "actor/cppo_div_mean": _ratio(div_sum, n_valid),
        "actor/cppo_rho_mean": _ratio(rho_sum, n_valid),
        "actor/cppo_rho_max": rho_max,
        "actor/cppo_ratio_truncated_frac": _ratio(n_truncated, n_valid),
        "actor/cppo_nonfinite_frac": _ratio(n_nonfinite, n_resp),
        "actor/cppo_gate_weight_mean": _ratio(gate_sum, n_valid),
        "actor/pg_clipfrac": masked_frac,
        "actor/ppo_kl": _ratio(kl_sum, n_valid),
    }
    assert tuple(stats) == METRIC_KEYS
    values = torch.stack([v.to(torch.float64) for v in stats.values()] + [loss.to(torch.float64)])
    *metric_values, loss_value = values.tolist()
    metrics = dict(zip(METRIC_KEYS, metric_values, strict=True))
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
