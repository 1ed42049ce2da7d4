"""Per-call cost of bounding verl_cppo.math_task.reward: math-verify in the sandbox children vs in-process.

    .venv/bin/python -m benchmarks.bench_math_reward --calls 1000 --threads 4

Times ``--calls`` responses that need math-verify (no string match: ``3/4`` vs ``\\frac{3}{4}`` and the
like, the work the sandbox exists for; every string distinct, so math-verify's caches never hit) three ways,
in one run: ``math_verify_verdict`` in-process on the main thread (math-verify alone, the old main-thread path),
``compute_score`` on the main thread, and ``compute_score`` from a thread pool of ``--threads`` (how verl's
reward managers call it). The sandbox's children are started before
timing (their start, about 0.5 s each, is paid once per scoring process). Prints mean ms per call and the
ratio to in-process; the difference is the per-call overhead of the bound (pickling and a pipe round trip).
"""

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

from verl_cppo.math_task import reward as math_reward

PAIRS = [("1/2", "0.5"), ("\\frac{3}{4}", "0.75"), ("2\\sqrt{2}", "\\sqrt{8}"), ("x = 5", "5"), ("41", "42")]


def distinct(i: int) -> tuple[str, str]:
    """The i-th answer / ground truth: distinct strings, so math-verify's parse caches never hit."""
    a, b = i % 97 + 1, i // 97 + 2
    return [
        (f"{a}/{b}", f"\\frac{{{a}}}{{{b}}}"),
        (f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{a * a * b}}}"),
        (f"x = {i}", f"{i}.0"),
    ][i % 3]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    work = [distinct(i) for i in range(args.calls)]
    responses = [(f"Answer: {a}", t) for a, t in work]
    expected = [math_reward.math_verify_verdict(a, t) for a, t in PAIRS]  # warm math-verify in-process
    assert expected == [True, True, True, True, False]

    with ThreadPoolExecutor(args.threads) as pool:  # start every child before timing
        list(pool.map(lambda r: math_reward.compute_score("x", f"Answer: {r[0]}", r[1]), PAIRS * args.threads))

    start = time.perf_counter()
    direct = [math_reward.math_verify_verdict(a, t) for a, t in work]
    t_direct = time.perf_counter() - start

    start = time.perf_counter()
    main_thread = [math_reward.compute_score("x", *r)["score"] for r in responses]
    t_main = time.perf_counter() - start

    with ThreadPoolExecutor(args.threads) as pool:
        start = time.perf_counter()
        threaded = list(pool.map(lambda r: math_reward.compute_score("x", *r)["score"], responses))
        t_threads = time.perf_counter() - start

    assert [float(v) for v in direct] == main_thread == threaded, "the sandbox changed a verdict"
    print(f"{sum(direct)} of {len(direct)} answers equivalent (distinct strings: no parse-cache hits)")
    n = args.calls
    print(f"{n} calls, {math_reward.MAX_WORKERS} sandbox children, {args.threads} caller threads")
    rows = [
        ("in-process math_verify_verdict (main thread)", t_direct, ""),
        ("compute_score, main thread (sandboxed)", t_main, ""),
        (f"compute_score, {args.threads} threads (sandboxed)", t_threads, "  (wall time / calls)"),
    ]
    for label, seconds, note in rows:
        print(f"{label:45s} {1e3 * seconds / n:8.3f} ms/call  {seconds / t_direct:.2f}x{note}")
    print(f"overhead per call, main thread: {1e3 * (t_main - t_direct) / n:.3f} ms")


if __name__ == "__main__":
    main()
