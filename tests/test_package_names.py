"""A package's own name never shadows one of its submodules, or the other way round.

Importing ``pkg.name`` sets the attribute ``pkg.name`` to that submodule, replacing a function ``pkg.name``
defined in ``pkg/__init__.py``: every later ``pkg.name(...)`` then raises "'module' object is not callable". A
lazy import inside the function itself (a kernel module loaded on the first CUDA call) makes the second call
fail, on a GPU only."""

import importlib
import pkgutil
import types

import verl_cppo


def test_no_package_attribute_is_also_a_submodule_name():
    clashes = []
    for info in pkgutil.walk_packages(verl_cppo.__path__, "verl_cppo."):
        if not info.ispkg or info.name.startswith("verl_cppo.testing"):
            continue
        package = importlib.import_module(info.name)
        for sub in pkgutil.iter_modules(package.__path__):
            attribute = vars(package).get(sub.name)
            if attribute is not None and not isinstance(attribute, types.ModuleType):
                clashes.append(f"{info.name}.{sub.name}: a {type(attribute).__name__} and a submodule")
    assert clashes == []


def test_the_topk_divergence_entry_point_survives_its_kernel_import():
    """The case that broke: ``kernels.topk_divergence`` stays the function once the Triton kernel is loaded."""
    from verl_cppo import kernels

    function = kernels.topk_divergence
    importlib.import_module("verl_cppo.kernels.topk_statistics")
    assert kernels.topk_divergence is function and callable(kernels.topk_divergence)
