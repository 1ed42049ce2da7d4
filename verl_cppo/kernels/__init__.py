"""Triton twins of ``verl_cppo.core`` and the choice between a kernel and its pure-torch reference.

This package imports only torch and ``verl_cppo.core`` (never verl). Each kernel module imports triton at
import time: import one only after ``triton_available()``; the pure-torch code in core is each kernel's
reference and fallback.

``topk_statistics.py``: the row statistics of the Top-K divergences (``verl_cppo.core.topk_divergence``);
``topk_divergence()`` below picks that kernel or the torch pass (``backend``).
``cppo_triton.py`` + ``fused_loss.py``: the whole CPPO loss rule (divergence, position weights, prefix scan,
per-row quantile by selection, gate, loss coefficient, metric sums) as one program per response, launched
inside an autograd function; ``verl_cppo.core.mask`` / ``verl_cppo.core.token_loss`` are its reference and
fallback, and ``use_triton`` is the choice ``cppo.kernel`` makes between them. Kernels run on CUDA tensors, or
on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` before triton is imported; the tests use it).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

import torch

from verl_cppo.core import topk_divergence as _topk

__all__ = ["Backend", "interpreting", "topk_divergence", "triton_available", "triton_installed", "use_triton"]

Backend = Literal["auto", "torch", "triton"]
"""auto = Triton on CUDA tensors when it is installed, torch otherwise; torch / triton = forced."""
BACKENDS = ("auto", "torch", "triton")


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


def use_triton(kernel: Backend, like: torch.Tensor) -> bool:
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


def _topk_uses_triton(logits: torch.Tensor, backend: Backend) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"topk_divergence: backend={backend!r}; known: {BACKENDS}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise ValueError("topk_divergence: backend='triton' but triton is not installed (extra 'kernels')")
        if logits.dtype == torch.float64:
            raise ValueError("topk_divergence: backend='triton' takes fp16/bf16/fp32 logits, got float64")
        return True
    return logits.is_cuda and logits.dtype != torch.float64 and triton_available()


def topk_divergence(logits: torch.Tensor, *args, backend: Backend = "auto", **kwargs) -> torch.Tensor:
    """``verl_cppo.core.topk_divergence.topk_divergence`` with its pass over the logits on ``backend``.

    backend: "auto" (Triton on CUDA when installed, else torch), "torch", or "triton" (CPU tensors only under
    TRITON_INTERPRET=1, Triton's interpreter: slow, for tests). Other arguments as the core function."""
    row_statistics = None
    if _topk_uses_triton(logits, backend):
        from verl_cppo.kernels.topk_statistics import row_statistics_triton

        row_statistics = row_statistics_triton
    return _topk.topk_divergence(logits, *args, row_statistics=row_statistics, **kwargs)
