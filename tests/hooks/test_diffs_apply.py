"""Every diff under patches/ still applies to the pinned verl 0.9.1 (checked with `patch --dry-run`)."""

import glob
import os
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
