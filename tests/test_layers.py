"""The package's layering, read from its source: what each layer may import, no cycles, short modules.

Every ``import`` and ``from ... import`` of every module of ``verl_cppo`` counts, including the ones inside
functions (a lazy import is still a dependency). ``from verl_cppo import hooks`` is an import of the module
``verl_cppo.hooks``.
"""

from __future__ import annotations

import ast
import re
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
    for layer in (
        "core",
        "kernels",
        "sharding",
        "topk",
        "advantage",
        "hooks",
        "launch",
        "math_task",
        "trainer",
        "testing",
    ):
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


def _room(name: str) -> str:
    """The folder (``verl_cppo.launch``) or root module (``verl_cppo.loss``) a module belongs to."""
    return ".".join(name.split(".")[:2])


def test_the_rooms_import_each_other_without_cycles():
    """Between folders and root modules too: a room that imports another is never imported back by it."""
    edges = {room: set() for room in map(_room, MODULES)}
    for name in MODULES:
        edges[_room(name)] |= {_room(dep) for dep in _internal(name)} - {_room(name)}
    done: set[str] = set()

    def visit(room: str, path: tuple[str, ...]) -> None:
        for dep in sorted(edges[room]):
            assert dep not in path, "rooms import each other: " + " -> ".join([*path, dep])
            if dep not in done:
                visit(dep, (*path, dep))
        done.add(room)

    for room in sorted(edges):
        visit(room, (room,))


def test_config_paths_imports_only_the_standard_library_when_loaded():
    """The plugin's broken-install guard asks ``uses_the_plugin`` when the rest of the package failed to import."""
    tree = ast.parse(MODULES["verl_cppo.config_paths"].read_text(encoding="utf-8"))
    top = {
        alias.name if isinstance(node, ast.Import) else node.module
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert top <= {"__future__", "collections.abc", "typing"}, top


def _verl_names(tree: ast.Module) -> set[str]:
    """Names a module binds to verl modules or to objects imported from verl."""
    return {
        alias.asname or alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
        if (getattr(node, "module", None) or alias.name).startswith("verl.")
        or (getattr(node, "module", None) or alias.name) == "verl"
    }


def _root(node: ast.expr) -> ast.expr:
    while isinstance(node, ast.Attribute | ast.Subscript):
        node = node.value
    return node


def _is_function(value: ast.expr, defined: set[str]) -> bool:
    """A lambda, a function the module defines (``def``), a bound method or a functools.partial / wraps."""
    if isinstance(value, ast.Lambda):
        return True
    if isinstance(value, ast.Name):
        return value.id in defined
    if isinstance(value, ast.Attribute):
        return isinstance(value.value, ast.Name) and value.value.id in ("self", "cls")
    if isinstance(value, ast.Call):
        name = value.func.attr if isinstance(value.func, ast.Attribute) else getattr(value.func, "id", None)
        return name in ("partial", "wraps", "MethodType") or (
            isinstance(value.func, ast.Call) and _is_function(value.func, defined)
        )
    return False


def _fresh(scope: ast.AST) -> set[str]:
    """Names a scope binds to objects it builds itself (a call other than getattr): not verl's objects."""
    return {
        target.id
        for node in ast.walk(scope)
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Call)
        and getattr(node.value.func, "id", None) != "getattr"
        for target in node.targets
        if isinstance(target, ast.Name)
    }


def _attribute_changes(tree: ast.Module) -> list[tuple[int, ast.expr, ast.expr | None]]:
    """(line, object, assigned value) of every ``obj.attr = value``, ``setattr(obj, ...)``, ``delattr(obj, ...)``."""
    changes = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute):
                    changes.append((node.lineno, target.value, node.value))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("setattr", "delattr") and node.args:
            value = node.args[2] if len(node.args) > 2 else None
            changes.append((node.lineno, node.args[0], value))
    return changes


def verl_changes_outside_hooks(source: str) -> list[int]:
    """Lines of ``source`` that change verl at runtime without ``verl_cppo.hooks``:

    * any attribute set (or setattr / delattr) on a name imported from verl (``verl_module.fn = ...``);
    * a function (lambda, ``def``, bound method, partial) put on an attribute of an object the code did not
      build itself: one it was handed or reached (``trainer.logger.log = f``, ``tracker = getattr(trainer,
      "logger"); tracker.log = f``), which is how a verl object's behaviour is replaced in place.
    """
    tree = ast.parse(source)
    verl_names = _verl_names(tree)
    defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    lines = []  # every function is a scope, and the module (scopes overlap: a line may be found twice)
    scopes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))]
    for scope in scopes:
        body = ast.Module(body=scope.body, type_ignores=[])
        fresh = _fresh(scope)
        for line, obj, value in _attribute_changes(body):
            root = _root(obj)
            name = root.id if isinstance(root, ast.Name) else None
            if name in verl_names:
                lines.append(line)
            elif value is not None and _is_function(value, defined) and name not in ("self", "cls", *fresh):
                lines.append(line)
    return sorted(set(lines))


def test_every_change_to_verl_goes_through_hooks():
    """No module outside ``hooks`` changes a verl module, class or object in place: they call hooks.wrap."""
    offenders = [
        f"{name}:{line}"
        for name, path in MODULES.items()
        if not _in(name, "hooks")
        for line in verl_changes_outside_hooks(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


REPLACED_IN_PLACE = [
    # the old KeepLatestAndBest._hook: an instance attribute of verl's Tracking replaced by a wrapper
    "def _hook(self, trainer):\n    tracker = getattr(trainer, 'logger', None)\n    log = tracker.log\n"
    "    def log_and_record(data, step):\n        return log(data, step)\n    tracker.log = log_and_record\n",
    "def f(trainer):\n    trainer.logger.log = lambda *a: None\n",
    "import functools\ndef f(trainer, g):\n    setattr(trainer.logger, 'log', functools.partial(g, 1))\n",
    "from verl.utils import tracking\ntracking.Tracking.log = print\n",
    "import verl.utils.tracking as t\nsetattr(t.Tracking, 'log', None)\n",
    "from verl.utils.tracking import Tracking\ndel_ = delattr(Tracking, 'log')\n",
]
LEFT_ALONE = [
    "class A:\n    def f(self):\n        self.log = self.g\n    def g(self):\n        pass\n",
    "import types\ndef noop():\n    pass\ndef f():\n    m = types.ModuleType('m')\n    m.noop = noop\n",
    "def f(stats):\n    stats.messages += 1\n",  # data, not behaviour
    "import sys\ndef f():\n    sys.stdout = sys.stderr\n",
]


@pytest.mark.parametrize("source", REPLACED_IN_PLACE)
def test_the_rule_catches_in_place_changes_of_verl_objects(source):
    assert verl_changes_outside_hooks(source)


@pytest.mark.parametrize("source", LEFT_ALONE)
def test_the_rule_leaves_the_packages_own_objects_alone(source):
    assert verl_changes_outside_hooks(source) == []


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
    sys.path, so that a job's working directory, not a stale install, provides the plugin;
    verl_cppo/math_task/sandbox.py's child process loads the scoring module by file, since importing the package
    would import verl (~5 s a child)."""
    root = PACKAGE.parent
    allowed = {"examples/dry_run.py", "verl_cppo/math_task/sandbox.py"}
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


TESTS = Path(REPO_ROOT) / "tests"
TESTED_THROUGH_MAIN_PPO = {
    # modules that only a main_ppo run exercises (the CPU switch's platform and registration, the replay buffer
    # the launcher selects): the runs of tests/e2e and ci/ test them
    "verl_cppo.testing.cpu_platform",
    "verl_cppo.testing.register",
    "verl_cppo.testing.replay_buffer",
}
TESTED_BESIDE_ITS_TWIN = {
    # the Triton Top-K statistics are checked with the torch ones against the same float64 reference
    "verl_cppo.kernels.topk_statistics": "tests/core/test_topk_divergence.py",
}


def _tests_of(name: str) -> tuple[Path, str]:
    """The test folder mirroring ``name``'s folder and the module's own test file name."""
    parts = name.split(".")[1:]
    return TESTS.joinpath(*parts[:-1]), f"test_{parts[-1]}.py"


def _tested_in_its_folder(name: str) -> bool:
    """``name`` has its own test file in the mirrored folder, or a test of that folder imports it."""
    folder, own = _tests_of(name)
    if (folder / own).is_file():
        return True
    package, _, module = name.rpartition(".")
    imported = re.compile(rf"\b{re.escape(name)}\b|from {re.escape(package)} import [^\n]*\b{module}\b")
    return any(imported.search(test.read_text(encoding="utf-8")) for test in folder.glob("test_*.py"))


@pytest.mark.parametrize("name", [m for m in MODULES if MODULES[m].name != "__init__.py"])
def test_the_tests_mirror_the_package(name):
    """tests/<folder>/ mirrors verl_cppo/<folder>/ (tests/ the package root); a module is tested there, in
    test_<module>.py or, when it is tested through the module that drives it, in a test of that folder that
    imports it (verl_cppo/README.md, *Layout*)."""
    folder, _ = _tests_of(name)
    assert (folder / "__init__.py").is_file(), folder
    if name in TESTED_BESIDE_ITS_TWIN:
        assert name in (Path(REPO_ROOT) / TESTED_BESIDE_ITS_TWIN[name]).read_text(encoding="utf-8")
    else:
        assert name in TESTED_THROUGH_MAIN_PPO or _tested_in_its_folder(name), name


def test_the_mirror_rule_finds_untested_modules():
    assert _tested_in_its_folder("verl_cppo.launch.driver")  # tests/launch/test_driver.py
    assert _tested_in_its_folder("verl_cppo.launch.dry_run")  # imported by tests/launch/test_verl_checks.py
    assert not _tested_in_its_folder("verl_cppo.launch.no_such_module")
    assert not _tested_in_its_folder("verl_cppo.topk.config_paths")  # its name is tested, but not in tests/topk


def test_the_core_tests_load_without_verl():
    """tests/core, like verl_cppo/core, needs torch alone: its tests load with verl made unimportable."""
    import subprocess
    import sys

    code = (
        "import sys, glob, importlib\nsys.modules['verl'] = None\n"
        "for f in sorted(glob.glob('tests/core/test_*.py')):\n    importlib.import_module(f[:-3].replace('/', '.'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
