#!/usr/bin/env bash
# Build the real CUDA extension (sm_80 + sm_90) and import it — no GPU needed.
#
# The CPU build of torch in .venv cannot compile CUDA code (its c10/cuda headers are incomplete),
# so this uses a separate environment, .venv-cuda, with the CUDA 13.0 build of torch 2.14.1
# (matches the machine's nvcc 13.0). It never touches .venv: the extension is compiled the way a
# user's first use or `python -m marginops.build --cuda` compiles it, into the cache folder
# build/cuda-ext/ (MARGINOPS_CACHE), keyed by that torch, so the CPU build never sees it.
#
# Exit status: 0 when the extension compiled, linked, imported and registered its CUDA kernels
# (or when there is no nvcc at all: then it says so and skips); non-zero on any failure.
#
# Env: PYTHON (base interpreter for the venv, default python3), MAX_JOBS (default 2),
#      MARGINOPS_CUDA_VENV (default <repo>/.venv-cuda), MARGINOPS_CUDA_BUILD_DIR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MARGINOPS_CUDA_VENV:-$ROOT/.venv-cuda}"
BUILD="${MARGINOPS_CUDA_BUILD_DIR:-$ROOT/build/cuda-ext}"
TORCH_SPEC="torch==2.14.1"
start=$(date +%s)
elapsed() { echo "$(( $(date +%s) - start ))s"; }

# --- the toolkit: CUDA_HOME is the folder above nvcc's bin/ ------------------------------------
NVCC="$(command -v nvcc || true)"
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "build_cuda_extension: SKIPPED — no nvcc on this machine (PATH or /usr/local/cuda/bin)."
  exit 0
fi
# `nvcc` on PATH may be a symlink or a wrapper script (here /usr/local/bin/nvcc execs
# /usr/local/cuda-13.0/bin/nvcc): take the first candidate that is a real toolkit.
is_toolkit() { [[ -x "$1/bin/nvcc" && -f "$1/include/cuda_runtime.h" ]]; }
CUDA_HOME=""
for cand in "$(dirname "$(dirname "$NVCC")")" "$(dirname "$(dirname "$(readlink -f "$NVCC")")")" \
            "$(sed -n 's|^exec \(/[^ ]*\)/bin/nvcc.*|\1|p' "$NVCC" 2>/dev/null | head -n1)" \
            /usr/local/cuda; do
  if [[ -n "$cand" ]] && is_toolkit "$cand"; then CUDA_HOME="$cand"; break; fi
done
if [[ -z "$CUDA_HOME" ]]; then
  echo "build_cuda_extension: FAILED — nvcc at $NVCC but no CUDA toolkit (bin/nvcc + include/cuda_runtime.h) found" >&2
  exit 1
fi
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
echo "build_cuda_extension: nvcc = $NVCC ($("$NVCC" --version | grep -o 'release [0-9.]*')), CUDA_HOME = $CUDA_HOME"

# --- the CUDA torch environment ----------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.14.1') and torch.version.cuda else 1)" 2>/dev/null; then
  echo "build_cuda_extension: installing $TORCH_SPEC (CUDA build) into $VENV ..."
  "$PY" -m pip install -q "$TORCH_SPEC" numpy setuptools wheel ninja
fi
"$PY" -c "import ninja, numpy" 2>/dev/null || "$PY" -m pip install -q ninja numpy
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
echo "build_cuda_extension: torch $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)') ready after $(elapsed)"

# --- build into a separate cache: python -m marginops.build --cuda -------------------------------
mkdir -p "$BUILD"
export MARGINOPS_CACHE="$BUILD"
export MAX_JOBS="${MAX_JOBS:-2}"
OUT="$(cd "$BUILD" && PYTHONPATH="$ROOT" "$PY" -m marginops.build --cuda --arch "8.0;9.0")"
echo "$OUT"
SO="${OUT##*: }"
[[ -f "$SO" ]] || { echo "build_cuda_extension: FAILED — no library at '$SO'" >&2; exit 1; }
echo "build_cuda_extension: built $SO after $(elapsed)"

# --- import it without a GPU and check the registrations -------------------------------------
(cd "$BUILD" && "$PY" - "$SO" <<'PY'
import sys
import torch

torch.ops.load_library(sys.argv[1])
for name in ("margin_lse", "margin_lse_backward", "topk"):
    assert hasattr(torch.ops.marginops, name), f"torch.ops.marginops.{name} is not registered"
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"marginops::{name}", key), (
            f"marginops::{name} has no {key} kernel")
# The CPU kernels of this build run too (tiny smoke call).
f = torch.randn(3, 8)
w = torch.randn(5, 8)
lse, dot = torch.ops.marginops.margin_lse(f, w, torch.ones(3), None, torch.tensor([0, -1, 4]),
                                          None, None, None, True, 1)
assert torch.isfinite(lse).all() and dot[1] == 0
print(f"build_cuda_extension: import OK — torch {torch.__version__} (CUDA {torch.version.cuda}), "
      "marginops::{margin_lse, margin_lse_backward, topk} have CPU and CUDA kernels")
PY
)
echo "build_cuda_extension: done in $(elapsed)"
