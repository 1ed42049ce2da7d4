#!/usr/bin/env bash
# Every GPU check of the project in one call on one H100/H200, figures in one JSON file (rewritten after each step).
# Runs on the lent GPU machine's bare python3 (torch, triton, numpy; no verl, which cannot travel): where verl is
# not installed a step runs the kernel and loss checks alone and prints what it skipped (SKIPPED lines, in the JSON).
#
#   benchmarks/gpu_checks.sh [--out gpu_checks.json] [--python PYTHON] [--budget SECONDS] [--skip-vllm]
#   benchmarks/gpu_checks.sh --check-imports [--python PYTHON]      # no GPU: imports and arguments of each step
#   benchmarks/gpu_checks.sh --list-steps                            # name, time limit (s), module, arguments
#
#   --python   interpreter (default: .venv/bin/python where it exists, else python3)
#   --budget   seconds for all steps together (default 360); a step gets the lesser of its own limit and what
#              is left, and one that cannot start is recorded as not run
#
# Steps, correctness first, at the shapes of users' runs on one GPU (answers of 8k-16k tokens, V = 151,936, K = 20):
#   loss_check         fused CPPO loss kernel vs the float64 loop reference and the torch path (bench_loss --check-only)
#   topk_kernel_edges  Top-K statistics kernel vs float64 on vocab shards, strided and -inf rows, tile edges, fp32 /
#                      bf16 / fp16, and at V = 151,936 (tests/support/topk_kernel_check)
#   engine_hook_16k    Top-K divergence on the engine hook's packed layout, 16,384 tokens, vs float64 (tv, kl); the
#                      hook itself as verl's engine calls it where verl is installed (gpu_topk_check)
#   engine_hook_4k     the same at 4,096 tokens
#   topk_kernel_16k    Top-K divergence kernel vs float64, time / extra memory, N = 16,384, V = 151,936, K = 20
#   topk_kernel        the same at N = 8,192
#   loss_bench         the loss, forward + backward, 64 x 8192 and 32 x 16384 fp32 (bench_loss)
#   vllm_topk          rollout cost of mu's Top-K (bench_vllm_topk, K = 0 / 4 / 20, 1,024 tokens, V = 8,192 and
#                      151,936), only where a CUDA build of vLLM is installed
# Exit status: 0 all passed; 1 a step failed or did not run (the JSON says which); 2 bad arguments; 3 no CUDA
# device (nothing run; the JSON says so).
set -u
cd "$(dirname "$0")/.." || exit 2

STEP_TABLE="
loss_check         120 benchmarks.bench_loss --device cuda --check-only
topk_kernel_edges   90 tests.support.topk_kernel_check --device cuda
engine_hook_16k     60 benchmarks.gpu_topk_check --tokens 16384 --vocab 151936 --k 20
engine_hook_4k      45 benchmarks.gpu_topk_check --tokens 4096 --vocab 151936 --k 20
topk_kernel_16k     75 benchmarks.bench_topk_divergence --device cuda --n 16384 --v 151936 --k 20 --repeats 5
topk_kernel         60 benchmarks.bench_topk_divergence --device cuda --n 8192 --v 151936 --k 20
loss_bench         120 benchmarks.bench_loss --device cuda --no-check --sizes 64x8192,32x16384
vllm_topk          240 benchmarks.bench_vllm_topk --vocab 8192,151936 --tokens 1024 --prompts 64
"

OUT=gpu_checks.json
PYTHON=${PYTHON:-}
BUDGET=360
SKIP_VLLM=0
MODE=run
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "gpu_checks.sh: --out needs a file name" >&2; exit 2; }; OUT=$2; shift 2 ;;
    --python) [ $# -ge 2 ] || { echo "gpu_checks.sh: --python needs an interpreter" >&2; exit 2; }; PYTHON=$2; shift 2 ;;
    --budget)
      [ $# -ge 2 ] && [[ $2 =~ ^[0-9]+$ ]] || { echo "gpu_checks.sh: --budget needs whole seconds" >&2; exit 2; }
      BUDGET=$2; shift 2 ;;
    --skip-vllm) SKIP_VLLM=1; shift ;;
    --check-imports) MODE=imports; shift ;;
    --list-steps) echo "$STEP_TABLE" | sed '/^$/d' | tr -s ' '; exit 0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_checks.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
[ -x "$PYTHON" ] || command -v "$PYTHON" >/dev/null 2>&1 || { echo "gpu_checks.sh: no python at '$PYTHON'" >&2; exit 2; }

START=$(date +%s)  # the budget counts from here: the probes below import torch too (seconds on a cold disk)
LOGS=$(mktemp -d)
STEPS=()
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 WANDB_MODE=disabled HF_HUB_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

write_json() {  # write_json <error or empty>: the report so far (steps run, steps not run, environment)
  "$PYTHON" - "$OUT" "$LOGS" "$1" "${STEPS[@]}" <<'EOF'
import glob, json, os, re, sys
out, logs, error, steps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
env = json.load(open(os.path.join(logs, "environment.json"))) if os.path.exists(os.path.join(logs, "environment.json")) else {}
report = {"error": error or None, "environment": env, "steps": {}, "not_run": {}}
for name in steps:
    text = open(os.path.join(logs, name + ".log"), errors="replace").read()
    rc, seconds, command = open(os.path.join(logs, name + ".meta")).read().split("\t", 2)
    lines = text.splitlines()
    step = {"command": command.strip(), "rc": int(rc), "seconds": float(seconds), "output": lines[-40:]}
    results = [dict(kv.split("=", 1) for kv in line.split()[1:]) for line in lines if line.startswith("RESULT ")]
    if results:
        step["results"] = [{k: float(v) if re.fullmatch(r"[-+.\deE]+", v) else v for k, v in r.items()} for r in results]
    skipped = [line[len("SKIPPED "):] for line in lines if line.startswith("SKIPPED ")]
    if skipped:
        step["skipped"] = skipped
    report["steps"][name] = step
for path in sorted(glob.glob(os.path.join(logs, "*.notrun"))):
    report["not_run"][os.path.basename(path)[: -len(".notrun")]] = open(path).read().strip()
report["passed"] = not error and all(s["rc"] == 0 for s in report["steps"].values()) and not any(
    reason.startswith("budget") for reason in report["not_run"].values()
)
with open(out, "w") as f:
    json.dump(report, f, indent=1)
print(f"gpu_checks: {'passed' if report['passed'] else 'FAILED'}; figures in {out}")
EOF
}

"$PYTHON" - >"$LOGS/environment.json" 2>/dev/null <<'EOF'
import importlib.metadata, importlib.util, json, platform
def version(name):
    return importlib.metadata.version(name) if importlib.util.find_spec(name) else None
env = {"python": platform.python_version(), **{n: version(n) for n in ("torch", "triton", "numpy", "verl", "vllm")}}
try:
    import torch
    env["torch"], env["cuda"] = torch.__version__, torch.version.cuda
    env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
except Exception as exc:  # recorded, the steps say the rest
    env["device"] = f"torch failed to import: {exc}"
print(json.dumps(env))
EOF

has_cuda_vllm() { "$PYTHON" -c "import vllm, sys; sys.exit('+cpu' in vllm.__version__)" >/dev/null 2>&1; }

# skip_reason <name>: why this step does not run on this machine (empty: it runs)
skip_reason() {
  if [ "$1" = vllm_topk ]; then
    [ "$SKIP_VLLM" = 1 ] && { echo "--skip-vllm"; return; }
    has_cuda_vllm || echo "no CUDA build of vLLM installed (the GPU machine's image has none; it cannot travel)"
  fi
}

FAILED=0
run_step() {  # run_step <name> <limit> <module> <args...>
  local name=$1 limit=$2 module=$3 left start rc
  shift 3
  left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then
    echo "budget of ${BUDGET} s spent before this step" >"$LOGS/$name.notrun"
    echo "!! $name not run: budget spent"
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  STEPS+=("$name")
  echo "== $name (limit ${limit} s): $PYTHON -m $module $*"
  start=$(date +%s%N)
  timeout -k 5 "$limit" "$PYTHON" -m "$module" "$@" </dev/null >"$LOGS/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s' "$rc" "$((($(date +%s%N) - start) / 1000000))e-3" "$PYTHON -m $module $*" >"$LOGS/$name.meta"
  tail -n 8 "$LOGS/$name.log"
  [ "$rc" -eq 0 ] || echo "!! $name failed (exit $rc$([ "$rc" -eq 124 ] && echo ": over its ${limit} s limit"))"
  write_json "" >/dev/null
}

check_step() {  # check_step <name> <limit> <module> <args...>: imports and arguments only
  local name=$1
  shift 2
  if "$PYTHON" -m benchmarks.check_imports "$@" </dev/null; then echo "ok   $name"; else echo "FAIL $name"; FAILED=1; fi
}

if [ "$MODE" = run ] && ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_checks.sh: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False); nothing run" >&2
  write_json "no CUDA device" >/dev/null
  exit 3
fi

while read -r name limit module args; do
  [ -n "$name" ] || continue
  reason=$(skip_reason "$name")
  if [ -n "$reason" ]; then
    echo "-- $name not run: $reason"
    echo "$reason" >"$LOGS/$name.notrun"
    continue
  fi
  # shellcheck disable=SC2086  # the table's arguments are words without spaces
  if [ "$MODE" = imports ]; then check_step "$name" "$limit" "$module" $args; else run_step "$name" "$limit" "$module" $args; fi
done <<<"$STEP_TABLE"

if [ "$MODE" = imports ]; then
  [ "$FAILED" = 0 ] && echo "gpu_checks.sh --check-imports: every step that runs here imports and parses ($PYTHON)"
  exit "$FAILED"
fi
write_json ""
"$PYTHON" -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))['passed'] else 1)" "$OUT"
