"""The CPU Ulysses pieces (``verl_cppo.testing.cpu_ulysses``): the packed attention against a float64
loop of softmax(q k^T / sqrt(d)) v per sequence (causal, grouped-query heads), the all-to-all on 2 gloo ranks
against the list exchange it replaces. Their use under Ulysses SP = 2 is
checked end to end by tests/e2e/test_multirank_equivalence.py."""

import math

import pytest
import torch

from verl_cppo.testing.cpu_ulysses import segment_starts, varlen_causal_attention


def reference(q, k, v, lengths):
    """q [T, H, D], k / v [T, Hk, D], sequences of `lengths` packed back to back -> [T, H, D] float64."""
    q, k, v = q.double(), k.double(), v.double()
    heads, groups = q.shape[1], q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    start = 0
    for n in lengths:
        for h in range(heads):
            for i in range(n):
                scores = [
                    float(q[start + i, h] @ k[start + j, h // groups]) / math.sqrt(q.shape[-1]) for j in range(i + 1)
                ]
                weights = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
                out[start + i, h] = sum(w * v[start + j, h // groups] for j, w in enumerate(weights))
        start += n
    return out


def float32_bound(q, k, v, longest):
    """A bound on |float32 attention - float64 reference| per output entry (u = 2^-24): a score q.k / sqrt(d) of
    d terms is off by <= (d + 2) u |q| |k| / sqrt(d) (Cauchy-Schwarz bounds sum |q_i k_i|); softmax turns score
    errors ds into relative weight errors <= 2 ds, plus <= (n + 4) u of its own rounding (n <= longest); the
    weighted sum of <= n values rounds by <= n u sum w |v|: |d out| <= max |v| (2 ds + (2 n + 4) u)."""
    u, d = 2.0**-24, q.shape[-1]
    ds = (d + 2) * u * float(q.double().norm(dim=-1).max() * k.double().norm(dim=-1).max()) / math.sqrt(d)
    return float(v.abs().max()) * (2 * ds + (2 * longest + 4) * u)


def test_segments_are_runs_of_consecutive_positions():
    positions = torch.tensor([0, 1, 2, 0, 1, 0, 5, 6, 0, 0])
    assert segment_starts(positions).tolist() == [0, 3, 5, 6, 8, 9]


def test_packed_attention_equals_per_sequence_reference():
    gen = torch.Generator().manual_seed(0)
    lengths = [4, 1, 6, 3]
    total = sum(lengths)
    q = torch.randn(total, 4, 8, generator=gen)  # [T, H, D]
    k, v = torch.randn(total, 2, 8, generator=gen), torch.randn(total, 2, 8, generator=gen)  # [T, Hk, D]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]  # [1, T]
    out = varlen_causal_attention(q[None], k[None], v[None], None, total, position_ids=positions)  # [1, T, H, D]
    assert out.shape == (1, total, 4, 8)
    # float32 against float64: float32_bound (~4e-5 here), 2x margin; attending across a boundary moves
    # outputs by ~1 (checked below at 1e-3)
    atol = 2 * float32_bound(q, k, v, total)
    assert torch.allclose(out[0].double(), reference(q, k, v, lengths), rtol=0, atol=atol)
    # one sequence = plain causal attention; a wrong packing would attend across the boundary and differ
    whole = varlen_causal_attention(q[None], k[None], v[None], None, total, position_ids=torch.arange(total)[None])
    assert torch.allclose(whole[0].double(), reference(q, k, v, [total]), rtol=0, atol=atol)
    assert not torch.allclose(whole, out, atol=1e-3)


def test_padding_mask_and_dropout_are_refused():
    x = torch.zeros(2, 3, 2, 4)
    with pytest.raises(ValueError, match="padding attention_mask of shape \\(2, 3\\)"):
        varlen_causal_attention(x, x, x, torch.tensor([[1, 1, 0], [1, 1, 1]]), 3)
    with pytest.raises(ValueError, match=r"dropout=0\.1"):
        varlen_causal_attention(x, x, x, None, 3, dropout=0.1)


def _exchange(rank, world, scatter_dim, gather_dim):
    import torch.distributed as dist

    from verl_cppo.testing.cpu_ulysses import all_to_all_tensor

    mine = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 4, 6) + 1000 * rank  # [2, 4, 6]
    out = all_to_all_tensor(mine, scatter_dim, gather_dim, group=dist.group.WORLD)
    waited = all_to_all_tensor(mine, scatter_dim, gather_dim, group=dist.group.WORLD, async_op=True)()
    return out, waited


@pytest.mark.parametrize(("scatter_dim", "gather_dim"), [(1, 2), (2, 1), (0, 1)])
def test_all_to_all_through_all_to_all_single_matches_the_list_exchange(scatter_dim, gather_dim):
    """Rank r receives chunk r of every rank's scatter dim, concatenated in rank order along the gather dim
    (what verl's list-based ``dist.all_to_all`` version returns), synchronously and with async_op."""
    from tests.support.distributed import run_ranks

    world = 2
    results = run_ranks(_exchange, world, scatter_dim, gather_dim, time_limit_s=60)
    inputs = [torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 4, 6) + 1000 * r for r in range(world)]
    for rank, (out, waited) in enumerate(results):
        expected = torch.cat([torch.tensor_split(x, world, scatter_dim)[rank] for x in inputs], dim=gather_dim)
        assert torch.equal(torch.tensor(out), expected) and torch.equal(torch.tensor(waited), expected)
