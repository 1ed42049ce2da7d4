#!/usr/bin/env bash
# Every GPU check of the project in one call (one H100/H200, under 8 minutes), figures in one JSON file.
#
#   benchmarks/gpu_checks.sh [--out gpu_checks.json] [--python PYTHON] [--skip-vllm]
#
# Steps (each under its own time limit; a correctness mismatch makes its script exit non-zero):
#   loss_check       fused CPPO loss kernel vs the float64 loop reference and the torch path (bench_loss --check-only)
#   loss_bench       the loss, forward + backward, 64 x 8192 and 16 x 32768 fp32 (bench_loss)
#   topk_kernel      Top-K divergence kernel vs float64, time / extra memory, N = 8192, V = 151,936, K = 20
#   topk_kernel_16k  the same at N = 16,384 (the paper's 16k-token micro-batches)
#   engine_hook_4k   Top-K engine hook as verl's engine calls it, 4,096 tokens, V = 151,936, vs float64 (tv, kl)
#   engine_hook_16k  the same at 16,384 tokens
#   vllm_topk        rollout cost of mu's Top-K (bench_vllm_topk, K = 0 / 4 / 20, 1,024 tokens, V = 8,192 and
#                    151,936), only where a CUDA build of vLLM is installed
# Exit status: 0 all passed; 1 a step failed (its output is in the JSON); 2 bad arguments; 3 no CUDA device.
set -u
cd "$(dirname "$0")/.."

OUT=gpu_checks.json
PYTHON=${PYTHON:-.venv/bin/python}
SKIP_VLLM=0
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "gpu_checks.sh: --out needs a file name" >&2; exit 2; }; OUT=$2; shift 2 ;;
    --python) [ $# -ge 2 ] || { echo "gpu_checks.sh: --python needs an interpreter" >&2; exit 2; }; PYTHON=$2; shift 2 ;;
    --skip-vllm) SKIP_VLLM=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_checks.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ -x "$PYTHON" ] || command -v "$PYTHON" >/dev/null 2>&1 || { echo "gpu_checks.sh: no python at '$PYTHON'" >&2; exit 2; }

LOGS=$(mktemp -d)
STEPS=()
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

write_json() {  # write_json <error or empty>
  "$PYTHON" - "$OUT" "$LOGS" "$1" "${STEPS[@]}" <<'EOF'
import json, os, re, sys
out, logs, error, steps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
report = {"error": error or None, "steps": {}}
for name in steps:
    text = open(os.path.join(logs, name + ".log"), errors="replace").read()
    rc, seconds, command = open(os.path.join(logs, name + ".meta")).read().split("\t", 2)
    step = {"command": command.strip(), "rc": int(rc), "seconds": float(seconds), "output": text.splitlines()[-40:]}
    results = [dict(kv.split("=", 1) for kv in line.split()[1:]) for line in text.splitlines() if line.startswith("RESULT ")]
    if results:
        step["results"] = [{k: float(v) if re.fullmatch(r"[-+.\deE]+", v) else v for k, v in r.items()} for r in results]
    report["steps"][name] = step
report["passed"] = not error and all(s["rc"] == 0 for s in report["steps"].values())
with open(out, "w") as f:
    json.dump(report, f, indent=1)
print(f"gpu_checks: {'passed' if report['passed'] else 'FAILED'}; figures in {out}")
EOF
}

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_checks.sh: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False); nothing run" >&2
  write_json "no CUDA device" >/dev/null
  exit 3
fi

step() {  # step <name> <timeout s> <command...>
  local name=$1 limit=$2 start rc
  shift 2
  STEPS+=("$name")
  echo "== $name: $*"
  start=$(date +%s%N)
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s' "$rc" "$(( ($(date +%s%N) - start) / 1000000 ))e-3" "$*" >"$LOGS/$name.meta"
  tail -n 8 "$LOGS/$name.log"
  [ "$rc" -eq 0 ] || echo "!! $name failed (exit $rc)"
}

step loss_check 120 "$PYTHON" -m benchmarks.bench_loss --device cuda --check-only
step loss_bench 120 "$PYTHON" -m benchmarks.bench_loss --device cuda --no-check
step topk_kernel 60 "$PYTHON" -m benchmarks.bench_topk_divergence --device cuda --n 8192 --v 151936 --k 20
step topk_kernel_16k 60 "$PYTHON" -m benchmarks.bench_topk_divergence --device cuda --n 16384 --v 151936 --k 20 --repeats 5
step engine_hook_4k 60 "$PYTHON" -m ci.gpu_topk_check --tokens 4096 --vocab 151936 --k 20
step engine_hook_16k 90 "$PYTHON" -m ci.gpu_topk_check --tokens 16384 --vocab 151936 --k 20
if [ "$SKIP_VLLM" = 0 ] && "$PYTHON" -c "import vllm, sys; sys.exit('+cpu' in vllm.__version__)" 2>/dev/null; then
  step vllm_topk 240 "$PYTHON" -m benchmarks.bench_vllm_topk --vocab 8192,151936 --tokens 1024 --prompts 64
fi
write_json ""
"$PYTHON" -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))['passed'] else 1)" "$OUT"
