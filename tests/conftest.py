"""Shared fixtures. CPU only; importing verl_cppo registers the `cppo` loss with verl's real registry."""

import os

import pytest
import torch

# The fused kernel's tests (tests/kernels/) run in Triton's CPU interpreter. It must be on before triton is
# first imported (verl imports it), and it only matters where a test asks for cppo.kernel=triton on CPU
# tensors; kernel=auto still picks the torch path on CPU. Run with TRITON_INTERPRET=0 to opt out.
os.environ.setdefault("TRITON_INTERPRET", "1")
from verl_cppo.testing.launcher import TEST_ENV

for _key, _value in TEST_ENV.items():  # no W&B, no Hub, no tokenizer threads, in every test and its children
    os.environ.setdefault(_key, _value)
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.hookimpl(trylast=True)  # after -m has deselected
def pytest_collection_modifyitems(config, items):
    """A `vllm` test selected where vLLM is not installed is an error, not a skip (ci/setup_env.sh installs it)."""
    import importlib.util

    selected = [item.nodeid for item in items if item.get_closest_marker("vllm")]
    if selected and importlib.util.find_spec("vllm") is None:
        raise pytest.UsageError(
            f"{len(selected)} selected test(s) need vLLM (e.g. {selected[0]}): run them in the environment "
            "ci/setup_env.sh makes (.venv/bin/python -m pytest)"
        )


@pytest.fixture(autouse=True)
def _no_recorded_launch():
    """Hydra's record of a launch's command-line overrides is per process (``@hydra.main`` and the dry run's
    ``compose_config`` set it; ``verl_cppo.launch.unread_settings`` reads it): a test never sees an earlier test's."""
    from hydra.core.hydra_config import HydraConfig

    yield
    HydraConfig.instance().cfg = None


@pytest.fixture(autouse=True)
def _no_leaked_topk_env():
    """The driver exports VERL_CPPO_TOPK to its own process for a Top-K launch; a test that runs the driver in the
    pytest process must not hand it to later tests' main_ppo children (their Ray workers would apply the Top-K
    diffs to a binary launch). ``monkeypatch.delenv(..., raising=False)`` of an unset variable restores nothing."""
    from verl_cppo.topk.setup import ENV_TOPK

    before = os.environ.get(ENV_TOPK)
    yield
    if before is None:
        os.environ.pop(ENV_TOPK, None)
    else:
        os.environ[ENV_TOPK] = before
