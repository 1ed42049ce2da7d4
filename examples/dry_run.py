"""Dry run of an example launch: ``CPPO_DRY_RUN=1 bash examples/<script>.sh`` runs this file.

A thin entry point to ``python -m verl_cppo.launch.dry_run`` (the installed package's dry run; its docstring says
what is checked) that puts this repository first on ``sys.path``, so the checks use the repository's copy of
the plugin (the one ``ray job submit --working-dir`` ships to the nodes), and resolves a relative reward
function path against the repository, the job's working directory.

    python examples/dry_run.py [--quiet] <hydra overrides...>
"""

from __future__ import annotations

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from verl_cppo.launch import dry_run as _module  # noqa: E402
from verl_cppo.launch.dry_run import Report, compose_config  # noqa: E402, F401


def dry_run(overrides: list[str], working_dir: str | None = REPO_ROOT) -> Report:
    """``verl_cppo.launch.dry_run.dry_run`` with the repository as the working directory."""
    return _module.dry_run(overrides, working_dir)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return _module.main(["--working-dir", REPO_ROOT, *argv])


if __name__ == "__main__":
    sys.exit(main())
