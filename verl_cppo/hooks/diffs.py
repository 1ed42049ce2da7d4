"""Apply unified diffs against verl 0.9.1 to verl modules as they are imported (no file on disk changes).

Where verl offers no extension point, verl-cppo keeps the change as a reviewed diff (``verl_cppo/hooks/patches/``,
documented in ``patches/README.md``), and this module makes that diff the code that runs: a ``sys.meta_path``
finder intercepts the import of each patched module, reads verl's installed source, applies the hunks (exact
context, a line offset allowed as GNU patch does, no fuzz), and compiles the result under the original file name
(tracebacks and ``inspect`` show the patched lines via ``linecache``). A hunk that does not apply raises
``PatchError`` at import time, naming the diff, the file and the hunk; a module imported before the finder was
installed cannot be patched and raises too. ``tests/test_patches.py`` checks every diff with ``patch --dry-run``
and with ``apply_diff`` against the pinned verl.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import linecache
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["FilePatch", "PatchError", "apply_diff", "install_patches", "parse_diff", "patched_source"]

PATCH_DIR = Path(__file__).with_name("patches")

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(RuntimeError):
    """A diff does not apply to the installed verl, or a patched module was imported too early."""


@dataclass
class Hunk:
    header: str
    old_start: int
    old: list[str] = field(default_factory=list)  # context and removed lines
    new: list[str] = field(default_factory=list)  # context and added lines


@dataclass
class FilePatch:
    path: str  # relative to site-packages, e.g. verl/workers/engine_workers.py
    hunks: list[Hunk]
    diff: str  # name of the diff file, for messages

    @property
    def module(self) -> str:
        return self.path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def _strip_prefix(path: str) -> str:
    path = path.split("\t")[0].strip()
    return path[2:] if path[:2] in ("a/", "b/") else path


def parse_diff(text: str, name: str = "<diff>") -> list[FilePatch]:
    """The file patches of a unified diff (git or GNU style)."""
    patches: list[FilePatch] = []
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            patches.append(FilePatch(_strip_prefix(lines[i + 1][4:]), [], name))
            i += 2
            continue
        match = _HUNK.match(line)
        if match:
            if not patches:
                raise PatchError(f"{name}: hunk {line.strip()!r} before any file header")
            old_len = int(match.group(2) or 1)
            new_len = int(match.group(4) or 1)
            hunk = Hunk(line.strip(), int(match.group(1)))
            i += 1
            while (len(hunk.old) < old_len or len(hunk.new) < new_len) and i < len(lines):
                body = lines[i]
                tag, content = body[:1], body[1:]
                if body.startswith("\\"):  # "\ No newline at end of file"
                    i += 1
                    continue
                if tag in (" ", "\n"):
                    content = content if tag == " " else "\n"
                    hunk.old.append(content)
                    hunk.new.append(content)
                elif tag == "-":
                    hunk.old.append(content)
                elif tag == "+":
                    hunk.new.append(content)
                else:
                    raise PatchError(f"{name}: unexpected line in hunk {hunk.header!r}: {body!r}")
                i += 1
            if len(hunk.old) != old_len or len(hunk.new) != new_len:
                raise PatchError(f"{name}: truncated hunk {hunk.header!r}")
            patches[-1].hunks.append(hunk)
            continue
        i += 1
    return patches


def apply_diff(source: str, patch: FilePatch) -> str:
    """``source`` with every hunk of ``patch`` applied; PatchError if a hunk's old lines are not found."""
    lines = source.splitlines(keepends=True)
    offset = 0
    for hunk in patch.hunks:
        expected = hunk.old_start - 1 + offset
        n = len(hunk.old)
        for delta in sorted(range(-len(lines), len(lines) + 1), key=abs):
            at = expected + delta
            if 0 <= at <= len(lines) - n and lines[at : at + n] == hunk.old:
                break
        else:
            raise PatchError(
                f"{patch.diff}: hunk {hunk.header} does not apply to {patch.path} of the installed verl "
                f"(verl-cppo's patches are written against verl 0.9.1)"
            )
        lines[at : at + n] = hunk.new
        offset = at + len(hunk.new) - (hunk.old_start - 1) - n
    return "".join(lines)


def patched_source(patch: FilePatch, origin: str) -> str:
    return apply_diff(Path(origin).read_text(encoding="utf-8"), patch)


class _PatchedLoader(importlib.machinery.SourceFileLoader):
    """verl's source file, compiled with the diff applied (bypasses the bytecode cache)."""

    def __init__(self, fullname: str, path: str, patch: FilePatch):
        super().__init__(fullname, path)
        self._patch = patch
        self._source: str | None = None

    def get_source(self, fullname: str) -> str:
        if self._source is None:
            self._source = patched_source(self._patch, self.path)
            lines = self._source.splitlines(keepends=True)
            linecache.cache[self.path] = (len(self._source), None, lines, self.path)
        return self._source

    def get_code(self, fullname: str):
        return compile(self.get_source(fullname), self.path, "exec", dont_inherit=True)


class _PatchFinder(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.patches: dict[str, FilePatch] = {}

    def find_spec(self, fullname, path, target=None):
        patch = self.patches.get(fullname)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not spec.origin or not spec.origin.replace("\\", "/").endswith(patch.path):
            raise PatchError(f"{patch.diff}: cannot locate {patch.path} for module {fullname} (found {spec})")
        spec.loader = _PatchedLoader(fullname, spec.origin, patch)
        return spec


_FINDER = _PatchFinder()


def install_patches(diff_names: list[str], patch_dir: Path = PATCH_DIR) -> list[str]:
    """Patch the modules of these diffs when they are imported (idempotent); returns their module names."""
    modules = []
    for name in diff_names:
        for patch in parse_diff((patch_dir / name).read_text(encoding="utf-8"), name):
            if _FINDER.patches.get(patch.module) is not None:
                modules.append(patch.module)
                continue
            if patch.module in sys.modules:
                raise PatchError(
                    f"{name}: {patch.module} was imported before verl-cppo could patch it; load verl-cppo first "
                    "(it loads during 'import verl' through the verl.plugins entry point)"
                )
            _FINDER.patches[patch.module] = patch
            modules.append(patch.module)
    if _FINDER not in sys.meta_path:
        # Just before Python's path finder, not first: finders that delegate to the rest of sys.meta_path and
        # wrap what they get (verl_cppo.hooks.post_import's, placed first) then wrap the patched module too.
        at = next((i for i, f in enumerate(sys.meta_path) if f is importlib.machinery.PathFinder), 0)
        sys.meta_path.insert(at, _FINDER)
    return modules
