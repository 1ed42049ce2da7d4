"""The verl adapter: the registered policy loss ``cppo``.

verl's ``ppo_loss`` (verl/workers/utils/losses.py) calls it for every engine with gathered, right-padded
[B, T] rows. It does four things and nothing else:

    config      ``config.policy_loss.cppo`` (the defaults for verl's plain PolicyLossConfig)
    dispatch    the torch path (``verl_cppo.core.token_loss``) or the fused Triton kernel (``verl_cppo.kernels``);
                the rows are whole responses (``GatheredRows``) or a rank's shard-local tokens
                (``verl_cppo.sharding.context.ShardContext``), both behind one small interface
    aggregate   verl's ``agg_loss`` with the configured ``loss_agg_mode`` and global batch counts
    metrics     the METRIC_KEYS of ``verl_cppo.core.token_loss`` in one device-to-host copy

    L = - sum_t M_t * sg(min(rho_t, ratio_cap)) * A_t * log pi_t      aggregated by verl's agg_loss
"""

from __future__ import annotations

import logging
import math
from typing import Any, Protocol

import torch
from verl.trainer.ppo.core_algos import agg_loss, register_policy_loss

from verl_cppo.config import cppo_config_of
from verl_cppo.core.divergence import BINARY_DIVERGENCES, TOPK_DIVERGENCES
from verl_cppo.core.token_loss import (
    METRIC_KEYS,
    STAT_NAMES,
    Rows,
    WholeRows,
    cppo_token_losses,
    metrics_from_sums,
    torch_stats,
)
from verl_cppo.kernels import use_triton
from verl_cppo.topk.channel import topk_divergence_input

__all__ = ["GATHERED_ROWS", "METRIC_KEYS", "STAT_NAMES", "GatheredRows", "LossRows", "compute_policy_loss_cppo"]

logger = logging.getLogger(__name__)


class LossRows(Rows, Protocol):
    """``Rows`` plus what the adapter needs: verl's aggregation and the metric sums over those rows."""

    fusable: bool
    """Whether the fused kernel (which assumes whole rows) may serve these rows."""

    def aggregate(self, pg_losses: torch.Tensor, response_mask: torch.Tensor, loss_agg_mode: str, batch_info: dict):
        """verl's agg_loss of these rows' per-token losses (for shard-local rows: this rank's share)."""
        ...

    def reduce_sums(self, stats: torch.Tensor, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The STAT_NAMES sums [K] and the loss [1] (float64) of all the rows (for shards: of the group)."""
        ...

    def whole_loss(self, local: torch.Tensor) -> torch.Tensor:
        """The loss to return, from ``aggregate``'s value."""
        ...


class GatheredRows(WholeRows):
    """Whole right-padded responses, as every verl 0.9.1 engine hands them to the loss."""

    fusable = True

    def aggregate(self, pg_losses, response_mask, loss_agg_mode, batch_info):
        info = dict(batch_info)  # verl's agg_loss divides by local counts when no global count is given
        if loss_agg_mode == "token-mean" and info.get("batch_num_tokens") is None:
            info["batch_num_tokens"] = response_mask.sum().clamp(min=1)  # 0/0 would be NaN
        if loss_agg_mode.startswith("seq-mean") and info.get("global_batch_size") is None:
            info["global_batch_size"] = response_mask.any(dim=-1).sum().clamp(min=1)
        return agg_loss(loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **info)

    def reduce_sums(self, stats, loss):
        return stats, loss

    def whole_loss(self, local):
        return local


GATHERED_ROWS = GatheredRows()


@register_policy_loss("cppo")
def compute_policy_loss_cppo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
    shard: LossRows | None = None,
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
        shard: None for gathered rows (every verl engine in 0.9.1). A ``verl_cppo.sharding.context.ShardContext``
            when the tensors are this rank's shard-local tokens: the returned loss then has the gathered
            loss's value and, w.r.t. this rank's log-probs, its gradient; metrics are the gathered ones.
        **unused: ``topk_divergence`` [B, T], D of ``divergence=topk_*`` (else taken from the engine hook's
            channel, ``verl_cppo.topk.channel``); other keywords are ignored.

    Returns:
        (loss: 0-dim float tensor, metrics: dict with the keys of METRIC_KEYS on every call)
    """
    cfg = cppo_config_of(config)
    rows = GATHERED_ROWS if shard is None else shard
    response_mask = response_mask.bool()
    topk_div = None
    if cfg.divergence in TOPK_DIVERGENCES:  # D comes from the engine, not from the sampled token's log-probs
        topk_div = topk_divergence_input(unused.get("topk_divergence"), log_prob, cfg.divergence)
    if rows.fusable and cfg.divergence in BINARY_DIVERGENCES and use_triton(cfg.kernel, log_prob):
        from verl_cppo.kernels.fused_loss import fused_cppo_token_losses

        pg_losses, stats = fused_cppo_token_losses(
            old_log_prob, log_prob, advantages, response_mask, cfg, rollout_is_weights
        )
    else:
        terms = cppo_token_losses(
            old_log_prob, log_prob, advantages, response_mask, cfg, rollout_is_weights, rows, topk_div
        )
        pg_losses, stats = terms.pg_losses, torch_stats(terms, response_mask, cfg.ratio_cap, rows)
    batch_info = getattr(config, "global_batch_info", None) or {}
    local = rows.aggregate(pg_losses, response_mask, loss_agg_mode, batch_info)
    stats, loss = rows.reduce_sums(stats.to(torch.float64), local.detach().reshape(1).to(torch.float64))
    *sums, loss_value = torch.cat([stats, loss]).tolist()  # the one device-to-host copy
    metrics = metrics_from_sums(sums)
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"cppo loss is {loss_value}; metrics of this micro-batch: {metrics}")
    if metrics["actor/cppo_nonfinite_frac"] > 0:
        _warn_nonfinite(metrics["actor/cppo_nonfinite_frac"])
    return rows.whole_loss(local), metrics


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
