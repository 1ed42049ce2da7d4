"""Outcome reward for DAPO-Math-17k and AIME: the response's final answer checked with math-verify.

Select it in verl 0.9.1 with (``pkg://`` resolves wherever ``verl_cppo`` is importable, Ray workers included)::

    reward.custom_reward_function.path=pkg://verl_cppo.math_task.reward
    reward.custom_reward_function.name=compute_score

Design:

* Extraction is explicit, not a scan of the whole response: the prompts (``examples/data/prepare_data.py``,
  the DAPO-Math template) ask for a last line ``Answer: <answer>``; the answer is that line's text, or else
  the content of the last ``\\boxed{...}``. Only the final ``TAIL_CHARS`` characters are searched, so a 16k
  response costs the same as a short one and an early guess in the reasoning never counts.
* Equivalence is math-verify's (``parse`` + ``verify``: ``1/2 == 0.5 == \\frac{1}{2}``), with an exact string
  match after light normalisation as a fallback when math-verify cannot parse either side.
* Bounded everywhere verl calls it. verl 0.9.1's reward managers (``experimental/reward_loop/reward_manager``)
  call a synchronous ``compute_score`` through ``loop.run_in_executor`` (a thread pool inside a Ray actor),
  where math-verify's ``signal.alarm`` timeouts cannot run, and a short answer such as ``9^{9^{9^{9}}}`` can
  run for minutes and grow to gigabytes in sympy. So math-verify runs only in ``verl_cppo.math_task.sandbox`` child
  processes (the same on every thread, the main one included): at most ``TIMEOUT_SECONDS`` per answer (the
  child is killed past it) and ``MEMORY_MB`` of address space. A timed-out, over-memory or crashed check
  scores 0 and logs why. Cheap pre-screening keeps most work out of the children: an exact match after
  normalisation needs no math-verify, and an answer longer than ``MAX_ANSWER_CHARS`` (or a ground truth
  longer than ``MAX_GROUND_TRUTH_CHARS``) is compared as a string only.
* Bad arguments are errors, not scores: a ``solution_str`` that is not a string or a ``ground_truth`` that
  is None (a dataset row without ``reward_model.ground_truth``) raise a ``TypeError`` / ``ValueError``
  naming the argument; scoring such a row 0 would silently drop its prompt from training. The driver checks
  the data files for ``DATA_FIELDS`` before Ray starts, so this error is the last guard, not the first.
* Score 1.0 for a correct answer, 0.0 otherwise (the paper's grader; no format penalty).

math-verify is verl's ``math`` extra; it is imported on first use, with an error that says how to install it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any

__all__ = [
    "DATA_FIELDS",
    "MAX_ANSWER_CHARS",
    "MAX_GROUND_TRUTH_CHARS",
    "MEMORY_MB",
    "TAIL_CHARS",
    "TIMEOUT_SECONDS",
    "compute_score",
    "extract_answer",
    "is_equivalent",
    "math_verify_verdict",
]

logger = logging.getLogger(__name__)

TAIL_CHARS = 600
"""Only this many final characters of a response are searched for its answer."""

MAX_ANSWER_CHARS = 200
"""A longer extracted answer is compared as a string only (no math-verify)."""

MAX_GROUND_TRUTH_CHARS = 1000
"""A longer ground truth is compared as a string only (no math-verify)."""

TIMEOUT_SECONDS = 5
"""Wall-clock bound of one math-verify check (parse both sides and verify); the child is killed past it."""

MEMORY_MB = 512
"""Address space a math-verify child may grow by beyond its size after importing math-verify."""

DATA_FIELDS = {"reward_model.ground_truth": "string"}
"""What ``compute_score`` reads from every dataset row: the driver checks ``data.train_files`` and
``data.val_files`` for it before Ray starts (``verl_cppo.launch.data_check``; keep it true in a copy you adapt)."""

MAX_WORKERS = min(4, os.cpu_count() or 1)
"""math-verify child processes per process that scores (started on demand)."""

_ANSWER_LINE = re.compile(r"Answer\s*[:：]\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_math_verify = None


def _load_math_verify():
    global _math_verify
    if _math_verify is None:
        try:
            import math_verify
        except ImportError as exc:
            raise ImportError(
                "verl_cppo.math_task.reward needs math-verify: pip install 'math-verify>=0.8' (verl's `math` extra)"
            ) from exc
        _math_verify = math_verify
    return _math_verify


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) with balanced braces, or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : i]
    return None


def _strip(answer: str) -> str:
    """Drop a trailing period and enclosing $...$ (or $$...$$)."""
    answer = answer.strip().rstrip(".").strip()
    if answer.startswith("$") and answer.endswith("$") and len(answer) > 1:
        answer = answer.strip("$").strip()
    return answer.rstrip(".").strip()


def extract_answer(solution: str) -> str | None:
    """The final answer of a response: its last ``Answer:`` line, else its last ``\\boxed{}``; None if absent.

    Text before a closing ``</think>`` is ignored when the tag is present (Qwen3 thinking mode).
    """
    think_end = solution.rfind("</think>")
    if think_end >= 0:
        solution = solution[think_end + len("</think>") :]
    tail = solution[-TAIL_CHARS:]
    lines = _ANSWER_LINE.findall(tail)
    if lines:
        answer = lines[-1]
        boxed = _last_boxed(answer)  # "Answer: \boxed{7}"
        answer = _strip(boxed if boxed is not None else answer)
        return answer or None
    boxed = _last_boxed(tail)
    if boxed is None:
        return None
    return _strip(boxed) or None


def _normalise(text: str) -> str:
    return re.sub(r"\s+|\\[,!; ]|\\left|\\right", "", text).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def math_verify_verdict(answer: str, ground_truth: str) -> bool:
    """math-verify's verdict, unbounded: ``is_equivalent`` runs it inside a sandbox child (its main thread, where
    math-verify's own timeouts apply); calling it directly is the in-process baseline of the sandbox's cost."""
    mv = _load_math_verify()
    latex_only = [mv.LatexExtractionConfig()]
    latex_or_expr = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]
    gold = mv.parse(f"\\boxed{{{ground_truth}}}", extraction_config=latex_only, parsing_timeout=TIMEOUT_SECONDS)
    pred = mv.parse(f"\\boxed{{{answer}}}", extraction_config=latex_or_expr, parsing_timeout=TIMEOUT_SECONDS)
    if not gold or not pred:
        return False
    return bool(mv.verify(gold, pred, timeout_seconds=TIMEOUT_SECONDS))


def _warmup() -> None:
    """Load math-verify and sympy in a child before its memory limit is set."""
    math_verify_verdict("\\frac{1}{2}", "0.5")


_SANDBOX = None
_SANDBOX_LOCK = threading.Lock()


def _sandbox():
    global _SANDBOX
    with _SANDBOX_LOCK:
        if _SANDBOX is None:
            from verl_cppo.math_task.sandbox import Sandbox

            _SANDBOX = Sandbox(math_verify_verdict, TIMEOUT_SECONDS, MEMORY_MB, MAX_WORKERS, warmup=_warmup)
        return _SANDBOX


def is_equivalent(answer: str, ground_truth: str) -> bool:
    """Whether ``answer`` equals ``ground_truth`` as normalised strings, or else under math-verify (run in a
    bounded child process; a check that times out, runs out of memory or crashes counts as not equal)."""
    if _normalise(answer) == _normalise(ground_truth):
        return True
    if len(answer) > MAX_ANSWER_CHARS or len(ground_truth) > MAX_GROUND_TRUTH_CHARS:
        return False
    _load_math_verify()  # the install hint here rather than a child's failure to start
    outcome = _sandbox().call(answer, ground_truth)
    if outcome.ok:
        return bool(outcome.value)
    logger.warning(
        "verl_cppo.math_task.reward: answer %.80r vs ground truth %.80r scored 0: math-verify %s (%s)",
        answer,
        ground_truth,
        outcome.status,
        outcome.value,
    )
    return False


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """verl custom reward function: ``{"score": 1.0 or 0.0, "acc": same}`` for one decoded response.

    TypeError if ``solution_str`` is not a string, ValueError if ``ground_truth`` is None."""
    if not isinstance(solution_str, str):
        raise TypeError(
            f"verl_cppo.math_task.reward.compute_score: solution_str must be the decoded response (str), got "
            f"{type(solution_str).__name__} {solution_str!r:.80} (data_source={data_source!r})"
        )
    if ground_truth is None:
        raise ValueError(
            f"verl_cppo.math_task.reward.compute_score: ground_truth is None (data_source={data_source!r}, "
            f"extra_info={extra_info!r:.200}): the dataset row has no reward_model.ground_truth"
        )
    answer = extract_answer(solution_str)
    correct = answer is not None and is_equivalent(answer, str(ground_truth).strip())
    score = 1.0 if correct else 0.0
    return {"score": score, "acc": score}
