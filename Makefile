# The README's commands. `make demo` runs the main job, `make test` the tests; both set up first.
PYTHON ?= python3
STAMP := build/.setup-stamp

.PHONY: setup demo test bench lint

setup: $(STAMP)

# torch is installed first and pinned (a local CPU wheel); --no-build-isolation builds flowkern._C against it
# instead of downloading a second torch into an isolated build environment.
$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	$(PYTHON) -m pip install --quiet "torch==2.13.0" setuptools wheel
	$(PYTHON) -m pip install --quiet --no-build-isolation -e ".[dev]"
	@mkdir -p build && touch $(STAMP)

# Main job. Until the demo model ships, it is the attention benchmark on this machine.
demo: setup
	$(PYTHON) benchmarks/bench_attention.py

# Every benchmark; each writes benchmarks/results/<device>[-<name>].json and prints a Markdown table.
bench: setup
	$(PYTHON) benchmarks/bench_attention.py
	$(PYTHON) benchmarks/bench_compact.py
	$(PYTHON) benchmarks/bench_trace.py
	$(PYTHON) benchmarks/bench_generate.py
	$(PYTHON) benchmarks/bench_cam.py

lint: setup
	$(PYTHON) -m ruff check .

test: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q
