"""benchmarks/gpu_checks.sh where no GPU is: its arguments, and the clean refusal that still writes the JSON."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.support import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "gpu_checks.sh")


def _run(*args, timeout=120):
    return subprocess.run(
        ["bash", SCRIPT, "--python", sys.executable, *args], capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_every_step():
    run = _run("--help")
    assert run.returncode == 0, run.stderr
    for step in ("loss_check", "topk_kernel_16k", "engine_hook_4k", "engine_hook_16k", "vllm_topk"):
        assert step in run.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frobnicate"], "unknown argument '--frobnicate'"),
        (["--out"], "--out needs a file name"),
        (["--python"], "--python needs an interpreter"),
    ],
)
def test_bad_arguments_exit_2_naming_them(args, message):
    run = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and message in run.stderr, (run.returncode, run.stderr)


def test_missing_interpreter_is_refused():
    run = subprocess.run(
        ["bash", SCRIPT, "--python", "/nonexistent/python"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2 and "no python at '/nonexistent/python'" in run.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_refuses_and_writes_the_json(tmp_path):
    out = tmp_path / "figures.json"
    run = _run("--out", str(out))
    assert run.returncode == 3, (run.stdout, run.stderr)
    assert "no CUDA device" in run.stderr
    report = json.loads(out.read_text())
    assert report == {"error": "no CUDA device", "steps": {}, "passed": False}
