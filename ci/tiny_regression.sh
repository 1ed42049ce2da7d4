#!/usr/bin/env bash
# CPPO regression on a tiny model through verl's real trainer on CPU (see ci/README.md).
#   bash ci/tiny_regression.sh OUTDIR [extra args of ci/tiny_regression.py, e.g. --no-golden]
# Runs the arms cppo, dppo_tv and vanilla through `python -m verl.trainer.main_ppo` with verl's vLLM rollout
# (vLLM's CPU build), writes OUTDIR/metrics.json and OUTDIR/reward.png, checks them against
# ci/golden/tiny_regression.json; exit 0 only if every check passed.
set -euo pipefail
outdir=$(realpath -m "${1:?usage: bash ci/tiny_regression.sh OUTDIR}")
shift
cd "$(dirname "$0")/.."
bash ci/setup_env.sh
exec .venv/bin/python -m ci.tiny_regression "$outdir" "$@"
