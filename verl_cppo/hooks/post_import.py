"""Run a callback right after Python imports a given module, without importing it early.

The exclusion hooks wrap functions of verl modules that are heavy to import (the trainers, the workers) and
are imported by verl itself only in the processes that need them. Importing them when the plugin loads
(during ``import verl``, in every process) would cost seconds per process and risk import cycles, so the
patch is applied when the module has finished executing: a ``sys.meta_path`` finder delegates the search
to the other finders and wraps the found loader's ``exec_module``. A module already imported is patched at
once. Callbacks run at most once per module and process.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from collections.abc import Callable
from types import ModuleType

__all__ = ["when_imported"]

_PENDING: dict[str, list[Callable[[ModuleType], None]]] = {}
_LOCK = threading.RLock()


def when_imported(module_name: str, callback: Callable[[ModuleType], None]) -> None:
    """Call ``callback(module)`` once ``module_name`` is imported: now if it already is, else right after."""
    with _LOCK:
        module = sys.modules.get(module_name)
        if module is None:
            _PENDING.setdefault(module_name, []).append(callback)
            if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
                sys.meta_path.insert(0, _PostImportFinder())
            return
    callback(module)


def _run_pending(module_name: str, module: ModuleType) -> None:
    with _LOCK:
        callbacks = _PENDING.pop(module_name, [])
    for callback in callbacks:
        callback(module)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader another finder returns for a module with pending callbacks."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _PENDING:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or isinstance(loader, type) or not hasattr(loader, "exec_module"):
            return spec  # no per-module loader instance to wrap (builtin / frozen)
        exec_module = loader.exec_module

        def exec_then_run_pending(module: ModuleType) -> None:
            exec_module(module)
            _run_pending(fullname, module)

        loader.exec_module = exec_then_run_pending
        return spec
