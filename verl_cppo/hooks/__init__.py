"""The one mechanism through which verl-cppo changes verl 0.9.1 at runtime (verl's files stay untouched).

Every change is one of two kinds, and both are applied only by this package:

* ``wrap(module, attribute, make_wrapper)``: replace a function or method of a verl module by a wrapper
  of the original, when (or, if already, as soon as) verl imports that module (``post_import``). The
  wrapper keeps verl's signature and attributes (``functools.wraps``), is marked with the hook's name so a
  second ``wrap`` is a no-op, and ``unwrap`` restores the original. ``aliases`` rebinds the same wrapper
  where verl's own modules imported the name before the hook ran.
* ``apply_diffs(names)``: a reviewed unified diff against verl 0.9.1 (``hooks/import_time_diffs/*.diff``) becomes the
  source of the module it patches at import time (``diffs``), where a change sits inside a function body
  and no wrapper can reach it.

``patches/README.md`` lists every hook with what it changes, why verl offers no extension point for it,
and the equivalent diff against verl 0.9.1.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from typing import Any

from verl_cppo.hooks.diffs import PatchError, install_patches
from verl_cppo.hooks.post_import import when_imported

__all__ = ["HOOK_MARK", "PatchError", "apply_diffs", "hook_name", "unwrap", "when_imported", "wrap"]

HOOK_MARK = "__verl_cppo_hook__"
"""Attribute set on every wrapper: the name of the hook that made it."""


def hook_name(obj: Any) -> str | None:
    """The name of the verl-cppo hook that wrapped ``obj``, or None for an original."""
    return getattr(obj, HOOK_MARK, None)


def _owner(module: Any, path: list[str]) -> Any:
    for name in path:
        module = getattr(module, name)
    return module


def _install(module: Any, attribute: str, make_wrapper: Callable[[Callable], Callable], name: str, aliases) -> None:
    *owner_path, attr = attribute.split(".")
    owner = _owner(module, owner_path)
    current = getattr(owner, attr)
    if hook_name(current) == name:
        return
    wrapper = make_wrapper(current)
    setattr(wrapper, HOOK_MARK, name)
    wrapper.__verl_cppo_original__ = current
    setattr(owner, attr, wrapper)
    for alias in aliases:
        bound = sys.modules.get(alias)  # modules that bound the name before the hook ran
        if bound is not None and getattr(bound, attr, None) is current:
            setattr(bound, attr, wrapper)


def wrap(
    module: str,
    attribute: str,
    make_wrapper: Callable[[Callable], Callable],
    *,
    name: str,
    aliases: tuple[str, ...] = (),
    now: bool = False,
) -> None:
    """Replace ``module.attribute`` (``attribute`` may be dotted: ``Class.method``) by ``make_wrapper(original)``.

    Applied when verl imports ``module`` (at once if it is imported; ``now=True`` imports it first).
    Idempotent per hook ``name``. ``aliases``: modules whose same-named attribute is rebound too."""
    if now:
        importlib.import_module(module)
    when_imported(
        module, functools.partial(_install, attribute=attribute, make_wrapper=make_wrapper, name=name, aliases=aliases)
    )


def unwrap(module: str, attribute: str, *, aliases: tuple[str, ...] = ()) -> bool:
    """Restore the original of a wrapped ``module.attribute`` (and its aliases); False if it was not wrapped."""
    mod = sys.modules.get(module)
    if mod is None:
        return False
    *owner_path, attr = attribute.split(".")
    owner = _owner(mod, owner_path)
    current = getattr(owner, attr)
    if hook_name(current) is None:
        return False
    original = current.__verl_cppo_original__
    setattr(owner, attr, original)
    for alias in aliases:
        bound = sys.modules.get(alias)
        if bound is not None and getattr(bound, attr, None) is current:
            setattr(bound, attr, original)
    return True


def apply_diffs(names: list[str]) -> list[str]:
    """Apply these diffs of ``hooks/import_time_diffs`` to verl's modules when they are imported; their module names."""
    return install_patches(names)
