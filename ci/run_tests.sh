#!/usr/bin/env bash
# The test command of README.md: set-up, lint, then the whole CPU test suite: everything but the `vllm` tests in
# .venv, the `vllm` tests (verl's own vLLM rollout on vLLM's CPU build) in .venv-vllm (ci/setup_vllm_venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup_venv.sh
bash ci/setup_vllm_venv.sh
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
.venv/bin/ruff format --check .
timeout 1500 .venv/bin/python -m pytest -q --durations=10 -m "not vllm" "$@"
# the vllm tests live in one module (.venv-vllm lacks the test-only packages the other modules import)
timeout 1200 .venv-vllm/bin/python -m pytest -q --durations=5 -p no:cacheprovider -m vllm tests/testing/test_vllm_cpu.py "$@"
