"""Benchmark of the Top-K divergence (verl_cppo.core.topk_divergence): time and extra peak memory.

    python -m benchmarks.bench_topk_divergence                  # GPU: N=8192, V=151936, K=20, bf16 logits
    python -m benchmarks.bench_topk_divergence --device cpu     # CPU: a reduced size (N=1024, V=32768)
    python -m benchmarks.bench_topk_divergence --sweep          # GPU: also time the kernel's BLOCK_V x num_warps
    python -m benchmarks.bench_topk_divergence --device cpu --n 16384 --v 151936 --skip-naive --repeats 2

Variants, each checked first against the float64 reference of tests/support/topk_reference.py on a few rows:
  naive    torch.log_softmax(logits.float()) over the full vocabulary, then the same finish
  torch    the chunked torch backend (fp32 chunks of CHUNK_BYTES)
  triton   the fused kernel (GPU only; on CPU it would run in Triton's interpreter, which says nothing of speed)
  floor    reading the logits once at the read bandwidth measured here (a sum over an fp32 buffer as large)
Extra peak memory is measured above the inputs: CUDA's allocator peak on GPU; on CPU the rise of the
process's peak resident set (VmHWM, reset through /proc/self/clear_refs), which includes allocator noise.
The Top-K design's anchors (one H200): naive 8.4 ms / +9.5 GB, chunked torch 12.3 ms / +1.19 GB, floor 0.59 ms at
4.2 TB/s; target <= 1.5 ms and <= 64 MB.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

import torch

from tests.support.topk_reference import reference_topk_divergence
from verl_cppo.core.topk_divergence import RowStatistics, divergence_from_statistics
from verl_cppo.kernels import topk_divergence

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_case(n: int, v: int, k: int, dtype: torch.dtype, device: str, seed: int = 0):
    """pi's logits [N, V] and mu (pi plus noise): its top-K ids / log-probs and the sampled token's."""
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.empty(n, v, dtype=dtype, device=device)
    topk_ids = torch.empty(n, k, dtype=torch.long, device=device)
    topk_lp = torch.empty(n, k, dtype=torch.float32, device=device)
    sampled = torch.empty(n, dtype=torch.long, device=device)
    sampled_lp = torch.empty(n, dtype=torch.float32, device=device)
    for r0 in range(0, n, 256):  # chunks keep the set-up's own memory small
        r1 = min(r0 + 256, n)
        x = torch.randn(r1 - r0, v, generator=gen, device=device) * 3.0  # [c, V]
        logits[r0:r1] = x.to(dtype)
        log_mu = torch.log_softmax(x + 0.3 * torch.randn(x.shape, generator=gen, device=device), dim=-1)
        topk_lp[r0:r1], topk_ids[r0:r1] = log_mu.topk(k, dim=-1)
        pick = torch.multinomial(log_mu.exp(), 1, generator=gen)[:, 0]  # [c] sampled from mu
        sampled[r0:r1] = pick
        sampled_lp[r0:r1] = log_mu.gather(1, pick[:, None])[:, 0]
    return logits, sampled, topk_ids, topk_lp, sampled_lp


def naive(logits, sampled, topk_ids, topk_lp, sampled_lp, kind):
    """The full fp32 log-softmax the chunked design rules out: [N, V] fp32 twice over."""
    ids = torch.cat([topk_ids, sampled[:, None]], dim=1)  # [N, K+1]
    z = torch.log_softmax(logits.float(), dim=-1).gather(1, ids)  # [N, K+1] log-probs
    ones = torch.ones(z.shape[0], dtype=torch.float64, device=z.device)
    stats = RowStatistics(torch.zeros_like(ones), ones, z, z.exp())
    return divergence_from_statistics(kind, stats, sampled, topk_ids, topk_lp, sampled_lp)


def ours(backend):
    def run(logits, sampled, topk_ids, topk_lp, sampled_lp, kind):
        lp = sampled_lp
        return topk_divergence(logits, sampled, topk_ids, topk_lp, kind, mu_sampled_logprobs=lp, backend=backend)

    return run


def _vm_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure(fn, device: str, repeats: int) -> tuple[float, float]:
    """(median seconds, extra peak bytes) of fn()."""
    fn()  # warm-up (compilation, allocator)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current VmRSS
        base = _vm_kib("VmRSS")
        fn()
        extra = (_vm_kib("VmHWM") - base) * 1024
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), extra


def read_floor(nbytes: int, device: str, repeats: int) -> tuple[float, float]:
    """(seconds to read nbytes once, bandwidth B/s), from a sum over an fp32 buffer of that size."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    seconds, _ = measure(buf.sum, device, repeats)
    return seconds, nbytes / seconds


def check(variants, case, kind: str, rows: int) -> None:
    sub = [t[:rows] for t in case]
    want = torch.tensor(reference_topk_divergence(*sub[:4], kind, sub[4]), dtype=torch.float64)
    for name, fn in variants.items():
        err = (fn(*sub, kind).double().cpu() - want).abs().max().item()
        print(f"check {name:7s} {kind}: max |D - float64 reference| over {rows} rows = {err:.1e}")
        if not err < 1e-5:
            raise SystemExit(f"{name} disagrees with the reference")


def sweep(case, repeats: int) -> None:
    from verl_cppo.kernels.topk_statistics import row_statistics_triton

    logits, sampled, topk_ids = case[:3]
    ids = torch.cat([topk_ids, sampled[:, None]], dim=1)
    print("kernel sweep (row statistics only):")
    for block_v in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            run = lambda b=block_v, w=warps: row_statistics_triton(logits, ids, block_v=b, num_warps=w)  # noqa: E731
            sec, _ = measure(run, "cuda", repeats)
            print(f"  BLOCK_V={block_v:5d} num_warps={warps:2d}: {sec * 1e3:7.3f} ms")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, help="tokens (default 8192 on GPU, 1024 on CPU)")
    parser.add_argument("--v", type=int, help="vocabulary (default 151936 on GPU, 32768 on CPU)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--kind", choices=["tv", "kl"], default="tv")
    parser.add_argument("--repeats", type=int, help="timed runs per variant, median reported (20 GPU, 5 CPU)")
    parser.add_argument("--check-rows", type=int, default=4, help="rows checked against the float64 reference")
    parser.add_argument("--sweep", action="store_true", help="GPU: time the kernel over BLOCK_V x num_warps")
    parser.add_argument("--skip-naive", action="store_true", help="skip the full-softmax variant ([N, V] fp32 twice)")
    return parser


def main() -> None:
    args = parser().parse_args()
    gpu = args.device == "cuda"
    n, v = args.n or (8192 if gpu else 1024), args.v or (151936 if gpu else 32768)
    repeats = args.repeats or (20 if gpu else 5)

    case = make_case(n, v, args.k, DTYPES[args.dtype], args.device)
    variants = {"torch": ours("torch")} if args.skip_naive else {"naive": naive, "torch": ours("torch")}
    if gpu:
        variants["triton"] = ours("triton")
    name = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"device {name}; N={n} V={v} K={args.k} {args.dtype} logits ({case[0].nbytes / 1e9:.2f} GB), D={args.kind}")
    check(variants, case, args.kind, args.check_rows)

    floor, bandwidth = read_floor(case[0].nbytes, args.device, repeats)
    results = {k: measure(lambda f=f: f(*case, args.kind), args.device, repeats) for k, f in variants.items()}
    naive_time = results["naive"][0] if "naive" in results else float("nan")
    print(f"{'variant':8s} {'time ms':>9s} {'extra MB':>10s} {'x floor':>8s} {'x naive':>8s}")
    for key, (sec, extra) in results.items():
        print(f"{key:8s} {sec * 1e3:9.3f} {extra / 2**20:10.1f} {sec / floor:8.2f} {sec / naive_time:8.2f}")
    row = f"{'floor':8s} {floor * 1e3:9.3f} {'':>10s} {1:8.2f} {floor / naive_time:8.2f}"
    print(f"{row}   (read at {bandwidth / 1e9:.0f} GB/s)")
    for key, (sec, extra) in results.items():
        print(f"RESULT variant={key} n={n} v={v} k={args.k} ms={sec * 1e3:.4f} extra_mib={extra / 2**20:.1f}")
    if gpu:
        print(f"issue anchor floor at 4.2 TB/s: {case[0].nbytes / 4.2e12 * 1e3:.3f} ms")
    if gpu and args.sweep:
        sweep(case, repeats)


if __name__ == "__main__":
    main()
