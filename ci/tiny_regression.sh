#!/usr/bin/env bash
# CPPO regression on a tiny model through verl's real trainer on CPU (see ci/README.md).
#   bash ci/tiny_regression.sh OUTDIR [extra args of ci/tiny_regression.py, e.g. --no-golden, --rollout hf_cpu]
# Runs the arms cppo, dppo_tv and vanilla through `python -m verl.trainer.main_ppo` with verl's vLLM rollout
# (vLLM's CPU build), writes OUTDIR/metrics.json and OUTDIR/reward.png, checks them against
# ci/golden/tiny_regression.json; exit 0 only if every check passed.
set -euo pipefail
outdir=$(realpath -m "${1:?usage: bash ci/tiny_regression.sh OUTDIR}")
shift
cd "$(dirname "$0")/.."
# verl's vLLM rollout runs in .venv-vllm; --rollout hf_cpu (the project's HF server) in .venv
venv=.venv-vllm
case " $* " in *" --rollout hf_cpu "* | *" --rollout=hf_cpu "*) venv=.venv ;; esac
if [ "$venv" = .venv ]; then bash ci/setup_venv.sh; else bash ci/setup_vllm_venv.sh; fi
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$venv/bin/python" ci/tiny_regression.py "$outdir" "$@"
