"""Helpers of the test suite: float64 references, input builders, multi-process runners, scripts run by tests."""

from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[2])
"""The repository root (where pyproject.toml is), as a string."""
