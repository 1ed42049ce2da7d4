"""Time of the ``cppo_grpo`` advantage estimator against verl's ``grpo``, as a ratio measured in one run.

Both are called through verl's advantage-estimator registry the way the trainer calls them, on the same batch
(binary outcome rewards on the last response token, groups of ``--group`` responses). Before timing, the
``cppo_grpo`` advantages are checked against the float64 per-group reference of ``tests/advantage/test_estimator.py``.
There is no speed target for the estimator (it runs once per step on the driver); this shows that
excluding zero-variance groups costs nothing next to verl's own estimator.

    .venv/bin/python -m benchmarks.bench_advantage [--batch 4096] [--length 1024] [--group 8] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from verl.trainer.ppo.core_algos import get_adv_estimator_fn

import verl_cppo  # noqa: F401  (registers cppo_grpo)
from tests.support.advantage_reference import reference_cppo_grpo


def batch(size: int, length: int, group: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (size,), generator=gen)  # [B]
    mask = (torch.arange(length)[None] < lengths[:, None]).float()  # [B, T]
    rewards = torch.zeros(size, length)  # [B, T]
    rewards[torch.arange(size), lengths - 1] = torch.randint(0, 2, (size,), generator=gen).float()
    index = np.array([f"prompt-{i // group}" for i in range(size)], dtype=object)  # [B]
    return rewards, mask, index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rewards, mask, index = batch(args.batch, args.length, args.group)

    adv, _ = get_adv_estimator_fn("cppo_grpo")(token_level_rewards=rewards, response_mask=mask, index=index)
    ref, _ = reference_cppo_grpo(rewards.sum(-1).tolist(), list(index))
    expected = torch.tensor(ref, dtype=torch.float64)[:, None] * mask.double()  # [B, T]
    torch.testing.assert_close(adv.double(), expected, rtol=0, atol=1e-6)
    print(f"check: cppo_grpo == float64 per-group reference ({args.batch} responses)")

    times: dict[str, list[float]] = {"grpo": [], "cppo_grpo": []}
    for _ in range(args.repeats):  # interleaved, so drifting load hits both
        for name in times:
            fn = get_adv_estimator_fn(name)
            start = time.perf_counter()
            fn(token_level_rewards=rewards, response_mask=mask, index=index, config=None)
            times[name].append(time.perf_counter() - start)
    grpo = statistics.median(times["grpo"])
    print(
        f"B={args.batch} T={args.length} groups of {args.group}, median of {args.repeats} calls, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads"
    )
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:10s} {1e3 * median:8.1f} ms   ratio to grpo {median / grpo:.2f}")


if __name__ == "__main__":
    main()
