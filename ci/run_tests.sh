#!/usr/bin/env bash
# The test command of README.md: set-up (ci/setup_env.sh), lint, then the whole CPU test suite in the one
# environment .venv (verl 0.9.1 on its own pins, with verl's vLLM rollout on vLLM's CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup_env.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
timeout 2400 .venv/bin/python -m pytest -q --durations=15 "$@"
