"""verl_cppo.hooks.diffs applies a hunk only near its line and only where it matches once; a diff is all or
nothing. Sources are synthetic files and a throwaway package on sys.path (never verl), so a failure here
cannot leave a verl module patched in the test process."""

import importlib
import shutil
import subprocess
import sys
import textwrap
import uuid

import pytest

from verl_cppo.hooks import diffs
from verl_cppo.hooks.diffs import MAX_OFFSET, PatchError, apply_diff, install_patches, parse_diff

BLOCK = ["def f():\n", "    x = 1\n", "    return x\n"]
DIFF = textwrap.dedent(
    """\
    --- a/pkg/mod.py
    +++ b/pkg/mod.py
    @@ -11,3 +11,4 @@
     def f():
         x = 1
    +    x += 1
         return x
    """
)


def _source(*blocks_at: int, length: int = 400) -> str:
    """``length`` distinct filler lines with BLOCK placed at each 1-based line of ``blocks_at``."""
    lines = [f"filler {i}\n" for i in range(1, length + 1)]
    for start in sorted(blocks_at):  # ascending: each block starts at its given line of the result
        lines[start - 1 : start - 1] = BLOCK
    return "".join(lines)


def _patch(text=DIFF):
    (patch,) = parse_diff(text, "t.diff")
    return patch


def test_a_hunk_applies_at_its_line_and_within_the_bound():
    for at in (11, 11 + MAX_OFFSET, 11 - 10):
        out = apply_diff(_source(at), _patch()).splitlines()
        assert out[at - 1 : at + 3] == ["def f():", "    x = 1", "    x += 1", "    return x"]


def test_a_far_match_is_refused_naming_diff_file_hunk_and_offset():
    """verl changed the targeted block; an identical block far away must not be patched instead."""
    far = 11 + 209
    with pytest.raises(PatchError) as info:
        apply_diff(_source(far), _patch())
    message = str(info.value)
    assert message.startswith("t.diff: hunk @@ -11,3 +11,4 @@ of pkg/mod.py")
    assert f"only at line {far}, offset +209 from line 11, beyond the allowed {MAX_OFFSET} lines" in message
    with pytest.raises(PatchError, match=rf"offset \+{MAX_OFFSET + 1} from line 11"):
        apply_diff(_source(11 + MAX_OFFSET + 1), _patch())


def test_the_near_block_wins_over_a_far_identical_one():
    out = apply_diff(_source(13, 300), _patch()).splitlines()
    assert out[12:16] == ["def f():", "    x = 1", "    x += 1", "    return x"]
    assert out[300:303] == ["def f():", "    x = 1", "    return x"]  # the far copy (one line lower) untouched


def test_two_matches_within_the_bound_are_ambiguous():
    with pytest.raises(PatchError, match=r"t.diff: hunk .* of pkg/mod.py: its context matches at lines 5 \(offset -6\)"
                       r", 30 \(offset \+19\), all within 50 lines of line 11; ambiguous"):  # fmt: skip
        apply_diff(_source(5, 30), _patch())


def test_no_match_anywhere_is_refused():
    with pytest.raises(PatchError, match=r"hunk @@ -11,3 \+11,4 @@ of pkg/mod.py does not apply .* not in the file"):
        apply_diff(_source(11).replace("    x = 1\n", "    x = 2\n"), _patch())


def test_later_hunks_follow_the_earlier_ones_line_changes_and_never_go_back():
    two = DIFF + textwrap.dedent(
        """\
        @@ -99,2 +100,3 @@
         filler 96
        +added
         filler 97
        """
    )
    out = apply_diff(_source(11), _patch(two)).splitlines()
    assert out[99:102] == ["filler 96", "added", "filler 97"]  # line 100: the header's 99 + the first hunk's +1
    first = "--- a/pkg/mod.py\n+++ b/pkg/mod.py\n@@ -60,2 +60,3 @@\n filler 57\n+added\n filler 58\n"
    second = DIFF.split("\n", 2)[2].replace("@@ -11,3 +11,4 @@", "@@ -70,3 +71,4 @@")
    with pytest.raises(PatchError, match=r"@@ -70,3 \+71,4 @@ .* only at line 30, offset -41 .*before the previous"):
        apply_diff(_source(30), _patch(first + second))  # its one match within the bound precedes the first hunk


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A throwaway package ``<name>`` with modules a and b on sys.path; the finder's registry restored after."""
    name = f"cppo_probe_{uuid.uuid4().hex[:8]}"
    root = tmp_path / "site" / name
    root.mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("A = 1\n")
    (root / "b.py").write_text("B = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(diffs._FINDER, "patches", dict(diffs._FINDER.patches))
    yield name, tmp_path
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def _write_diff(tmp_path, name, b_old="B = 1"):
    (tmp_path / "two.diff").write_text(
        f"--- a/{name}/a.py\n+++ b/{name}/a.py\n@@ -1,1 +1,1 @@\n-A = 1\n+A = 2\n"
        f"--- a/{name}/b.py\n+++ b/{name}/b.py\n@@ -1,1 +1,1 @@\n-{b_old}\n+B = 2\n"
    )


def test_a_diff_that_fails_partway_registers_none_of_its_modules(package):
    name, tmp_path = package
    _write_diff(tmp_path, name, b_old="B = 99")  # a.py's hunk applies, b.py's does not
    with pytest.raises(PatchError, match=rf"two.diff: hunk @@ -1,1 \+1,1 @@ of {name}/b.py does not apply"):
        install_patches(["two.diff"], patch_dir=tmp_path)
    assert f"{name}.a" not in diffs._FINDER.patches and f"{name}.b" not in diffs._FINDER.patches
    assert importlib.import_module(f"{name}.a").A == 1  # verl's own source, not half a diff


def test_a_diff_that_applies_registers_all_its_modules_once(package):
    name, tmp_path = package
    _write_diff(tmp_path, name)
    assert install_patches(["two.diff"], patch_dir=tmp_path) == [f"{name}.a", f"{name}.b"]
    assert install_patches(["two.diff"], patch_dir=tmp_path) == [f"{name}.a", f"{name}.b"]  # idempotent
    assert importlib.import_module(f"{name}.a").A == 2 and importlib.import_module(f"{name}.b").B == 2
    (tmp_path / "other.diff").write_text((tmp_path / "two.diff").read_text())
    with pytest.raises(PatchError, match=rf"other.diff: {name}.a is already patched by two.diff"):
        install_patches(["other.diff"], patch_dir=tmp_path)


# ---------------------------------------------------------------------------------------------- zero context


def _gnu_patch(tmp_path, source: str, diff: str) -> str:
    """GNU patch's own result of ``diff`` on ``source`` (file pkg/mod.py under tmp_path)."""
    (tmp_path / "pkg").mkdir(exist_ok=True)
    (tmp_path / "pkg" / "mod.py").write_text(source)
    out = subprocess.run(
        ["patch", "-p1", "--forward", "-i", "-"], input=diff, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return (tmp_path / "pkg" / "mod.py").read_text()


def _unified_zero_context(tmp_path, old: str, new: str) -> str:
    """``diff -U0`` of two versions of pkg/mod.py (GNU diff's own output, headers as git writes them)."""
    (tmp_path / "a").write_text(old)
    (tmp_path / "b").write_text(new)
    out = subprocess.run(["diff", "-U0", "a", "b"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    body = out.stdout.split("\n", 2)[2]
    return "--- a/pkg/mod.py\n+++ b/pkg/mod.py\n" + body


ORIGINAL = "".join(f"line {i}\n" for i in range(1, 21))
EDITS = {  # new versions of ORIGINAL: pure insertions (no old lines in -U0), and a mix with a removal
    "after line 10": ORIGINAL.replace("line 10\n", "line 10\nnew a\nnew b\n"),
    "at the start": "new a\n" + ORIGINAL,
    "at the end": ORIGINAL + "new z\n",
    "two insertions": ORIGINAL.replace("line 3\n", "line 3\nnew a\nnew b\n").replace("line 12\n", "line 12\nnew c\n"),
    "insertion after a removal": ORIGINAL.replace("line 2\nline 3\n", "line 2\n").replace("line 9\n", "line 9\nnew\n"),
}


@pytest.mark.skipif(shutil.which("patch") is None or shutil.which("diff") is None, reason="needs GNU patch and diff")
@pytest.mark.parametrize("edit", list(EDITS))
def test_a_zero_context_hunk_inserts_where_gnu_patch_does(tmp_path, edit):
    diff = _unified_zero_context(tmp_path, ORIGINAL, EDITS[edit])
    assert ",0 +" in diff  # at least one hunk with no old lines
    expected = _gnu_patch(tmp_path, ORIGINAL, diff)
    assert expected == EDITS[edit]
    assert apply_diff(ORIGINAL, _patch(diff), allow_unanchored=True) == expected


def test_a_zero_context_hunk_is_refused_by_default():
    """Nothing anchors it: without the flag it would patch any file of at least 10 lines."""
    diff = "--- a/pkg/mod.py\n+++ b/pkg/mod.py\n@@ -10,0 +11,2 @@\n+new a\n+new b\n"
    with pytest.raises(PatchError, match=r"t.diff: hunk @@ -10,0 \+11,2 @@ of pkg/mod.py has no context"):
        apply_diff(ORIGINAL, _patch(diff))
    # allowed, it inserts after line 10 (GNU patch), not before it
    out = apply_diff(ORIGINAL, _patch(diff), allow_unanchored=True).splitlines()
    assert out[9:12] == ["line 10", "new a", "new b"]
    with pytest.raises(PatchError, match="past the file's end"):
        apply_diff("line 1\n", _patch(diff), allow_unanchored=True)


def test_every_shipped_diff_is_anchored():
    for path in sorted(diffs.PATCH_DIR.glob("*.diff")):
        for patch in parse_diff(path.read_text(encoding="utf-8"), path.name):
            assert all(hunk.old for hunk in patch.hunks), (path.name, patch.path)
