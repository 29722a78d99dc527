# Two commands a newcomer needs; each creates (or reuses) .venv and installs what it needs.
#   make demo   - the main job: find flipped labels in the wine data by influence
#   make test   - the whole test suite (what CI runs; about 16 minutes on 2 cores)
#   make test-fast - the fast lane for your own loop (under 3 minutes): no cluster, child-process,
#                 docs or slow tests (markers assigned in tests/conftest.py)
#   make test-gpu - the CUDA tests only (tests marked gpu; skipped where torch sees no GPU)
#   make lint   - ruff (lint and format check) and mypy; CI runs it before the tests
#   make dist-check - build the wheel and sdist, install the wheel into a fresh venv, run the CLI
#   make bench-env - pyDVL 0.10.0 in its own environment (benchmarks/.venv-pydvl; it pins numpy<2)
#   make bench  - the benchmark against the lower bound and pyDVL (docs/benchmarks.md; ~1 hour on 2 cores)
#   make bench-env-kronfluence / bench-env-dattri / bench-env-captum - each peer library in its own
#                 environment (benchmarks/.venv-<peer>); make bench-envs makes all four
#   make bench-peers - time to accuracy against pyDVL, Kronfluence, dattri and captum (docs/benchmarks.md)
PYTHON ?= python3
VENV ?= .venv
# Pins for these CPU machines (the local CPU build of torch); set CONSTRAINTS= to skip.
CONSTRAINTS ?= constraints/cpu.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_CONSTRAINTS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

PYDVL_VENV ?= benchmarks/.venv-pydvl
KRONFLUENCE_VENV ?= benchmarks/.venv-kronfluence
DATTRI_VENV ?= benchmarks/.venv-dattri
CAPTUM_VENV ?= benchmarks/.venv-captum
# the peers' environments get the project's transformers release too (the tiny GPT-2 of benchmarks.peers)
PEER_TRANSFORMERS ?= transformers==5.24.0

FAST_LANE := not (slow or cluster or subprocess or docs)

.PHONY: install demo test test-fast test-gpu dist-check lint clean bench-env bench bench-env-kronfluence bench-env-dattri bench-env-captum bench-envs bench-peers

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@echo "Setting up $(VENV): dask-influence (editable) with its dev extra: torch, dask, zarr, transformers,"
	@echo "scikit-learn, pytest, ruff, mypy, mkdocs. First run: about 5-10 minutes; later runs: nothing to do."
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --progress-bar off $(PIP_CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)
	@echo "Installed. The commands are in $(VENV)/bin: run 'source $(VENV)/bin/activate' to use dask-influence directly."

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dask-influence demo

test: $(STAMP)
	@echo "Running the whole suite (about 16 minutes on 2 cores; 'make test-fast' runs the fast lane)."
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "$(FAST_LANE)" $(PYTEST_ARGS)

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu $(PYTEST_ARGS)

# The package as a user installs it outside a clone: wheel and sdist built, the wheel installed into a
# fresh environment (dist/.venv-check), imported, and its CLI run.
dist-check: $(STAMP)
	rm -rf dist
	$(BIN)/python -m pip install --quiet --progress-bar off build
	$(BIN)/python -m build --outdir dist .
	rm -rf dist/.venv-check && $(PYTHON) -m venv dist/.venv-check
	dist/.venv-check/bin/python -m pip install --quiet --progress-bar off $(PIP_CONSTRAINTS) dist/*.whl
	cd dist && .venv-check/bin/python -c "import dask_influence as di; print('imported dask_influence', di.__version__, 'from', di.__file__)"
	dist/.venv-check/bin/dask-influence --help

# Configured in pyproject.toml ([tool.ruff], [tool.mypy]).
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy

bench-env:
	test -x $(PYDVL_VENV)/bin/python || $(PYTHON) -m venv $(PYDVL_VENV)
	$(PYDVL_VENV)/bin/python -m pip install --quiet $(PIP_CONSTRAINTS) "pydvl[influence]==0.10.0" scikit-learn

# Kronfluence without its torchvision requirement (used only by its examples): PyPI's torchvision
# is built for PyPI's CUDA torch and breaks imports (transformers loads it) next to the CPU build.
bench-env-kronfluence:
	test -x $(KRONFLUENCE_VENV)/bin/python || $(PYTHON) -m venv $(KRONFLUENCE_VENV)
	$(KRONFLUENCE_VENV)/bin/python -m pip install --quiet $(PIP_CONSTRAINTS) --no-deps "kronfluence==1.0.1"
	$(KRONFLUENCE_VENV)/bin/python -m pip install --quiet $(PIP_CONSTRAINTS) torch accelerate einops einconv \
		opt-einsum safetensors tqdm "$(PEER_TRANSFORMERS)"
	$(KRONFLUENCE_VENV)/bin/python -m pip uninstall --quiet --yes torchvision

bench-env-dattri:
	test -x $(DATTRI_VENV)/bin/python || $(PYTHON) -m venv $(DATTRI_VENV)
	$(DATTRI_VENV)/bin/python -m pip install --quiet $(PIP_CONSTRAINTS) "dattri==0.3.0" torch "$(PEER_TRANSFORMERS)"

bench-env-captum:
	test -x $(CAPTUM_VENV)/bin/python || $(PYTHON) -m venv $(CAPTUM_VENV)
	$(CAPTUM_VENV)/bin/python -m pip install --quiet $(PIP_CONSTRAINTS) "captum==0.9.0" "$(PEER_TRANSFORMERS)"

bench-envs: bench-env bench-env-kronfluence bench-env-dattri bench-env-captum

bench-peers: $(STAMP)
	$(BIN)/python -m benchmarks.peers --out benchmarks/results $(BENCH_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --out benchmarks/results $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
