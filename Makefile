# The two commands: `make run` and `make test`.  Both set everything up from scratch
# (virtual environment, dependencies, embedded PostgreSQL when DATABASE_URL is unset).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: run test lint bench bench-long install clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=python3.11)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/tenantry run

# Two workers (pytest-xdist), each with its own embedded PostgreSQL: the suite waits on
# processes and the database more than it computes, so two halve its time on two cores.
# TEST_WORKERS=0 runs it in this process alone.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

lint: $(STAMP)
	$(BIN)/ruff check service tests bench schema .ci
	$(BIN)/ruff format --check service tests bench schema .ci
	$(BIN)/mypy

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.all

# bench, plus the long ones (the /metrics scrape over 1,000,000 jobs, 20,000 SSE streams).
bench-long: $(BENCH_STAMP)
	$(BIN)/python -m bench.all --long

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
