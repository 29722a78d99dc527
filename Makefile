# Two commands a newcomer needs; each creates (or reuses) .venv and installs what it needs.
#   make demo   - the main job: find flipped labels in the wine data by influence
#   make test   - the test suite
#   make lint   - ruff (lint and format check) and mypy; CI runs it before the tests
#   make bench-env - pyDVL 0.10.0 in its own environment (benchmarks/.venv-pydvl; it pins numpy<2)
#   make bench  - the benchmark against the lower bound and pyDVL (docs/benchmarks.md; ~1 hour on 2 cores)
PYTHON ?= python3
VENV ?= .venv
# Pins for these CPU machines (the local CPU build of torch); set CONSTRAINTS= to skip.
CONSTRAINTS ?= constraints/cpu.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_CONSTRAINTS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

PYDVL_VENV ?= benchmarks/.venv-pydvl

.PHONY: install demo test lint clean bench-env bench

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(PIP_CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dask-influence demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Configured in pyproject.toml ([tool.ruff], [tool.mypy]).
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy

bench-env:
	test -x $(PYDVL_VENV)/bin/python || $(PYTHON) -m venv $(PYDVL_VENV)
	$(PYDVL_VENV)/bin/python -m pip install --quiet $(PIP_CONSTRAINTS) "pydvl[influence]==0.10.0" scikit-learn

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --out benchmarks/results $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
