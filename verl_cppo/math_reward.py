"""Outcome reward for DAPO-Math-17k and AIME: the response's final answer checked with math-verify.

Select it in verl 0.9.1 with (``pkg://`` resolves wherever ``verl_cppo`` is importable, Ray workers included)::

    reward.custom_reward_function.path=pkg://verl_cppo.math_reward
    reward.custom_reward_function.name=compute_score

Design:

* Extraction is explicit, not a scan of the whole response: the prompts (``examples/data/prepare_data.py``,
  the DAPO-Math template) ask for a last line ``Answer: <answer>``; the answer is that line's text, or else
  the content of the last ``\\boxed{...}``. Only the final ``TAIL_CHARS`` characters are searched, so a 16k
  response costs the same as a short one and an early guess in the reasoning never counts.
* Equivalence is math-verify's (``parse`` + ``verify``: ``1/2 == 0.5 == \\frac{1}{2}``), with an exact string
  match after light normalisation as a fallback when math-verify cannot parse either side.
* verl's reward loop calls a synchronous ``compute_score`` from a thread pool, where math-verify's
  ``signal.alarm`` timeouts raise and (with its default ``raise_on_error=False``) would silently score every
  response 0. Timeouts are therefore used only on the main thread; elsewhere the input is bounded instead
  (``MAX_ANSWER_CHARS``).
* Score 1.0 for a correct answer, 0.0 otherwise (the paper's grader; no format penalty).

math-verify is verl's ``math`` extra; it is imported on first use, with an error that says how to install it.
"""

from __future__ import annotations

import re
import threading
from typing import Any

__all__ = ["MAX_ANSWER_CHARS", "TAIL_CHARS", "compute_score", "extract_answer", "is_equivalent"]

TAIL_CHARS = 600
"""Only this many final characters of a response are searched for its answer."""

MAX_ANSWER_CHARS = 200
"""A longer extracted answer is scored 0 without parsing (bounds math-verify's work off the main thread)."""

TIMEOUT_SECONDS = 5
"""math-verify's parsing / verification timeout, applied only on the main thread (signal.alarm)."""

_ANSWER_LINE = re.compile(r"Answer\s*[:：]\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_math_verify = None


def _load_math_verify():
    global _math_verify
    if _math_verify is None:
        try:
            import math_verify
        except ImportError as exc:
            raise ImportError(
                "verl_cppo.math_reward needs math-verify: pip install 'math-verify>=0.8' (verl's `math` extra)"
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


def is_equivalent(answer: str, ground_truth: str) -> bool:
    """Whether ``answer`` equals ``ground_truth`` under math-verify, or as normalised strings."""
    if len(answer) > MAX_ANSWER_CHARS:
        return False
    if _normalise(answer) == _normalise(ground_truth):
        return True
    mv = _load_math_verify()
    on_main_thread = threading.current_thread() is threading.main_thread()
    timeout = TIMEOUT_SECONDS if on_main_thread else None
    latex_only = [mv.LatexExtractionConfig()]
    latex_or_expr = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]
    gold = mv.parse(f"\\boxed{{{ground_truth}}}", extraction_config=latex_only, parsing_timeout=timeout)
    pred = mv.parse(f"\\boxed{{{answer}}}", extraction_config=latex_or_expr, parsing_timeout=timeout)
    if not gold or not pred:
        return False
    return bool(mv.verify(gold, pred, timeout_seconds=timeout))


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """verl custom reward function: ``{"score": 1.0 or 0.0, "acc": same}`` for one decoded response."""
    answer = extract_answer(solution_str)
    correct = answer is not None and is_equivalent(answer, str(ground_truth).strip())
    score = 1.0 if correct else 0.0
    return {"score": score, "acc": score}
