# Two entry points (README): `make bench` sets up and runs the main job; `make test` sets up and
# runs the tests. Both create or reuse the virtual environment .venv in the repo.
#
# The venv sees system site-packages, so a torch already installed on the machine is kept; only
# when none imports is torch==2.13.0 installed (a local CPU build on the project's machines; set
# TORCH_SPEC to choose another, e.g. TORCH_SPEC="torch==2.14.1").

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.13.0
STAMP       := $(VENV)/.marginops-installed
EXT_SOURCES := $(shell find marginops/csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)

.PHONY: setup bench test lint cuda-check gpu-check test-triton-oldest clean

setup: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(STAMP): $(VENV)/bin/python setup.py pyproject.toml $(EXT_SOURCES)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install setuptools wheel ninja numpy
	$(PY) -m pip install triton pytest pytest-benchmark pytorch-metric-learning scikit-learn \
		matplotlib tqdm ruff
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --no-build-isolation --no-deps -e .
	$(PY) -m marginops.info
	@touch $(STAMP)

bench: setup
	$(PY) benchmarks/bench_fused.py

# CI runs exactly this. The CUDA extension build (no GPU needed) comes first so that pytest's
# summary is the last thing printed.
test: setup
	bash scripts/build_cuda_extension.sh
	bash scripts/test_triton_oldest.sh
	bash scripts/gpu_check.sh --dry-run --out build/gpu-check-dry-run
	$(PY) -m ruff check marginops tests benchmarks examples
	$(PY) -m pytest -q tests

# Interpreter subset + AOT defaults under the oldest supported Triton, in .venv-triton-old.
test-triton-oldest:
	bash scripts/test_triton_oldest.sh

# The whole GPU verification, < 8 min, results in gpu-check-results/ (GPU_CHECK_ARGS="--out DIR").
# `make gpu-check --dry-run` (make's -n) runs the script's own dry run: the recipe is marked `+`,
# so make executes it under -n, and passes --dry-run on.
GPU_CHECK_DRY := $(if $(findstring n,$(firstword -$(MAKEFLAGS))),--dry-run,)
gpu-check:
	+bash scripts/gpu_check.sh $(GPU_CHECK_DRY) $(GPU_CHECK_ARGS)

cuda-check:
	bash scripts/build_cuda_extension.sh

clean:
	rm -rf build *.egg-info marginops/_C*.so $(STAMP)
