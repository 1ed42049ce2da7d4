"""Every diff under patches/ still applies to the pinned verl 0.9.1 (checked with `patch --dry-run`)."""

import glob
import importlib
import os
import re
import shutil
import subprocess

import pytest
import verl

from tests.support import REPO_ROOT

ROOT = REPO_ROOT
SITE = os.path.dirname(os.path.dirname(verl.__file__))
# The Top-K diffs are applied at import time by verl_cppo.hooks.diffs, so they ship inside the package;
# patches/ links to them so that every diff against verl is listed in one place.
DIFFS = sorted({os.path.realpath(p) for p in glob.glob(os.path.join(ROOT, "patches", "*.diff"))})
PACKAGED = sorted(glob.glob(os.path.join(ROOT, "verl_cppo", "patches", "*.diff")))


def test_every_packaged_diff_is_listed_in_patches():
    assert {os.path.realpath(p) for p in PACKAGED} <= set(DIFFS)


def test_there_are_diffs_to_check():
    assert DIFFS


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
