"""Engine side of the Top-K divergences: D computed where pi's logits exist, delivered aligned to the loss.

verl 0.9.1 already has the hook: with ``distillation_use_topk`` set in a micro-batch, both LM engines call the
loss function on the shard-local, temperature-scaled logits *before* gathering the log-probs, and gather every
per-token tensor it returns exactly like ``log_probs`` into ``model_output``:

    FSDP / FSDP2 (+ Ulysses SP, packed)  logits (1, ceil(nnz/sp), V)   contiguous slice of the packed stream
    Megatron THD (TP, CP)                logits (1, nnz_pad/cp, V/tp)  zig-zag chunks of each padded sequence
    Megatron BSHD (TP, CP)               logits (B, S_pad/cp, V/tp)

``verl_cppo/hooks/import_time_diffs/topk_actor_update.diff`` sets that flag for the actor update and makes the worker's
loss function ``ppo_loss_with_topk``, which answers both calls:

* ``student_logits=...`` (the hook): lays mu's per-response-token inputs out over the sequence positions whose
  logits predict them (position P-1+t predicts response token t, as the log-probs do), cuts them to this rank's
  shard with the engine's own layout function (``slice_input_tensor`` / ``preprocess_thd_engine`` /
  ``preprocess_bshd_engine``), calls ``topk_divergence`` on the rows (TP: this rank's vocab shard, all-reduced
  over the TP group) and returns D under the key ``cppo_topk_div`` (0 off the response tokens);
* ``model_output=..., data=...`` (the loss): takes the gathered D, cuts the responses out with verl's
  ``no_padding_2_padding`` (the same call ``ppo_loss`` makes for ``log_probs``) and runs verl's ``ppo_loss``
  inside ``topk_divergence_channel`` so the ``cppo`` loss sees D aligned with its rows, and adds the metric
  ``actor/cppo_topk_coverage``: the fraction of response tokens that carry mu's full top-K row (1.0 for
  single-turn rollouts; below 1 means top-K entries were lost on the way: D of such a token spans fewer ids,
  down to {sampled, other}, the binary divergence, when its whole row is missing).

Both trainers' micro-batches are read: the v1 trainer's response fields are nested (one row per response token),
the legacy trainer's are right-padded ``[B, R_max, ...]`` (``left_right_2_no_padding`` packs only ``input_ids`` and
``position_ids``); ``response_rows`` takes each response's R_b rows either way, R_b by verl's own rule.

The hook output is built under ``no_grad``: D only selects tokens, it carries no gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed import ProcessGroup
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import no_padding_2_padding

from verl_cppo import kernels
from verl_cppo.config import cppo_config_of
from verl_cppo.core.divergence import TOPK_DIVERGENCES
from verl_cppo.topk.channel import topk_divergence_channel
from verl_cppo.topk.rollout import ENV_TOPK, TOPK_IDS, TOPK_LOG_PROBS

__all__ = [
    "TOPK_COVERAGE_METRIC",
    "TOPK_DIV_KEY",
    "full_sequence_topk_inputs",
    "ppo_loss_with_topk",
    "response_lengths",
    "response_rows",
    "shard_topk_divergence",
]

TOPK_DIV_KEY = "cppo_topk_div"
"""model_output key of the per-token Top-K divergence (nested like log_probs after the engine's gather)."""

TOPK_COVERAGE_METRIC = "actor/cppo_topk_coverage"
"""Fraction of the micro-batch's response tokens with a full top-K row from the rollout (no -1 entry)."""


def ppo_loss_with_topk(
    config: Any, model_output: dict | None = None, data: Any = None, dp_group: ProcessGroup | None = None, **hook
):
    """verl's ``ppo_loss`` that also serves the engine's logits hook (see the module docstring)."""
    if "student_logits" in hook:
        div = shard_topk_divergence(config, hook["student_logits"], data, hook.get("data_format"))
        return {TOPK_DIV_KEY: div}
    div = (model_output or {}).get(TOPK_DIV_KEY)
    if div is None:
        return ppo_loss(config, model_output, data, dp_group)
    rows = no_padding_2_padding(div, data)  # [B, T] exactly as ppo_loss aligns log_probs
    with topk_divergence_channel(rows):
        loss, metrics = ppo_loss(config, model_output, data, dp_group)
    topk_ids = response_rows(data, TOPK_IDS)  # [sum R, K]
    coverage = (topk_ids >= 0).all(-1).float().mean() if topk_ids.shape[0] else topk_ids.new_ones((), dtype=torch.float)
    metrics[TOPK_COVERAGE_METRIC] = Metric(value=coverage, aggregation=AggregationType.MEAN)
    return loss, metrics


def _nested(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return torch.nested.nested_tensor_from_jagged(values, offsets=offsets)


def response_lengths(data: Any) -> torch.Tensor:
    """R_b, the response length of each sequence [B], by verl's rule (``no_padding_2_padding``): the nested
    ``responses``' lengths (v1 trainer), or the response part of ``attention_mask`` (the legacy trainer's
    ``left_right_2_no_padding`` leaves ``prompts`` / ``responses`` left / right padded)."""
    responses = data["responses"]
    if responses.is_nested:
        return responses.offsets().diff()
    return data["attention_mask"][:, data["prompts"].shape[1] :].sum(dim=1)


def response_rows(data: Any, key: str) -> torch.Tensor:
    """The response-token rows of ``data[key]``, packed [sum R, ...]: the values of a nested field (v1 trainer), the
    first R_b rows of each sequence of a right-padded [B, R_max, ...] field (legacy trainer)."""
    field, lens = data[key], response_lengths(data)
    if field.is_nested:
        if not torch.equal(field.offsets().diff(), lens):
            raise ValueError(f"{key} has {field.offsets().diff().tolist()} rows, responses {lens.tolist()}")
        return field.values()
    if field.shape[0] != lens.numel() or (lens.numel() and field.shape[1] < int(lens.max())):
        raise ValueError(f"{key} has shape {tuple(field.shape)}, responses {lens.tolist()} tokens (right-padded)")
    keep = torch.arange(field.shape[1], device=field.device)[None, :] < lens.to(field.device)[:, None]  # [B, R_max]
    return field[keep]


def full_sequence_topk_inputs(data: Any) -> dict[str, torch.Tensor]:
    """mu's per-response-token inputs laid out over each whole sequence (prompt + response), as nested tensors.

    Row P-1+t of a sequence with P prompt tokens holds response token t: its id (``sampled``), mu's top-K ids
    (-1 = none) and log-probs, mu's log-prob of it (``mu_sampled``) and ``is_response`` = 1. Every other row is
    empty (id 0, no top-K, flag 0). Shapes: [B, j] or [B, j, K] with j the sequence lengths of ``input_ids``.
    """
    missing = [key for key in (TOPK_IDS, TOPK_LOG_PROBS, "rollout_log_probs") if key not in data.keys()]
    if missing:
        raise RuntimeError(
            f"the actor batch lacks {missing}, needed for a Top-K divergence: the rollout did not return mu's "
            f"top-K (was {ENV_TOPK} set in every process, i.e. the job launched through verl's main_ppo with "
            "verl-cppo installed?) or actor_rollout_ref.rollout.calculate_log_probs=False"
        )
    input_ids = data["input_ids"]
    offsets = input_ids.offsets()  # [B+1]
    resp_lens = response_lengths(data)  # [B]
    nnz, k, device = int(offsets[-1]), data[TOPK_IDS].shape[-1], input_ids.values().device
    # packed row of response token t of sequence b: offsets[b] + P_b - 1 + t = offsets[b+1] - R_b - 1 + t
    first = torch.repeat_interleave(offsets[1:] - resp_lens - 1, resp_lens)  # [sum R]
    starts = torch.repeat_interleave(resp_lens.cumsum(0) - resp_lens, resp_lens)  # [sum R]
    rows = first + torch.arange(first.numel(), device=device) - starts  # [sum R]
    sampled = torch.zeros(nnz, dtype=torch.long, device=device)
    sampled[rows] = response_rows(data, "responses").long()
    ids = torch.full((nnz, k), -1, dtype=torch.long, device=device)
    ids[rows] = response_rows(data, TOPK_IDS).long()
    lps = torch.zeros((nnz, k), dtype=torch.float32, device=device)
    lps[rows] = response_rows(data, TOPK_LOG_PROBS).float()
    mu_sampled = torch.zeros(nnz, dtype=torch.float32, device=device)
    mu_sampled[rows] = response_rows(data, "rollout_log_probs").float()
    is_response = torch.zeros(nnz, dtype=torch.bool, device=device)
    is_response[rows] = True
    fields = {"sampled": sampled, "ids": ids, "lps": lps, "mu_sampled": mu_sampled, "is_response": is_response}
    return {name: _nested(value, offsets) for name, value in fields.items()}


def _fsdp_shard(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """(1, rows, ...) of this Ulysses rank: the packed stream right-padded to a multiple of sp, sliced."""
    from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size, slice_input_tensor

    packed = {name: value.values().unsqueeze(0) for name, value in inputs.items()}  # (1, nnz, ...)
    if get_ulysses_sequence_parallel_world_size() > 1:
        packed = {name: slice_input_tensor(value, dim=1) for name, value in packed.items()}
    return packed


def _megatron_shard(inputs: dict[str, torch.Tensor], data: Any, data_format: str) -> dict[str, torch.Tensor]:
    """This CP rank's rows in the engine's THD (1, rows, ...) or BSHD (B, S, ...) layout."""
    from verl.models.mcore.util import preprocess_bshd_engine, preprocess_thd_engine

    if data_format == "thd":
        return {name: preprocess_thd_engine(value, pre_process=True)[0] for name, value in inputs.items()}
    forced = tu.get_non_tensor_data(data=data, key="forced_max_seqlen", default=None)
    return {
        name: preprocess_bshd_engine(value, pre_process=True, forced_max_seqlen=forced)[0]
        for name, value in inputs.items()
    }


def _tensor_parallel(vocab_shard: int) -> tuple[Any, int]:
    from megatron.core import parallel_state as mpu

    if mpu.get_tensor_model_parallel_world_size() == 1:
        return None, 0
    return mpu.get_tensor_model_parallel_group(), mpu.get_tensor_model_parallel_rank() * vocab_shard


@torch.no_grad()
def shard_topk_divergence(config: Any, logits: torch.Tensor, data: Any, data_format: str | None) -> torch.Tensor:
    """D for this rank's logits rows, shaped logits.shape[:2]; 0 off the response tokens.

    Args:
        config: the worker's actor config (``policy_loss.cppo.divergence`` picks tv or kl).
        logits: FSDP (1, rows, V) full vocabulary; Megatron (B, rows, V/tp) this TP rank's vocab shard.
        data: the micro-batch (nested ``input_ids``; ``responses``, ``rollout_log_probs`` and the top-K fields
            nested or right-padded).
        data_format: None for FSDP (the hook passes none), "thd" / "bshd" for Megatron.
    """
    name = cppo_config_of(config).divergence
    if name not in TOPK_DIVERGENCES:
        raise ValueError(
            f"the engine's Top-K divergence hook is on ({ENV_TOPK} set) but policy_loss.cppo.divergence={name!r} "
            f"is not one of {TOPK_DIVERGENCES}"
        )
    inputs = full_sequence_topk_inputs(data)
    if data_format is None:
        shard, tp_group, vocab_start = _fsdp_shard(inputs), None, 0
    else:
        shard = _megatron_shard(inputs, data, data_format)
        tp_group, vocab_start = _tensor_parallel(logits.shape[-1])
    for field, value in shard.items():
        if value.shape[:2] != logits.shape[:2]:
            raise RuntimeError(
                f"Top-K divergence hook: the {field} shard has shape {tuple(value.shape)} but the logits "
                f"{tuple(logits.shape)} (unsupported sequence layout: FP8 padding, pad_to_length or dynamic CP?)"
            )
    k = shard["ids"].shape[-1]
    div = kernels.topk_divergence(
        logits.reshape(-1, logits.shape[-1]),
        shard["sampled"].reshape(-1),
        shard["ids"].reshape(-1, k),
        shard["lps"].reshape(-1, k),
        name.removeprefix("topk_"),  # topk_tv -> "tv", topk_kl -> "kl"
        mu_sampled_logprobs=shard["mu_sampled"].reshape(-1),
        tp_group=tp_group,
        vocab_start_index=vocab_start,
    )  # [rows] float32
    return torch.where(shard["is_response"].reshape(-1), div, 0.0).view(logits.shape[:2])
