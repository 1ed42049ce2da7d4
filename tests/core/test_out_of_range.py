"""Finite but out-of-range log-probs (above 0 by rounding, or absurd: 0.5, 88.8, 1e30, -1e30, the float's
max) never give a non-finite or out-of-range divergence, for every divergence (the registered loss's metrics on them:
tests/test_loss.py). Expected values are hand-computed: a log-prob above 0 counts as 0 (probability 1)."""

import math

import pytest
import torch

from verl_cppo.core.divergence import BINARY_DIVERGENCES, KL_MAX, binary_divergence
from verl_cppo.core.topk_divergence import topk_divergence

BIG = torch.finfo(torch.float32).max
OUT_OF_RANGE = [1e-7, 0.5, 88.8, 1e30, BIG, -1e30, -BIG]  # finite; all but the last two above 0
LOG_HALF = math.log(0.5)


def test_binary_tv_counts_a_log_prob_above_0_as_0_by_hand():
    log_pi = torch.tensor([0.5, 1e30, 1e-7, LOG_HALF, 88.8, -1e30], dtype=torch.float64)
    log_mu = torch.tensor([LOG_HALF, LOG_HALF, 0.0, 3.0, 88.8, 0.5], dtype=torch.float64)
    # |1 - 1/2|, |1 - 1/2|, |1 - 1|, |1/2 - 1|, |1 - 1|, |0 - 1|
    expected = torch.tensor([0.5, 0.5, 0.0, 0.5, 0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(binary_divergence("binary_tv", log_pi, log_mu), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", BINARY_DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_every_binary_divergence_is_finite_and_in_range(name, dtype):
    values = torch.tensor([*OUT_OF_RANGE, 0.0, LOG_HALF, -1e-3], dtype=torch.float64)
    log_pi, log_mu = (v.to(dtype) for v in torch.cartesian_prod(values, values).T)
    d = binary_divergence(name, log_pi, log_mu).double()
    top = 1.0 if name == "binary_tv" else KL_MAX
    assert torch.isfinite(d).all() and (d >= 0).all() and (d <= top).all(), (name, d)
    # a log-prob above 0 is the same as 0
    clamped = binary_divergence(name, log_pi.clamp(max=0.0), log_mu.clamp(max=0.0)).double()
    torch.testing.assert_close(d, clamped, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["tv", "kl"])
def test_every_topk_divergence_is_finite_and_in_range(kind):
    gen = torch.Generator().manual_seed(0)
    n, v, k = len(OUT_OF_RANGE), 11, 3
    logits = torch.randn(n, v, generator=gen)
    ids = torch.stack([torch.randperm(v, generator=gen)[: k + 1] for _ in range(n)])  # [N, K+1] distinct
    topk_ids, sampled = ids[:, :k], ids[:, k]
    bad = torch.tensor(OUT_OF_RANGE, dtype=torch.float32)
    topk_logprobs = torch.stack([bad, bad.flip(0), torch.full((n,), -1.0)], dim=1)  # [N, K]
    d = topk_divergence(logits, sampled, topk_ids, topk_logprobs, kind, mu_sampled_logprobs=bad.roll(1))
    top = 1.0 if kind == "tv" else KL_MAX
    assert torch.isfinite(d).all() and (d >= 0).all() and (d <= top).all(), d
