"""A CPU platform for verl 0.9.1, registered through ``verl.plugin.platform.PlatformRegistry``.

verl ships platforms for NVIDIA, Ascend and AMD only; on a CPU-only machine it falls back to "nvidia" and
the first ``torch.cuda`` call fails. ``PlatformCPU`` makes ``get_device_name()`` "cpu", ``get_device_id()``
"cpu" (so ``tensor.to(get_device_id())`` is a no-op), the communication backend gloo, and the device module
a copy of ``torch.cpu`` plus the memory / RNG / IPC calls verl makes on ``torch.cuda`` (no-ops or the CPU
RNG). Ray placement stays on "GPU" bundles: CPU runs start Ray with fake GPU slots
(``+ray_kwargs.ray_init.num_gpus=N``), one per worker, exactly as verl's resource pools expect.

``install()`` also registers verl's FSDP engines for device "cpu" (FSDP2 only: FSDP1 refuses CPU
parameters with sync_module_states) and installs the process-group hook (hook ``cpu_process_group_backend`` in
patches/README.md).
Call it through ``verl_cppo.testing.register`` only.
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Any

import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry

from verl_cppo import hooks

__all__ = ["PlatformCPU", "cpu_device_module", "install"]


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _zero(*args: Any, **kwargs: Any) -> int:
    return 0


def _mem_get_info(*args: Any, **kwargs: Any) -> tuple[int, int]:
    """(free, total) bytes of host memory, read from /proc/meminfo (verl logs it; nothing allocates by it)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", 0), info.get("MemTotal", 0)
    except OSError:
        return 0, 0


def cpu_device_module() -> types.ModuleType:
    """``torch.cpu`` plus the ``torch.cuda`` calls verl 0.9.1 makes through ``get_torch_device()``."""
    module = types.ModuleType("verl_cppo_cpu_device")
    for name in dir(torch.cpu):
        if not name.startswith("_"):
            setattr(module, name, getattr(torch.cpu, name))
    module.current_device = lambda: "cpu"
    module.set_device = _noop
    module.empty_cache = _noop
    module.ipc_collect = _noop
    module.reset_peak_memory_stats = _noop
    module.set_per_process_memory_fraction = _noop
    module.memory_allocated = _zero
    module.memory_reserved = _zero
    module.max_memory_allocated = _zero
    module.max_memory_reserved = _zero
    module.mem_get_info = _mem_get_info
    module.get_device_name = lambda *args, **kwargs: "cpu"
    module.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    module.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    module.manual_seed = torch.manual_seed
    module.manual_seed_all = torch.manual_seed
    module.is_available = lambda: True
    module.device_count = lambda: 1
    return module


class PlatformCPU(PlatformBase):
    """verl's device abstraction on the host CPU (test runs only; see ``verl_cppo.testing``)."""

    _device_module = cpu_device_module()

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return self._device_module

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # never picked by auto-detection: only VERL_PLATFORM=cpu selects it
        return False

    def current_device(self) -> str:  # a device, not an index: tensor.to(get_device_id()) must stay on CPU
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray exports it for the fake GPU slots; verl only records it
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def _register_cpu_engines() -> None:
    """Register verl's FSDP2 engines (language and value model) for device "cpu" (idempotent)."""
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead

    for model_type, engine in (("language_model", FSDPEngineWithLMHead), ("value_model", FSDPEngineWithValueHead)):
        if "cpu" not in EngineRegistry._engines.get(model_type, {}).get("fsdp2", {}):
            EngineRegistry.register(model_type=model_type, backend="fsdp2", device="cpu")(engine)


def _wrap_initialize_global_process_group_ray(original):
    @functools.wraps(original)
    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        return original(timeout_second=timeout_second, backend=backend or "cpu:gloo")

    return initialize_global_process_group_ray


def _install_process_group_hook() -> None:
    """verl's default backend string "cpu:gloo,<device>:<backend>" is "cpu:gloo,cpu:gloo" here, which torch
    rejects (duplicate device type); use "cpu:gloo" when the caller passes none (patches/README.md, 2)."""
    hooks.wrap(
        "verl.utils.distributed",
        "initialize_global_process_group_ray",
        _wrap_initialize_global_process_group_ray,
        name="cpu_process_group_backend",
        aliases=("verl.workers.engine_workers", "verl.checkpoint_engine.base"),  # modules that bound the name
        now=True,
    )


def install() -> None:
    """Register the platform and engines, install the process-group hook (idempotent)."""
    if PlatformRegistry.get("cpu") is not PlatformCPU:
        PlatformRegistry.register(platform="cpu")(PlatformCPU)
    _install_process_group_hook()
    _register_cpu_engines()
