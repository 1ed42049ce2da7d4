#!/usr/bin/env bash
# The main job of README.md: set-up, then CPPO on a tiny model on CPU through verl's real loss path.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup_venv.sh
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python examples/cpu_loss_demo.py "$@"
