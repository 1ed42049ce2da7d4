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
  divides by and the responses whose ``response_mask`` is all 0 (``cppo_grpo``'s excluded responses).

Installed by ``verl_cppo.testing.register`` only with ``VERL_CPPO_LOSS_PROBE=1`` (it needs the CPU test switch).
The loss value and gradient are verl's, untouched.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from verl_cppo import hooks

__all__ = ["PROBE_ENV", "install", "loss_input_metrics"]

PROBE_ENV = "VERL_CPPO_LOSS_PROBE"
HOOK_NAME = "loss_probe"


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


def install() -> None:
    """Wrap ``ppo_loss`` when verl imports it (idempotent); refuses without the CPU test switch."""
    from verl_cppo.testing import SWITCH_ENV

    if os.environ.get(SWITCH_ENV) != "1":
        raise RuntimeError(f"{PROBE_ENV}=1 is a CPU test probe and needs {SWITCH_ENV}=1")
    hooks.wrap(
        "verl.workers.utils.losses", "ppo_loss", _with_probe, name=HOOK_NAME, aliases=("verl.workers.engine_workers",)
    )
