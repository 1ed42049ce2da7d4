"""benchmarks/gpu_checks.sh where no GPU is: its arguments, its steps' imports and arguments (the cheap part of the
rehearsal; the whole one in the device image's packages is ``benchmarks/device_image_env.py``, see
benchmarks/README.md), and the clean refusal that still writes the JSON."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import check_imports, device_image_env, gpu_topk_check
from benchmarks.bench_loss import TokenParams
from tests.support import REPO_ROOT
from verl_cppo.config import CPPOConfig

SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "gpu_checks.sh")


def _run(*args, timeout=120):
    return subprocess.run(
        ["bash", SCRIPT, "--python", sys.executable, *args], capture_output=True, text=True, timeout=timeout
    )


def _steps() -> list[tuple[str, int, str, list[str]]]:
    run = subprocess.run(["bash", SCRIPT, "--list-steps"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return [(name, int(limit), module, args) for name, limit, module, *args in map(str.split, run.stdout.splitlines())]


def test_help_lists_every_step():
    run = _run("--help")
    assert run.returncode == 0, run.stderr
    names = [name for name, *_ in _steps()]
    assert names[:2] == ["loss_check", "topk_kernel_edges"], "correctness first"
    assert {"engine_hook_16k", "topk_kernel_16k", "loss_bench", "vllm_topk"} <= set(names)
    for name in names:
        assert name in run.stdout


@pytest.mark.parametrize("name, limit, module, args", _steps(), ids=lambda v: v if isinstance(v, str) else None)
def test_each_step_imports_and_parses_its_arguments(name, limit, module, args):
    """Every step's module, what it imports inside functions and its GPU_IMPORTS import in the project's
    environment, and its own parser accepts the step's arguments."""
    assert 0 < limit <= 240, (name, limit)
    assert os.path.isfile(os.path.join(REPO_ROOT, *module.split(".")) + ".py"), module
    summary = check_imports.check(module, args)
    assert summary.startswith(f"{module}: imports ok"), summary


def _topk_check(monkeypatch, capsys) -> tuple[int, str]:
    argv = ["gpu_topk_check", "--device", "cpu", "--tokens", "256", "--vocab", "512", "--k", "8"]
    monkeypatch.setattr(sys, "argv", argv)
    rc = gpu_topk_check.main()
    return rc, capsys.readouterr().out


def test_engine_hook_check_agrees_with_the_hook_on_cpu(monkeypatch, capsys):
    """The check's own layout of mu's inputs, its float64 reference, the hook (verl is installed here) and the
    kernel on the layout agree at a small shape, for tv and kl."""
    rc, out = _topk_check(monkeypatch, capsys)
    assert rc == 0, out
    assert out.count("RESULT path=hook") == 2 and out.count("RESULT path=kernel") == 2, out


def test_engine_hook_check_fails_on_a_misplaced_row(monkeypatch, capsys):
    """A divergence one row off the layout (what a hook that misaligned prompt and response would give) fails."""
    aligned = gpu_topk_check.kernel_divergence
    monkeypatch.setattr(gpu_topk_check, "kernel_divergence", lambda *a: torch.roll(aligned(*a), 1))
    rc, out = _topk_check(monkeypatch, capsys)
    assert rc == 1, out


def test_function_imports_are_read_from_the_source():
    source = "import os\n\ndef f():\n    import no_such_module_for_the_check\n    from pkg.sub import name, other\n"
    assert check_imports.function_imports(source) == [
        ("no_such_module_for_the_check", ()),
        ("pkg.sub", ("name", "other")),
    ]
    with pytest.raises(ModuleNotFoundError, match="no_such_module_for_the_check"):
        check_imports.import_all("no_such_module_for_the_check")


def test_a_refused_argument_is_named():
    with pytest.raises(ValueError, match=r"benchmarks.gpu_topk_check refuses the arguments \['--tokenz', '1'\]"):
        check_imports.check("benchmarks.gpu_topk_check", ["--tokenz", "1"])


def test_bench_loss_plain_params_match_the_config_defaults():
    """Without verl, bench_loss builds the token loss's parameters from TokenParams: same fields and defaults as
    CPPOConfig's token-loss fields."""
    plain, config = TokenParams(), CPPOConfig()
    for field in dataclasses.fields(plain):
        assert getattr(plain, field.name) == getattr(config, field.name), field.name


def test_the_device_image_stand_in_holds_the_image_packages_and_not_verls_stack():
    allowed = device_image_env.image_packages()
    assert {"torch", "triton", "numpy", "pytest", "transformers", "tokenizers"} <= allowed
    assert not {"verl", "ray", "tensordict", "omegaconf", "hydra-core", "vllm"} & allowed
    links, found, left_out = device_image_env.linked_entries(allowed)
    tops = {entry[0] for entry in links}
    assert {"torch", "triton", "numpy"} <= tops and not {"verl", "ray", "tensordict"} & tops
    assert {"verl", "ray", "tensordict"} <= set(left_out) and "torch" in found


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frobnicate"], "unknown argument '--frobnicate'"),
        (["--out"], "--out needs a file name"),
        (["--python"], "--python needs an interpreter"),
        (["--budget", "soon"], "--budget needs whole seconds"),
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
    assert report["error"] == "no CUDA device" and report["passed"] is False
    assert report["steps"] == {} and report["not_run"] == {}
    assert report["environment"]["torch"] == torch.__version__ and report["environment"]["device"] is None
