"""What verl's ``ppo_loss`` receives, as actor metrics (CPU tests only; ``VERL_CPPO_LOSS_PROBE=1``).

An end-to-end test through ``main_ppo`` must see the loss's inputs, not the trainer's: whether
``old_log_prob`` is the rollout policy's log-probs (bypass mode) or the actor's recomputation, and what
``cppo_grpo``'s exclusion left of the normalisers. verl's ``ppo_loss`` receives the whole micro-batch
(``rollout_log_probs`` included) but hands the registered loss only ``old_log_probs``. ``install`` wraps
``verl.workers.utils.losses.ppo_loss`` (through ``verl_cppo.hooks``; ``engine_workers`` binds the wrapped
name when it imports it, before ``init_model`` builds the loss function) so that its metrics gain, per
micro-batch (response tokens only; verl reduces them over micro-batches by the aggregation given, then
averages over the step's mini-batches):

* ``actor/probe_old_vs_rollout_abs_max`` (max): max |old_log_probs - rollout_log_probs|; exactly 0 when the
  loss anchors on mu, the trainer/inference mismatch when old_log_probs was recomputed;
* ``actor/probe_old_vs_current_abs_max`` (max): max |old_log_probs - log_prob of the policy being trained|;
* ``actor/probe_global_batch_size`` (min) and ``actor/probe_zeroed_rows`` (sum): the sequence count the loss
  divides by and the responses whose ``response_mask`` is all 0 (``cppo_grpo``'s excluded responses);
* on the step's first mini-batch only, ``actor/probe_rollout_gap_abs_max`` (max) and
  ``actor/probe_rollout_gap_abs_mean`` (mean over response tokens): |log pi_theta - log mu|, where pi_theta is
  still the policy verl synced to the rollout server, so this is the rollout-vs-actor log-prob gap of the
  step (verl's own ``training/rollout_probs_diff_*`` exists only when the actor recomputes old log-probs, i.e.
  not in bypass mode). mu is ``rollout_log_probs`` (``old_log_probs`` where verl did not send it: the same
  tensor in bypass mode, trainer_base.py:1645). ``TrainingWorker.train_mini_batch`` (one call per step) opens
  the window and the end of its first ``train_batch`` closes it. Under the Megatron shard-local loss
  (``verl_cppo.megatron_shard_local``, CP > 1), which replaces ``ppo_loss``, the same two metrics come from
  each CP rank's shard, reduced over the CP group; and ``actor/probe_shard_local_micro_batches`` (sum) counts
  the micro-batches that took it (proof that the shard-local loss ran).

Installed by ``verl_cppo.testing.register`` only with ``VERL_CPPO_LOSS_PROBE=1`` (it needs the CPU test switch).
The loss value and gradient are verl's, untouched.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from verl_cppo import hooks

__all__ = ["GAP_KEYS", "PROBE_ENV", "install", "loss_input_metrics", "rollout_gap_metrics"]

PROBE_ENV = "VERL_CPPO_LOSS_PROBE"
HOOK_NAME = "loss_probe"
GAP_KEYS = ("actor/probe_rollout_gap_abs_max", "actor/probe_rollout_gap_abs_mean")
"""The rollout-vs-actor log-prob gap of a step (its first mini-batch): max and mean |log pi - log mu|."""
_first_mini_batch = False
"""True from the start of a step's update (``train_mini_batch``) until its first mini-batch is trained."""


def rollout_gap_metrics(
    log_prob: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor, group=None
) -> dict[str, tuple[float, str]]:
    """``GAP_KEYS`` of response tokens ``mask`` (any shape, matching ``log_prob`` and ``mu``); with ``group``,
    of the tokens of every rank of that process group (each rank passing its own shard)."""
    gap = torch.where(mask.bool(), (log_prob.detach().double() - mu.double()).abs(), 0.0)
    sums = torch.stack([gap.sum(), mask.bool().sum().double()])  # [2]: gap sum, token count
    peak = gap.max() if gap.numel() else torch.zeros((), dtype=torch.float64)
    if group is not None:
        torch.distributed.all_reduce(sums, group=group)
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX, group=group)
    return {GAP_KEYS[0]: (float(peak), "max"), GAP_KEYS[1]: (float(sums[0] / sums[1].clamp(min=1)), "mean")}


def loss_input_metrics(log_prob: torch.Tensor, data) -> dict[str, tuple[float, str]]:
    """{metric: (value, aggregation)} of one micro-batch; ``log_prob`` [b, T] aligned with the padded
    ``response_mask`` [b, T] of ``data``, as ``ppo_loss`` aligns it."""
    from verl.utils import tensordict_utils as tu

    fields = [k for k in ("response_mask", "old_log_probs", "rollout_log_probs") if k in data.keys()]
    padded = data.select(*fields).to_padded_tensor()
    mask = padded["response_mask"].to(torch.bool)  # [b, T]
    old = padded["old_log_probs"].to(torch.float64)  # [b, T]

    def masked_abs_max(other: torch.Tensor) -> float:
        gap = (old - other.to(torch.float64)).abs()  # [b, T]
        return float(torch.where(mask, gap, torch.zeros_like(gap)).max()) if mask.any() else 0.0

    metrics = {"actor/probe_old_vs_current_abs_max": (masked_abs_max(log_prob.detach()), "max")}
    if "rollout_log_probs" in padded.keys():
        metrics["actor/probe_old_vs_rollout_abs_max"] = (masked_abs_max(padded["rollout_log_probs"]), "max")
    metrics["actor/probe_zeroed_rows"] = (float((~mask.any(dim=-1)).sum()), "sum")
    global_batch_size = tu.get_non_tensor_data(data, key="global_batch_size", default=None)
    if global_batch_size is not None:
        metrics["actor/probe_global_batch_size"] = (float(global_batch_size), "min")
    if _first_mini_batch:
        mu = padded["rollout_log_probs"] if "rollout_log_probs" in padded.keys() else padded["old_log_probs"]
        metrics.update(rollout_gap_metrics(log_prob, mu, mask))
    return metrics


def _with_probe(original: Callable) -> Callable:
    @functools.wraps(original)
    def ppo_loss(config, model_output, data, dp_group=None):
        from verl.utils.metric import Metric
        from verl.workers.utils.padding import no_padding_2_padding

        loss, metrics = original(config, model_output, data, dp_group)
        log_prob = no_padding_2_padding(model_output["log_probs"], data)  # [b, T], as ppo_loss aligns it
        for key, (value, aggregation) in loss_input_metrics(log_prob, data).items():
            metrics[key] = Metric(value=value, aggregation=aggregation)
        return loss, metrics

    return ppo_loss


def _with_shard_probe(original: Callable) -> Callable:
    @functools.wraps(original)
    def shard_local_ppo_loss(config, model_output=None, data=None, dp_group=None, *, outputs):
        from verl.utils.metric import Metric

        from verl_cppo.sharding.megatron import response_field_on_shard, thd_response_layout

        loss, metrics = original(config, model_output, data, dp_group, outputs=outputs)
        metrics["actor/probe_shard_local_micro_batches"] = Metric(value=1.0, aggregation="sum")
        if _first_mini_batch:
            shard = outputs["log_probs"]
            layout = thd_response_layout(data, shard)
            mu_key = "rollout_log_probs" if "rollout_log_probs" in data.keys() else "old_log_probs"
            mu, mask = (response_field_on_shard(data[key], layout) for key in (mu_key, "response_mask"))
            gap = rollout_gap_metrics(shard.local.reshape(mu.shape), mu, mask, group=shard.group)
            for key, (value, aggregation) in gap.items():
                metrics[key] = Metric(value=value, aggregation=aggregation)
        return loss, metrics

    return shard_local_ppo_loss


def _opens_step(original: Callable) -> Callable:
    @functools.wraps(original)
    def train_mini_batch(self, *args, **kwargs):
        global _first_mini_batch
        _first_mini_batch = True
        try:
            return original(self, *args, **kwargs)
        finally:
            _first_mini_batch = False

    return train_mini_batch


def _closes_first_mini_batch(original: Callable) -> Callable:
    @functools.wraps(original)
    def train_batch(self, *args, **kwargs):
        global _first_mini_batch
        try:
            return original(self, *args, **kwargs)
        finally:
            _first_mini_batch = False

    return train_batch


def install() -> None:
    """Wrap ``ppo_loss`` when verl imports it, the shard-local loss when the Megatron hook's module is imported,
    and ``TrainingWorker``'s update (the first mini-batch's window) (idempotent); refuses without the CPU test
    switch."""
    from verl_cppo.testing import SWITCH_ENV

    if os.environ.get(SWITCH_ENV) != "1":
        raise RuntimeError(f"{PROBE_ENV}=1 is a CPU test probe and needs {SWITCH_ENV}=1")
    hooks.wrap(
        "verl.workers.utils.losses", "ppo_loss", _with_probe, name=HOOK_NAME, aliases=("verl.workers.engine_workers",)
    )
    hooks.wrap("verl_cppo.sharding.megatron", "shard_local_ppo_loss", _with_shard_probe, name=HOOK_NAME)
    workers = "verl.workers.engine_workers"
    hooks.wrap(workers, "TrainingWorker.train_mini_batch", _opens_step, name=HOOK_NAME)
    hooks.wrap(workers, "TrainingWorker.train_batch", _closes_first_mini_batch, name=HOOK_NAME)
