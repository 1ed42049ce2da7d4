"""Every diff under patches/ still applies to the pinned verl 0.9.1 (checked with `patch --dry-run`)."""

import glob
import os
import shutil
import subprocess

import pytest
import verl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = os.path.dirname(os.path.dirname(verl.__file__))
DIFFS = sorted(glob.glob(os.path.join(ROOT, "patches", "*.diff")))
# The Top-K diffs are applied at import time by verl_cppo.patching, so they ship inside the package (issue 7).
DIFFS += sorted(glob.glob(os.path.join(ROOT, "verl_cppo", "patches", "*.diff")))


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
