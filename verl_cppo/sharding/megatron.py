"""Shard-local CPPO loss for verl 0.9.1's Megatron engine under context parallelism (an opt-in runtime hook).

verl's Megatron engine all-gathers every per-token output (log-probs, and entropy when computed) over the CP
group in ``postprocess_thd_engine`` and then runs ``ppo_loss`` on whole sequences, redundantly on every CP
rank. With this hook installed, a *training* micro-batch (``forward_only=False``) whose loss is verl's
``ppo_loss`` with ``loss_mode=cppo`` skips that all-gather:

* ``verl.models.mcore.model_forward.postprocess_thd_engine`` returns the rank's own zigzag shard
  ([1, sum_b S_b / cp], a ``ShardLocalOutput``) instead of gathering;
* ``MegatronEngineWithLMHead.postprocess_micro_batch_func`` runs verl's own code with ``shard_local_ppo_loss``
  in place of ``ppo_loss``: it cuts the side inputs (old log-probs, advantages, masks, IS weights, ref
  log-probs) to the same tokens and calls the ``cppo`` loss with a ``verl_cppo.sharding.context.ShardContext``.

The returned loss has the gathered loss's value and, w.r.t. this rank's log-probs, its gradient, so verl's
scaling (x num_micro_batch; Megatron's x cp_size and DP x CP gradient average, or the per-token 3-tuple
path) gives the same parameter gradient as the gathered path (see ``verl_cppo.sharding.context``). Every other case
runs verl's gathered path unchanged: forward-only passes (log-prob computation), other losses, BSHD, fused
kernels, dynamic CP, the contiguous CP layout, CP = 1; for the ones a user might expect to be shard-local a
warning is logged once.

Enable it in every actor worker with ``actor_rollout_ref.model.external_lib=verl_cppo.megatron_shard_local``
(verl imports it when it builds the model config, before the engine exists). ``patches/README.md`` documents
the hook and ``patches/megatron_shard_local_loss.diff`` is the equivalent change to verl's source.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import sys
from dataclasses import dataclass

import torch
import torch.distributed
from verl.trainer.ppo.core_algos import kl_penalty
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric

from verl_cppo import hooks
from verl_cppo.config import cppo_config_of
from verl_cppo.loss import compute_policy_loss_cppo
from verl_cppo.sharding.context import ShardContext
from verl_cppo.sharding.layout import ShardLayout, zigzag_thd_layout

__all__ = [
    "ShardLocalOutput",
    "install",
    "installed",
    "keep_shard_or_postprocess_thd",
    "response_field_on_shard",
    "route_shard_local",
    "shard_local_ppo_loss",
    "shard_local_scope",
    "thd_response_layout",
    "uninstall",
]

logger = logging.getLogger(__name__)

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("verl_cppo_megatron_shard_local", default=False)
HOOK_NAME = "megatron_shard_local"
_WARNED: set = set()


@dataclass
class ShardLocalOutput:
    """One per-token output of the LM head on this CP rank, left in verl's zigzag THD order (not gathered)."""

    local: torch.Tensor  # [1, sum_b S_b / cp] (grad flows from here into the model)
    cu_seqlens_padded: torch.Tensor  # [B + 1] packed offsets of the padded sequences (PackedSeqParams)
    cp_rank: int
    cp_size: int
    group: torch.distributed.ProcessGroup  # the CP process group


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        logger.warning("verl_cppo.megatron_shard_local: %s; this micro-batch uses verl's gathered loss path", reason)


def _is_cppo_ppo_loss(loss_function) -> bool:
    from verl.workers.utils.losses import ppo_loss

    if not (isinstance(loss_function, functools.partial) and loss_function.func is ppo_loss):
        return False
    config = loss_function.keywords.get("config")
    return config is not None and config.policy_loss.get("loss_mode", "vanilla") == "cppo"


def _shard_local_reason(engine, loss_function, forward_only: bool) -> str | None:
    """None if this batch can run shard-local, else why not (empty string: not a case to warn about)."""
    cfg = engine.engine_config
    if forward_only or not _is_cppo_ppo_loss(loss_function) or cfg.context_parallel_size <= 1:
        return ""
    if not cfg.use_remove_padding:
        return "use_remove_padding=False (BSHD) is not supported"
    if cfg.use_fused_kernels:
        return "use_fused_kernels=True is not supported"
    if cfg.dynamic_context_parallel:
        return "dynamic_context_parallel=True is not supported"
    if cppo_config_of(loss_function.keywords["config"]).shuffle_positions:
        return "cppo.shuffle_positions needs whole responses"
    return None


@contextlib.contextmanager
def shard_local_scope(engine, loss_function, forward_only: bool):
    """Around Megatron's schedule in ``forward_backward_batch``: keep shards for this batch if it qualifies."""
    reason = _shard_local_reason(engine, loss_function, forward_only)
    if reason:
        _warn_once(reason)
    token = _ACTIVE.set(reason is None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def keep_shard_or_postprocess_thd(
    output, packed_seq_params, input_ids, batch_size, post_process=True, local_cp_size=None, cp_layout="zigzag"
):
    """verl's ``postprocess_thd_engine``, except inside ``shard_local_scope``: this rank's shard, not gathered."""
    from verl.models.mcore.util import postprocess_thd_engine

    if _ACTIVE.get() and post_process:
        from megatron.core import parallel_state as mpu

        if local_cp_size is None and cp_layout == "zigzag" and mpu.get_context_parallel_world_size() > 1:
            return ShardLocalOutput(
                local=output,
                cu_seqlens_padded=packed_seq_params.cu_seqlens_q_padded,
                cp_rank=mpu.get_context_parallel_rank(),
                cp_size=mpu.get_context_parallel_world_size(),
                group=mpu.get_context_parallel_group(),
            )
        _warn_once(f"CP layout {cp_layout!r} / dynamic CP is not supported")
    return postprocess_thd_engine(
        output, packed_seq_params, input_ids, batch_size, post_process, local_cp_size, cp_layout
    )


def route_shard_local(output, loss_function):
    """In ``postprocess_micro_batch_func``: shard-local outputs go to ``shard_local_ppo_loss`` instead of
    ``ppo_loss``; returns (output, loss_function) to use. Training drops model_output, so none is kept."""
    if not isinstance(output, dict) or not any(isinstance(v, ShardLocalOutput) for v in output.values()):
        return output, loss_function
    if not all(isinstance(v, ShardLocalOutput) for v in output.values()):
        raise RuntimeError(f"verl_cppo shard-local loss: mixed gathered/shard-local outputs {sorted(output)}")
    config = loss_function.keywords["config"]
    return {}, functools.partial(shard_local_ppo_loss, config=config, outputs=dict(output))


def _wrap_forward_backward_batch(original):
    @functools.wraps(original)
    def forward_backward_batch(self, data, loss_function, forward_only=False):
        with shard_local_scope(self, loss_function, forward_only):
            return original(self, data, loss_function, forward_only=forward_only)

    return forward_backward_batch


def _wrap_postprocess_micro_batch_func(original):
    @functools.wraps(original)
    def postprocess_micro_batch_func(self, output, data, forward_only, loss_function, local_cp_size=None):
        output, loss_function = route_shard_local(output, loss_function)
        return original(self, output, data, forward_only, loss_function, local_cp_size=local_cp_size)

    return postprocess_micro_batch_func


def _wrap_postprocess_thd_engine(original):
    @functools.wraps(original)
    def postprocess_thd_engine(*args, **kwargs):
        return keep_shard_or_postprocess_thd(*args, **kwargs)

    return postprocess_thd_engine


_ENGINE = "verl.workers.engine.megatron.transformer_impl"
_MODEL_FORWARD = "verl.models.mcore.model_forward"
_HOOKS = (
    (_ENGINE, "MegatronEngine.forward_backward_batch", _wrap_forward_backward_batch),
    (_ENGINE, "MegatronEngineWithLMHead.postprocess_micro_batch_func", _wrap_postprocess_micro_batch_func),
    (_MODEL_FORWARD, "postprocess_thd_engine", _wrap_postprocess_thd_engine),
)


def install() -> None:
    """Wrap verl's Megatron engine and THD post-processing (idempotent), through ``verl_cppo.hooks``."""
    for module, attribute, make_wrapper in _HOOKS:
        hooks.wrap(module, attribute, make_wrapper, name=HOOK_NAME, now=True)


def uninstall() -> None:
    """Restore verl's functions."""
    for module, attribute, _ in _HOOKS:
        hooks.unwrap(module, attribute)


def installed() -> bool:
    module = sys.modules.get(_ENGINE)
    return module is not None and hooks.hook_name(module.MegatronEngine.forward_backward_batch) == HOOK_NAME


def _lengths(nested_or_padded, data, key) -> torch.Tensor:
    if nested_or_padded.is_nested:
        return nested_or_padded.offsets().diff()
    mask = data["attention_mask"]  # the padded layout of no_padding_2_padding
    prompt_width = data["prompts"].shape[1]
    return mask[:, :prompt_width].sum(1) if key == "prompts" else mask[:, prompt_width:].sum(1)


def thd_response_layout(data, shard: ShardLocalOutput) -> ShardLayout:
    """Where the responses of `data` sit in this rank's zigzag THD shard (verl's no_padding_2_padding columns)."""
    prompt_lens = _lengths(data["prompts"], data, "prompts").cpu()
    response_lens = _lengths(data["responses"], data, "responses").cpu()
    width = tu.get_non_tensor_data(data=data, key="max_response_len", default=-1)
    if width is None or width < 0:
        width = int(response_lens.max()) if response_lens.numel() else 0
    layout = zigzag_thd_layout(
        shard.cu_seqlens_padded.cpu(), prompt_lens - 1, response_lens, shard.cp_rank, shard.cp_size, width=int(width)
    )
    if layout.row.numel() != shard.local.shape[-1]:
        raise RuntimeError(
            f"shard-local loss: layout has {layout.row.numel()} tokens, the log-probs {shard.local.shape[-1]}"
        )
    return layout.to(shard.local.device)


def response_field_on_shard(field: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    """A per-response field ([B, j] nested or [B, T] padded) at this rank's tokens, [1, N]; 0 off responses."""
    inside = layout.row >= 0
    row, col = layout.row.clamp(min=0), (layout.position - 1).clamp(min=0)
    if field.is_nested:
        values, offsets = field.values(), field.offsets().to(row.device)
        picked = values[(offsets[row] + col).clamp(max=max(values.shape[0] - 1, 0))]
    else:
        picked = field[row, col]
    return torch.where(inside, picked, torch.zeros((), dtype=picked.dtype, device=picked.device))[None]


def shard_local_ppo_loss(
    config, model_output=None, data=None, dp_group: torch.distributed.ProcessGroup | None = None, *, outputs: dict
):
    """verl's ``ppo_loss`` (verl/workers/utils/losses.py) on this CP rank's tokens, with the ``cppo`` loss.

    Same global batch info, metrics and aggregation types as verl's; entropy bonus and KL loss included.
    Values are the gathered ones on every CP rank; gradients flow into this rank's log-probs only.
    """
    shard = outputs["log_probs"]
    layout = thd_response_layout(data, shard)
    ctx = ShardContext(layout, shard.group)
    config.global_batch_info["dp_size"] = data["dp_size"]
    config.global_batch_info["batch_num_tokens"] = data["batch_num_tokens"]
    config.global_batch_info["global_batch_size"] = data["global_batch_size"]
    config.global_batch_info["loss_scale_factor"] = config.loss_scale_factor
    if (
        data["dp_size"] > 1
        or data["batch_num_tokens"] is not None
        or data["global_batch_size"] is not None
        or config.loss_scale_factor is not None
    ):
        metric_aggregation = AggregationType.SUM
    else:
        metric_aggregation = AggregationType.MEAN

    names = ["response_mask", "old_log_probs", "advantages", "rollout_is_weights", "ref_log_prob"]
    side = {k: response_field_on_shard(data[k], layout) for k in names if k in data.keys()}
    response_mask = side["response_mask"].bool()
    log_prob = shard.local.reshape(1, -1)
    pg_loss, pg_metrics = compute_policy_loss_cppo(
        old_log_prob=side["old_log_probs"],
        log_prob=log_prob,
        advantages=side["advantages"],
        response_mask=response_mask,
        loss_agg_mode=config.loss_agg_mode,
        config=config,
        rollout_is_weights=side.get("rollout_is_weights"),
        shard=ctx,
    )
    metrics = dict(Metric.from_dict(pg_metrics, aggregation=AggregationType.MEAN))
    metrics["actor/pg_loss"] = Metric(value=pg_loss, aggregation=metric_aggregation)
    extra = {}  # this rank's shares of verl's extra loss terms, reduced in one message below
    if "entropy" in outputs:
        entropy = outputs["entropy"].local.reshape(1, -1)
        extra["entropy"] = ctx.aggregate(entropy, response_mask, config.loss_agg_mode, config.global_batch_info)
    if config.use_kl_loss:
        kld = kl_penalty(logprob=log_prob, ref_logprob=side["ref_log_prob"], kl_penalty=config.kl_loss_type)
        extra["kl"] = ctx.aggregate(kld, response_mask, config.loss_agg_mode, config.global_batch_info)
    whole = dict(zip(extra, ctx.whole_losses(list(extra.values())), strict=True)) if extra else {}
    policy_loss = pg_loss
    if "entropy" in whole:
        policy_loss = policy_loss - config.entropy_coeff * whole["entropy"]
        metrics["actor/entropy_loss"] = Metric(value=whole["entropy"], aggregation=metric_aggregation)
    if "kl" in whole:
        policy_loss = policy_loss + whole["kl"] * config.kl_loss_coef
        metrics["kl_loss"] = Metric(value=whole["kl"], aggregation=metric_aggregation)
        metrics["kl_coef"] = config.kl_loss_coef
    return policy_loss, metrics
