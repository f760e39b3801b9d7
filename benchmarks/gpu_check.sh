#!/usr/bin/env bash
# The one-command GPU check (`make gpu-check`): the first thing to run whenever a GPU is lent.
#
# On a CUDA machine with its own torch (the lent H200: Python 3.12, torch 2.11, triton 3.6, transformers 5.17, no
# network) it builds flowkern there, runs the CUDA op tests, the sm_90 compile report (registers / spills) and every
# benchmark with --device cuda at the issue-2 sizes, writing every file to one folder, and prints a summary table
# last. Each step has its own time limit inside one overall budget (GPU_CHECK_BUDGET, default 480 s = 8 minutes), in
# order of value, so a slow step cannot eat the others' time and a failed step does not stop the rest.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine (OUT=<dir> to choose the folder)
#   bash benchmarks/gpu_check.sh --dry-run   # on a CPU: every step at toy sizes on the CPU (make gpu-check-dry, CI)
#
# Files (in $OUT, default benchmarks/results/gpu-check): env.txt, <step>.log per step, tests.xml, aot.json,
# attention.json, compact.json, trace.json, generate.json, cam.json, status.tsv, summary.md.
# The exit code is 0 only when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu-check}
BUDGET=${GPU_CHECK_BUDGET:-480}
mkdir -p "$OUT" || { echo "gpu_check: cannot create OUT=$OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
: > "$OUT/status.tsv"
export PYTHONUNBUFFERED=1
START=$(date +%s)

if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device here; use --dry-run on a CPU machine" >&2
  exit 2
fi

# step NAME LIMIT_SECONDS COMMAND...: run with a limit (never past the overall budget), log, record the status.
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -le 5 ]; then
    printf '%s\tskipped\t0\tno time left in the %ss budget\n' "$name" "$BUDGET" >> "$OUT/status.tsv"
    echo "== $name: skipped (budget spent)"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s): $*"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local what=passed
  [ "$rc" -ne 0 ] && what="failed(rc=$rc)"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && what="timed-out"
  printf '%s\t%s\t%s\t%s\n' "$name" "$what" "$dt" "$*" >> "$OUT/status.tsv"
  tail -n 4 "$OUT/$name.log" | sed 's/^/   /'
}

{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  echo "mode $([ "$DRY" = 1 ] && echo dry-run || echo gpu)"
  git rev-parse HEAD 2>/dev/null | sed 's/^/commit /'
  "$PY" -c "import platform, torch; print('python', platform.python_version(), 'torch', torch.__version__)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  "$PY" -c "import transformers; print('transformers', transformers.__version__)" 2>&1
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$DRY" = 1 ]; then
  # the same steps, on the CPU at toy sizes: everything is checked but the GPU itself
  DEV=cpu
  step build 60 "$PY" -m pip install --dry-run --no-build-isolation --no-deps -e .
  step info 30 "$PY" -m flowkern.cli info
  step tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/ops/test_ops_errors.py "--junitxml=$OUT/tests.xml"
  step aot 150 "$PY" benchmarks/aot_sm90.py --max-configs 4 --brief --json "$OUT/aot.json"
  step attention 60 "$PY" benchmarks/bench_attention.py --device cpu --seqs 64 --decode-sk 128 --decode-batch 1 \
    --repeats 1 --no-memory --out "$OUT/attention.json"
  step visibility 60 "$PY" benchmarks/bench_visibility.py --device cpu --seqs 128 --window 32 --repeats 1 --no-memory \
    --no-baseline --out "$OUT/visibility.json"
  step compact 60 "$PY" benchmarks/bench_compact.py --device cpu --layers 2 --heads 2 --seq 128 --repeats 1 \
    --no-memory --out "$OUT/compact.json"
  step generate 120 "$PY" benchmarks/bench_generate.py --device cpu --size tiny --batches 1 --new-tokens 2 \
    --repeats 1 --out "$OUT/generate.json"
  step trace 120 "$PY" benchmarks/bench_trace.py --device cpu --size cpu --new-tokens 2 --repeats 1 --no-memory \
    --out "$OUT/trace.json"
  step cam 120 "$PY" benchmarks/bench_cam.py --config cpu-reduced --device cpu --repeats 1 \
    --no-baseline --out "$OUT/cam.json"
else
  DEV=cuda
  step build 100 "$PY" -m pip install --no-build-isolation --no-deps -e .
  step info 30 "$PY" -m flowkern.cli info
  step tests 100 "$PY" -m pytest -q -p no:cacheprovider tests/ops/test_ops_segment_attention.py \
    tests/ops/test_ops_key_attention_mass.py tests/ops/test_ops_compact.py tests/ops/test_ops_errors.py \
    tests/ops/test_ops_visibility.py tests/ops/test_kernels_visibility.py "--junitxml=$OUT/tests.xml"
  step attention 70 "$PY" benchmarks/bench_attention.py --device cuda --repeats 10 --out "$OUT/attention.json"
  step visibility 50 "$PY" benchmarks/bench_visibility.py --device cuda --repeats 10 --out "$OUT/visibility.json"
  step aot 45 "$PY" benchmarks/aot_sm90.py --brief --json "$OUT/aot.json"
  step compact 25 "$PY" benchmarks/bench_compact.py --device cuda --repeats 20 --out "$OUT/compact.json"
  step generate 50 "$PY" benchmarks/bench_generate.py --device cuda --repeats 3 --out "$OUT/generate.json"
  step trace 55 "$PY" benchmarks/bench_trace.py --device cuda --repeats 3 --out "$OUT/trace.json"
  step cam 45 "$PY" benchmarks/bench_cam.py --config llava-1.5-7b --device cuda --repeats 1 --out "$OUT/cam.json"
fi

"$PY" benchmarks/gpu_summary.py "$OUT" --device "$DEV" | tee "$OUT/summary.md"
echo "total $(( $(date +%s) - START ))s of a ${BUDGET}s budget; files in $OUT"
! grep -qvP '\tpassed\t' "$OUT/status.tsv"
