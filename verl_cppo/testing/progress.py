"""Progress of a main_ppo run, read from its files: verl's per-step metrics (FileLogger JSONL) and its log.

Pure functions, no verl import: ``read_steps`` parses verl's FileLogger JSONL, ``phases_in`` spots the start-up
phases (``PHASES``) in log lines, ``progress_lines`` formats one terminal line per step with the elapsed time
and an ETA (the mean of verl's ``timing_s/step`` so far times the steps left). ``verl_cppo.testing.launcher``
polls a running main_ppo with them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

__all__ = ["PHASES", "duration", "eta_seconds", "phases_in", "progress_line", "progress_lines", "read_steps"]

PHASES = (
    (re.compile(r"Started a local Ray instance|Connected to Ray cluster"), "Ray started"),
    (re.compile(r"\(TaskRunner\w* pid=\d+\)"), "trainer driver (TaskRunner) starting"),
    (re.compile(r"actor and ref model engine initialized"), "actor ready (model engine built)"),
    (re.compile(r"\(vLLMHttpServer pid=\d+\)"), "vLLM server starting"),
    (re.compile(r"LLMServerManager: \["), "vLLM server up"),
    (
        re.compile(r"all initialize finished, ready to fit"),
        "first step (agent loop workers start)",
    ),
)
"""(pattern in main_ppo.log, what it means): start-up phases reported once each, in the order seen."""


def phases_in(lines: Sequence[str], seen: set[str]) -> list[str]:
    """The ``PHASES`` messages whose pattern first appears in ``lines`` (those in ``seen`` excluded), in order."""
    found = []
    for line in lines:
        for pattern, message in PHASES:
            if message not in seen and message not in found and pattern.search(line):
                found.append(message)
    return found


def progress_lines(
    label: str,
    rows: list[dict],
    shown: int,
    steps: int,
    elapsed: float,
    arms_after: int = 0,
    masked_key: str = "actor/pg_clipfrac",
) -> list[str]:
    """The progress lines of rows[shown:], each with the elapsed time and the ETA as of that row; with
    ``arms_after`` more runs to go, each projected at this run's wall time (elapsed + ETA)."""
    lines = []
    for i in range(shown, len(rows)):
        eta = eta_seconds(rows[: i + 1], steps)
        eta_all = eta + arms_after * (elapsed + eta) if arms_after else None
        lines.append(progress_line(label, rows[i], steps, masked_key, elapsed, eta, eta_all))
    return lines


def read_steps(path: str) -> list[dict]:
    """verl's FileLogger JSONL -> [{"step": int, **numeric metrics}] (non-numeric values dropped)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line verl is still writing
                break
            row = {"step": int(record["step"])}
            for key, value in record["data"].items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    row[key] = float(value)
            rows.append(row)
    return rows


def duration(seconds: float) -> str:
    """42s, 3m05s, 1h02m ("?" when unknown)."""
    if seconds != seconds or seconds < 0:  # NaN
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and value == value and abs(value) != float("inf")


def eta_seconds(rows: list[dict], steps: int) -> float:
    """Seconds left in a run: the mean of verl's timing_s/step so far times the steps left (NaN if unknown)."""
    times = [r["timing_s/step"] for r in rows if _finite(r.get("timing_s/step"))]
    if not rows or not times:
        return float("nan")
    return sum(times) / len(times) * max(steps - rows[-1]["step"], 0)


def progress_line(
    label: str,
    row: dict,
    steps: int,
    masked_key: str = "actor/pg_clipfrac",
    elapsed: float | None = None,
    eta: float | None = None,
    eta_all: float | None = None,
) -> str:
    """One step's terminal line: reward, masked (or clipped) fraction, response length, step time, elapsed, ETA."""
    masked = row.get(masked_key, float("nan"))
    line = (
        f"[{label}] step {row['step']:3d}/{steps}  reward {row.get('critic/score/mean', float('nan')):.3f}  "
        f"masked {masked:.3f}  len {row.get('response_length/mean', float('nan')):.2f}  "
        f"step time {row.get('timing_s/step', float('nan')):.1f}s"
    )
    if elapsed is not None:
        line += f"  elapsed {duration(elapsed)}"
    if eta is not None:
        line += f"  eta {duration(eta)}"
    if eta_all is not None:
        line += f" (all arms {duration(eta_all)})"
    return line
