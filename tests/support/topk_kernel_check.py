"""Correctness check of the Triton kernel of the Top-K divergences; exits non-zero on a mismatch.

    TRITON_INTERPRET=1 python -m tests.support.topk_kernel_check --device cpu      # Triton's interpreter (slow, small)
    python -m tests.support.topk_kernel_check --device cuda                         # compiled, adds the paper's V

It compares the kernel's row statistics with the torch backend's (fp64 logits as the truth) on vocab shards
(vocab_start_index > 0), strided logits, -inf / NaN rows and tile-boundary widths, then D of
``topk_divergence(backend="triton")`` with the float64 full-vocabulary reference. tests/core/test_topk_divergence.py
runs the CPU form.
"""

from __future__ import annotations

import argparse

import torch

from tests.support.topk_reference import random_topk_case, reference_topk_divergence
from verl_cppo.core.topk_divergence import torch_row_statistics
from verl_cppo.kernels import topk_divergence
from verl_cppo.kernels.topk_statistics import row_statistics_triton


def _log_softmax_and_other(stats, held):
    """log softmax at the held ids [N, J] and the mass outside them [N], from RowStatistics."""
    shift, s, z, e = (t.cpu().double() for t in stats)
    lsm = z - shift[:, None] - s.log()[:, None]
    other = (s - torch.where(held, e, 0.0).sum(dim=1)) / s
    return lsm, other


def check_statistics(device: str, n: int, v: int, k: int, dtype, *, block_v=None, start=0, stride=False) -> float:
    """Kernel statistics against fp64 truth: log softmax at the ids, the other mass (relative), the logits."""
    gen = torch.Generator().manual_seed(v * 31 + k)
    logits, sampled, ids, *_ = random_topk_case(gen, n, v, k, dtype=torch.float64, scale=4.0)
    logits[0, : v // 2] = float("-inf")  # a half-masked row
    if n > 2:
        logits[2] = float("-inf")  # an all -inf row: s = 0
    if n > 3:
        logits[3, -1] = logits[3].max() + 80.0  # a far outlier in the last tile: the row is streamed again
    ids = torch.cat([ids, sampled[:, None]], dim=1) + start  # [N, K+1] global ids of a shard at `start`
    ids[:, 0] = torch.where(torch.arange(n) % 3 == 0, -1, ids[:, 0])  # padding
    ids[:, 1] = torch.where(torch.arange(n) % 4 == 1, start + v + 5, ids[:, 1])  # held by another shard
    if start > 0:
        ids[:, 2] = torch.where(torch.arange(n) % 4 == 2, start - 1, ids[:, 2])  # below this shard
    ids[:, -1] = ids[:, 2]  # a duplicate id
    x = logits.to(dtype)
    if stride:  # a column-strided view: logits[:, ::2] of a wider tensor
        wide = torch.zeros(n, 2 * v, dtype=dtype)
        wide[:, ::2] = x
        x = wide[:, ::2]
    held = (ids >= start) & (ids < start + v)
    unique = held.clone()
    unique[:, -1] = False  # count the duplicate once in the other mass
    got = row_statistics_triton(x.to(device), ids.to(device), start, block_v=block_v)
    truth = torch_row_statistics(x.double(), ids, start)  # fp64 from the same (rounded) logits
    assert torch.equal(got[2].cpu().double(), truth.z), "gathered logits differ"
    lsm, other = _log_softmax_and_other(got, unique)
    lsm0, other0 = _log_softmax_and_other(truth, unique)
    live = truth.s > 0  # rows with a finite logit
    finite = torch.isfinite(truth.z)  # held ids whose logit is not -inf
    err = (lsm[finite] - lsm0[finite]).abs().max().item()
    assert err < 2e-6, f"log-softmax at the ids off by {err}"
    rel = ((other - other0).abs() / other0.clamp(min=1e-300))[live].max().item()
    assert rel < 1e-5, f"mass outside the ids off by a relative {rel}"
    if n > 2:
        assert got[1][2].item() == 0.0, "an all -inf row must have s = 0"
    return max(err, rel)


def check_divergence(device: str, n: int, v: int, k: int, dtype) -> float:
    gen = torch.Generator().manual_seed(n + v + k)
    case = random_topk_case(gen, n, v, k, dtype=dtype)
    worst = 0.0
    for kind in ("tv", "kl"):
        want = torch.tensor(reference_topk_divergence(*case[:4], kind, case[4]), dtype=torch.float64)
        args = [t.to(device) for t in case]
        got = topk_divergence(*args[:4], kind, mu_sampled_logprobs=args[4], backend="triton").cpu().double()
        err = (got - want).abs().max().item()
        assert err < 3e-6, f"D ({kind}, {dtype}) off by {err}"
        worst = max(worst, err)
    return worst


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main() -> None:
    args = parser().parse_args()
    dev = args.device
    worst = 0.0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        worst = max(worst, check_statistics(dev, 6, 37, 3, dtype, block_v=16))  # 3 tiles, ragged last one
        worst = max(worst, check_statistics(dev, 5, 64, 4, dtype, block_v=32, start=1000))  # exact tiles
    worst = max(worst, check_statistics(dev, 4, 300, 20, torch.bfloat16, start=77, stride=True))
    worst = max(worst, check_divergence(dev, 8, 200, 20, torch.bfloat16))
    worst = max(worst, check_divergence(dev, 8, 90, 1, torch.float32))
    if dev != "cpu":  # compiled only: the paper's vocabulary and a many-row launch
        worst = max(worst, check_statistics(dev, 64, 151936, 20, torch.bfloat16, start=151936))
        worst = max(worst, check_divergence(dev, 16, 151936, 20, torch.bfloat16))
        worst = max(worst, check_statistics(dev, 4099, 1000, 20, torch.bfloat16))
    print(f"kernel check passed on {dev}: worst |error| {worst:.2e}")


if __name__ == "__main__":
    main()
