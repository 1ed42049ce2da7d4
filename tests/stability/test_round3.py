"""The third round's onset definition and comparisons on hand-made curves (README, "Third round")."""

import pytest

from benchmarks.stability import round3, stats


def test_smoothed_reward_is_the_trailing_three_step_mean():
    assert round3.smoothed([0.0, 0.3, 0.6, 0.9]) == pytest.approx([0.3, 0.6])


def test_a_learning_run_is_censored():
    rewards = [0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.6, 0.7, 0.72, 0.7]
    assert round3.onset(rewards, [0.05] * 10) == (11, False)


def test_a_drop_starts_where_the_smoothed_reward_falls_below_the_best_minus_drop():
    # m_3..m_8 = 0.5, 0.6, 0.6, 0.4333.., 0.3, 0.2: best before step 7 is 0.6; m_7 = 0.3 < 0.4 -> onset 7
    rewards = [0.4, 0.5, 0.6, 0.7, 0.5, 0.1, 0.3, 0.2]
    assert round3.onset(rewards, [0.05] * 8) == (7, True)
    # with DROP 0.3 the fall must go below 0.3: m_8 = 0.2 is the first -> onset 8
    assert round3.onset(rewards, [0.05] * 8, drop=0.3) == (8, True)


def test_a_freeze_starts_at_the_first_step_of_the_frozen_tail():
    rewards = [0.1, 0.2, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25]
    grads = [0.05, 0.04, 0.03, 5e-4, 0.002, 5e-4, 0.0, 0.0]  # frozen (< 1e-3) from step 6 to the end
    assert round3.onset(rewards, grads) == (6, True)
    # at GRAD 1e-2 step 4 starts the frozen tail; at 1e-4 only steps 7-8 are frozen: too short (< 3 steps)
    assert round3.onset(rewards, grads, grad=1e-2) == (4, True)
    assert round3.onset(rewards, grads, grad=1e-4) == (9, False)
    # a solved run (m_N >= 0.95) with zero gradient is not frozen
    assert round3.onset([0.5, 0.9, 1.0, 1.0, 1.0, 1.0], [0.1, 0.1, 0.0, 0.0, 0.0, 0.0]) == (7, False)


def test_onset_takes_the_earlier_of_drop_and_freeze():
    rewards = [0.4, 0.5, 0.6, 0.7, 0.5, 0.1, 0.3, 0.2, 0.2, 0.2]
    grads = [0.05] * 4 + [0.0] * 6  # frozen from step 5
    assert round3.onset(rewards, grads) == (5, True)


def test_paired_comparison_uses_censored_onsets_and_exact_tests():
    def outcome(final, step, event, mid=0.5):
        onset = (step, event)
        sensitivity = {f"onset@{d},{g}": onset for d, g in round3.SENSITIVITY}
        return {"final_reward": final, "reward_at": {round3.PRIMARY_STEP: mid}, **sensitivity}

    a = {0: outcome(0.8, 41, False, 0.6), 1: outcome(0.7, 30, True), 2: outcome(0.9, 41, False, 0.7)}
    b = {0: outcome(0.6, 20, True), 1: outcome(0.7, 25, True), 2: outcome(0.5, 10, True), 3: outcome(0.1, 5, True)}
    c = round3.paired(a, b)
    assert c["seeds"] == [0, 1, 2]
    assert c["final_reward_diff_mean"] == pytest.approx((0.2 + 0.0 + 0.4) / 3)
    assert c["reward_at_20_diff_mean"] == pytest.approx((0.1 + 0.0 + 0.2) / 3)
    # [0.1, 0, 0.2]: |sum| 0.3 is reached by the 2 assignments that keep 0.1 and 0.2 on one side (x2 for the 0)
    assert c["reward_at_20_p"] == pytest.approx(4 / 8)
    assert c["onset_diff_mean"] == pytest.approx((21 + 5 + 31) / 3)
    assert c["onset_p"] == stats.sign_flip_p([21.0, 5.0, 31.0]) == pytest.approx(2 / 8)
    assert (c["unstable_a"], c["unstable_b"], c["unstable_only_a"], c["unstable_only_b"]) == (1, 3, 0, 2)
    assert c["unstable_p"] == pytest.approx(0.5)


def test_run_outcomes_reads_a_results_entry():
    rewards = [0.1 * i for i in range(1, 11)] + [1.0] * 2  # 12 steps, rising to 1
    entry = {"rewards": rewards, "grad_norm": [0.05] * 10 + [0.0] * 2, "masked_frac": [0.1] * 12}
    out = round3.run_outcomes(entry)
    assert out["final_reward"] == pytest.approx(1.0)
    assert out["reward_at"] == {10: pytest.approx(0.9)}
    assert (out["onset"], out["unstable"]) == (13, False)
    assert out["masked_frac_early"] == pytest.approx(0.1)
