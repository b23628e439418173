"""One tolerance policy for every comparison in the suite.

Two kinds of check:

* ``assert_tight`` — fp64 against fp64: the math must agree to rounding (1e-9 of the magnitude).
* ``assert_within_budget`` — a low-precision result against fp64 truth. Following
  apple/ml-cross-entropy's tests, the allowed error is tied to what plain PyTorch achieves in the
  same dtype: ``err(ours) <= factor · err(same-precision naive PyTorch) + floor(dtype)``, where err
  is the max absolute deviation from the fp64 truth. The floor keeps the check meaningful when the
  naive baseline happens to be exact.
"""

from __future__ import annotations

import torch

FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_tight(actual, expected, rtol: float = 1e-7, atol: float = 1e-9, name: str = ""):
    """fp64 vs fp64. ``atol`` is relative to the largest |expected| (at least 1): a gradient of
    magnitude 10 through s = 64 loses a few digits to cancellation, in any correct order of sums."""
    magnitude = max(1.0, expected.double().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol,
                               atol=atol * magnitude, msg=lambda m: f"{name}: {m}")


def max_abs_err(x, truth) -> float:
    return (x.double() - truth.double()).abs().max().item() if x.numel() else 0.0


def assert_within_budget(actual, baseline, truth, dtype: torch.dtype, factor: float = 2.0,
                         name: str = ""):
    """``actual`` and ``baseline`` (same-precision naive PyTorch) are compared with fp64 ``truth``."""
    ours = max_abs_err(actual, truth)
    theirs = max_abs_err(baseline, truth)
    scale = max(truth.double().abs().max().item(), 1.0) if truth.numel() else 1.0
    budget = factor * theirs + FLOOR[dtype] * scale
    assert ours <= budget, (
        f"{name}: max error {ours:.3e} vs fp64 exceeds budget {budget:.3e} "
        f"({factor}× same-precision PyTorch error {theirs:.3e} + floor)")
