"""Apply unified diffs against verl 0.9.1 to verl modules as they are imported (no file on disk changes).

Where verl offers no extension point and the change sits inside a function body, verl-cppo keeps it as a
reviewed diff (``verl_cppo/hooks/import_time_diffs/``, package data; documented in ``patches/README.md``, whose
own ``*.diff`` files are the readers' equivalents of the runtime wrappers and never run), and this module makes
that diff the code that runs: a ``sys.meta_path`` finder intercepts the import of each patched module, reads verl's
installed source, applies the hunks (exact context, a line offset allowed as GNU patch does, no fuzz), and compiles the
result under the original file name (tracebacks and ``inspect`` show the patched lines via ``linecache``).

Where a hunk applies (``apply_diff``): exactly where its old lines match, once, within ``MAX_OFFSET`` lines of
its header's line (shifted by the earlier hunks' line-count changes), never before the previous hunk's end.
GNU patch would search the whole file; here a far match, or two matches within the bound, is refused: when
verl changes the targeted block and an identical block exists elsewhere, patching the other one would be a
silent wrong change. A hunk with no old lines (``diff -U0``'s pure insertion, ``@@ -L,0 +M,N @@``) matches
anywhere, so it is refused; ``allow_unanchored=True`` applies it where GNU patch does (after line L). Every
refusal is a ``PatchError`` naming the diff, the file, the hunk and the offset.

When (``install_patches``): each diff is applied to the installed sources (found without importing them) when
it is installed, and registered only if every file patch applies, so a failing diff leaves none of its
modules patched; the loader applies it again to the file it actually loads. A module imported before the
finder was installed cannot be patched and raises too. ``tests/hooks/`` checks every diff with
``patch --dry-run`` and with ``apply_diff`` against the pinned verl, and the bounds and the atomicity.
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

PATCH_DIR = Path(__file__).with_name("import_time_diffs")

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


MAX_OFFSET = 50
"""How far (in lines) a hunk may apply from where its header puts it, after the line-count changes of the
file's earlier hunks. GNU patch searches the whole file (and reports the offset); a diff pinned to one verl
release needs no more than a small drift, and a far match is more likely an identical block elsewhere than
the block the diff was written for, so a match beyond this is refused."""


def _located(patch: FilePatch, hunk: Hunk, lines: list[str], expected: int, earliest: int) -> int:
    """The 0-based line where ``hunk`` applies: the one match of its old lines within MAX_OFFSET of
    ``expected`` (and not before ``earliest``, the end of the previous hunk); PatchError otherwise."""
    n = len(hunk.old)
    where = f"{patch.diff}: hunk {hunk.header} of {patch.path}"
    matches = [at for at in range(max(0, len(lines) - n + 1)) if lines[at : at + n] == hunk.old] if n else [expected]
    near = [at for at in matches if abs(at - expected) <= MAX_OFFSET and at >= earliest]
    if len(near) == 1:
        return near[0]
    line = expected + 1
    if len(near) > 1:
        found = ", ".join(f"{at + 1} (offset {at - expected:+d})" for at in near)
        raise PatchError(
            f"{where}: its context matches at lines {found}, all within {MAX_OFFSET} lines of line {line}; "
            "ambiguous, so it is applied nowhere (the installed verl differs from 0.9.1 here)"
        )
    if matches:
        nearest = min(matches, key=lambda at: abs(at - expected))
        raise PatchError(
            f"{where}: its context is found only at line {nearest + 1}, offset {nearest - expected:+d} from line "
            f"{line}, beyond the allowed {MAX_OFFSET} lines (or before the previous hunk); refusing to patch a "
            "block so far from the one the diff was written for (verl-cppo's patches are written against verl 0.9.1)"
        )
    raise PatchError(
        f"{where} does not apply to the installed verl: its context is not in the file "
        "(verl-cppo's patches are written against verl 0.9.1)"
    )


def _anchor(hunk: Hunk) -> int:
    """The 0-based line where the hunk's old lines start, per its header. With old lines, ``-L,N`` starts at
    line L; with none (``-L,0``, a pure insertion), unified diff (and GNU patch) insert *after* line L."""
    return hunk.old_start if not hunk.old else hunk.old_start - 1


def apply_diff(source: str, patch: FilePatch, *, allow_unanchored: bool = False) -> str:
    """``source`` with every hunk of ``patch`` applied.

    Each hunk applies where its old lines (context and removed lines, exactly, no fuzz) match once within
    MAX_OFFSET lines of its header's line (shifted by the line-count changes of the earlier hunks), at or
    after the end of the previous hunk. PatchError, naming diff, file, hunk and offset, when there is no
    such match, only a farther one, or more than one.

    A hunk with no old lines (``@@ -L,0 +M,N @@``, made by ``diff -U0``) has nothing to match: it would apply
    to any file of at least L lines, so it is refused unless ``allow_unanchored`` (then it inserts after
    line L, shifted by the earlier hunks, as GNU patch does)."""
    lines = source.splitlines(keepends=True)
    shift = 0  # line-count change of the hunks applied so far
    earliest = 0  # the previous hunk's end in ``lines``
    for hunk in patch.hunks:
        if not hunk.old and not allow_unanchored:
            raise PatchError(
                f"{patch.diff}: hunk {hunk.header} of {patch.path} has no context or removed lines, so nothing "
                "anchors it: it would apply to any file. Regenerate the diff with context (diff -U3 / git diff)"
            )
        expected = _anchor(hunk) + shift
        if not hunk.old and not 0 <= expected <= len(lines):
            raise PatchError(
                f"{patch.diff}: hunk {hunk.header} of {patch.path}: line {expected} is past the file's end"
            )
        at = _located(patch, hunk, lines, expected, earliest)
        lines[at : at + len(hunk.old)] = hunk.new
        shift += len(hunk.new) - len(hunk.old)
        earliest = at + len(hunk.new)
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


def _installed_source(patch: FilePatch) -> Path | None:
    """The file ``patch`` targets in the installed package, found without importing any of it (importing a
    parent package could import the module before the finder is in place); None if not locatable."""
    top = patch.path.split("/", 1)[0]
    module = sys.modules.get(top)
    roots = list(getattr(module, "__path__", []) or [])
    if not roots:
        spec = importlib.machinery.PathFinder.find_spec(top)
        roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        candidate = Path(root).parent / patch.path
        if candidate.is_file():
            return candidate
    return None


def install_patches(diff_names: list[str], patch_dir: Path = PATCH_DIR) -> list[str]:
    """Patch the modules of these diffs when they are imported (idempotent); returns their module names.

    A diff is all or nothing: its file patches are parsed, checked against ``sys.modules`` and applied to
    the installed sources (where locatable) first, and its modules are registered only if every one of
    them applies; a PatchError registers none of that diff's modules."""
    modules = []
    for name in diff_names:
        pending: dict[str, FilePatch] = {}
        patches = parse_diff((patch_dir / name).read_text(encoding="utf-8"), name)
        for patch in patches:
            registered = _FINDER.patches.get(patch.module)
            if registered is not None:
                if registered.diff != name:
                    raise PatchError(f"{name}: {patch.module} is already patched by {registered.diff}")
                continue
            if patch.module in sys.modules:
                raise PatchError(
                    f"{name}: {patch.module} was imported before verl-cppo could patch it; load verl-cppo first "
                    "(it loads during 'import verl' through the verl.plugins entry point)"
                )
            source = _installed_source(patch)
            if source is not None:
                patched_source(patch, str(source))  # raises before anything of this diff is registered
            pending[patch.module] = patch
        _FINDER.patches.update(pending)
        modules.extend(p.module for p in patches)
    if _FINDER not in sys.meta_path:
        # Just before Python's path finder, not first: finders that delegate to the rest of sys.meta_path and
        # wrap what they get (verl_cppo.hooks.post_import's, placed first) then wrap the patched module too.
        at = next((i for i, f in enumerate(sys.meta_path) if f is importlib.machinery.PathFinder), 0)
        sys.meta_path.insert(at, _FINDER)
    return modules
