"""Carry ``cppo_grpo``'s excluded responses from the advantage estimator to the loss normalisers.

Why a hook: verl 0.9.1's estimators return only (advantages, returns), and neither trainer lets them reach
the counts ``agg_loss`` divides by:

* the token count ``batch_num_tokens`` is summed by every engine's ``forward_backward_batch`` from the
  mini-batch's ``loss_mask`` (all-reduced over DP). The v0 trainer builds ``loss_mask`` from
  ``response_mask`` after the estimator ran; the v1 trainer stores ``loss_mask`` as its own TransferQueue
  field at rollout time and writes back only ``advantages`` and ``returns`` (``response_mask`` only under
  decoupled rollout correction, never ``loss_mask``);
* the sequence count ``global_batch_size`` is a constant of the config (``ppo_mini_batch_size * n``) that
  both trainers attach to the actor update;
* zeroing ``response_mask`` on the trainer side would also corrupt verl's metrics, which read response
  lengths (and the "aborted" share that filters the score metrics) from it.

NaN advantages are no way out either (non-finite tokens are masked by the loss but still counted).

How (three runtime hooks, each installed when verl imports the module it wraps; see patches/README.md):

1. the estimator publishes a ``GroupExclusion`` (which responses it kept) to every active capture;
2. trainer side, the v0 call site ``ray_trainer.compute_advantage`` and the v1 trainer's
   ``PPOTrainer._compute_advantage`` capture it and store the per-response field ``cppo_grpo_keep``
   ([B] bool) with the batch: in the DataProto (v0), in TransferQueue next to ``advantages`` (v1);
3. worker side, ``TrainingWorker.train_batch`` (called once per mini-batch, for every engine) zeroes
   ``loss_mask`` and ``response_mask`` of the excluded responses and subtracts their DP-global count from
   ``global_batch_size``; the engine then counts ``batch_num_tokens`` from the zeroed ``loss_mask``.

Excluded responses therefore add exactly nothing to the loss, its gradient and both denominators, for every
``loss_agg_mode``; the trainer's batch, metrics and ``response_mask`` stay as verl made them. When a whole
mini-batch is excluded (on every DP rank), only ``response_mask`` is zeroed: every loss term is then exactly
0 over verl's own, non-zero denominators, instead of 0/0.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

import torch
from torch.distributed import ProcessGroup

from verl_cppo import hooks

__all__ = [
    "KEEP_FIELD",
    "GroupExclusion",
    "capture_exclusions",
    "exclude_responses",
    "exclusion_metrics",
    "install",
    "publish_exclusion",
]

logger = logging.getLogger(__name__)

KEEP_FIELD = "cppo_grpo_keep"
"""Batch field ([B] bool) that marks the responses the estimator kept; absent = nothing to exclude. One
scalar per response: TransferQueue 0.1.11 stores it per sample and stacks scalars back densely to [B]."""

HOOK_NAME = "cppo_grpo_exclusion"


class GroupExclusion(NamedTuple):
    keep: torch.Tensor  # [B] bool, False for the responses of excluded (zero-variance) groups
    num_groups: int
    num_excluded_groups: int


_SINKS: ContextVar[tuple[list[GroupExclusion], ...]] = ContextVar("verl_cppo_exclusion_sinks", default=())


def publish_exclusion(exclusion: GroupExclusion) -> None:
    """Hand the estimator's decision to every enclosing ``capture_exclusions`` (none outside a trainer)."""
    for sink in _SINKS.get():
        sink.append(exclusion)


@contextmanager
def capture_exclusions() -> Iterator[list[GroupExclusion]]:
    """Collect what estimators publish inside the block (nestable; per thread / task)."""
    sink: list[GroupExclusion] = []
    token = _SINKS.set((*_SINKS.get(), sink))
    try:
        yield sink
    finally:
        _SINKS.reset(token)


def _the_exclusion(captured: list[GroupExclusion], batch_size: int) -> GroupExclusion | None:
    if not captured:
        return None
    if len(captured) != 1 or tuple(captured[0].keep.shape) != (batch_size,):
        raise RuntimeError(
            f"cppo_grpo: expected one estimator call over the {batch_size} responses of the batch, got "
            f"{[tuple(c.keep.shape) for c in captured]}"
        )
    return captured[0]


def exclusion_metrics(exclusion: GroupExclusion) -> dict[str, float]:
    """Shares of the step's groups and responses that ``cppo_grpo`` excluded."""
    n_resp = exclusion.keep.numel()
    return {
        "cppo_grpo/excluded_group_frac": exclusion.num_excluded_groups / max(exclusion.num_groups, 1),
        "cppo_grpo/excluded_response_frac": float((~exclusion.keep).sum()) / max(n_resp, 1),
    }


# ---------------------------------------------------------------------------------------------- worker side


def _row_sums(mask: torch.Tensor) -> torch.Tensor:
    """[b] per-row sums of a dense [b, T] or nested jagged [b, j] mask."""
    if mask.is_nested:
        lengths = mask.offsets().diff()  # [b]
        rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)  # [nnz]
        return torch.zeros(lengths.numel(), dtype=torch.int64, device=mask.device).index_add_(
            0, rows, mask.values().to(torch.int64)
        )
    return mask.to(torch.int64).sum(dim=-1)


def _zero_rows(mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The mask with every row where ``keep`` is False set to 0 (dense [b, T] or nested jagged [b, j])."""
    if mask.is_nested:  # zero a copy's values in place: a rebuilt jagged tensor would lose its max_seqlen
        lengths = mask.offsets().diff()  # [b]
        token_keep = torch.repeat_interleave(keep.to(lengths.device), lengths)  # [nnz]
        out = mask.clone()
        out.values().masked_fill_(~token_keep.to(out.device), 0)
        return out
    keep = keep.to(mask.device).view(-1, *([1] * (mask.dim() - 1)))  # [b, 1]
    return torch.where(keep, mask, torch.zeros_like(mask))


def exclude_responses(data: Any, dp_group: ProcessGroup | None = None, device: Any = "cpu") -> tuple[int, int]:
    """Remove the responses marked by ``KEEP_FIELD`` from a mini-batch's loss, gradient and normalisers.

    ``data`` is the TensorDict of one mini-batch on one DP rank, as ``TrainingWorker.train_batch`` gets it::

        rank r of DP:  rows [b_r]  loss_mask / response_mask [b_r, T] or jagged, KEEP_FIELD [b_r],
                       non-tensor global_batch_size = sequences of the mini-batch over all DP ranks

    Every rank of ``dp_group`` must call this for the same mini-batch (one all-reduce of two counts, on
    ``device``: the accelerator for NCCL). Returns the DP-global (kept tokens, excluded responses).
    """
    from verl.utils import tensordict_utils as tu

    missing = [key for key in ("loss_mask", "response_mask") if key not in data.keys()]
    if missing:
        raise KeyError(f"cppo_grpo: the mini-batch carries {KEEP_FIELD} but no {missing}")
    keep = data[KEEP_FIELD]
    keep = (keep.values() if keep.is_nested else keep).reshape(-1).to(torch.bool)  # [b]
    loss_mask = data["loss_mask"]
    kept_tokens = torch.where(keep, _row_sums(loss_mask), 0).sum()
    counts = torch.stack([kept_tokens, (~keep).sum()]).to(device=device, dtype=torch.int64)  # [2]
    if dp_group is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM, group=dp_group)
    kept_tokens, excluded = (int(c) for c in counts.tolist())

    data["response_mask"] = _zero_rows(data["response_mask"], keep)
    if kept_tokens > 0:  # else leave verl's denominators: every numerator is 0 now, avoid 0 / 0
        data["loss_mask"] = _zero_rows(loss_mask, keep)
        global_batch_size = tu.get_non_tensor_data(data, key="global_batch_size", default=None)
        if global_batch_size is not None:
            tu.assign_non_tensor(data, global_batch_size=int(global_batch_size) - excluded)
    return kept_tokens, excluded


def _wrap_train_batch(original: Callable) -> Callable:
    @functools.wraps(original)
    def train_batch(self, data, *args, **kwargs):
        from tensordict import TensorDict

        if isinstance(data, TensorDict) and KEEP_FIELD in data.keys():
            from verl.utils.device import get_device_id

            exclude_responses(data, dp_group=self.engine.get_data_parallel_group(), device=get_device_id())
        return original(self, data, *args, **kwargs)

    return train_batch


# --------------------------------------------------------------------------------------------- trainer side


def _wrap_v0_compute_advantage(original: Callable) -> Callable:
    """``ray_trainer.compute_advantage`` (the v0 trainer's call site) that also stores ``KEEP_FIELD``."""

    @functools.wraps(original)
    def compute_advantage(data, *args, **kwargs):
        with capture_exclusions() as captured:
            data = original(data, *args, **kwargs)
        exclusion = _the_exclusion(captured, len(data))
        if exclusion is not None:
            data.batch[KEEP_FIELD] = exclusion.keep.to(data.batch["response_mask"].device)
        return data

    return compute_advantage


def _wrap_v1_compute_advantage(original: Callable) -> Callable:
    """``PPOTrainer._compute_advantage`` (v1) that also puts ``KEEP_FIELD`` into TransferQueue."""

    @functools.wraps(original)
    def _compute_advantage(self, batch, metrics):
        with capture_exclusions() as captured:
            batch = original(self, batch, metrics)
        exclusion = _the_exclusion(captured, len(batch))
        if exclusion is not None:
            import transfer_queue as tq
            from tensordict import TensorDict

            fields = TensorDict({KEEP_FIELD: exclusion.keep}, batch_size=len(batch))
            batch = tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=fields)
            metrics.update(exclusion_metrics(exclusion))
        return batch

    return _compute_advantage


# ------------------------------------------------------------------------------------------------- install


def install() -> None:
    """Install the three hooks, each when (or if already) verl imports its module (idempotent)."""
    hooks.wrap("verl.trainer.ppo.ray_trainer", "compute_advantage", _wrap_v0_compute_advantage, name=HOOK_NAME)
    hooks.wrap(
        "verl.trainer.ppo.v1.trainer_base", "PPOTrainer._compute_advantage", _wrap_v1_compute_advantage, name=HOOK_NAME
    )
    hooks.wrap("verl.workers.engine_workers", "TrainingWorker.train_batch", _wrap_train_batch, name=HOOK_NAME)
