"""The CPU context-parallel core attention equals one-rank causal attention (float64, gloo, CP = 1, 2, 3).

Reference: a float64 loop over sequences and heads, softmax(q k^T * scale) over the valid tokens at positions
<= the query's, on the whole unsharded sequences. The inputs are cut into zig-zag shards by verl's own
``preprocess_thd_engine`` (THD: padded ``cu_seqlens``, GQA) or by an inline chunking (SBHD), so the module's
layout code is not its own reference. Outputs and the gradients of q, k, v (through the K / V all-gather's
backward) must equal the reference's shards to float64 rounding: every value is a softmax-weighted sum of at
most 32 terms of size <= 4, so 1e-10 leaves orders of magnitude of room above float64's 1e-16 and catches any
wrong key (a wrong key changes outputs by O(0.1)).
"""

from __future__ import annotations

import pytest
import torch

from tests.support.distributed import run_ranks
from verl_cppo.testing.cp_attention import ContextParallelCoreAttention, zigzag_positions

HEADS, GROUPS, DIM = 4, 2, 8
TOL = 1e-10
LENGTHS = [5, 12, 1, 8]  # THD sequences: padded to multiples of 2 cp (a pad-only chunk included at cp = 3)


def reference_attention(q, k, v, lengths, scale):
    """Per sequence, per head, float64: q [L, H, D], k / v [L, G, D] lists -> [L, H, D] outputs."""
    outs = []
    for qs, ks, vs, n in zip(q, k, v, lengths, strict=True):
        out = torch.zeros_like(qs)
        for h in range(HEADS):
            g = h // (HEADS // GROUPS)
            for i in range(n):
                scores = torch.stack([(qs[i, h] * ks[j, g]).sum() * scale for j in range(i + 1)])
                weights = torch.softmax(scores, 0)
                out[i, h] = sum(weights[j] * vs[j, g] for j in range(i + 1))
        outs.append(out)
    return outs


def _config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS, num_query_groups=GROUPS,
        kv_channels=DIM, attention_dropout=0.0, hidden_dropout=0.0, context_parallel_size=1,
    )  # fmt: skip


def _module():
    from megatron.core.transformer.enums import AttnMaskType

    return ContextParallelCoreAttention(_config(), 1, AttnMaskType.causal, "self").double()


def _thd_rank(rank, world, cu_seqlens_valid):
    from megatron.core import parallel_state
    from verl.models.mcore.util import preprocess_thd_engine

    parallel_state.initialize_model_parallel(context_parallel_size=world)
    gen = torch.Generator().manual_seed(0)
    q = [torch.randn(n, HEADS, DIM, generator=gen, dtype=torch.float64) for n in LENGTHS]
    k = [torch.randn(n, GROUPS, DIM, generator=gen, dtype=torch.float64) for n in LENGTHS]
    v = [torch.randn(n, GROUPS, DIM, generator=gen, dtype=torch.float64) for n in LENGTHS]
    w = [torch.randn(n, HEADS, DIM, generator=gen, dtype=torch.float64) for n in LENGTHS]  # d loss / d out

    # reference grads: autograd through the float64 loop
    leaves = [[t.clone().requires_grad_(True) for t in xs] for xs in (q, k, v)]
    ref_out = reference_attention(*leaves, LENGTHS, DIM**-0.5)
    sum((o * wi).sum() for o, wi in zip(ref_out, w)).backward()

    def shard(rows):  # verl's zig-zag split of per-token [L, ...] rows: [T_local, ...]
        nested = torch.nested.as_nested_tensor([r.detach() for r in rows], layout=torch.jagged)
        local, params, _ = preprocess_thd_engine(nested, pre_process=True)
        return local.squeeze(0), params

    q_local, params = shard(q)
    if cu_seqlens_valid:  # TE's meaning: cu_seqlens_q = valid lengths, cu_seqlens_q_padded = the layout
        valid = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
        params.cu_seqlens_q = params.cu_seqlens_kv = valid
    k_local, v_local, w_local = shard(k)[0], shard(v)[0], shard(w)[0]
    inputs = [t.clone().requires_grad_(True) for t in (q_local, k_local, v_local)]
    out = _module()(*inputs, None, packed_seq_params=params)  # [T_local, H * D]
    (out.reshape(w_local.shape) * w_local).sum().backward()
    seq, pos = zigzag_positions(params.cu_seqlens_q_padded.diff(), rank, world)
    real = pos < torch.tensor(LENGTHS)[seq]  # [T_local] tokens of the sequences, not CP padding
    return {
        "out": (out.reshape(w_local.shape) - shard(ref_out)[0])[real].abs().max(),
        "grads": [(x.grad - shard([t.grad for t in leaf])[0]).abs().max() for x, leaf in zip(inputs, leaves)],
        "padding_rows_zero": bool((out[~real] == 0).all()),
        "moved": float(out.abs().max()),
        "tokens": int(q_local.shape[0]),
    }


@pytest.mark.parametrize("cu_seqlens_valid", [True, False], ids=["valid_cu_seqlens", "verl_padded_cu_seqlens"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_thd_zigzag_gqa_equals_one_rank_attention(world, cu_seqlens_valid):
    """verl passes cu_seqlens_q = cu_seqlens_q_padded (its CP pads are tokens, after every real one: no real
    query sees them); with TE's meaning (cu_seqlens_q = the valid lengths) pads are masked and return 0. The
    gradients must match in both: a pad's output never reaches the loss, so pads get no gradient either way."""
    results = run_ranks(_thd_rank, world, cu_seqlens_valid, time_limit_s=120)
    padded = sum(-(-n // (2 * world)) * 2 * world if world > 1 else n for n in LENGTHS)
    assert sum(r["tokens"] for r in results) == padded  # verl padded each sequence to a multiple of 2 cp
    for rank, r in enumerate(results):
        assert r["out"] <= TOL, (rank, r)
        assert max(r["grads"]) <= TOL, (rank, r)
        assert r["padding_rows_zero"] or not cu_seqlens_valid, (rank, r)
        assert r["moved"] > 0.1, (rank, r)


def _sbhd_rank(rank, world):
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(context_parallel_size=world)
    gen = torch.Generator().manual_seed(1)
    batch, length = 2, 4 * world
    q = torch.randn(length, batch, HEADS, DIM, generator=gen, dtype=torch.float64)
    k = torch.randn(length, batch, GROUPS, DIM, generator=gen, dtype=torch.float64)
    v = torch.randn(length, batch, GROUPS, DIM, generator=gen, dtype=torch.float64)
    w = torch.randn(length, batch, HEADS, DIM, generator=gen, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    per_row = [reference_attention(*[[x[:, b]] for x in leaves], [length], DIM**-0.5)[0] for b in range(batch)]
    ref_out = torch.stack(per_row, dim=1)  # [S, B, H, D]
    (ref_out * w).sum().backward()

    def shard(x):  # chunks r and 2 cp - 1 - r of the sequence dim
        chunks = x.chunk(2 * world, dim=0)
        return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=0)

    inputs = [shard(t).clone().requires_grad_(True) for t in (q, k, v)]
    out = _module()(*inputs, None)  # [S / cp, B, H * D]
    (out.reshape(shard(w).shape) * shard(w)).sum().backward()
    return {
        "out": (out.reshape(shard(w).shape) - shard(ref_out)).abs().max(),
        "grads": [(x.grad - shard(leaf.grad)).abs().max() for x, leaf in zip(inputs, leaves)],
    }


@pytest.mark.parametrize("world", [1, 2])
def test_sbhd_zigzag_gqa_equals_one_rank_attention(world):
    for rank, r in enumerate(run_ranks(_sbhd_rank, world, time_limit_s=120)):
        assert r["out"] <= TOL and max(r["grads"]) <= TOL, (rank, r)


def test_zigzag_positions_of_the_docstring_example():
    assert zigzag_positions(torch.tensor([8]), 0, 2)[1].tolist() == [0, 1, 6, 7]
    assert zigzag_positions(torch.tensor([8]), 1, 2)[1].tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="divisible by 2 \\* cp = 4"):
        zigzag_positions(torch.tensor([6]), 0, 2)
