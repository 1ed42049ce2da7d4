"""Switch verl to the CPU test backend in this process: ``VERL_USE_EXTERNAL_MODULES=verl_cppo.testing.register``.

Importing this module (verl does it during ``import verl`` in every process that has the variable) registers
the "cpu" platform and the FSDP2 engines for device "cpu", verl's Megatron engines for device "cpu" with their
CPU shims (``verl_cppo.testing.cpu_megatron``), installs the CPU shims of verl's vLLM rollout
(``verl_cppo.testing.vllm_cpu``) and of Ulysses SP on gloo (``verl_cppo.testing.cpu_ulysses``) and, with
``VERL_CPPO_LOSS_PROBE=1``, the loss-input probe (``verl_cppo.testing.loss_probe``), and selects the platform
(``VERL_PLATFORM=cpu``). It raises instead when:

* ``VERL_CPPO_CPU_TESTING`` is not "1" (the explicit switch; a stray module name alone does nothing but fail);
* CUDA is available (a GPU machine must never train on the CPU test backend by accident);
* ``VERL_PLATFORM`` names another platform, or verl already resolved another platform in this process.
"""

from __future__ import annotations

import os

import torch

from verl_cppo.testing import PLATFORM_NAME, SWITCH_ENV


def register() -> None:
    if os.environ.get(SWITCH_ENV) != "1":
        raise RuntimeError(
            f"verl_cppo.testing.register switches verl to the CPU test backend and needs {SWITCH_ENV}=1 "
            f"(got {os.environ.get(SWITCH_ENV)!r}); remove it from VERL_USE_EXTERNAL_MODULES for real runs"
        )
    if torch.cuda.is_available():
        raise RuntimeError(
            f"{SWITCH_ENV}=1 but CUDA is available: the CPU test backend refuses to run on a GPU machine"
        )
    platform = os.environ.setdefault("VERL_PLATFORM", PLATFORM_NAME)
    if platform.strip().lower() != PLATFORM_NAME:
        raise RuntimeError(f"{SWITCH_ENV}=1 needs VERL_PLATFORM={PLATFORM_NAME} (or unset), got {platform!r}")

    from verl.plugin.platform import platform_manager

    current = platform_manager._current_platform
    if current is not None and current.device_name != "cpu":
        raise RuntimeError(f"verl already resolved platform {current.device_name!r} before {__name__} ran")

    from verl_cppo.testing import cpu_megatron, cpu_platform, cpu_ulysses, vllm_cpu

    cpu_platform.install()
    cpu_megatron.install()
    cpu_ulysses.install()
    vllm_cpu.install()
    if os.environ.get("VERL_CPPO_LOSS_PROBE") == "1":  # what ppo_loss receives, as metrics (loss_probe)
        from verl_cppo.testing import loss_probe

        loss_probe.install()


register()
