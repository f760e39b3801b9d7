#!/usr/bin/env bash
# CI entry: the ahead-of-time sm_90 compile sweep (benchmarks/aot_sm90.py) on two Tritons, both must pass:
#   1. the Triton of $PYTHON (the main environment: what a fresh install gets);
#   2. Triton 3.6.0, the GPU machine's, in an extra venv that this script creates (or reuses when it already
#      holds torch 2.13.0 + triton 3.6.0): $AOT_VENV, default build/venv-triton36 (gitignored).
# Usage: PYTHON=/path/to/python bash benchmarks/aot_check.sh        (PYTHON defaults to python3)
# Extra arguments are passed to both sweeps (e.g. --table, --jobs 1). Reports: build/aot-sm90-<triton>.json.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${AOT_VENV:-$ROOT/build/venv-triton36}"
TRITON_OLD=3.6.0
TORCH_PIN=2.13.0  # the CPU wheel; never an unpinned torch (that would be the multi-GB CUDA build)
mkdir -p build

venv_ok() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$TRITON_OLD" "$TORCH_PIN" <<'EOF' 2>/dev/null
import os, sys
import torch, triton
import triton.backends.nvidia as nv
ok = triton.__version__ == sys.argv[1] and torch.__version__.split("+")[0] == sys.argv[2]
sys.exit(0 if ok and os.path.exists(os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")) else 1)
EOF
}

t0=$SECONDS
if venv_ok; then
    echo "aot_check: reusing $VENV (triton $TRITON_OLD)"
else
    echo "aot_check: creating $VENV (torch==$TORCH_PIN triton==$TRITON_OLD)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_PIN" "triton==$TRITON_OLD" numpy
    venv_ok || { echo "aot_check: $VENV does not hold torch $TORCH_PIN + triton $TRITON_OLD" >&2; exit 1; }
    echo "aot_check: venv ready in $((SECONDS - t0)) s"
fi

status=0
for py in "$PYTHON" "$VENV/bin/python"; do
    ver="$("$py" -c 'import triton; print(triton.__version__)')"
    t1=$SECONDS
    # TRITON_INTERPRET is cleared by the script itself; the sweep runs the repo's flowkern (not an installed one)
    if ! "$py" benchmarks/aot_sm90.py --json "build/aot-sm90-triton$ver.json" "$@"; then
        echo "aot_check: FAILED on triton $ver ($py)" >&2
        status=1
    fi
    echo "aot_check: triton $ver done in $((SECONDS - t1)) s"
done
echo "aot_check: total $((SECONDS - t0)) s"
exit $status
