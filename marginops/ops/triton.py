"""Binding of the ``triton`` backend (kernels in ``marginops/triton/``) to the core-op contract.

Importing this module never imports triton: the kernels are imported on first use, so a machine
without triton just reports the backend unavailable. CPU tensors are accepted when
``TRITON_INTERPRET=1`` (Triton's interpreter); Triton fixes a kernel's mode when it is defined, so the
variable must be set before the first triton-backend call of the process (the environment is read at
call time; a mismatch is reported, not silently run in the wrong mode).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys

import torch
from torch import Tensor

NAMES = ("triton",)
# Supported Triton: 3.5 (torch 2.9's) to 3.9; CI runs the newest and 3.5 (scripts/test_triton_oldest.sh).
MIN_TRITON = (3, 5)

_KERNELS = "marginops.triton.margin_lse"


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def availability(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run on ``device`` here, else the reason it cannot."""
    if backend not in NAMES:
        return f"backend {backend!r} is not served by marginops.ops.triton"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    version = _triton_version()
    if version is not None and version < MIN_TRITON:
        return (f"triton {'.'.join(map(str, version))} is older than the oldest supported "
                f"{'.'.join(map(str, MIN_TRITON))} (pip install 'triton>=3.5')")
    device = torch.device(device)
    loaded = sys.modules.get(_KERNELS)
    if device.type == "cpu":
        if not _interpret_env():
            return ("backend 'triton' needs CUDA tensors "
                    "(or TRITON_INTERPRET=1 for CPU tensors)")
        if loaded is not None and not loaded.interpreting():
            return ("backend 'triton': TRITON_INTERPRET=1 was set after the Triton kernels were "
                    "defined in compiled mode; set it in the environment before the first use")
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "backend 'triton' needs a CUDA device, and torch sees none"
        if loaded is not None and loaded.interpreting():
            return None  # interpreter mode runs CUDA tensors too (slowly)
        return None
    return f"backend 'triton' does not run on device type {device.type!r}"


def _triton_version() -> tuple[int, int] | None:
    """(major, minor) of the installed triton, read without importing it; None if unknown."""
    try:
        major, minor = importlib.metadata.version("triton").split(".")[:2]
        return int(major), int(minor)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def _ops():
    """Import the kernels (registers torch.ops.marginops.*_triton) and return the op namespace."""
    import marginops.triton.margin_lse  # noqa: F401
    import marginops.triton.topk  # noqa: F401

    return torch.ops.marginops


def _check(features: Tensor, weight: Tensor) -> None:
    reason = availability("triton", features.device)
    if reason is not None:
        raise RuntimeError(reason)
    if features.dtype == torch.float64 or weight.dtype == torch.float64:
        raise TypeError("backend 'triton' does not support float64 inputs (fp32/fp16/bf16 only); "
                        "use backend='torch' or backend='cpp' for float64")


def margin_lse(features, weight, scale, bias, target_col, class_index, hard_tau, hard_t,
               normalize_weight: bool, subcenters: int,
               filter_threshold: float = 0.0) -> tuple[Tensor, Tensor]:
    """Differentiable (lse_neg, dot_y); see marginops/ops/__init__.py for the contract."""
    _check(features, weight)
    return _ops().margin_lse_triton(features, weight, scale, bias, target_col, class_index,
                                    hard_tau, hard_t, bool(normalize_weight), int(subcenters),
                                    float(filter_threshold))


def topk(features, weight, exclude_col, k: int, normalize_weight: bool,
         subcenters: int) -> tuple[Tensor, Tensor]:
    """(values (B, k) fp32, columns (B, k) int64), k ≤ 16; no autograd."""
    _check(features, weight)
    return _ops().topk_triton(features, weight, exclude_col, int(k), bool(normalize_weight),
                              int(subcenters))
