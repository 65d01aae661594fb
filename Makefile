# One entry point for newcomers and CI. `make test` and `make demo` set everything up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast test-all demo bench lint clean

$(STAMP): pyproject.toml
	# PostgreSQL server binaries for the production-like MLflow backend in the tests (Debian/Ubuntu).
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
		{ command -v apt-get >/dev/null && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null); } || \
		echo "warning: PostgreSQL server binaries missing and apt-get unavailable: the PostgreSQL tests will be skipped (failed in CI)"
	$(PY) -m venv $(VENV)
	# The CPU wheel of torch first, so nothing pulls a multi-GB CUDA build; the project asks only for torch>=2.6.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# Style, formatting and the import layers (pyproject.toml [tool.importlinter]).
lint: setup
	$(BIN)/ruff check recycler tests bench flows
	$(BIN)/ruff format --check recycler tests bench flows
	$(BIN)/lint-imports

# Everything, servers included (MLflow on SQLite and PostgreSQL, moto S3, Prefect): what CI runs.
test: setup lint
	$(BIN)/pytest -q

# The inner loop: no servers, no PostgreSQL, no long runs.
test-fast: setup
	$(BIN)/pytest -q -m "not integration and not slow"

demo: setup
	$(BIN)/recycler demo --output out/demo --overwrite

bench: setup
	$(BIN)/python bench/bench_delta.py

clean:
	rm -rf $(VENV) out .pytest_cache
