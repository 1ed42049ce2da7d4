"""The stability study's exact tests and paired comparisons, against hand-computed cases and brute force."""

import itertools
import math
import random

import pytest

from benchmarks.stability import report, stats


def test_sign_flip_hand_computed_cases():
    # [1, 2, 3]: of the 8 sign assignments only +++ and --- reach |sum| = 6
    assert stats.sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(2 / 8)
    # [1, -1]: every assignment has |sum| in {0, 2}; the observed 0 is reached by all four
    assert stats.sign_flip_p([1.0, -1.0]) == 1.0
    # ten positive differences: only all-plus and all-minus are as extreme
    assert stats.sign_flip_p([0.1 * (i + 1) for i in range(10)]) == pytest.approx(2 / 1024)
    # [3, 1, 1]: |sum| 5 -> +++ / ---; |3+1-1| = 3 and |3-1+1| = 3 are below; so 2 of 8
    assert stats.sign_flip_p([3.0, 1.0, 1.0]) == pytest.approx(2 / 8)
    # [1, 1, 1, 5]: observed 8; |±1±1±1+5| >= 8 needs all three +: 1 assignment per sign of 5 -> 2 of 16
    assert stats.sign_flip_p([1.0, 1.0, 1.0, 5.0]) == pytest.approx(2 / 16)


def test_sign_flip_against_a_float64_loop_over_random_differences():
    rng = random.Random(3)
    for n in (1, 4, 7):
        diffs = [rng.uniform(-1, 1) for _ in range(n)]
        observed = abs(sum(diffs))
        count = 0
        for mask in range(2**n):  # an independent enumeration by bit mask
            total = sum(d if (mask >> i) & 1 else -d for i, d in enumerate(diffs))
            count += abs(total) >= observed - 1e-12
        assert stats.sign_flip_p(diffs) == pytest.approx(count / 2**n)


def test_mcnemar_hand_computed_cases():
    assert stats.mcnemar_exact_p(0, 0) == 1.0
    assert stats.mcnemar_exact_p(6, 0) == pytest.approx(2 / 64)  # 6-0: 0.031
    assert stats.mcnemar_exact_p(0, 5) == pytest.approx(2 / 32)  # 5-0: 0.0625
    assert stats.mcnemar_exact_p(9, 1) == pytest.approx(2 * 11 / 1024)  # 2 (C(10,0) + C(10,1)) / 2^10
    assert stats.mcnemar_exact_p(3, 3) == 1.0  # the doubled tail exceeds 1 and is capped
    # against the binomial two-sided p computed by summing every outcome at most as likely as the observed one
    for a, b in itertools.product(range(8), repeat=2):
        n = a + b
        if n == 0 or a == b:
            continue
        probs = [math.comb(n, k) / 2**n for k in range(n + 1)]
        reference = sum(p for p in probs if p <= probs[a] + 1e-15)
        assert stats.mcnemar_exact_p(a, b) == pytest.approx(min(1.0, reference))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"1\.\.20"):
        stats.sign_flip_p([])
    with pytest.raises(ValueError, match="non-finite"):
        stats.sign_flip_p([1.0, math.nan])
    with pytest.raises(ValueError, match="only_a=-1"):
        stats.mcnemar_exact_p(-1, 2)


def test_paired_comparison_and_summary_on_hand_made_runs():
    def run(seed, final, locked):
        rewards = [0.1, 0.2, final, final, final]
        grad = [0.05, 0.05, 0.0, 0.0, 0.0] if locked else [0.05] * 5
        return {
            "seed": seed,
            "rewards": rewards,
            "grad_norm": grad,
            "masked_frac": [0.1] * 5,
            "rollout_train_kl": [0.01] * 5,
            "wall_s": 1.0,
        }

    a = [run(s, 0.5, locked=False) for s in range(6)]
    b = [run(s, 0.3, locked=True) for s in range(6)] + [run(6, 0.9, locked=False)]  # seed 6 only in b
    summary = report.summarize({"cppo": a, "dppo_tv_matched": b})
    arms, comparisons = summary["arms"], summary["comparisons"]
    assert arms["cppo"]["locked_in"] == 0 and arms["dppo_tv_matched"]["locked_in"] == 6
    c = comparisons["cppo vs dppo_tv_matched"]
    assert c["seeds"] == list(range(6))  # paired on the shared seeds only
    assert c["final_reward_diff_mean"] == pytest.approx(0.2)
    assert c["final_reward_wins_a"] == 6 and c["final_reward_p"] == pytest.approx(2 / 64)
    assert (c["locked_only_a"], c["locked_only_b"]) == (0, 6) and c["locked_in_p"] == pytest.approx(2 / 64)
    assert list(comparisons) == ["cppo vs dppo_tv_matched"]  # the other pairs lack an arm
    assert "| cppo vs dppo_tv_matched | 6 | +0.200, 6/6 | 0.031 |" in report.comparison_table(comparisons)
