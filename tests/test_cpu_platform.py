"""The CPU test backend: off unless switched on, refuses GPU machines, and runs verl's real FSDP2 engine and
weight export on the CPU platform (tests/cpu_engine_script.py, in a fresh process)."""

import json
import os
import subprocess
import sys

import pytest

from verl_cppo.testing import tiny_task as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWITCH = {"VERL_CPPO_CPU_TESTING": "1", "VERL_USE_EXTERNAL_MODULES": "verl_cppo.testing.register"}
STATE = """
from verl.plugin.platform import PlatformRegistry
from verl.workers.rollout.base import _ROLLOUT_REGISTRY
from verl.workers.rollout.replica import RolloutReplicaRegistry
print("STATE", "cpu" in PlatformRegistry.registered_names(), ("hf_cpu", "async") in _ROLLOUT_REGISTRY,
      "hf_cpu" in RolloutReplicaRegistry._registry)
"""


def _python(code: str, timeout: float = 180, script: str | None = None, args=(), **env) -> subprocess.CompletedProcess:
    proc_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("VERL_USE_EXTERNAL", "VERL_CPPO", "VERL_PLAT"))
    }
    proc_env.update(env)
    command = [sys.executable, script, *args] if script else [sys.executable, "-c", code]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=proc_env)


def test_plugin_alone_registers_no_cpu_backend():
    out = _python(f"import verl, verl_cppo\n{STATE}")
    assert out.returncode == 0, out.stderr
    assert "STATE False False False" in out.stdout


def test_switch_registers_platform_engine_and_rollout():
    code = (
        "import verl\n"
        + STATE
        + """
from verl.utils.device import get_device_name, get_device_id
from verl.workers.engine import EngineRegistry
from verl.workers.rollout.base import get_rollout_class
from verl.workers.rollout.replica import get_rollout_replica_class
print(get_device_name(), get_device_id(), EngineRegistry.get_engine_cls("language_model", "fsdp2").__name__,
      get_rollout_class("hf_cpu").__name__, get_rollout_replica_class("hf_cpu").__name__)
"""
    )
    out = _python(code, **SWITCH)
    assert out.returncode == 0, out.stderr
    assert "STATE True True True" in out.stdout
    assert "cpu cpu FSDPEngineWithLMHead HFCPUServerAdapter HFCPUReplica" in out.stdout


@pytest.mark.parametrize(
    ("code", "env", "message"),
    [
        ("import verl", {"VERL_USE_EXTERNAL_MODULES": "verl_cppo.testing.register"}, "needs VERL_CPPO_CPU_TESTING=1"),
        ("import torch; torch.cuda.is_available = lambda: True; import verl", SWITCH, "CUDA is available"),
        ("import verl", {**SWITCH, "VERL_PLATFORM": "nvidia"}, "needs VERL_PLATFORM=cpu"),
    ],
    ids=["no-switch", "cuda-available", "other-platform"],
)
def test_switch_refuses(code, env, message):
    out = _python(code, **env)
    assert out.returncode != 0
    assert "RuntimeError" in out.stderr and message in out.stderr


def test_fsdp2_engine_trains_cppo_and_syncs_weights_on_cpu(tmp_path):
    model_dir = T.build(str(tmp_path), n_train=4, n_val=4)["model"]
    out = _python(
        "", timeout=300, script=os.path.join(ROOT, "tests", "cpu_engine_script.py"), args=[model_dir], **SWITCH
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["device"] == "cpu" and result["engine"] == "FSDPEngineWithLMHead"
    assert result["infer_vs_hf_max_abs"] < 1e-5  # the engine computes the same log-probs as HF
    assert all(abs(loss) < 1e3 for loss in result["losses"])  # finite, from verl's ppo_loss with cppo
    assert len(result["cppo_metrics"]) == 10
    assert result["masked"][0] == 0.0  # first mini-batch: pi == mu, nothing masked
    assert result["moved_toward_advantage"] > 0
    assert "lm_head.weight" in result["exported"] and result["loaded"] == len(result["exported"])
    assert result["server_vs_engine_max_abs"] < 1e-5  # the rollout serves exactly the trained weights
