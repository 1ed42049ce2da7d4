"""The verl adapter: the registered policy loss ``cppo``.

verl's ``ppo_loss`` (verl/workers/utils/losses.py) calls it for every engine with gathered, right-padded
[B, T] rows. It does four things and nothing else:

    config      ``config.policy_loss.cppo`` (the defaults for verl's plain PolicyLossConfig)
    dispatch    the torch path (``verl_cppo.core.token_loss``) or the fused Triton kernel (``verl_cppo.kernels``);
                the rows are whole responses (``GatheredRows``) or a rank's shard-local tokens
                (``verl_cppo.sharding.context.ShardContext``), both behind one small interface
    aggregate   verl's ``agg_loss`` with the configured ``loss_agg_mode`` and global batch counts
                (``agg_loss_keywords``: verl's rule for missing counts, and empty mini-batches made exact)
    metrics     the METRIC_KEYS of ``verl_cppo.core.token_loss`` in one device-to-host copy

    L = - sum_t M_t * sg(min(rho_t, ratio_cap)) * A_t * log pi_t      aggregated by verl's agg_loss
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Mapping
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

__all__ = [
    "GATHERED_ROWS",
    "METRIC_KEYS",
    "STAT_NAMES",
    "GatheredRows",
    "LossRows",
    "agg_loss_keywords",
    "compute_policy_loss_cppo",
]

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


_COUNT_OF_MODE = {
    "token-mean": "batch_num_tokens",
    "seq-mean-token-sum": "global_batch_size",
    "seq-mean-token-sum-norm": "global_batch_size",
    "seq-mean-token-mean": "global_batch_size",
}
"""The global count each loss_agg_mode divides by (token-sum divides by none)."""


def _scalar(value: Any) -> Any:
    """A one-element tensor as its Python number; anything else unchanged."""
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def _whole(x: Any) -> bool:
    """A finite real number with no fractional part (a bool is not one)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and x == int(x)


def _refuse(key: str, value: Any, allowed: str) -> None:
    raise ValueError(f"cppo loss: global_batch_info {key} must be {allowed}, got {value!r}")


def checked_batch_info(batch_info: Any) -> dict:
    """verl's ``config.global_batch_info`` with every count and scalar that enters the loss checked.

    ``dp_size`` must be an int >= 1 (absent: 1, verl's default), ``batch_num_tokens`` and
    ``global_batch_size`` whole counts >= 0 or None (missing), ``loss_scale_factor`` a finite number > 0 or
    None. A ``ValueError`` names the key and the value otherwise: ``dp_size = -1`` would flip the loss's sign,
    0 would silently zero it, NaN would end as a NaN loss naming nothing."""
    if not isinstance(batch_info, Mapping):
        raise ValueError(f"cppo loss: config.global_batch_info must be a mapping, got {batch_info!r}")
    info = dict(batch_info)
    for key, value in info.items():
        x = _scalar(value)
        if key == "dp_size":
            if x is None:
                info[key] = 1
                continue
            if not _whole(x) or x < 1:
                _refuse(key, value, "an int >= 1")
            info[key] = int(x)
        elif key in ("batch_num_tokens", "global_batch_size") and x is not None:
            if not _whole(x) or x < 0:
                _refuse(key, value, "a whole count >= 0 (or None)")
        elif key == "loss_scale_factor" and x is not None:
            if isinstance(x, bool) or not isinstance(x, numbers.Real) or not 0 < x < math.inf:
                _refuse(key, value, "a finite number > 0 (or None)")
    return info


def agg_loss_keywords(
    batch_info: dict,
    loss_agg_mode: str,
    *,
    num_tokens: Callable[[], torch.Tensor],
    num_seqs: Callable[[], torch.Tensor],
    width: int,
) -> dict:
    """The keywords for verl's ``agg_loss`` from ``config.global_batch_info``, for every kind of rows.

    ``num_tokens`` / ``num_seqs``: the rows' own response-token / non-empty-response counts (gathered rows:
    the micro-batch's; shard-local rows: the gathered responses'), as 0-dim tensors; ``width``: the padded
    response length, verl's default ``loss_scale_factor``.

    * A missing count follows verl's rule: with ``dp_size > 1`` it stays missing and ``agg_loss`` raises
      (a local count would silently weight ranks unequally); with ``dp_size`` 1 it is the rows' own count.
    * A count of 0 (explicit or the rows' own: a mini-batch without response tokens) makes every loss term
      an empty sum: the loss is 0 with zero gradient, not verl's 0/0 = NaN. An explicit global count of 0
      while these rows hold response tokens is a contradiction and raises, naming the key.
    * ``seq-mean-token-sum-norm`` with T = 0 and no ``loss_scale_factor`` divides by 1, not 0 (no tokens,
      loss 0).
    * Every count and scalar is checked first (``checked_batch_info``).
    """
    info = checked_batch_info(batch_info)
    dp_size = info.get("dp_size", 1)
    key = _COUNT_OF_MODE.get(loss_agg_mode)
    if key is not None:
        local = num_tokens if key == "batch_num_tokens" else num_seqs
        if info.get(key) is None:
            if dp_size <= 1:
                info[key] = local().clamp(min=1)  # 0 tokens: the sum is empty, so 0 / 1 = 0
        elif _scalar(info[key]) == 0:
            held = int(local())
            if held:
                raise ValueError(
                    f"cppo loss: global_batch_info {key}=0 (the global count), but this micro-batch has {held} "
                    f"{'response tokens' if key == 'batch_num_tokens' else 'non-empty responses'}"
                )
            info[key] = 1  # every term is 0: loss 0 and zero gradient instead of 0/0
    if loss_agg_mode == "seq-mean-token-sum-norm" and info.get("loss_scale_factor") is None:
        info["loss_scale_factor"] = max(width, 1)
    return info


class GatheredRows(WholeRows):
    """Whole right-padded responses, as every verl 0.9.1 engine hands them to the loss."""

    fusable = True

    def aggregate(self, pg_losses, response_mask, loss_agg_mode, batch_info):
        info = agg_loss_keywords(
            batch_info,
            loss_agg_mode,
            num_tokens=lambda: response_mask.sum(),
            num_seqs=lambda: response_mask.any(dim=-1).sum(),
            width=response_mask.shape[-1],
        )
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
    topk_divergence: torch.Tensor | None = None,
    **verl_extras: Any,
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
        topk_divergence: [B, T] or None, D of ``divergence=topk_*`` when the caller has it (else taken from the
            engine hook's channel, ``verl_cppo.topk.channel``); ignored for the binary divergences.
        **verl_extras: keywords verl passes to every registered loss that CPPO does not read; ignored.

    Returns:
        (loss: 0-dim float tensor, metrics: dict with the keys of METRIC_KEYS on every call)
    """
    cfg = cppo_config_of(config)
    rows = GATHERED_ROWS if shard is None else shard
    response_mask = response_mask.bool()
    topk_div = None
    if cfg.divergence in TOPK_DIVERGENCES:  # D comes from the engine, not from the sampled token's log-probs
        topk_div = topk_divergence_input(topk_divergence, log_prob, cfg.divergence)
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
        inputs = {"advantages": advantages, "rollout_is_weights": rollout_is_weights, "log_prob": log_prob}
        raise FloatingPointError(_nonfinite_loss_message(loss_value, pg_losses, response_mask, inputs, batch_info))
    if metrics["actor/cppo_nonfinite_frac"] > 0:
        _warn_nonfinite(metrics["actor/cppo_nonfinite_frac"])
    return rows.whole_loss(local), metrics


def _largest(name: str, tensor: torch.Tensor | None, mask: torch.Tensor) -> tuple[float, str] | None:
    """(|value|, 'name = value at [b, t]') of the finite response-token entry of largest magnitude."""
    if tensor is None or tensor.shape != mask.shape or tensor.numel() == 0:
        return None
    x = tensor.detach().double()
    size = torch.where(mask & torch.isfinite(x), x.abs(), torch.zeros_like(x))  # [B, T]
    flat = int(size.argmax())
    b, t = divmod(flat, x.shape[-1])
    return float(size.view(-1)[flat]), f"{name} = {float(x[b, t]):.6g} at [{b}, {t}]"


def _nonfinite_loss_message(loss_value, pg_losses, response_mask, inputs, batch_info) -> str:
    """Why the aggregated loss is not finite although every non-finite input was dropped: finite inputs whose
    product or quotient leaves the loss's dtype. Names the largest input on a response token and the counts."""
    dtype = pg_losses.dtype
    limit = torch.finfo(dtype).max
    found = [r for name, x in inputs.items() if (r := _largest(name, x, response_mask)) is not None]
    terms = torch.where(response_mask, pg_losses.detach().double(), torch.zeros((), dtype=torch.float64))
    bad = ~torch.isfinite(pg_losses.detach()) & response_mask
    if bad.any():
        b, t = (int(i) for i in bad.nonzero()[0])
        where = f"the per-token loss at [{b}, {t}] overflows {dtype}"
        shown = [
            f"{name} = {float(x[b, t]):.6g}" for name, x in inputs.items() if x is not None and x.shape == bad.shape
        ]
    else:
        total = terms.abs().sum().item()
        where = f"the per-token losses are finite but their aggregate (sum |L_t| = {total:.6g}) overflows {dtype}"
        shown = [text for _, text in sorted(found, reverse=True)[:1]]
    counts = ", ".join(f"{k}={_scalar(v)!r}" for k, v in batch_info.items()) or "none"
    return (
        f"cppo loss is {loss_value}: {where} (largest finite magnitude {limit:.4g}); inputs: {', '.join(shown)}; "
        f"global_batch_info: {counts}. Inputs this large (or counts this small) are not representable in the "
        "loss's dtype: check the advantages / IS weights and the counts verl passes"
    )


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
