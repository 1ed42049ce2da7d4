#!/usr/bin/env bash
# The main job of README.md: set-up, then CPPO on a tiny model through verl's real trainer (main_ppo) on CPU,
# rolling out through verl's own vLLM rollout on vLLM's CPU build. It prints a line at once, one per start-up
# phase (Ray, the trainer driver, the vLLM server) and one per step, each with the elapsed time; verl's own
# output goes to OUTDIR/cppo/main_ppo.log.
#   bash ci/main_job.sh [OUTDIR (default out/main_job)] [extra args of ci/tiny_regression.py, e.g. --steps 10]
set -euo pipefail
outdir=$(realpath -m "${1:-out/main_job}")
shift || true
cd "$(dirname "$0")/.."
bash ci/setup_env.sh
exec .venv/bin/python -m ci.tiny_regression "$outdir" --arms cppo --no-golden "$@"
