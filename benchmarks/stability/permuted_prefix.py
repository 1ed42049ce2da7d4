"""The stability study's ``cppo_permuted_prefix`` loss: CPPO with the prefix budget's causal order removed.

CPPO's budget (``verl_cppo.core.mask``) lets token t through when Z_t = w_t D_t stays under

    c_t = min(delta, delta + delta_b W_{t-1} - S_{t-1}),   S_{t-1} = sum_{j<t} Z_j,   W_{t-1} = sum_{j<t} w_j,

so what a token may do depends on the divergence of the tokens BEFORE it. This arm asks whether that order
matters, or only the amount of budget: each response's positions 1..H are visited in a random order pi, and
the running sums are taken along it,

    c_{pi(i)} = min(delta, delta + delta_b sum_{j<i} w_{pi(j)} - sum_{j<i} Z_{pi(j)}),

with everything else CPPO's: the same D, the same position weight w_t of each token's TRUE position (the
per-token threshold delta / w_t and the weight inside Z are not permuted), the same delta_b (a quantile of the
response's D: order-free), the same toward-mu exemption and ratio cap. The budget's amount is kept: the final
sums S_H and W_H are the same sums in another order, and a token's threshold is drawn from the same set of
partial sums; only which tokens form a token's "prefix" changes (a random subset instead of the earlier ones).
The identity permutation gives CPPO exactly.

The permutation is drawn per response, from the response itself: a generator seeded by a hash of the
response's rollout log-probs (``old_log_prob`` under bypass mode, which is mu and does not change while the
actor trains on the rollout batch). So a response keeps ONE permutation for every mini-batch and epoch of its
rollout batch, whatever micro-batch it lands in and however wide that is padded, as its causal order is fixed
under CPPO: each token keeps a fixed pseudo-prefix across the updates, and the arm differs from CPPO in the
order alone, not also in a mask re-randomised at every update (which would average the gate over
permutations, a smoother and different regulator). A new rollout gives new log-probs, so a new permutation
per response and step; the run's seed fixes the rollouts and so the permutations.

Study code, kept out of the package: it registers the loss mode through verl's policy-loss registry and
reuses the package's ``compute_policy_loss_cppo`` unchanged, handing it a ``Rows`` (the package's interface for
"where the tokens sit") whose gate gathers the tensors into the permuted order, runs ``cppo_mask`` there with
each token's true position, and scatters the mask back. Load it in every process by adding this module to
``VERL_USE_EXTERNAL_MODULES`` (``run_study.py`` does), which ``import verl`` imports.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from verl.trainer.ppo.core_algos import register_policy_loss

from verl_cppo.core.mask import CPPOMask, cppo_mask, response_lengths
from verl_cppo.loss import GatheredRows, compute_policy_loss_cppo

__all__ = ["LOSS_MODE", "PermutedRows", "budget_orders", "compute_policy_loss_cppo_permuted_prefix"]

LOSS_MODE = "cppo_permuted_prefix"
_SALT = b"cppo_permuted_prefix/v1"
"""Mixed into each response's hash, so that its permutation is this arm's own draw."""


def _response_seed(row_log_mu: torch.Tensor) -> int:
    """A 63-bit generator seed from one response's rollout log-probs (its first H entries, float32 bytes)."""
    digest = hashlib.blake2b(row_log_mu.detach().to("cpu", torch.float32).contiguous().numpy().tobytes(), key=_SALT)
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def budget_orders(old_log_prob: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """The order in which each response's budget visits its columns.

    old_log_prob [B, T] (mu's log-probs), response_mask [B, T] -> orders [B, T] int64 on the mask's device:
    orders[b, i] = the column visited i-th. Columns 0..H_b-1 (H_b = position of the last response token) are
    a random permutation seeded by ``_response_seed`` of old_log_prob[b, :H_b]; columns from H_b on stay in
    place. The same response gives the same order at any padded width T >= H_b.
    """
    batch, width = response_mask.shape
    lengths = response_lengths(response_mask.bool()).tolist()  # [B]
    orders = torch.arange(width, dtype=torch.int64).repeat(batch, 1)  # [B, T]
    for b, n in enumerate(lengths):
        if n > 1:
            generator = torch.Generator().manual_seed(_response_seed(old_log_prob[b, :n]))
            orders[b, :n] = torch.randperm(n, generator=generator)  # [n]
    return orders.to(response_mask.device)


class PermutedRows(GatheredRows):
    """Whole right-padded responses whose prefix budget runs along ``orders`` ([B, T], ``budget_orders``)."""

    fusable = False  # the fused kernel scans in column order

    def __init__(self, orders: torch.Tensor):
        self.orders = orders

    def mask(self, div, valid, toward_mu, params, response_mask, validf, maskf) -> CPPOMask:
        if params.shuffle_positions:
            raise ValueError(f"{LOSS_MODE} keeps each token's true position weight: set cppo.shuffle_positions=false")
        if self.orders.shape != div.shape:
            raise ValueError(f"{LOSS_MODE}: orders have shape {tuple(self.orders.shape)}, D has {tuple(div.shape)}")
        order = self.orders  # [B, T]
        lengths = response_lengths(maskf)  # [B] H from the true layout (holes and dropped tokens counted)
        true_positions = (order + 1).to(div.dtype)  # [B, T] the 1-based position of the token visited i-th
        gate = cppo_mask(
            div.gather(-1, order),  # [B, T] D in visiting order (0 off valid, as the caller made it)
            valid.gather(-1, order),
            toward_mu.gather(-1, order),
            params,
            lengths=lengths,
            positions=true_positions,
            validf=validf.gather(-1, order),
        )
        unpermute = torch.empty_like(order).scatter_(
            -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
        )
        weight, masked, by_budget = (x.gather(-1, unpermute) for x in gate[:3])  # [B, T] each, column order
        return CPPOMask(weight, masked, by_budget, gate.delta_b)


def _checked_anchor(old_log_prob: torch.Tensor, response_mask: torch.Tensor) -> None:
    if old_log_prob.shape != response_mask.shape:
        raise ValueError(
            f"{LOSS_MODE}: old_log_prob has shape {tuple(old_log_prob.shape)}, "
            f"response_mask {tuple(response_mask.shape)}"
        )


@register_policy_loss(LOSS_MODE)
def compute_policy_loss_cppo_permuted_prefix(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
    **verl_extras: Any,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``compute_policy_loss_cppo`` (same arguments, same returns, same metrics) with the prefix budget taken
    along ``budget_orders``. [B, T] tensors; old_log_prob must be mu (bypass mode), as for cppo."""
    _checked_anchor(old_log_prob, response_mask)
    rows = PermutedRows(budget_orders(old_log_prob, response_mask))
    return compute_policy_loss_cppo(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
        shard=rows,
        **verl_extras,
    )
