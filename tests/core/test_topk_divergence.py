"""verl_cppo.core.topk_divergence (through verl_cppo.kernels.topk_divergence's backend choice) against the float64
full-vocabulary reference (tests/support/topk_reference.py), hand-computed values, the binary divergences (K =
0), its error messages, tensor-parallel vocab shards (gloo, 2 and 4 ranks) and the Triton kernel
(verl_cppo.kernels.topk_statistics) in Triton's interpreter (tests/support/topk_kernel_check.py)."""

from __future__ import annotations

import math
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.support import REPO_ROOT
from tests.support.topk_reference import random_topk_case, reference_topk_divergence
from tests.support.tp_topk_worker import BAD_ID, TP_CASE, tp_case, tp_worker
from verl_cppo.core.divergence import KL_MAX, binary_kl, binary_tv
from verl_cppo.kernels import topk_divergence

ROOT = Path(REPO_ROOT)
KINDS = ("tv", "kl")
# fp32 row statistics: |error of p_pi| ~ 1e-7 relative, so D is off by ~1e-6 at most; fp64 logits stay fp64.
ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}


def _check(logits, sampled, ids, lps, lp_sampled, kind, atol, **kw):
    got = topk_divergence(logits, sampled, ids, lps, kind, mu_sampled_logprobs=lp_sampled, **kw)
    want = torch.tensor(reference_topk_divergence(logits, sampled, ids, lps, kind, lp_sampled), dtype=torch.float64)
    assert got.dtype == torch.float32 and got.shape == (logits.shape[0],)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=1e-5)
    return got


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_full_vocabulary_reference(gen, kind, dtype):
    """Random rows; the sampled token is inside mu's top-K in even rows and outside it in odd rows."""
    case = random_topk_case(gen, 48, 300, 20, dtype=dtype)
    d = _check(*case, kind, ATOL[dtype], backend="torch")
    assert (d > 1e-3).all()  # a real comparison: pi and mu differ everywhere


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 2, 7])
def test_small_k_and_wide_spread(gen, kind, k):
    case = random_topk_case(gen, 32, 97, k, scale=6.0, noise=1.5)
    _check(*case, kind, ATOL[torch.float32], backend="torch")


@pytest.mark.parametrize("kind", KINDS)
def test_ties(gen, kind):
    """Integer logits (many exact ties in pi's max and in mu's top-K) and tied mu log-probs."""
    logits, sampled, ids, lps, lp_s = random_topk_case(gen, 32, 64, 8)
    logits = torch.randint(-2, 3, logits.shape, generator=gen).float()  # [N, V] ties everywhere
    lps = torch.full_like(lps, math.log(0.1))  # eight ids at 0.1 each: mu's other = 0.2
    _check(logits, sampled, ids, lps, lp_s, kind, ATOL[torch.float32], backend="torch")


@pytest.mark.parametrize("kind", KINDS)
def test_extreme_logits(gen, kind):
    """Near one-hot pi (inside or outside A'), huge magnitudes, -inf columns, mu mass summing past 1, -inf mu."""
    logits, sampled, ids, lps, lp_s = random_topk_case(gen, 40, 128, 6, scale=40.0, noise=5.0)
    logits[0::5] *= 300.0  # |logits| up to ~5e4: one-hot rows
    logits[1::5, 100:] = float("-inf")  # masked vocabulary columns (a padded vocab)
    logits[2::5, ids[2::5, 0]] = float("-inf")  # mu's top-1 impossible under pi: KL = KL_MAX
    lps[3::5] += 0.01  # mu's top-K mass above 1 (rounding): the other bucket clamps to 0
    lps[4::5, 1:] = float("-inf")  # mu puts no mass there
    got = _check(logits, sampled, ids, lps, lp_s, kind, 2e-6, backend="torch")
    if kind == "kl":
        assert (got[2::5] == KL_MAX).all()


@pytest.mark.parametrize("kind", KINDS)
def test_padding_duplicates_and_sampled_inside(gen, kind):
    """ids < 0 are ignored, a repeated id counts once with its first log-prob, a known y_t ignores its log-prob."""
    logits, sampled, ids, lps, lp_s = random_topk_case(gen, 24, 50, 6)
    ids[:, 4:] = -1  # padding entries (their log-probs are garbage)
    lps[:, 4:] = 5.0
    ids[1::3, 3] = ids[1::3, 1]  # a duplicate with a different log-prob: the first one counts
    lps[1::3, 3] = -0.01
    sampled[0::2] = ids[0::2, 2]  # sampled inside the (kept) top-K ...
    lp_s[0::2] = float("nan")  # ... so its own log-prob is never read
    _check(logits, sampled, ids, lps, lp_s, kind, ATOL[torch.float32], backend="torch")


def test_hand_computed():
    """pi = (.5, .25, .125, .125), mu top-2 = (.4, .4) at ids 0, 1, sampled 1: A'' = {0, 1, other}."""
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    args = (torch.tensor([1]), torch.tensor([[0, 1]]), torch.tensor([[0.4, 0.4]]).log())
    tv = 0.5 * (0.1 + 0.15 + 0.05)
    kl = 0.4 * math.log(0.4 / 0.5) + 0.4 * math.log(0.4 / 0.25) + 0.2 * math.log(0.2 / 0.25)
    assert topk_divergence(logits, *args, "tv").item() == pytest.approx(tv, abs=1e-7)
    assert topk_divergence(logits, *args, "kl").item() == pytest.approx(kl, abs=1e-7)


def test_other_floor_in_the_kl():
    """pi one-hot on id 0 (other mass e^-200), mu: 0.5 on id 0 and 0.5 elsewhere: pi's other is floored at 1e-6."""
    logits = torch.tensor([[0.0, -200.0, -200.0, -200.0]])
    args = (torch.tensor([0]), torch.tensor([[0]]), torch.tensor([[math.log(0.5)]]))
    kl = 0.5 * math.log(0.5 / 1.0) + 0.5 * math.log(0.5 / 1e-6)
    assert topk_divergence(logits, *args, "kl").item() == pytest.approx(kl, rel=1e-6)
    assert topk_divergence(logits, *args, "tv").item() == pytest.approx(0.5, abs=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_k0_is_the_binary_divergence(gen, kind):
    """Without top-K data A'' = {y_t, other}: topk_tv and topk_kl reduce to binary_tv and binary_kl."""
    logits, sampled, _, _, lp_s = random_topk_case(gen, 64, 40, 0, scale=2.0)
    empty = torch.zeros(64, 0, dtype=torch.long)
    got = topk_divergence(logits, sampled, empty, empty.float(), kind, mu_sampled_logprobs=lp_s)
    log_pi = torch.log_softmax(logits.double(), dim=-1).gather(1, sampled[:, None])[:, 0]
    binary = binary_tv if kind == "tv" else binary_kl
    torch.testing.assert_close(got.double(), binary(log_pi, lp_s.double()), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_inputs_give_the_maximum(kind):
    logits = torch.zeros(4, 8)
    logits[0, 3] = float("nan")
    logits[1, 5] = float("inf")
    logits[2] = float("-inf")
    ids, lps = torch.tensor([[0, 1]] * 4), torch.full((4, 2), math.log(0.3))
    lps[3, 1] = float("nan")
    got = topk_divergence(logits, torch.tensor([0] * 4), ids, lps, kind)
    assert got.tolist() == [1.0 if kind == "tv" else KL_MAX] * 4


def test_chunking_and_no_gradient(gen):
    logits, *rest = random_topk_case(gen, 37, 211, 5)
    logits.requires_grad_(True)
    full = topk_divergence(logits, *rest[:3], "kl", mu_sampled_logprobs=rest[3], backend="torch")
    assert not full.requires_grad
    for rows in (1, 4, 36):
        chunked = topk_divergence(logits, *rest[:3], "kl", mu_sampled_logprobs=rest[3], chunk_rows=rows)
        torch.testing.assert_close(chunked, full, atol=1e-7, rtol=0)


def test_errors_name_the_tensor(gen):
    logits, sampled, ids, lps, lp_s = random_topk_case(gen, 6, 30, 4)
    with pytest.raises(ValueError, match=r"mu_sampled_logprobs is None but sampled_ids\[1\]"):
        topk_divergence(logits, sampled, ids, lps, "tv")
    sampled[1::2] = ids[1::2, 0]  # every y_t inside its top-K: no log-prob needed
    topk_divergence(logits, sampled, ids, lps, "tv")
    bad = ids.clone()
    bad[4, 2] = 30
    with pytest.raises(ValueError, match=r"mu_topk_ids\[4, 2\] = 30 .* vocabulary is \[0, 30\)"):
        topk_divergence(logits, sampled, bad, lps, "tv")
    with pytest.raises(ValueError, match=r"sampled_ids\[3\] = -1"):
        topk_divergence(logits, torch.tensor([0, 1, 2, -1, 4, 5]), ids, lps, "tv", mu_sampled_logprobs=lp_s)
    with pytest.raises(ValueError, match="kind='js'"):
        topk_divergence(logits, sampled, ids, lps, "js")
    with pytest.raises(ValueError, match=r"mu_topk_logprobs must be a float tensor of shape \(6, 4\)"):
        topk_divergence(logits, sampled, ids, lps[:, :3], "tv")
    with pytest.raises(ValueError, match="vocab_start_index=5 needs a tp_group"):
        topk_divergence(logits, sampled, ids, lps, "tv", vocab_start_index=5)


# ----------------------------------------------------------------------------------------- tensor parallel
def test_tensor_parallel_vocab_shards(tmp_path):
    """gloo, 4 ranks and a 2-rank subgroup, uneven vocab shards: every rank gets the unsharded D."""
    ctx = mp.start_processes(tp_worker, args=(4, str(tmp_path / "init"), str(tmp_path)), nprocs=4, join=False,
                             start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "tensor-parallel workers timed out"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    logits, sampled, ids, lps, lp_s = tp_case()
    for size in (2, 4):
        for kind in KINDS:
            whole = topk_divergence(logits, sampled, ids, lps, kind, mu_sampled_logprobs=lp_s, backend="torch")
            want = torch.tensor(reference_topk_divergence(logits, sampled, ids, lps, kind, lp_s), dtype=torch.float64)
            torch.testing.assert_close(whole.double(), want, atol=2e-6, rtol=1e-5)
            for rank in range(size):
                got = torch.load(tmp_path / f"rank{rank}.pt")[(size, kind)]
                torch.testing.assert_close(got, whole, atol=1e-6, rtol=1e-6)
        for rank in range(size):
            msg = torch.load(tmp_path / f"rank{rank}.pt")[(size, "error")]
            assert f"mu_topk_ids[{BAD_ID[0]}, {BAD_ID[1]}] = {TP_CASE['v']}" in msg and "no rank of tp_group" in msg


# ----------------------------------------------------------------------------------------- Triton kernel
def test_triton_kernel_in_interpreter():
    """The fused kernel, run by Triton's interpreter on CPU, against the torch statistics and the reference."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "tests.support.topk_kernel_check", "--device", "cpu"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kernel check passed" in proc.stdout


def test_benchmark_runs_and_checks_against_the_reference(monkeypatch, capsys):
    """benchmarks/bench_topk_divergence.py at a toy size (CPU): it checks each variant, then prints the table."""
    argv = ["bench", "--device", "cpu", "--n", "16", "--v", "300", "--repeats", "1", "--kind", "kl"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "benchmarks" / "bench_topk_divergence.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "check torch   kl" in out and "check naive   kl" in out
    assert all(f"\n{name} " in out for name in ("naive", "torch", "floor"))
