"""Context-parallel causal core attention in plain PyTorch, for megatron-core on the CPU test platform.

megatron-core 0.16.1 runs context parallelism (CP) only inside Transformer Engine's attention
(``TEDotProductAttention``: ring / all-gather exchange of K and V in CUDA kernels). Its plain-PyTorch
``DotProductAttention`` asserts ``context_parallel_size == 1`` (``transformer/dot_product_attention.py:57``) and
refuses packed THD input (``:153``). TE is not installable without CUDA, so the CPU test platform puts this
module in the layer spec's ``core_attention`` slot instead (``verl_cppo.testing.cpu_megatron``).

The design is the all-gather variant of CP attention: each CP rank gathers every rank's K and V (one
``all_gather`` each; the backward sums the gradient over the group and keeps the rank's own slice), rebuilds the
global position of every key from the zig-zag layout, and runs one masked ``scaled_dot_product_attention`` over
its local queries. It is O(tokens^2 / cp) memory per rank: a test-scale module, not a long-context kernel.

The zig-zag layout (megatron's ``get_batch_on_this_cp_rank``, verl's ``preprocess_thd_engine``): every
(padded) sequence of length S is cut into 2 * cp chunks of S / (2 cp); rank r holds chunks r and 2 cp - 1 - r,
concatenated. For cp = 2, one sequence of 8 tokens::

    global position   0 1 | 2 3 | 4 5 | 6 7
    chunk                0     1     2     3
    rank 0 holds      chunks 0, 3  ->  positions 0 1 6 7
    rank 1 holds      chunks 1, 2  ->  positions 2 3 4 5

THD (packed) input: ``cu_seqlens_q_padded`` [B + 1] are the *global* offsets of the padded sequences (each a
multiple of 2 cp); the rank's local stream is the concatenation of every sequence's two chunks, so sequence b
starts at local offset ``cu_seqlens_q_padded[b] / cp``. ``cu_seqlens_q`` [B + 1] gives the valid lengths: keys
past them are masked and padded queries return 0 (as TE's THD attention does). SBHD input: every row of the
batch is one sequence of length ``cp * s_local``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["ContextParallelCoreAttention", "causal_attention_by_position", "gather_along_dim0", "zigzag_positions"]


def zigzag_positions(padded_lengths: torch.Tensor, cp_rank: int, cp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence index, global position) of each token of rank ``cp_rank``'s zig-zag shard.

    padded_lengths: [B] lengths of the padded sequences, each divisible by 2 * cp_size when cp_size > 1.
    Returns two [sum_b padded_lengths[b] / cp_size] long tensors, in the rank's local order."""
    seq, pos = [], []
    for b, length in enumerate(padded_lengths.tolist()):
        if cp_size == 1:  # no split (verl pads nothing for CP then)
            pos.append(torch.arange(length))
            seq.append(torch.full((length,), b))
            continue
        if length % (2 * cp_size):
            raise ValueError(f"zig-zag CP needs every padded length divisible by 2 * cp = {2 * cp_size}, got {length}")
        chunk = length // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pos.append(torch.arange(c * chunk, (c + 1) * chunk))
            seq.append(torch.full((chunk,), b))
    if not pos:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(seq), torch.cat(pos)


class _GatherAlongDim0(torch.autograd.Function):
    """all_gather along dim 0 in rank order; backward: all_reduce (SUM) of the gradient, this rank's slice.

    ``torch.distributed.nn.all_gather``'s backward needs ``all_to_all`` / ``reduce_scatter``, which gloo lacks."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        ctx.rank, ctx.rows = rank, local.shape[0]
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, dim=0)  # [world * rows, ...]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


def gather_along_dim0(local: torch.Tensor, group) -> torch.Tensor:
    """[rows, ...] on each rank of ``group`` -> [world * rows, ...], rank order, differentiable (gloo)."""
    return _GatherAlongDim0.apply(local, group)


def causal_attention_by_position(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_seq: torch.Tensor,
    q_pos: torch.Tensor,
    k_seq: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor,
    q_valid: torch.Tensor,
    scale: float | None,
) -> torch.Tensor:
    """Causal attention where tokens carry (sequence, position) labels instead of sitting in order.

    q [Tq, B, H, D], k / v [Tk, B, G, D] (G query groups, H % G == 0); q_seq / q_pos / q_valid [Tq] or [B, Tq];
    k_seq / k_pos / k_valid [Tk] or [B, Tk]. A query attends the valid keys of its own sequence at positions
    <= its own. Returns [Tq, B, H, D]; invalid (padding) queries give 0."""
    heads, groups = q.shape[2], k.shape[2]
    if heads % groups:
        raise ValueError(f"query heads {heads} are not a multiple of key/value groups {groups}")
    qh = q.permute(1, 2, 0, 3)  # [B, H, Tq, D]
    kh = k.permute(1, 2, 0, 3).repeat_interleave(heads // groups, dim=1)  # [B, H, Tk, D]
    vh = v.permute(1, 2, 0, 3).repeat_interleave(heads // groups, dim=1)  # [B, H, Tk, D]
    allowed = (
        (q_seq[..., :, None] == k_seq[..., None, :])
        & (k_pos[..., None, :] <= q_pos[..., :, None])
        & k_valid[..., None, :]
    )  # [Tq, Tk] or [B, Tq, Tk]
    # a padding query may see no key (a pad of a sequence whose every key is masked): let it see all, then zero it
    allowed = allowed | ~q_valid[..., :, None]
    mask = allowed if allowed.dim() == 2 else allowed[:, None]  # broadcast over [B, H, Tq, Tk]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)  # [B, H, Tq, D]
    out = out.permute(2, 0, 1, 3)  # [Tq, B, H, D]
    keep = q_valid if q_valid.dim() == 1 else q_valid.transpose(0, 1)  # [Tq] or [Tq, B]
    keep = keep.reshape(keep.shape[0], -1, 1, 1)
    return torch.where(keep, out, torch.zeros((), dtype=out.dtype))


class ContextParallelCoreAttention(torch.nn.Module):
    """megatron-core's ``core_attention`` slot (``DotProductAttention``'s constructor and forward signature),
    causal, for CP >= 1 with the zig-zag layout, THD (packed, padded ``cu_seqlens``) or SBHD input, GQA.

    The CP group is megatron's (``parallel_state``) unless ``pg_collection`` carries one. No dropout, no
    attention bias, no sliding window, causal masks only: anything else raises."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__()
        from megatron.core import parallel_state
        from megatron.core.transformer.enums import AttnMaskType

        self.config = config
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"ContextParallelCoreAttention is causal only, got attn_mask_type={attn_mask_type}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"ContextParallelCoreAttention has no dropout, got attention_dropout={dropout}")
        if getattr(config, "window_size", None) is not None:
            raise ValueError(f"ContextParallelCoreAttention has no sliding window, got {config.window_size}")
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
        cp = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        self.cp_group = cp if cp is not None else parallel_state.get_context_parallel_group()

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """THD: query [T, H, D], key / value [T, G, D] -> [T, H * D]. SBHD: [s, B, H, D] -> [s, B, H * D]."""
        if attention_bias is not None:
            raise ValueError("ContextParallelCoreAttention has no attention bias")
        group = self.cp_group
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if thd:
            padded = packed_seq_params.cu_seqlens_q_padded
            valid_cu = packed_seq_params.cu_seqlens_q
            padded = valid_cu if padded is None else padded
            padded_lengths, valid_lengths = torch.diff(padded).cpu(), torch.diff(valid_cu).cpu()  # [B], [B]
            seq, pos = zigzag_positions(padded_lengths, rank, cp)  # [T] each
            valid = pos < valid_lengths[seq]  # [T]
            q, k, v = query[:, None], key[:, None], value[:, None]  # [T, 1, H|G, D]
        else:
            s_local = query.shape[0]
            seq, pos = zigzag_positions(torch.tensor([s_local * cp]), rank, cp)  # [s]: one sequence per row
            valid = torch.ones_like(pos, dtype=torch.bool)  # [s]
            q, k, v = query, key, value  # [s, B, H|G, D]
        if cp > 1:
            k = gather_along_dim0(k, group)  # [cp * T, B, G, D]
            v = gather_along_dim0(v, group)  # [cp * T, B, G, D]
            lengths = padded_lengths if thd else torch.tensor([s_local * cp])
            shards = [zigzag_positions(lengths, r, cp) for r in range(cp)]  # the keys in all_gather's rank order
            k_seq, k_pos = torch.cat([s for s, _ in shards]), torch.cat([p for _, p in shards])  # [cp * T]
            k_valid = k_pos < valid_lengths[k_seq] if thd else torch.ones_like(k_pos, dtype=torch.bool)
        else:
            k_seq, k_pos, k_valid = seq, pos, valid
        device = query.device
        out = causal_attention_by_position(
            q,
            k,
            v,
            seq.to(device),
            pos.to(device),
            k_seq.to(device),
            k_pos.to(device),
            k_valid.to(device),
            valid.to(device),
            self.softmax_scale,
        )  # fmt: skip  [T|s, 1|B, H, D]
        if thd:
            return out[:, 0].reshape(out.shape[0], -1)  # [T, H * D]
        return out.reshape(out.shape[0], out.shape[1], -1)  # [s, B, H * D]
