"""The bound on verl's rollout requests under the CPU test switch (``verl_cppo.testing.vllm_cpu``).

A rollout server that stops answering must stop the run within a bounded time with an error naming what
failed, instead of leaving the agent loop waiting forever. verl's own ``LLMServerClient`` and load balancer
run in a local Ray against a server that never answers; the weight-sync bound is tested in test_vllm_cpu.py.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.support import REPO_ROOT
from verl_cppo.testing import vllm_cpu
from verl_cppo.testing.launcher import CPU_ENV, TEST_ENV


def test_a_generate_without_answer_fails_in_bounded_time():
    env = {**os.environ, **TEST_ENV, **CPU_ENV, vllm_cpu.GENERATE_TIMEOUT_ENV: "3"}
    script = os.path.join(REPO_ROOT, "tests", "support", "generate_timeout_script.py")
    run = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["error"] == "TimeoutError", result
    assert "rollout generate failed: the vllm rollout server did not answer request 'request-0'" in result["message"]
    assert f"within 3 s ({vllm_cpu.GENERATE_TIMEOUT_ENV})" in result["message"], result
    assert 3.0 <= result["seconds"] < 30, result
    assert result["inflight"] == 0, result  # the cancelled request gave its server slot back


@pytest.mark.parametrize("env", [vllm_cpu.WEIGHT_SYNC_TIMEOUT_ENV, vllm_cpu.GENERATE_TIMEOUT_ENV])
@pytest.mark.parametrize("bad", ["0", "-1", "soon", "inf", "nan"])
def test_a_bad_bound_is_refused_at_install(monkeypatch, env, bad):
    monkeypatch.setenv(env, bad)
    with pytest.raises(ValueError, match=f"{env} must be a positive number of seconds, got {bad!r}"):
        vllm_cpu.install()
