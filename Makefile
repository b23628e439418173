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
DOCS_STAMP  := $(VENV)/.marginops-docs-installed
EXT_SOURCES := $(shell find marginops/csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)

.PHONY: setup bench bench-train-step test lint cuda-check gpu-check test-triton-oldest clean docs browser

setup: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv --system-site-packages $(VENV)

# marginops installs as pure Python (`pip install -e .`, no torch in the build environment); its
# C++ extension is compiled against the venv's torch into the user cache (~/.cache/marginops, or
# $$MARGINOPS_CACHE) by `python -m marginops.build`, ahead of time so that no test waits for it.
$(STAMP): $(VENV)/bin/python pyproject.toml $(EXT_SOURCES)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test,bench,examples]"
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m marginops.build
	$(PY) -m marginops.info
	@touch $(STAMP)

bench: setup
	$(PY) benchmarks/bench_fused.py

# Memory and time of a whole training step of the classifier head (naive + torch.optim, marginops +
# torch.optim, marginops fused step): benchmarks/results/<machine>/train-step.*
bench-train-step: setup
	$(PY) benchmarks/bench_fused.py --train-step

# CI runs exactly this. The CUDA extension build (no GPU needed) comes first so that pytest's
# summary is the last thing printed.
test: setup $(DOCS_STAMP) browser
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

# The API reference site (mkdocs + mkdocstrings, docs/requirements.txt) into build/site. --strict:
# any warning, broken internal link or anchor fails the build. Open build/site/index.html.
$(DOCS_STAMP): $(STAMP) docs/requirements.txt
	$(PY) -m pip install -r docs/requirements.txt
	@touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -d build/site

# tests/test_docs.py opens the site in headless Chromium. Installed on Debian when run as root;
# nothing happens when it is already there (the test skips, saying why, when it is absent).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y chromium \
	    || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }; \
	  else echo "chromium not found (not root on Debian): tests/test_docs.py skips its browser checks"; fi; }

# The compiled extensions live in the user cache (python -m marginops.info shows where); they are
# keyed by torch version and sources, so stale ones are never loaded: delete that folder to reclaim
# the space. marginops/_C*.so are left by in-place builds of older versions.
clean:
	rm -rf build dist *.egg-info marginops/_C*.so $(STAMP) $(DOCS_STAMP)
