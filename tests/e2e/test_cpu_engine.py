"""The CPU test backend: off unless switched on, refuses GPU machines, and runs verl's real FSDP2 engine and
weight export on the CPU platform (tests/support/cpu_engine_script.py, in a fresh process). That verl's vLLM
weight sync delivers the exported weights to the rollout is checked through main_ppo in
tests/testing/test_vllm_cpu.py."""

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from verl.plugin.platform import PlatformRegistry

from tests.support import REPO_ROOT
from verl_cppo.testing import tiny_task as T

ROOT = REPO_ROOT
SWITCH = {"VERL_CPPO_CPU_TESTING": "1", "VERL_USE_EXTERNAL_MODULES": "verl_cppo.testing.register"}


def test_plugin_alone_registers_no_cpu_backend():
    """This pytest process imported verl and the verl_cppo plugin (conftest) without the switch."""
    import verl_cppo  # noqa: F401

    assert "cpu" not in PlatformRegistry.registered_names()
    assert "verl_cppo.testing.register" not in sys.modules


@pytest.mark.parametrize(
    ("env", "cuda", "message"),
    [
        ({"VERL_CPPO_CPU_TESTING": None}, False, "needs VERL_CPPO_CPU_TESTING=1"),
        ({"VERL_CPPO_CPU_TESTING": "1"}, True, "CUDA is available"),
        ({"VERL_CPPO_CPU_TESTING": "1", "VERL_PLATFORM": "nvidia"}, False, "needs VERL_PLATFORM=cpu"),
    ],
    ids=["no-switch", "cuda-available", "other-platform"],
)
def test_switch_refuses_before_registering_anything(monkeypatch, env, cuda, message):
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    with pytest.raises(RuntimeError, match=message):
        importlib.import_module("verl_cppo.testing.register")
    assert "verl_cppo.testing.register" not in sys.modules
    test_plugin_alone_registers_no_cpu_backend()


def test_fsdp2_engine_trains_cppo_and_syncs_weights_on_cpu(tmp_path):
    model_dir = T.build(str(tmp_path), n_train=4, n_val=4)["model"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VERL_USE_EXTERNAL", "VERL_CPPO", "VERL_PLAT"))}
    out = subprocess.run(
        [sys.executable, "-m", "tests.support.cpu_engine_script", model_dir],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**env, **SWITCH},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.split("RESULT ", 1)[1].splitlines()[0])
    # the switch registered the platform and the engine, and installed the vLLM CPU shims
    assert result["device"] == "cpu" and "cpu" in result["platforms"]
    assert result["engine"] == "FSDPEngineWithLMHead"
    assert result["generate_hook"] == "vllm_cpu"
    # the engine computes the same log-probs as HF: within twice a float32 forward's rounding (the two share no
    # kernel order; tests/support/float32_bounds.py, ~1e-4 here); a wrong weight, token shift or temperature
    # moves log-probs by > 1e-2
    assert result["infer_vs_hf_max_abs"] <= result["forward_bound"]
    assert all(abs(loss) < 1e3 for loss in result["losses"])  # finite, from verl's ppo_loss with cppo
    assert len(result["cppo_metrics"]) == 10
    assert result["masked"][0] == 0.0  # first mini-batch: pi == mu, nothing masked
    assert result["moved_toward_advantage"] > 0
    # the export holds every weight the model has, under HF's names, and they are the trained ones
    assert "lm_head.weight" in result["exported"]
    assert result["loaded"] == len(result["exported"]) and result["not_loaded"] == []
    assert result["export_moved"] > 1e-4  # the export carries the update, not the initial weights
    assert result["export_vs_engine_max_abs"] <= result["forward_bound"]  # the same two forwards, trained weights
