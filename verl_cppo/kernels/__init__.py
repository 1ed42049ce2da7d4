"""Fused kernels for the CPPO loss, and the choice between them and the torch path.

``cppo_triton.py`` computes the whole per-token rule (divergence, position weights, prefix scan, per-row
quantile by selection, gate, loss coefficient) in one Triton program per response, plus the per-row sums the
metrics need; ``fused_loss.py`` launches it inside an autograd function. ``verl_cppo.mask`` /
``verl_cppo.loss`` stay the reference and the fallback. The Triton modules are imported only when used: on
CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, which the tests use).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["interpreting", "triton_installed", "use_triton"]


def triton_installed() -> bool:
    """Whether the ``triton`` package can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def _triton_installed_cached() -> bool:  # the per-call check of kernel=auto on CUDA tensors
    return triton_installed()


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU tensors, slowly."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def use_triton(kernel: str, like: torch.Tensor) -> bool:
    """Whether the loss runs the fused kernel for `kernel` (a ``CPPOConfig.kernel`` value) on `like`'s device.

    auto: on CUDA tensors when Triton is installed; torch: never; triton: always, or a RuntimeError that
    says why it cannot (no Triton, or tensors on a device Triton does not serve here).
    """
    if kernel == "torch":
        return False
    if kernel == "auto":
        return like.is_cuda and _triton_installed_cached()
    if not triton_installed():
        raise RuntimeError(
            "cppo.kernel='triton' but the triton package is not installed; install it or use kernel=auto / torch"
        )
    if not (like.is_cuda or (like.device.type == "cpu" and interpreting())):
        raise RuntimeError(
            f"cppo.kernel='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got device "
            f"{like.device}; use kernel=auto or torch"
        )
    return True
