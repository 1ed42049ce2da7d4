"""Triton kernels. Each kernel module imports triton at import time: import one only after
``triton_available()``; the pure-torch code next to each kernel is the reference and the fallback.

``topk_divergence.py``: the row statistics of the Top-K divergences (``verl_cppo.topk``).
``cppo_triton.py`` + ``fused_loss.py``: the whole CPPO loss rule (divergence, position weights, prefix scan,
per-row quantile by selection, gate, loss coefficient, metric sums) as one program per response, launched
inside an autograd function; ``verl_cppo.mask`` / ``verl_cppo.loss`` are its reference and fallback, and
``use_triton`` is the choice ``cppo.kernel`` makes between them. Kernels run on CUDA tensors, or on CPU tensors
under Triton's interpreter (``TRITON_INTERPRET=1`` before triton is imported; the tests use it).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["interpreting", "triton_available", "triton_installed", "use_triton"]


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package is installed (a GPU is not required: Triton's interpreter runs on CPU)."""
    return importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    """Whether the ``triton`` package can be imported here, checked now (``triton_available`` is cached)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU tensors, slowly."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def use_triton(kernel: str, like: torch.Tensor) -> bool:
    """Whether the CPPO loss runs the fused kernel for `kernel` (a ``CPPOConfig.kernel`` value) on `like`'s device.

    auto: on CUDA tensors when Triton is installed; torch: never; triton: always, or a RuntimeError that
    says why it cannot (no Triton, or tensors on a device Triton does not serve here).
    """
    if kernel == "torch":
        return False
    if kernel == "auto":
        return like.is_cuda and triton_available()
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
