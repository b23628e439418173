"""Triton's interpreter in a child pytest: the one harness the test files share.

Triton fixes interpreter vs compiled mode when a kernel is defined, so the Triton cases of a file
cannot run in the CPU suite's own process. A file marks them ``requires_interp`` and adds one
test, outside the interpreter, that re-runs the file with ``TRITON_INTERPRET=1``
(:func:`run_in_interpreter`); the child skips the file's non-Triton cases (``not_interp``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
requires_interp = pytest.mark.skipif(
    not INTERP, reason="runs in this file's TRITON_INTERPRET=1 child pytest")
not_interp = pytest.mark.skipif(INTERP, reason="the interpreter child runs the Triton cases only")
outside_interp = pytest.mark.skipif(INTERP, reason="already in the interpreter process")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_in_interpreter(test_file: str, *pytest_args: str) -> str:
    """Run pytest on ``test_file`` (with ``pytest_args``, e.g. ``-k``) in a child process with
    ``TRITON_INTERPRET=1``; assert it exited 0 and return the tail of its output for the caller's
    own checks (how many passed, nothing skipped)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rsxX",
                          os.path.abspath(test_file), *pytest_args],
                         env=env, cwd=REPO, capture_output=True, text=True)
    tail = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, tail
    return tail
