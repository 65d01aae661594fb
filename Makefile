# One entry point for newcomers and CI. `make test` and `make demo` set everything up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast test-slow demo bench lint clean ui-screens wheel

$(STAMP): pyproject.toml recycler/delta/_native.c
	# Debian packages: PostgreSQL server binaries (the production-like MLflow backend in the tests),
	# Graphviz (the lineage pictures) and a C compiler (the Δ engine's kernels, recycler/delta/_native.c;
	# released wheels carry them compiled, an editable install builds them here).
	@{ { ls /usr/lib/postgresql/*/bin/initdb || command -v initdb; } && command -v dot && command -v cc; } >/dev/null 2>&1 || \
		{ command -v apt-get >/dev/null && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql graphviz gcc libc6-dev >/dev/null); } || \
		echo "warning: PostgreSQL, Graphviz or a C compiler missing and apt-get unavailable: their tests are skipped or fail"
	$(PY) -m venv $(VENV)
	# The CPU wheel of torch first, so nothing pulls a multi-GB CUDA build; the project asks only for torch>=2.6.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/python -c "import recycler.delta._native"  # optional for pip (a compiler-less install works), not here
	touch $(STAMP)

setup: $(STAMP)

# Style, formatting and the import layers (pyproject.toml [tool.importlinter]).
lint: setup
	$(BIN)/ruff check recycler tests bench flows docs
	$(BIN)/ruff format --check recycler tests bench flows docs
	$(BIN)/lint-imports

# Everything but the slow science run, servers included (MLflow on SQLite and PostgreSQL, moto S3,
# Prefect): what CI runs.
test: setup lint
	$(BIN)/pytest -q -m "not slow"

# The full `recycler reproduce` (three seeds, ~20 min cold) with its verdicts asserted.
test-slow: setup
	$(BIN)/pytest -q -m slow

# The inner loop: no servers, no PostgreSQL, no long runs.
test-fast: setup
	$(BIN)/pytest -q -m "not integration and not slow"

demo: setup
	$(BIN)/recycler demo --output out/demo --overwrite

# Screenshots of the MLflow and Prefect UIs after a fast demo (headless Chromium: apt-get install chromium).
ui-screens: setup
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	$(BIN)/python docs/ui/screens.py --demo out/demo-ui --out docs/ui

bench: setup
	$(BIN)/python bench/bench_delta.py

clean:
	rm -rf $(VENV) out .pytest_cache

# A wheel with the compiled Δ kernels (tagged cp311-abi3: every Python ≥ 3.11 on this platform) in dist/.
# Release builds for every platform: cibuildwheel (pyproject.toml [tool.cibuildwheel]).
wheel: setup
	$(BIN)/pip wheel --quiet --no-deps --no-build-isolation -w dist .
	@ls dist/*.whl
