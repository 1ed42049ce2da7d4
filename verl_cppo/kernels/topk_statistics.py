"""Fused Triton kernel for the row statistics of the Top-K divergences (``verl_cppo.core.topk_divergence``).

One program per logits row. It first loads the logits at the row's J = K+1 global ids that this vocab shard
holds and takes the shift c = max(those logits, the first tile): pi's largest logit is almost always among
mu's top-K and the sampled token, so c is the row max or close to it. It then streams the row once in tiles
of BLOCK_V columns (the next tile's load in flight while one is summed), each lane keeping a compensated
(Kahan) fp32 sum of exp(x - c), with no per-tile reduction or rescaling; the lanes are reduced once, in
fp64. Only where the sum exceeds V * 2**24 (a logit more than ~17 + ln V above c) is the row streamed
again, by a second small launch that skips every other row, with c = its max; the log-probs are thus off
by at most ~6e-8 * (max - c) < 2e-6 from the rounding of exp's argument.

The kernel also returns e_j = exp(z_j - c) computed by the very expression summed in the loop, so that
``s - sum_j e_j`` (pi's "other" mass, times s) cancels exactly instead of losing fp32 precision.
Extra memory: O(N * J); the logits are read once, so the kernel is bound by memory bandwidth (N=8192,
V=151936 bf16 is 2.5 GB: about 0.6 ms at 4.2 TB/s). The torch backend of ``verl_cppo.core.topk_divergence`` computes the
same statistics and is the reference in tests. With TRITON_INTERPRET=1 set before triton is imported, the
kernel runs on CPU tensors in Triton's interpreter (tests only: slow).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["BLOCK_V", "NUM_WARPS", "row_statistics_triton"]

BLOCK_V = 4096
"""Columns per tile (a power of 2); with NUM_WARPS = 8 each thread loads 16 values per tile, as two 16-byte
loads when Triton sees the row start 16-byte aligned (row stride and shard offset multiples of 8 bf16 values,
as for Qwen's V = 151936 and Megatron's padded vocab shards). Compiled for sm_90: 80 registers, no spills."""
NUM_WARPS = 8
_LOG2E = tl.constexpr(1.4426950408889634)
_RESCUE_FACTOR = tl.constexpr(16777216.0)  # 2**24: see _rescue_kernel


@triton.jit
def _sum_exp(row_ptr, V, stride_col, shift, BLOCK_V: tl.constexpr):
    """sum_v exp(x_v - shift) over one row in fp64: per-lane Kahan sums in fp32, the next tile prefetched."""
    cols = tl.arange(0, BLOCK_V)
    acc = tl.zeros([BLOCK_V], tl.float32)
    comp = tl.zeros([BLOCK_V], tl.float32)
    nxt = tl.load(row_ptr + cols * stride_col, mask=cols < V, other=float("-inf"))
    for start in range(BLOCK_V, V + BLOCK_V, BLOCK_V):
        x = nxt.to(tl.float32)
        offs = start + cols
        nxt = tl.load(row_ptr + offs * stride_col, mask=offs < V, other=float("-inf"))  # in flight meanwhile
        y = tl.exp2((x - shift) * _LOG2E) - comp
        t = acc + y
        comp = (t - acc) - y
        acc = t
    return tl.sum(acc.to(tl.float64) - comp.to(tl.float64), axis=0)


@triton.jit
def _row_max(row_ptr, V, stride_col, BLOCK_V: tl.constexpr):
    cols = tl.arange(0, BLOCK_V)
    top = tl.full([BLOCK_V], float("-inf"), tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        top = tl.maximum(top, tl.load(row_ptr + offs * stride_col, mask=offs < V, other=float("-inf")).to(tl.float32))
    return tl.max(top, axis=0)


@triton.jit
def _row_statistics_kernel(
    logits_ptr,  # [N, V] fp16 / bf16 / fp32, any strides
    ids_ptr,  # [N, J] int64 global ids, < 0: none
    shift_ptr,  # [N] fp32 out: the shift c (0 for an all -inf row)
    s_ptr,  # [N] fp64 out: sum_v exp(x_v - c)
    z_ptr,  # [N, J] fp32 out: logit at each id held by this shard, else -inf
    e_ptr,  # [N, J] fp32 out: exp(z - c), exactly as summed (0 where not held)
    V,
    J,
    vocab_start,
    stride_row,
    stride_col,
    stride_ids,
    stride_out,
    BLOCK_V: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    j = tl.arange(0, BLOCK_J)
    ids = tl.load(ids_ptr + row * stride_ids + j, mask=j < J, other=-1)
    local = ids - vocab_start
    held = (ids >= 0) & (local >= 0) & (local < V) & (j < J)
    z = tl.load(row_ptr + local * stride_col, mask=held, other=float("-inf")).to(tl.float32)

    cols = tl.arange(0, BLOCK_V)
    first = tl.load(row_ptr + cols * stride_col, mask=cols < V, other=float("-inf")).to(tl.float32)
    shift = tl.maximum(tl.max(z, axis=0), tl.max(first, axis=0))
    shift = tl.where(shift == float("-inf"), 0.0, shift)  # an all -inf row: every exp is 0, s = 0
    s = _sum_exp(row_ptr, V, stride_col, shift, BLOCK_V)  # large if a logit is far above c: see _rescue_kernel
    e = tl.exp2((z - shift) * _LOG2E)

    tl.store(shift_ptr + row, shift)
    tl.store(s_ptr + row, s)
    tl.store(z_ptr + row * stride_out + j, z, mask=j < J)
    tl.store(e_ptr + row * stride_out + j, e, mask=j < J)


@triton.jit
def _rescue_kernel(
    logits_ptr, shift_ptr, s_ptr, z_ptr, e_ptr, V, J, stride_row, stride_col, stride_out,
    BLOCK_V: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    """Redo with c = the row max (two passes) the rows whose s > V * 2**24: some logit exceeds c by more than
    ~17 + ln V, where the rounding of exp's argument (relative to x - c) would cost precision or overflow;
    and rows with a NaN / +inf logit. A separate launch keeps the main loop single and its registers few."""
    row = tl.program_id(0).to(tl.int64)
    if not (tl.load(s_ptr + row) <= V * _RESCUE_FACTOR):
        row_ptr = logits_ptr + row * stride_row
        shift = _row_max(row_ptr, V, stride_col, BLOCK_V)
        j = tl.arange(0, BLOCK_J)
        z = tl.load(z_ptr + row * stride_out + j, mask=j < J, other=float("-inf"))
        tl.store(shift_ptr + row, shift)
        tl.store(s_ptr + row, _sum_exp(row_ptr, V, stride_col, shift, BLOCK_V))
        tl.store(e_ptr + row * stride_out + j, tl.exp2((z - shift) * _LOG2E), mask=j < J)


def _interpreted() -> bool:
    return type(_row_statistics_kernel).__name__ == "InterpretedFunction"


def row_statistics_triton(
    logits: torch.Tensor, ids: torch.Tensor, vocab_start_index: int = 0, *, block_v: int | None = None, num_warps=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shift [N] fp32, s [N] fp64, z [N, J] fp32, e [N, J] fp32) for logits [N, V] and global ids [N, J].

    See ``verl_cppo.core.topk_divergence.RowStatistics`` for the meaning; block_v / num_warps override the tuning.
    """
    if not logits.is_cuda and not _interpreted():
        raise ValueError(
            f"topk_divergence: the Triton kernel got {logits.device} tensors; on CPU it runs only in Triton's "
            "interpreter (TRITON_INTERPRET=1 set before triton is imported)"
        )
    n, v = logits.shape
    j = ids.shape[1]
    ids = ids.long().contiguous()  # [N, J]
    shift = torch.empty(n, dtype=torch.float32, device=logits.device)  # [N]
    s = torch.empty(n, dtype=torch.float64, device=logits.device)  # [N]
    z = torch.empty(n, j, dtype=torch.float32, device=logits.device)  # [N, J]
    e = torch.empty(n, j, dtype=torch.float32, device=logits.device)  # [N, J]
    if n == 0:
        return shift, s, z, e
    blocks = {
        "BLOCK_V": block_v or min(BLOCK_V, triton.next_power_of_2(v)),
        "BLOCK_J": max(2, triton.next_power_of_2(j)),
        "num_warps": num_warps or NUM_WARPS,
    }
    stride_row, stride_col = logits.stride()
    _row_statistics_kernel[(n,)](
        logits, ids, shift, s, z, e, v, j, vocab_start_index, stride_row, stride_col, ids.stride(0), z.stride(0),
        **blocks,
    )  # fmt: skip
    _rescue_kernel[(n,)](logits, shift, s, z, e, v, j, stride_row, stride_col, z.stride(0), **blocks)
    return shift, s, z, e
