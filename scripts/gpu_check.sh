#!/usr/bin/env bash
# The whole GPU verification in one bounded command (< 8 minutes): see scripts/gpu_check.py.
#
#   scripts/gpu_check.sh [--out DIR] [--dry-run]        make gpu-check   /   make gpu-check --dry-run
#
# Runs with the machine's own Python/torch/Triton: $PYTHON if set, else the repo's .venv if its
# torch sees CUDA (or for --dry-run), else python3.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]] && { [[ " $* " == *" --dry-run "* ]] || \
      "$ROOT/.venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }; then
    PY="$ROOT/.venv/bin/python"
  else
    PY=python3
  fi
fi
cd "$ROOT"
exec "$PY" scripts/gpu_check.py "$@"
