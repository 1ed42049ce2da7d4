"""The package's layering, read from its source: what each layer may import, no cycles, short modules.

Every ``import`` and ``from ... import`` of every module of ``verl_cppo`` counts, including the ones inside
functions (a lazy import is still a dependency). ``from verl_cppo import hooks`` is an import of the module
``verl_cppo.hooks``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

PACKAGE = Path(REPO_ROOT) / "verl_cppo"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """Every module ``name`` imports (verl_cppo modules resolved to the module, others as written)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in MODULES else base)
    return found


IMPORTS = {name: _imports(name) for name in MODULES}


def _internal(name: str) -> set[str]:
    return {m for m in IMPORTS[name] if m in MODULES and m != "verl_cppo"}


def _in(name: str, layer: str) -> bool:
    return name == f"verl_cppo.{layer}" or name.startswith(f"verl_cppo.{layer}.")


def test_the_layers_are_folders():
    for layer in ("core", "kernels", "sharding", "topk", "advantage", "hooks", "testing"):
        assert (PACKAGE / layer / "__init__.py").is_file(), layer


@pytest.mark.parametrize("name", [m for m in MODULES if _in(m, "core")])
def test_core_imports_neither_verl_nor_the_rest_of_the_package(name):
    assert not {m for m in IMPORTS[name] if m == "verl" or m.startswith("verl.")}, IMPORTS[name]
    assert {m for m in _internal(name) if not _in(m, "core")} == set()


@pytest.mark.parametrize("name", [m for m in MODULES if _in(m, "kernels")])
def test_kernels_import_only_core(name):
    assert not {m for m in IMPORTS[name] if m == "verl" or m.startswith("verl.")}
    assert {m for m in _internal(name) if not (_in(m, "core") or _in(m, "kernels"))} == set()


def test_only_testing_imports_testing():
    outside = {name: _internal(name) for name in MODULES if not _in(name, "testing")}
    assert {name for name, deps in outside.items() if any(_in(m, "testing") for m in deps)} == set()


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for dep in sorted(_internal(name)):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(dep) :], dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[name] = 2

    for name in MODULES:
        if name not in state:
            visit(name)


def test_every_change_to_verl_goes_through_hooks():
    """No module outside ``hooks`` assigns to an attribute of a verl module or class: they call hooks.wrap."""
    offenders = []
    for name, path in MODULES.items():
        if _in(name, "hooks"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        verl_names = {
            alias.asname or alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
            if (getattr(node, "module", None) or alias.name).startswith("verl.")
            or (getattr(node, "module", None) or alias.name) == "verl"
        }
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                root = target
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(target, ast.Attribute) and isinstance(root, ast.Name) and root.id in verl_names:
                    offenders.append(f"{name}:{node.lineno}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr":
                arg = node.args[0] if node.args else None
                if isinstance(arg, ast.Name) and arg.id in verl_names:
                    offenders.append(f"{name}:{node.lineno}")
    assert offenders == []


@pytest.mark.parametrize("name", list(MODULES))
def test_modules_stay_short(name):
    assert len(MODULES[name].read_text(encoding="utf-8").splitlines()) <= 400


def test_testing_progress_reads_files_only():
    """``testing.progress`` formats what the launcher reads (metrics, log lines): no verl, no other layer."""
    name = "verl_cppo.testing.progress"
    assert not {m for m in IMPORTS[name] if m == "verl" or m.startswith("verl.")}, IMPORTS[name]
    assert _internal(name) == set()


def test_the_launcher_is_reached_by_import_not_by_path_edits():
    """tests/, ci/, benchmarks/ and examples/ import each other as packages from the repository root; only
    examples/dry_run.py (a user's entry point run as a file by examples/common.sh) puts the repository on
    sys.path, so that a job's working directory, not a stale install, provides the plugin."""
    root = PACKAGE.parent
    allowed = {"examples/dry_run.py"}
    offenders = []
    for folder in ("tests", "ci", "benchmarks", "examples", "verl_cppo"):
        for path in sorted((root / folder).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                call = node.func if isinstance(node, ast.Call) else None
                attr = getattr(call, "attr", None)
                target = getattr(getattr(call, "value", None), "attr", None)
                if attr == "spec_from_file_location" or (attr in ("insert", "append") and target == "path"):
                    if relative not in allowed:
                        offenders.append(f"{relative}:{node.lineno}")
    assert offenders == []
    for package in ("ci", "benchmarks", "benchmarks/stability", "examples", "examples/data"):
        assert (root / package / "__init__.py").is_file(), package
