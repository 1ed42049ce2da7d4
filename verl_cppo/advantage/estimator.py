"""The registered advantage estimator ``cppo_grpo``: the paper's GRPO-style outcome advantage.

The paper (arXiv 2606.10968, App. D) trains with group-relative outcome advantages, mean-centred without
dividing by the standard deviation in the authors' configs, and skips every prompt whose group of responses
has zero reward variance ("mask_std_0"). For a group g (the rows sharing verl's ``uid``) with outcome scores
s_i = sum_t r_{i,t}:

    A_i = s_i - mean_g(s)                               default (Dr. GRPO, the authors' configs)
    A_i = (s_i - mean_g(s)) / (std_g(s) + std_epsilon)  cppo_grpo.norm_adv_by_std=True (unbiased std, as grpo)
    A_i = 0                                             if max_g(s) - min_g(s) <= zero_variance_atol

A zero-variance group (every single-response group is one) carries no learning signal. verl's ``grpo`` gives
it advantage 0 but keeps its tokens in the loss normalisers, which dilutes every other group's gradient as
training saturates. With ``exclude_zero_variance`` (default) its responses also leave the token and
sequence counts of ``agg_loss``: the estimator returns only (advantages, returns), so it publishes which
responses it excluded and ``verl_cppo.advantage.exclusion`` carries that to the actor (see there for why and how).

The group arithmetic (``outcome_advantage``) is pure torch, in float64; the verl adapter is the registered
function at the bottom.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from verl_cppo.advantage.exclusion import GroupExclusion, publish_exclusion
from verl_cppo.config import CPPOGRPOConfig, cppo_grpo_config_of

__all__ = ["compute_cppo_grpo_advantage", "group_ids", "outcome_advantage"]


def group_ids(index: Sequence[Any]) -> torch.Tensor:
    """[B] int64 ids 0..G-1 of the groups of ``index`` (verl's ``uid`` array), numbered by first appearance."""
    ids: dict[Any, int] = {}
    return torch.tensor([ids.setdefault(uid, len(ids)) for uid in index], dtype=torch.int64)


def outcome_advantage(
    scores: torch.Tensor,
    group: torch.Tensor,
    *,
    norm_adv_by_std: bool = False,
    std_epsilon: float = 1e-6,
    zero_variance_atol: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative outcome advantage of each response.

    Args:
        scores: [B] outcome score of each response (any float dtype; computed in float64).
        group: [B] int64 group id of each response, every id in 0..G-1 used.
        norm_adv_by_std, std_epsilon, zero_variance_atol: see CPPOGRPOConfig.

    Returns:
        (advantages [B] float64, exactly 0 in zero-variance groups; zero_variance [G] bool per group)
    """
    s = scores.to(torch.float64)  # [B]
    num_groups = int(group.max()) + 1 if group.numel() else 0
    count = torch.bincount(group, minlength=num_groups).to(torch.float64)  # [G]
    mean = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group, s) / count  # [G]
    high = torch.full((num_groups,), -torch.inf, dtype=torch.float64).scatter_reduce_(0, group, s, "amax")  # [G]
    low = torch.full((num_groups,), torch.inf, dtype=torch.float64).scatter_reduce_(0, group, s, "amin")  # [G]
    zero_variance = (high - low) <= zero_variance_atol  # [G] True for every single-response group
    centred = s - mean[group]  # [B]
    if norm_adv_by_std:
        sq = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group, centred.square())  # [G]
        std = (sq / (count - 1).clamp(min=1)).sqrt()  # [G] unbiased; 0 for one response (zero variance anyway)
        centred = centred / (std[group] + std_epsilon)  # [B]
    advantages = torch.where(zero_variance[group], 0.0, centred)  # [B]
    return advantages, zero_variance


def _check_inputs(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Any) -> None:
    if token_level_rewards.dim() != 2 or response_mask.shape != token_level_rewards.shape:
        raise ValueError(
            f"cppo_grpo: token_level_rewards {tuple(token_level_rewards.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must both be [batch, response_len]"
        )
    if index is None:
        raise ValueError("cppo_grpo needs the group index (verl's non_tensor_batch['uid']), got None")
    if len(index) != token_level_rewards.shape[0]:
        raise ValueError(f"cppo_grpo: index has {len(index)} entries for {token_level_rewards.shape[0]} responses")


def _check_scores(scores: torch.Tensor) -> None:
    bad = ~torch.isfinite(scores)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"cppo_grpo: token_level_rewards sum to a non-finite score in rows {rows[:8]}"
            f"{' ...' if len(rows) > 8 else ''}: {scores[bad][:8].tolist()}"
        )


def compute_cppo_grpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any = None,
    config: Any = None,
    **verl_extras: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cppo_grpo`` with verl's estimator signature (registered below; select ``algorithm.adv_estimator``).

    Args:
        token_level_rewards: [B, T] rewards; a response's outcome score is the sum of its row.
        response_mask: [B, T] response tokens.
        index: [B] group of each response (verl passes ``non_tensor_batch["uid"]``).
        config: the ``algorithm`` section (DictConfig or AlgoConfig); its ``cppo_grpo`` node, if any.

    Returns:
        (advantages, returns): both the same [B, T] tensor, the response's advantage on its response tokens
        and 0 elsewhere, in the dtype of token_level_rewards (verl's ``grpo`` convention).
    """
    cfg: CPPOGRPOConfig = cppo_grpo_config_of(config)
    _check_inputs(token_level_rewards, response_mask, index)
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)  # [B]
        _check_scores(scores)
        group = group_ids(index)  # [B]
        adv, zero_variance = outcome_advantage(
            scores,
            group,
            norm_adv_by_std=cfg.norm_adv_by_std,
            std_epsilon=cfg.std_epsilon,
            zero_variance_atol=cfg.zero_variance_atol,
        )
        advantages = adv.to(token_level_rewards.dtype).unsqueeze(-1) * response_mask  # [B, T]
    if cfg.exclude_zero_variance:
        publish_exclusion(
            GroupExclusion(
                keep=~zero_variance[group],  # [B]
                num_groups=int(zero_variance.numel()),
                num_excluded_groups=int(zero_variance.sum()),
            )
        )
    return advantages, advantages


def register() -> None:
    """Register ``cppo_grpo`` with verl's advantage-estimator registry (idempotent)."""
    from verl.trainer.ppo.core_algos import register_adv_est

    register_adv_est("cppo_grpo")(compute_cppo_grpo_advantage)


register()
