#!/usr/bin/env bash
# The test command of README.md: set-up, lint, then the whole CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup_venv.sh
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
.venv/bin/ruff format --check .
timeout 1500 .venv/bin/python -m pytest -q --durations=10 "$@"
