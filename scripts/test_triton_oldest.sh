#!/usr/bin/env bash
# The Triton checks under the OLDEST supported Triton (issue 9 item 4, issue 11 item 9).
#
# marginops supports Triton 3.5 (torch 2.9's) to 3.9. The main environment has the newest; this
# script keeps a small second venv, .venv-triton-old, with the CPU torch and triton==$TRITON_OLDEST
# (--no-deps: its torch pin is not ours), and runs there
#   * a representative subset of the interpreter suite (every kernel, forward + backward, the
#     options, top-k, and the issue-11 regressions; the full file takes several minutes), and
#   * the ahead-of-time compile suite for the DEFAULT configurations of every variant —
#     aligned and unaligned D, sm_80 and sm_90 — with zero spills (MARGINOPS_AOT_DEFAULTS_ONLY=1).
#
# Env: PYTHON (base interpreter, default python3), TRITON_OLDEST (default 3.5.0),
#      MARGINOPS_TRITON_OLD_VENV (default <repo>/.venv-triton-old), TORCH_SPEC (default torch==2.13.0).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MARGINOPS_TRITON_OLD_VENV:-$ROOT/.venv-triton-old}"
TRITON_OLDEST="${TRITON_OLDEST:-3.5.0}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
start=$(date +%s)

if [[ ! -x "$VENV/bin/python" ]]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# pytest-random-order too: a shuffled `make test` (PYTEST_ADDOPTS="-p random_order ...") reaches
# this pytest as well.
if ! "$PY" -c "import torch, numpy, pytest, random_order" 2>/dev/null; then
  "$PY" -m pip install -q "$TORCH_SPEC" numpy pytest pytest-random-order
fi
if [[ "$("$PY" -c 'import triton; print(triton.__version__)' 2>/dev/null)" != "$TRITON_OLDEST" ]]; then
  "$PY" -m pip install -q --no-deps "triton==$TRITON_OLDEST"
fi
echo "test_triton_oldest: $("$PY" -c 'import torch, triton, numpy; print(f"torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}")') after $(( $(date +%s) - start ))s"

cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
SUBSET="plain-37x129x40 or all-options-K3 or zero-weight-row or topk_matches_oracle and fp32 \
or tf32 or duplicate or underflow or bf16 or topk_fewer or nan_ranks or empty_class_index"
TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_interpreter.py -k "$SUBSET"
MARGINOPS_AOT_DEFAULTS_ONLY=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_aot.py
echo "test_triton_oldest: triton $TRITON_OLDEST interpreter subset + AOT defaults passed in $(( $(date +%s) - start ))s"
