"""verl's Ulysses sequence parallelism on the CPU test platform: packed attention and an all-to-all gloo has.

verl 0.9.1's Ulysses sequence parallelism lives inside flash attention: with ``use_remove_padding=True`` (which
Ulysses requires) ``apply_monkey_patch`` replaces ``transformers.integrations.flash_attention.
_flash_attention_forward`` by ``_ulysses_flash_attention_forward`` (all-to-all: gather the sequence, scatter
the heads), which calls ``_flash_attention_forward`` of ``transformers.modeling_flash_attention_utils`` on the
packed stream. That last call needs the ``flash_attn`` CUDA kernels, and under SDPA or eager attention the
Ulysses all-to-all is never reached (each rank would attend within its own sequence shard only).

The exchange itself, ``verl.utils.ulysses.all_to_all_tensor``, calls ``dist.all_to_all`` (lists), which gloo
does not implement (``RuntimeError: Backend gloo does not support alltoall``); gloo does implement
``all_to_all_single``. This module gives the CPU test platform the three pieces:

* an attention implementation ``cpu_varlen`` (transformers' ``AttentionInterface``; select it with
  ``+actor_rollout_ref.model.override_config.attn_implementation=cpu_varlen``) that does what transformers'
  ``flash_attention_forward`` does (heads to dim 2, then call ``flash_attention._flash_attention_forward`` looked
  up at call time, i.e. verl's Ulysses wrapper once verl patched it), with the flash mask function (no 4-D mask);
* ``varlen_causal_attention``: the packed-stream attention on CPU, installed with ``hooks.wrap`` in place of
  ``_flash_attention_forward`` in ``verl.models.transformers.monkey_patch`` (what the Ulysses wrapper calls;
  ``cpu_varlen`` calls it directly when verl did not patch the seam). Sequences are
  the runs of consecutive ``position_ids`` (verl packs each response's positions from 0); each is attended
  causally with ``scaled_dot_product_attention``, grouped-query heads repeated;
* ``all_to_all_tensor`` in place of verl's in ``verl.utils.ulysses`` (``hooks.wrap``; ``SeqAllToAll`` looks the
  name up there at call time): the same split, exchange and concatenation through one ``all_to_all_single`` on
  the chunks stacked along a new first dim.

Installed only by ``verl_cppo.testing.register`` (CPU test switch on); hook ``cpu_varlen_attention`` in
patches/README.md.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from verl_cppo import hooks

__all__ = ["ATTN_IMPLEMENTATION", "all_to_all_tensor", "install", "segment_starts", "varlen_causal_attention"]

ATTN_IMPLEMENTATION = "cpu_varlen"
"""``attn_implementation`` of the packed CPU attention (model ``override_config``)."""

HOOK_NAME = "cpu_varlen_attention"


def segment_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """[S] first index of each run of consecutive positions in a packed [T] stream (always starts with 0)."""
    t = position_ids.shape[-1]
    breaks = torch.ones(t, dtype=torch.bool, device=position_ids.device)  # [T]
    breaks[1:] = position_ids[1:] != position_ids[:-1] + 1
    return breaks.nonzero().squeeze(-1)  # [S]


def varlen_causal_attention(
    query_states: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    query_length: int | None = None,
    *args: Any,
    position_ids: torch.Tensor | None = None,
    is_causal: bool = True,
    softmax_scale: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> torch.Tensor:
    """flash-attention's calling convention on CPU: q [B, T, H, D], k / v [B, T, Hk, D] -> [B, T, H, D].

    Packed input (B = 1 with ``position_ids``): causal attention within each run of consecutive positions.
    Otherwise each row is one causal sequence; a padding ``attention_mask`` is refused (use SDPA for padded
    batches)."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            f"{ATTN_IMPLEMENTATION} attention serves packed streams (use_remove_padding=True) or unpadded rows; "
            f"got a padding attention_mask of shape {tuple(attention_mask.shape)}"
        )
    if dropout:
        raise ValueError(f"{ATTN_IMPLEMENTATION} attention has no dropout, got dropout={dropout}")
    if not is_causal:
        raise ValueError(f"{ATTN_IMPLEMENTATION} attention is causal only, got is_causal={is_causal}")
    batch, length, heads, _ = query_states.shape
    groups = heads // key_states.shape[2]
    q = query_states.transpose(1, 2)  # [B, H, T, D]
    k = key_states.transpose(1, 2).repeat_interleave(groups, dim=1)  # [B, H, T, D]
    v = value_states.transpose(1, 2).repeat_interleave(groups, dim=1)  # [B, H, T, D]
    if position_ids is None or batch != 1:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale)  # [B, H, T, D]
        return out.transpose(1, 2)
    starts = segment_starts(position_ids.reshape(-1)[:length]).tolist()
    pieces = []
    for start, end in zip(starts, [*starts[1:], length]):
        pieces.append(
            F.scaled_dot_product_attention(
                q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], is_causal=True, scale=softmax_scale
            )  # [1, H, end - start, D]
        )
    return torch.cat(pieces, dim=2).transpose(1, 2)  # [1, T, H, D]


def cpu_varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature (q / k / v [B, H, T, D]); calls the flash seam at call time:
    verl's Ulysses wrapper once ``apply_monkey_patch`` installed it (``use_remove_padding=True``), else the CPU
    attention directly (transformers' own seam needs ``flash_attn``)."""
    from transformers import modeling_flash_attention_utils
    from transformers.integrations import flash_attention

    seam = flash_attention._flash_attention_forward
    if seam is modeling_flash_attention_utils._flash_attention_forward:
        seam = varlen_causal_attention
    kwargs.pop("is_causal", None)
    out = seam(
        query.transpose(1, 2),  # [B, T, H, D]
        key.transpose(1, 2),
        value.transpose(1, 2),
        attention_mask,
        query.shape[2],
        is_causal=True,
        dropout=dropout,
        softmax_scale=scaling,
        **kwargs,
    )
    return out, None


def all_to_all_tensor(
    local_input: torch.Tensor,
    scatter_dim: int,
    gather_dim: int,
    group: Any = None,
    async_op: bool = False,
):
    """verl's ``all_to_all_tensor`` through ``all_to_all_single``: chunk i of ``scatter_dim`` goes to rank i, the
    chunks received are concatenated along ``gather_dim`` in rank order (``group`` None: verl's Ulysses group)."""
    import torch.distributed as dist
    from verl.utils.ulysses import get_ulysses_sequence_parallel_group

    group = get_ulysses_sequence_parallel_group() if group is None else group
    world = dist.get_world_size(group)
    chunks = torch.tensor_split(local_input, world, scatter_dim)
    if len({tuple(c.shape) for c in chunks}) != 1:
        raise ValueError(
            f"all_to_all_tensor: dim {scatter_dim} of {tuple(local_input.shape)} does not split evenly over "
            f"{world} ranks"
        )
    send = torch.stack(chunks).contiguous()  # [W, *chunk]
    received = torch.empty_like(send)  # [W, *chunk]: row i from rank i
    work = dist.all_to_all_single(received, send, group=group, async_op=async_op)

    def gathered() -> torch.Tensor:
        if work is not None:
            work.wait()
        return torch.cat(received.unbind(0), dim=gather_dim).contiguous()

    return gathered if async_op else gathered()


def _all_to_all(original):
    return functools.wraps(original)(lambda *args, **kwargs: all_to_all_tensor(*args, **kwargs))


def _replace(original):
    @functools.wraps(original)
    def flash_attention_on_cpu(*args: Any, **kwargs: Any) -> torch.Tensor:
        return varlen_causal_attention(*args, **kwargs)

    return flash_attention_on_cpu


def install() -> None:
    """Register ``cpu_varlen`` with transformers; verl's Ulysses wrapper calls the CPU attention, its
    all-to-all goes through ``all_to_all_single`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, cpu_varlen_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flash_attention_mask)
    hooks.wrap("verl.models.transformers.monkey_patch", "_flash_attention_forward", _replace, name=HOOK_NAME, now=True)
    hooks.wrap("verl.utils.ulysses", "all_to_all_tensor", _all_to_all, name=HOOK_NAME, now=True)
