"""The Top-K rollout path on a live vLLM engine (``tests/support/topk_live_checks.py``), in a fresh process.

The Top-K diffs patch verl's modules as they are first imported, as in each Ray worker of a run; a pytest process
that already imported verl's rollout modules for other tests cannot host them, so the checks run in their own
pytest process, under a time limit.
"""

import os
import subprocess
import sys

import pytest

from tests.support import REPO_ROOT

pytestmark = pytest.mark.vllm


def test_live_topk_checks_pass_in_a_fresh_process():
    checks = os.path.join("tests", "support", "topk_live_checks.py")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", checks]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert out.returncode == 0 and "3 passed" in out.stdout, out.stdout[-6000:] + out.stderr[-3000:]
