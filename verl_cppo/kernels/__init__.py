"""Triton kernels. Each kernel module imports triton at import time: import one only after
``triton_available()``; the pure-torch code next to each kernel is the reference and the fallback."""

from __future__ import annotations

import functools
import importlib.util

__all__ = ["triton_available"]


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package is installed (a GPU is not required: Triton's interpreter runs on CPU)."""
    return importlib.util.find_spec("triton") is not None
