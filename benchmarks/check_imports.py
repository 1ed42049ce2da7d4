"""Import rehearsal of one gpu_checks.sh step, with no GPU: what the step's run imports, and its arguments.

    python -m benchmarks.check_imports MODULE [ARGS...]

Imports MODULE (its top-level imports: what runs everywhere, plus verl's where verl is installed), every module
that MODULE imports inside a function (read from its source, so the list cannot go stale), every module named in
its ``GPU_IMPORTS`` (what the package loads lazily on the CUDA path, e.g. a Triton kernel), and parses ARGS as the
step's own parser does. ``benchmarks/gpu_checks.sh --check-imports`` runs it for every step the script would
run; in the environment ``benchmarks/device_image_env.py`` builds, that rehearses the lent GPU machine's bare
python3 on CPU. Exits 1 naming the import that failed or the arguments refused.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from types import ModuleType


def function_imports(source: str) -> list[tuple[str, tuple[str, ...]]]:
    """(module, imported names) of every absolute import statement inside a function of a module's source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    found += [(alias.name, ()) for alias in inner.names]
                elif isinstance(inner, ast.ImportFrom) and inner.level == 0:
                    found.append((inner.module, tuple(alias.name for alias in inner.names)))
    return found


def import_all(name: str, names: tuple[str, ...] = ()) -> None:
    """``from name import names``: the module, and each name that is a submodule rather than an attribute."""
    module = importlib.import_module(name)
    for attribute in names:
        if not hasattr(module, attribute):
            importlib.import_module(f"{name}.{attribute}")


def parse(module: ModuleType, argv: list[str]) -> None:
    """The step's arguments through its own parser (``parser()`` or ``parse_args(argv)``)."""
    try:
        if hasattr(module, "parser"):
            module.parser().parse_args(argv)
        elif hasattr(module, "parse_args"):
            module.parse_args(argv)
        else:
            raise ValueError(f"{module.__name__} has neither parser() nor parse_args(argv) to check arguments with")
    except SystemExit as exc:  # argparse's refusal (its message is already on stderr)
        raise ValueError(f"{module.__name__} refuses the arguments {argv}") from exc


def check(module_name: str, argv: list[str]) -> str:
    """Import the step's module and what it imports later, parse argv; a one-line summary. Raises ImportError
    or ValueError naming what failed."""
    module = importlib.import_module(module_name)
    later = function_imports(inspect.getsource(module)) + [(name, ()) for name in getattr(module, "GPU_IMPORTS", ())]
    for name, names in later:
        import_all(name, names)
    parse(module, argv)
    verl = importlib.metadata.version("verl") if importlib.util.find_spec("verl") else None
    with_verl = f"verl {verl} installed" if verl else "verl not installed (the step skips what needs it)"
    imported = sorted({name for name, _ in later})
    return f"{module_name}: imports ok (and later: {', '.join(imported) or 'none'}), arguments ok; {with_verl}"


def main() -> int:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m benchmarks.check_imports MODULE [ARGS...]")
    try:
        print(check(sys.argv[1], sys.argv[2:]))
    except (ImportError, ValueError) as exc:
        print(f"check_imports: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
