"""How the per-token Top-K divergence reaches the registered ``cppo`` loss (pure torch, no verl import).

verl's ``ppo_loss`` calls a registered loss with a fixed set of keywords, none of which can carry D. Two
channels therefore lead into ``compute_policy_loss_cppo``, and it takes the first one that is set:

1. the keyword ``topk_divergence`` ([B, T] float, aligned with ``log_prob``), for direct callers and tools;
2. ``topk_divergence_channel(div)``, a context in which ``verl_cppo.topk.engine_hook.ppo_loss_with_topk`` calls
   verl's own ``ppo_loss`` for one micro-batch after aligning the engine's per-token D exactly as verl aligns
   the log-probs (``no_padding_2_padding``). A context variable, so concurrent calls cannot see each other's D.

With ``divergence=topk_*`` and neither channel set, the loss raises ``TopKDataMissing`` naming what is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

__all__ = ["TopKDataMissing", "topk_divergence_channel", "topk_divergence_input"]

_CHANNEL: ContextVar[torch.Tensor | None] = ContextVar("verl_cppo_topk_divergence", default=None)


class TopKDataMissing(ValueError):
    """A Top-K divergence is configured but no per-token Top-K divergence reached the loss."""


@contextmanager
def topk_divergence_channel(div: torch.Tensor) -> Iterator[None]:
    """Within this context the ``cppo`` loss uses ``div`` ([B, T], the micro-batch's rows) as D."""
    token = _CHANNEL.set(div)
    try:
        yield
    finally:
        _CHANNEL.reset(token)


def topk_divergence_input(explicit: torch.Tensor | None, like: torch.Tensor, divergence: str) -> torch.Tensor:
    """D [B, T] for a Top-K divergence: the keyword if given, else the channel; shape-checked against ``like``."""
    div = explicit if explicit is not None else _CHANNEL.get()
    if div is None:
        raise TopKDataMissing(
            f"cppo.divergence={divergence!r} needs the per-token Top-K divergence, computed in the actor's engine "
            "from pi's logits and the batch fields rollout_topk_ids / rollout_topk_log_probs (mu's top-K from the "
            "rollout); none reached the loss. Launch through verl.trainer.main_ppo with verl-cppo installed on "
            "every node (the driver then enables the rollout top-K and the engine hook, see README 'Top-K "
            "divergences'), or pass topk_divergence=[batch, response_len] when calling the loss directly."
        )
    if div.shape != like.shape:
        raise ValueError(
            f"cppo loss: topk_divergence has shape {tuple(div.shape)}, log_prob has {tuple(like.shape)}; the Top-K "
            "divergence must be aligned with the gathered log-probs"
        )
    return div
