"""``external_lib=verl_cppo.megatron_shard_local``: importing the module is the switch (fresh processes, since
an installed hook stays for the process)."""

import subprocess
import sys
import textwrap

from tests.support import REPO_ROOT

SHOW = """
import functools, importlib
from verl_cppo import hooks
from verl_cppo.sharding.megatron import _HOOKS
targets = [functools.reduce(getattr, a.split("."), importlib.import_module(m)) for m, a, _ in _HOOKS]
print(sorted({hooks.hook_name(t) or "none" for t in targets}))
"""


def _hooks_after(prelude: str) -> str:
    code = textwrap.dedent(prelude) + SHOW
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_importing_the_module_installs_the_shard_local_hook_and_nothing_else_does():
    assert _hooks_after("import verl") == "['none']"  # the plugin alone leaves Megatron's loss path alone
    assert _hooks_after("import verl\nimport verl_cppo.megatron_shard_local") == "['megatron_shard_local']"
