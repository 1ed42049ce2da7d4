"""verl_cppo.math_task.reward on hand-written responses, through verl's own custom-reward loader, and on the thread
pool verl's reward loop calls it from (where math-verify's signal-based timeouts cannot run)."""

import logging
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from omegaconf import OmegaConf

from verl_cppo.math_task import reward as math_reward
from verl_cppo.math_task.reward import TAIL_CHARS, compute_score, extract_answer

# (response, ground truth, expected score), written by hand
CASES = [
    ("Let me compute.\n2 + 40 = 42\nAnswer: 42", "42", 1.0),
    ("Answer: 41", "42", 0.0),
    ("The result is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
    ("Answer: $\\dfrac{3}{4}$", "3/4", 1.0),
    ("Answer: \\boxed{7}.", "7", 1.0),
    ("Answer: 2\\sqrt{2}", "\\sqrt{8}", 1.0),
    ("Answer: 075", "75", 1.0),
    ("Answer: $1{,}000$.", "1000", 1.0),
    ("Answer: x = 5", "5", 1.0),
    ("Answer: 6", "-6", 0.0),
    ("I think it is 42 but I am not sure.", "42", 0.0),  # no final-answer format: not scored as correct
    ("Answer: 12\nWait, that is wrong.\nAnswer: 13", "13", 1.0),  # the last answer line counts
    ("Answer: 12\nWait, that is wrong.\nAnswer: 13", "12", 0.0),
    ("<think>Maybe Answer: 5</think>\nSo the answer is \\boxed{6}", "6", 1.0),  # thinking text ignored
    ("<think>Maybe Answer: 5</think>\nSo the answer is \\boxed{6}", "5", 0.0),
    ("\\boxed{\\frac{1}{\\sqrt{4}}}", "\\frac12", 1.0),  # nested braces
]


@pytest.mark.parametrize(("response", "truth", "expected"), CASES)
def test_hand_written_cases(response, truth, expected):
    assert compute_score("math_dapo", response, truth) == {"score": expected, "acc": expected}


def test_extraction():
    assert extract_answer("blah\nAnswer:  $1{,}000$ .") == "1{,}000"
    assert extract_answer("Answer: 17.") == "17"
    assert extract_answer("no answer") is None
    assert extract_answer("\\boxed{unclosed") is None
    # an answer stated early in a long response is outside the searched tail
    assert extract_answer("Answer: 3\n" + "x" * (TAIL_CHARS + 10)) is None


def test_same_scores_on_a_worker_thread():
    """verl's NaiveRewardManager runs a sync compute_score in loop.run_in_executor (a thread pool)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        scores = list(pool.map(lambda c: compute_score("aime2025", c[0], c[1])["score"], CASES))
    assert scores == [c[2] for c in CASES]


def _copied_elsewhere(tmp_path) -> str:
    """A user's adaptation: the packaged file copied into a folder of their own."""
    copy = tmp_path / "my_reward" / "math_reward.py"
    copy.parent.mkdir()
    shutil.copy(math_reward.__file__, copy)
    return str(copy)


@pytest.mark.parametrize("how", ["pkg", "packaged_file", "copied_file"])
def test_scores_the_same_however_verls_custom_reward_loader_loads_it(how, tmp_path):
    """verl's documented forms of ``reward.custom_reward_function.path`` (``load_extern_object``; a file path is
    loaded without a ``sys.modules`` entry), scored on the main thread and on the reward loop's thread pool,
    math-verify cases included, with the packaged bounds."""
    from verl.trainer.ppo.reward import get_custom_reward_fn

    path = {"pkg": "pkg://verl_cppo.math_task.reward", "packaged_file": math_reward.__file__}.get(how)
    path = path or _copied_elsewhere(tmp_path)
    config = OmegaConf.create({"reward": {"custom_reward_function": {"path": path, "name": "compute_score"}}})
    fn = get_custom_reward_fn(config)

    def score(case):
        return fn(data_source="math_dapo", solution_str=case[0], ground_truth=case[1], extra_info={"index": 0})

    assert [score(c)["score"] for c in CASES] == [c[2] for c in CASES]  # main thread
    with ThreadPoolExecutor(max_workers=2) as pool:
        assert [r["score"] for r in pool.map(score, CASES)] == [c[2] for c in CASES]
    loaded = fn.args[0].__globals__  # the module verl loaded (a partial of verl's _call_with_kwargs)
    sandbox = loaded["_SANDBOX"]  # built by the math-verify cases above
    assert (sandbox.timeout_s, sandbox.memory_mb) == (math_reward.TIMEOUT_SECONDS, math_reward.MEMORY_MB)
    assert sandbox.target.rpartition(":")[0] == os.path.abspath(loaded["__file__"])  # the child runs that file
    sandbox.close()


def test_missing_math_verify_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # as if not installed
    monkeypatch.setattr(math_reward, "_math_verify", None)
    assert compute_score("x", "Answer: 12", "12")["score"] == 1.0  # equal strings need no math-verify
    with pytest.raises(ImportError, match=r"pip install 'math-verify>=0.8'"):
        compute_score("x", "Answer: 1/2", "0.5")


@pytest.fixture
def short_bounds(monkeypatch):
    """math_reward's sandbox rebuilt with a 2 s deadline (restored afterwards)."""
    monkeypatch.setattr(math_reward, "TIMEOUT_SECONDS", 2)
    monkeypatch.setattr(math_reward, "_SANDBOX", None)
    yield math_reward
    if math_reward._SANDBOX is not None:
        math_reward._SANDBOX.close()


# answers that ran unbounded on verl's reward threads: sympy evaluates the power tower / the 2^30-bit integer
HOSTILE = [("Answer: 9^{9^{9^{9}}}", "3"), ("Answer: 2^{2^{30}}", "4"), ("Answer: 3", "1" * 1_000_000)]


def test_hostile_answers_score_0_within_the_bound_on_a_worker_thread(short_bounds, caplog):
    """Off the main thread (where verl calls it) each check ends within its deadline and scores 0, logged."""
    caplog.set_level(logging.WARNING, logger="verl_cppo.math_task.reward")
    with ThreadPoolExecutor(max_workers=2) as pool:
        compute_score("x", "Answer: 1", "1/2")  # start a child outside the timed calls
        for response, truth in HOSTILE:
            start = time.monotonic()
            future = pool.submit(compute_score, "aime2025", response, truth)
            assert future.result(timeout=60) == {"score": 0.0, "acc": 0.0}
            assert time.monotonic() - start < 30  # 2 s deadline + a child restart, not minutes
    assert "9^{9^{9^{9}}}" in caplog.text and "timeout" in caplog.text
    # the pool recovers: the next answers are scored correctly
    assert compute_score("x", "Answer: \\frac{1}{2}", "0.5")["score"] == 1.0


def test_missing_ground_truth_and_non_string_solution_are_errors_naming_the_argument():
    with pytest.raises(ValueError, match=r"ground_truth is None \(data_source='math_dapo'"):
        compute_score("math_dapo", "Answer: None", None)
    with pytest.raises(TypeError, match=r"solution_str must be the decoded response \(str\), got NoneType"):
        compute_score("math_dapo", None, "12")
    with pytest.raises(TypeError, match=r"solution_str .* got bytes"):
        compute_score("math_dapo", b"Answer: 12", "12")
    # a numeric ground truth (parquet may store one) is still compared as text
    assert compute_score("math_dapo", "Answer: 12", 12)["score"] == 1.0
