"""One way to call a registered verl policy loss in a test: a fresh leaf for pi's log-probs, verl's keyword
signature, backward, and the gradient back."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from verl.trainer.ppo.core_algos import get_policy_loss_fn


class LossCall(NamedTuple):
    loss: torch.Tensor  # 0-dim, detached
    grad: torch.Tensor  # [B, T] d loss / d log_prob
    metrics: dict[str, Any]


def call_loss(old, new, adv, mask, mode: str, config, *, loss_mode: str | None = None, **kwargs) -> LossCall:
    """``loss_mode`` (default: the config's ``policy_loss.loss_mode``) on [B, T] tensors; ``new`` is cloned
    into the leaf the gradient is taken for. ``kwargs``: extra keywords (rollout_is_weights, shard, ...)."""
    fn = get_policy_loss_fn(loss_mode or config.policy_loss.loss_mode)
    leaf = new.clone().requires_grad_(True)
    loss, metrics = fn(
        old_log_prob=old,
        log_prob=leaf,
        advantages=adv,
        response_mask=mask,
        loss_agg_mode=mode,
        config=config,
        **kwargs,
    )
    loss.backward()
    return LossCall(loss.detach(), leaf.grad, metrics)
