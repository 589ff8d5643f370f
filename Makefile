# Megalith developer commands. Each target creates or reuses the virtual environment in .venv and says what
# it does. Override on the command line or in the environment, e.g. `make test PYTEST_ARGS="-k data"`.
#
#   make demo    set everything up, then run the end-to-end demo on the embedded data
#   make test    set everything up, then run the test suite
#   make test-floor  the same on the oldest supported torch, in its own environment .venv-floor
#   make lint    ruff over the whole repository
#   make build   rebuild the compiled module after editing cpp/ or cmake/
#   make wheels  build a wheel of each of the five distributions into dist/
#   make gpu-carry   build the pure-Python wheels the GPU report installs on a bare GPU machine (.gpu-carry/)
#   make gpu-report  on a GPU machine: build, test and benchmark Megalith into $OUT (benchmarks/gpu_report.py)

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# The supported torch range, read from the `torch` extra of pyproject.toml (the one place it is written; every
# distribution that imports torch declares the same range). CI tests both ends: the newest release the range
# allows (`make test`) and its floor (`make test-floor`).
TORCH_REQUIREMENT := $(shell sed -n 's/^torch = \["\(torch[^"]*\)"\]$$/\1/p' pyproject.toml)
TORCH_FLOOR := $(shell sed -n 's/^torch = \["torch>=\([0-9.]*\),.*/\1/p' pyproject.toml)
ifeq ($(and $(TORCH_REQUIREMENT),$(TORCH_FLOOR)),)
$(error cannot read the torch range from the line 'torch = ["torch>=FLOOR,<=CEILING"]' in pyproject.toml)
endif
# Which torch to install when the environment has none: the newest normal PyPI build in the range, which is what
# `pip install megalith-core` picks. Set it to try another, e.g. TORCH_SPEC=torch==2.13.0.
TORCH_SPEC ?= $(TORCH_REQUIREMENT)
# The environment `make test-floor` uses.
FLOOR_VENV ?= .venv-floor
# Build the CUDA kernels: AUTO (when nvcc is found), ON (fail without it) or OFF.
MEGALITH_CUDA ?= AUTO
export MEGALITH_CUDA
PYTEST_ARGS ?=
# Extra arguments of examples/demo.py, e.g. `make demo DEMO_ARGS="--quick"`.
DEMO_ARGS ?=

PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
PACKAGES := packages/data packages/core packages/training packages/export
EDITABLES := -e . $(foreach p,$(PACKAGES),-e "$(p)[dev]")
STAMP := $(VENV)/.megalith-setup
SETUP_INPUTS := pyproject.toml CMakeLists.txt $(wildcard packages/*/pyproject.toml) $(wildcard requirements/*.txt) \
	$(shell find cpp cmake -type f 2>/dev/null)

# The Python of the GPU machine (its own environment, not .venv) and extra arguments of benchmarks/gpu_report.py.
GPU_PYTHON ?= python3
GPU_REPORT_ARGS ?=

.PHONY: setup demo test test-floor lint build wheels gpu-carry gpu-report clean

setup: $(STAMP)

$(PY):
	@echo "==> Creating the virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) $(SETUP_INPUTS)
	@echo "==> Installing build tools and test tools into $(VENV)"
	@$(PIP) install -q --upgrade pip
	@$(PIP) install -q -r requirements/build.txt -r requirements/dev.txt
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "==> torch $$($(PY) -c 'import torch; print(torch.__version__)') is already installed"; \
	else \
		echo "==> Installing torch ($(TORCH_SPEC))"; $(PIP) install -q "$(TORCH_SPEC)"; \
	fi
	@echo "==> Building megalith-kernels (MEGALITH_CUDA=$(MEGALITH_CUDA)) and installing all five packages (editable)"
	@$(PIP) install -q --no-build-isolation $(EDITABLES)
	@$(PY) -m megalith.kernels
	@touch $(STAMP)
	@echo "==> $(VENV) is ready"

demo: setup
	@echo "==> Running the demo"
	@$(PY) examples/demo.py $(DEMO_ARGS)

test: setup
	@echo "==> Running the test suite on torch $$($(PY) -c 'import torch; print(torch.__version__)') ($(VENV))"
	@$(PY) -m pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests (exit code 5); that is a failure"; fi; \
	exit $$status

test-floor:
	@$(MAKE) --no-print-directory test VENV=$(FLOOR_VENV) TORCH_SPEC=torch==$(TORCH_FLOOR)

lint: setup
	@echo "==> ruff check"
	@$(VENV)/bin/ruff check .
	@echo "==> ruff format --check"
	@$(VENV)/bin/ruff format --check .

build: $(PY)
	@echo "==> Rebuilding the compiled module (incremental, build/ is reused)"
	@$(PIP) install -q --no-build-isolation --no-deps -e .
	@$(PY) -m megalith.kernels

wheels: setup
	@echo "==> Building wheels into dist/"
	@$(PIP) wheel -q --no-deps --no-build-isolation -w dist . $(PACKAGES)
	@ls -1 dist

gpu-carry: setup
	@echo "==> Building the pure-Python wheels for the GPU report into .gpu-carry/"
	@$(PY) benchmarks/gpu_report.py --prepare-carry

gpu-report:
	@$(GPU_PYTHON) benchmarks/gpu_report.py $(GPU_REPORT_ARGS)

clean:
	rm -rf build dist $(VENV) $(FLOOR_VENV)
