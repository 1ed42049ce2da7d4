"""How verl finds the plugin: the entry point in fresh processes (driver and Ray worker), external_lib, and a
broken install that must be loud instead of verl's late 'Unsupported loss mode: cppo'."""

import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest

from tests.support.verl_inputs import write_tiny_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGISTERED = "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as R; print('cppo' in R, R.get('cppo'))"


def _python(code: str, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    proc_env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_USE_EXTERNAL")}
    proc_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=proc_env,
    )


def test_entry_point_is_declared():
    eps = {ep.name: ep.value for ep in entry_points(group="verl.plugins")}
    assert eps.get("cppo") == "verl_cppo.plugin"


def test_import_verl_registers_cppo_in_a_fresh_process():
    out = _python(f"import verl\n{REGISTERED}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("True <function compute_policy_loss_cppo")


def test_plugins_off_then_external_lib_registers(tmp_path):
    """actor_rollout_ref.model.external_lib is imported by HFModelConfig at the start of init_model."""
    write_tiny_model_config(tmp_path)
    out = _python(
        f"""
        import verl
        {REGISTERED}
        from verl.workers.config import HFModelConfig
        HFModelConfig(path={str(tmp_path)!r}, external_lib="verl_cppo", load_tokenizer=False)
        {REGISTERED}
        """,
        VERL_USE_EXTERNAL_PLUGINS="none",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "False None"
    assert out.stdout.splitlines()[1].startswith("True <function compute_policy_loss_cppo")


def test_verl_use_external_modules_registers():
    out = _python(f"import verl\n{REGISTERED}", VERL_USE_EXTERNAL_PLUGINS="none", VERL_USE_EXTERNAL_MODULES="verl_cppo")
    assert out.stdout.startswith("True"), out.stderr


def test_broken_install_is_loud_and_never_unsupported_loss_mode():
    """A missing module inside the package: verl swallows the entry-point error at DEBUG; we log an ERROR and
    register a stand-in whose error names the original exception."""
    out = _python(
        """
        import sys
        sys.modules["verl_cppo.core.mask"] = None  # simulates a broken install of one of our modules
        import verl
        from verl.trainer.ppo.core_algos import get_policy_loss_fn
        fn = get_policy_loss_fn("cppo")
        try:
            fn(old_log_prob=None, log_prob=None, advantages=None, response_mask=None)
        except RuntimeError as exc:
            print("RAISED", exc)
        """
    )
    assert out.returncode == 0, out.stderr
    assert "verl-cppo failed to load (ModuleNotFoundError" in out.stderr
    assert "ERROR" in out.stderr and "Traceback" in out.stderr
    stand_in = "RAISED verl-cppo is installed but failed to import (ModuleNotFoundError: import of verl_cppo.core.mask"
    assert stand_in in out.stdout
    assert "Unsupported loss mode" not in out.stdout + out.stderr


@pytest.mark.slow
def test_ray_worker_process_has_cppo_registered():
    """Ray workers import verl when they unpickle verl objects; the entry point registers cppo there too."""
    out = _python(
        """
        import ray
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)

        @ray.remote
        def probe():
            import os
            import verl
            from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
            return os.getpid(), "cppo" in POLICY_LOSS_REGISTRY

        pid, registered = ray.get(probe.remote(), timeout=120)
        print("WORKER", pid != __import__("os").getpid(), registered)
        ray.shutdown()
        """,
        timeout=240,
        RAY_DEDUP_LOGS="0",
    )
    assert "WORKER True True" in out.stdout, out.stderr[-3000:]


def test_pure_math_modules_work_without_verl():
    """divergence/mask/topk import no verl: with verl hidden the package registers nothing and they still run."""
    out = _python(
        """
        import importlib.abc, importlib.util, sys

        class HideVerl(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "verl" or name.startswith("verl."):
                    raise ModuleNotFoundError(f"No module named {name!r}")

        sys.meta_path.insert(0, HideVerl())
        find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "verl" else find_spec(name, *a)
        import torch
        from verl_cppo.core.divergence import binary_tv
        from verl_cppo.core.topk_divergence import topk_divergence
        from verl_cppo.core.mask import position_weights
        print(position_weights(torch.arange(1.0, 4.0)[None], 3, 0.8).tolist(), "verl" in sys.modules)
        try:
            from verl_cppo import CPPOConfig
        except ImportError as exc:
            print("ImportError:", exc)
        """
    )
    assert out.returncode == 0, out.stderr
    assert "[[1.0, 0.8999999761581421, 0.800000011920929]] False" in out.stdout
    assert "ImportError: verl_cppo.CPPOConfig needs verl" in out.stdout


def test_broken_install_stops_a_launch_that_needs_the_plugin_in_the_driver():
    """verl's validate_config (what main_ppo calls before Ray starts) refuses launches that select cppo,
    cppo_grpo or a verl-cppo node, with the original import error as the cause; other launches go on."""
    out = _python(
        """
        import sys
        sys.modules["verl_cppo.core.mask"] = None  # simulates a broken install of one of our modules
        import verl
        import verl.trainer.main_ppo as main_ppo
        from tests.support.verl_hydra import CPPO_TARGET, compose_trainer

        launches = {
            "cppo": ["actor_rollout_ref.actor.policy_loss.loss_mode=cppo"],
            "legacy": ["actor_rollout_ref.actor.policy_loss.loss_mode=cppo", "trainer.use_v1=false",
                       "algorithm.rollout_correction.bypass_mode=true"],
            "estimator": ["algorithm.adv_estimator=cppo_grpo"],
            "target": [CPPO_TARGET],
            "vanilla": [],
        }
        for name, overrides in launches.items():
            try:
                main_ppo.validate_config(compose_trainer("dp", overrides), use_reference_policy=False,
                                         use_critic=False)
                print(name, "PASSED")
            except RuntimeError as exc:
                print(name, "REFUSED", exc, "| cause:", type(exc.__cause__).__name__)
        """
    )
    assert out.returncode == 0, out.stderr[-3000:]
    names = ("cppo", "legacy", "estimator", "target", "vanilla")
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(names))
    broken = "needs verl-cppo, which is installed but failed to import (ModuleNotFoundError: import of verl_cppo.core"
    assert lines["cppo"].startswith(f"REFUSED actor_rollout_ref.actor.policy_loss.loss_mode=cppo {broken}")
    assert lines["legacy"].startswith("REFUSED actor_rollout_ref.actor.policy_loss.loss_mode=cppo needs verl-cppo")
    assert lines["estimator"].startswith(f"REFUSED algorithm.adv_estimator=cppo_grpo {broken}")
    assert lines["target"].startswith("REFUSED actor_rollout_ref.actor.policy_loss._target_=verl_cppo.config.")
    refused = [line for name, line in lines.items() if name != "vanilla"]
    assert all(line.endswith("| cause: ModuleNotFoundError") for line in refused), refused
    assert lines["vanilla"] == "PASSED"
