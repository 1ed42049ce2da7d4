#!/usr/bin/env bash
# Creates (or refreshes) the virtual environment .venv at the repository root with everything the main job and
# the tests need. Idempotent: a stamp of pyproject.toml and this script skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.verl-cppo-setup
want=$(cat pyproject.toml ci/setup_venv.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pip install -U pip
# torch first and pinned: the CPU wheel of 2.13.0 is on this kind of machine; an unpinned torch pulls CUDA.
pip install torch==2.13.0
pip install -e ".[test]"
echo "$want" > "$stamp"
