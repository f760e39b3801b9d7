#!/usr/bin/env bash
# The Hugging Face tests (tests/hf, tests/analysis: trace, prune, cam; tests/cli) on the OLDEST transformers that pyproject.toml admits, in a
# virtual environment of their own (`make test-oldest`; CI runs it after `make test`, which tests the newest).
#
# The venv (build/venv-transformers-<version>) gets the main environment's torch version and pyproject's other
# dependencies with transformers pinned to the lower bound; flowkern itself comes from this checkout through
# PYTHONPATH, using the flowkern._C that `make setup` built against the same torch. Reused when already right.
# TRANSFORMERS_VERSION=X.Y.Z runs the same tests on another release (used to spot-check the releases in between).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

read -r OLDEST TORCH < <("$PY" - <<'PYEOF'
import re, tomllib
import torch
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
spec = next(d for d in deps if d.replace(" ", "").startswith("transformers"))
low = re.search(r">=\s*([0-9][0-9.]*)", spec).group(1)
print(low + ".0" * (2 - low.count(".")), torch.__version__.split("+")[0])
PYEOF
)
OLDEST=${TRANSFORMERS_VERSION:-$OLDEST}  # TRANSFORMERS_VERSION=5.20.0 bash .ci/test_oldest.sh tests any release
VENV=build/venv-transformers-$OLDEST
want() { "$VENV/bin/python" - "$OLDEST" "$TORCH" <<'PYEOF' 2>/dev/null
import sys, torch, transformers, pytest, hypothesis
sys.exit(transformers.__version__ != sys.argv[1] or torch.__version__.split("+")[0] != sys.argv[2])
PYEOF
}
if ! want; then
  echo "test-oldest: making $VENV (transformers $OLDEST, torch $TORCH)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet "torch==$TORCH"
  "$PY" - "$OLDEST" > build/requirements-oldest.txt <<'PYEOF'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for dep in project["dependencies"] + project["optional-dependencies"]["dev"]:
    name = dep.replace(" ", "").split(">")[0].split("<")[0].split("=")[0]
    if name == "torch":
        continue
    print(f"transformers=={sys.argv[1]}" if name == "transformers" else dep)
PYEOF
  "$VENV/bin/python" -m pip install --quiet -r build/requirements-oldest.txt
  want || { echo "test-oldest: $VENV does not hold transformers $OLDEST with torch $TORCH" >&2; exit 1; }
fi
echo "test-oldest: transformers $OLDEST, torch $TORCH"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/hf tests/analysis tests/cli
