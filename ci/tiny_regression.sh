#!/usr/bin/env bash
# CPPO regression on a tiny model through verl's real trainer on CPU (see ci/README.md).
#   bash ci/tiny_regression.sh OUTDIR [extra args of ci/tiny_regression.py]
# Runs the arms cppo, dppo_tv and vanilla through `python -m verl.trainer.main_ppo`, writes OUTDIR/metrics.json
# and OUTDIR/reward.png, checks them against ci/golden/tiny_regression.json; exit 0 only if every check passed.
set -euo pipefail
outdir=$(realpath -m "${1:?usage: bash ci/tiny_regression.sh OUTDIR}")
shift
cd "$(dirname "$0")/.."
bash ci/setup_venv.sh
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python ci/tiny_regression.py "$outdir" "$@"
