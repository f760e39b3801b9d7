# The README's commands. `make demo` runs the main job, `make test` the tests; both set up first.
PYTHON ?= python3
STAMP := build/.setup-stamp

.PHONY: setup demo test test-oldest gpu-check gpu-check-dry bench lint docs

setup: $(STAMP)

# torch is installed first and pinned (a local CPU wheel); --no-build-isolation builds flowkern._C against it
# instead of downloading a second torch into an isolated build environment.
$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	$(PYTHON) -m pip install --quiet "torch==2.13.0" setuptools wheel
	$(PYTHON) -m pip install --quiet --no-build-isolation -e ".[dev]"
	@mkdir -p build && touch $(STAMP)

# Main job: the paper's analysis end to end on the shipped shapes model, offline on the CPU, in one report
# (runs/demo/report.html; ~5 minutes on 2 cores). --overwrite: a rerun replaces the previous report as a whole.
demo: setup
	$(PYTHON) -m flowkern.cli demo --out runs/demo --overwrite

# Retrain the shipped demo model into flowkern/demo/model (tools/demo_model/README.md: the recipe; ~55 min on 2 cores).
.PHONY: demo-model
demo-model: setup
	$(PYTHON) -m tools.demo_model.train --out flowkern/demo/model --seed 0

# Every benchmark (each benchmarks/bench_*.py); each writes benchmarks/results/<device>[-<name>].json and prints a
# Markdown table (docs/benchmarks.md quotes them).
bench: setup
	$(PYTHON) benchmarks/bench_attention.py
	$(PYTHON) benchmarks/bench_visibility.py
	$(PYTHON) benchmarks/bench_compact.py
	$(PYTHON) benchmarks/bench_trace.py
	$(PYTHON) benchmarks/bench_generate.py
	$(PYTHON) benchmarks/bench_cam.py
	$(PYTHON) benchmarks/bench_eval.py
	$(PYTHON) benchmarks/bench_sweep.py

lint: setup
	$(PYTHON) -m ruff check .

# ruff, then the whole suite on the newest transformers pyproject admits (what a fresh install gets).
test: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q

# The Hugging Face tests on the oldest transformers pyproject admits, in build/venv-transformers-<version>.
test-oldest: setup
	PYTHON=$(PYTHON) bash .ci/test_oldest.sh

# On a lent GPU machine with its own torch (no `setup`: it must not install torch there): build, CUDA tests,
# sm_90 compile report and every benchmark with --device cuda, all files in $$OUT, within 8 minutes.
gpu-check:
	PYTHON=$(PYTHON) bash benchmarks/gpu_check.sh

# The same steps on the CPU at toy sizes (CI): everything short of the GPU.
gpu-check-dry: setup
	PYTHON=$(PYTHON) OUT=$${OUT:-build/gpu-check-dry} bash benchmarks/gpu_check.sh --dry-run

# The documentation site (mkdocs.yml, docs/) into build/site; --strict fails on a broken link, anchor or API
# reference. Installs only pyproject's `docs` extra (no torch: the API pages read the sources statically).
DOCS_STAMP := build/.docs-stamp
$(DOCS_STAMP): pyproject.toml
	@mkdir -p build
	$(PYTHON) -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["docs"]))' > build/docs-requirements.txt
	$(PYTHON) -m pip install --quiet -r build/docs-requirements.txt
	@touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict --site-dir build/site
