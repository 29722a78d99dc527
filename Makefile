# Two commands a newcomer needs; each creates (or reuses) .venv and installs what it needs.
#   make demo   - the main job: find flipped labels in the wine data by influence
#   make test   - the test suite
PYTHON ?= python3
VENV ?= .venv
# Pins for these CPU machines (the local CPU build of torch); set CONSTRAINTS= to skip.
CONSTRAINTS ?= constraints/cpu.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_CONSTRAINTS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: install demo test clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(PIP_CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dask-influence demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
