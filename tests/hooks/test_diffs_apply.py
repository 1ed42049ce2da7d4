"""Every diff against verl still applies to the pinned verl 0.9.1 (checked with `patch --dry-run`): the readers'
diffs of patches/ and the diffs that run, which live only in verl_cppo/hooks/import_time_diffs/; patches/README.md names
every one of them, and no diff exists twice."""

import glob
import importlib
import os
import re
import shutil
import subprocess

import pytest
import verl

from tests.support import REPO_ROOT
from verl_cppo.hooks.diffs import PATCH_DIR

ROOT = REPO_ROOT
SITE = os.path.dirname(os.path.dirname(verl.__file__))
READERS = sorted(glob.glob(os.path.join(ROOT, "patches", "*.diff")))
PACKAGED = sorted(str(p) for p in PATCH_DIR.glob("*.diff"))  # applied at import time by verl_cppo.hooks.diffs
DIFFS = READERS + PACKAGED


def unlisted(readme: str, packaged: list[str], readers: list[str]) -> list[str]:
    """The diffs patches/README.md does not name: packaged ones by their repository path
    (``verl_cppo/hooks/import_time_diffs/<name>``), readers' ones by their file name."""
    missing = [p for p in packaged if f"verl_cppo/hooks/import_time_diffs/{os.path.basename(p)}" not in readme]
    return missing + [p for p in readers if os.path.basename(p) not in readme]


def test_every_diff_is_named_in_patches_readme():
    assert PACKAGED and READERS  # globs of the right directories: an empty set would check nothing
    readme = open(os.path.join(ROOT, "patches", "README.md"), encoding="utf-8").read()
    assert unlisted(readme, PACKAGED, READERS) == []
    # and the check fails when a diff is missing from the list
    for name in PACKAGED:
        base = os.path.basename(name)
        assert unlisted(readme.replace(f"verl_cppo/hooks/import_time_diffs/{base}", base), PACKAGED, READERS) == [name]


def test_every_diff_named_in_patches_readme_exists_once():
    readme = open(os.path.join(ROOT, "patches", "README.md"), encoding="utf-8").read()
    named = set(re.findall(r"(\w+\.diff)\b", readme))
    names = [os.path.basename(p) for p in DIFFS]
    assert sorted(named - set(names)) == []  # no stale name
    assert len(names) == len(set(names))  # no copy of a packaged diff in patches/
    contents = [open(p, "rb").read() for p in DIFFS]
    assert len(contents) == len(set(contents))


@pytest.mark.parametrize("diff", DIFFS, ids=os.path.basename)
def test_diff_applies_to_pinned_verl(diff):
    assert verl.__version__ == "0.9.1"
    assert shutil.which("patch"), "GNU patch is needed to check patches/*.diff"
    out = subprocess.run(
        ["patch", "-p1", "--dry-run", "--forward", "-i", diff], cwd=SITE, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


IMPORT = re.compile(r"^\+\s*from (verl_cppo[\w.]*) import ([\w, ]+?)\s*(?:#.*)?$")


@pytest.mark.parametrize("diff", DIFFS, ids=os.path.basename)
def test_every_verl_cppo_name_a_diff_imports_exists(diff):
    """The added lines call into verl_cppo: each name they import must exist where they import it from (a
    moved module would otherwise fail only inside verl's patched code, at run time)."""
    found, lines = [], open(diff, encoding="utf-8").read().splitlines()
    for line in lines:
        match = IMPORT.match(line)
        if match:
            module = importlib.import_module(match.group(1))
            for name in (n.strip() for n in match.group(2).split(",")):
                assert hasattr(module, name), f"{os.path.basename(diff)}: {match.group(1)} has no {name}"
                found.append(name)
    calls = [line for line in lines if line.startswith("+") and "from verl_cppo" in line]
    assert len(found) >= len(calls), calls  # every import line was read
