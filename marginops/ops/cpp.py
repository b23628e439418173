"""Backends "cpp" (CPU) and "cuda" (CUDA): the compiled extension (marginops/csrc/).

The extension registers ``torch.ops.marginops.margin_lse``, ``margin_lse_backward`` and ``topk``
with CPU kernels, and with CUDA kernels when it was built against a CUDA torch with a toolkit.
Same op names, different dispatch keys: "cpp" is the CPU kernel, "cuda" the CUDA kernel.

It is compiled against the running torch on first use (``marginops.build``: cached, file-locked,
``python -m marginops.build`` does it ahead of time), not at import: importing this file is cheap.
``availability`` loads it when asked about a device the backend could run on; if it cannot be
built, a warning says so once and the backend reports unavailable (``backend="auto"`` then falls
back to the torch backend).

This file adds what the pytorch/extension-cpp recipe puts in Python: fake (meta) kernels, so
``torch.compile`` and ``opcheck`` can trace the ops, and the autograd formula, whose backward is
itself the registered ``margin_lse_backward`` op. The math is the contract of
``marginops/ops/__init__.py``.

On CPU, ``margin_lse`` keeps the forward's B × N·K dots for the backward when they fit the keep
budget (``set_keep_budget(nbytes)``, default ``DEFAULT_KEEP_BUDGET`` = 32 MiB; 0 = always
recompute): 3 GEMMs instead of 4, the same results bit for bit; above the budget nothing of size
B·C is kept. On CPUs with AVX-512 the chunk GEMMs run on the extension's own kernels (fp32 sums and
tiles): fp32 operands on the fp32 FMA units, bf16 features on the AVX512-BF16 units when the CPU has
them; ``MARGINOPS_CPU_F32_GEMM=0`` / ``MARGINOPS_CPU_BF16_GEMM=0`` send them to ATen's GEMM instead
(benchmarking knobs). fp64, and CPUs without AVX-512, use ATen's GEMM.

On CUDA (csrc/cuda/, tc_gemm.h) the GEMMs run on the tensor cores in the features' dtype with fp32
output, reading W and F in place (a weight of another dtype, or a class_index gather, is converted
one chunk at a time); fp32 inputs use TF32 exactly when torch's own matmuls would
(``torch.backends.cuda.matmul.allow_tf32`` / ``torch.set_float32_matmul_precision``), IEEE fp32
otherwise. Chunks are sized so the fp32 logit tile stays in half the GPU's L2;
``MARGINOPS_CUDA_TILE_KB`` overrides that budget (a test knob, read per call).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .. import build
from . import register_core_autograd

NAMES = ("cpp", "cuda")

_LOADED = False                 # the extension is loaded and its Python side registered
_LOAD_ERROR: str | None = None  # why it could not be loaded (set once, with one warning)


def _ensure_loaded() -> str | None:
    """Load (compiling if needed) the extension once per process; None, or why it is unusable."""
    global _LOADED, _LOAD_ERROR
    if _LOADED or _LOAD_ERROR is not None:
        return _LOAD_ERROR
    try:
        build.load()
    except build.BuildError as err:
        _LOAD_ERROR = f"{err} (fix it, then `python -m marginops.build`)"
        warnings.warn(f"marginops: the C++/CUDA backends are unavailable: {_LOAD_ERROR}. "
                      "The 'torch' backend still works.", RuntimeWarning, stacklevel=3)
        return _LOAD_ERROR
    if not hasattr(torch.ops.marginops, "margin_lse"):
        _LOAD_ERROR = (f"{build.loaded()['path']} loaded but did not register "
                       "torch.ops.marginops.margin_lse")
        return _LOAD_ERROR
    _register_python_side()
    torch.ops.marginops.set_grad_pool_limit(_keep_budget)
    _LOADED = True
    return None


def loaded() -> bool:
    """Whether the extension is loaded (never compiles it: marginops.optim asks per chunk)."""
    return _LOADED


def _has_cuda_kernel() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("marginops::margin_lse", "CUDA")


def availability(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` ("cpp" or "cuda") can run on ``device``, else the reason it cannot.

    Compiles the extension (once, cached) when the answer depends on it."""
    device = torch.device(device)
    if backend not in NAMES:
        return f"marginops.ops.cpp serves backends {NAMES}, not {backend!r}"
    if backend == "cpp" and device.type != "cpu":
        return "backend 'cpp' needs CPU tensors"
    if backend == "cuda" and device.type != "cuda":
        return "backend 'cuda' needs CUDA tensors"
    if _ensure_loaded() is not None:
        return _LOAD_ERROR
    if backend == "cpp":
        return None
    if not _has_cuda_kernel():
        why = (build.cuda_unavailable_reason()
               or "its CUDA build failed; `python -m marginops.build --cuda` shows why")
        return (f"the marginops extension was built without CUDA kernels ({why}); "
                "rebuild with `python -m marginops.build --cuda`")
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


# ------------------------------------------------------------------------------------------------
# Python-side registrations (only when the ops exist)
# ------------------------------------------------------------------------------------------------

def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_python_side() -> None:
    """Fake kernels and autograd of the ops; run once, right after the library is loaded."""

    @torch.library.register_fake("marginops::margin_lse")
    def _margin_lse_fake(features, weight, scale, bias, target_col, class_index, hard_tau,
                         hard_t, normalize_weight, subcenters, filter_threshold=0.0):
        acc = _acc(features.dtype)
        batch = features.shape[0]
        return features.new_empty((batch,), dtype=acc), features.new_empty((batch,), dtype=acc)

    @torch.library.register_fake("marginops::margin_lse_backward")
    def _margin_lse_backward_fake(grad_lse, grad_dot, lse_neg, features, weight, scale, bias,
                                  target_col, class_index, hard_tau, hard_t, normalize_weight,
                                  subcenters, filter_threshold=0.0):
        acc = _acc(features.dtype)
        grad_bias = (bias.new_empty(bias.shape, dtype=acc) if bias is not None
                     else features.new_empty((0,), dtype=acc))
        return (torch.empty_like(features), torch.empty_like(weight),
                features.new_empty((features.shape[0],), dtype=acc), grad_bias)

    @torch.library.register_fake("marginops::topk")
    def _topk_fake(features, weight, exclude_col, k, normalize_weight, subcenters):
        batch = features.shape[0]
        return (features.new_empty((batch, k), dtype=_acc(features.dtype)),
                features.new_empty((batch, k), dtype=torch.long))

    register_core_autograd("marginops::margin_lse", torch.ops.marginops.margin_lse_backward)

    @torch.library.register_fake("marginops::margin_lse_keep")
    def _margin_lse_keep_fake(features, weight, scale, bias, target_col, class_index, hard_tau,
                              hard_t, normalize_weight, subcenters, filter_threshold=0.0):
        lse_neg, dot_y = _margin_lse_fake(features, weight, scale, bias, target_col, class_index,
                                          hard_tau, hard_t, normalize_weight, subcenters)
        columns = (class_index.shape[0] * subcenters if class_index is not None
                   else weight.shape[0])
        dots = features.new_empty((features.shape[0], columns), dtype=_acc(features.dtype))
        return lse_neg, dot_y, dots

    @torch.library.register_fake("marginops::margin_lse_backward_kept")
    def _margin_lse_backward_kept_fake(grad_lse, grad_dot, lse_neg, dots, *rest):
        return _margin_lse_backward_fake(grad_lse, grad_dot, lse_neg, *rest)

    register_core_autograd("marginops::margin_lse_keep",
                           torch.ops.marginops.margin_lse_backward_kept, kept=True)

    from . import cpp_loss
    cpp_loss.register()  # the fixed-margin families' one-op loss (csrc/cpu/margin_loss.cpp)

    # marginops.optim's one-pass CPU updates (in place, no outputs)
    @torch.library.register_fake("marginops::sgd_step_")
    def _sgd_step_fake(param, grad, momentum_buffer, lr, weight_decay, momentum, dampening,
                       nesterov, maximize, first_step):
        return None

    @torch.library.register_fake("marginops::adamw_step_")
    def _adamw_step_fake(param, grad, exp_avg, exp_avg_sq, lr, weight_decay, beta1, beta2, eps,
                         step, maximize):
        return None


# ------------------------------------------------------------------------------------------------
# The interface marginops.core calls
# ------------------------------------------------------------------------------------------------

def _require_loaded() -> None:
    # core._resolve has called availability() before any call, so this is a plain flag check
    # (torch.compile traces it); a direct call without it loads here.
    if not _LOADED and _ensure_loaded() is not None:
        raise RuntimeError(f"marginops C++ backend unavailable: {_LOAD_ERROR}")


# The CPU kernel's keep budget: when the forward's dots d_ir (B × N·K in the acc dtype, N the
# iterated classes, K sub-centers) fit in this many bytes, the forward keeps them and the backward
# reads them instead of recomputing them (3 GEMMs instead of 4). Above it, nothing of size B·C is
# held: extra memory is at most this budget whatever B and C. 32 MiB: the L3 cache of one
# AMD EPYC CCD or of a large Intel Xeon socket's share, where a kept tile is read back from
# faster than it is recomputed; B = 64 × C = 100K fp32 (25.6 MB) fits.
DEFAULT_KEEP_BUDGET = 32 << 20
_keep_budget = DEFAULT_KEEP_BUDGET


def set_keep_budget(nbytes: int) -> int:
    """Set the cpp backend's keep budget in bytes (0: always recompute); returns the old value.

    Read at each call (never at import). Equivalent in math to recomputing: the backward reads
    the exact dots the forward computed. Between steps the extension holds on to the last freed
    block of kept dots (at most one, within the budget it was kept under) and the last freed
    weight gradient no larger than the budget: no page faults per step (csrc/cpu/keep_pool.h);
    this call frees both.
    """
    global _keep_budget
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"marginops: set_keep_budget(nbytes) takes an int >= 0 bytes, got "
                         f"{nbytes!r}; 0 turns keeping off")
    old, _keep_budget = _keep_budget, nbytes
    if _LOADED:
        torch.ops.marginops.set_grad_pool_limit(nbytes)
        torch.ops.marginops.keep_pool_held_bytes(True)
    return old


def _keeps(features: Tensor, weight: Tensor, class_index: Tensor | None, subcenters: int,
           extra_rows: int = 0) -> bool:
    """Whether margin_lse takes the keep path: CPU, a gradient will be asked, dots fit the budget
    (with ``extra_rows`` more rows of them: margin_loss keeps the weight norms beside them)."""
    if features.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    if not (features.requires_grad or weight.requires_grad):
        return False
    columns = class_index.shape[0] * subcenters if class_index is not None else weight.shape[0]
    itemsize = 8 if features.dtype == torch.float64 else 4
    return (features.shape[0] + extra_rows) * columns * itemsize <= _keep_budget


def margin_lse(features: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None,
               target_col: Tensor, class_index: Tensor | None, hard_tau: Tensor | None,
               hard_t: Tensor | None, normalize_weight: bool,
               subcenters: int, filter_threshold: float = 0.0) -> tuple[Tensor, Tensor]:
    """(lse_neg, dot_y), differentiable w.r.t. features, weight, scale and bias.

    On CPU, when the B × N·K dots fit the keep budget (``set_keep_budget``, default 32 MiB) and a
    gradient can be asked for, ``margin_lse_keep`` keeps them for its backward; else nothing of size
    B·C is kept and the backward recomputes them.
    """
    _require_loaded()
    args = (features, weight, scale, bias, target_col, class_index, hard_tau, hard_t,
            bool(normalize_weight), int(subcenters), float(filter_threshold))
    if _keeps(features, weight, class_index, int(subcenters)):
        lse_neg, dot_y, _dots = torch.ops.marginops.margin_lse_keep(*args)
        return lse_neg, dot_y
    lse_neg, dot_y = torch.ops.marginops.margin_lse(*args)
    return lse_neg, dot_y


def topk(features: Tensor, weight: Tensor, exclude_col: Tensor, k: int, normalize_weight: bool,
         subcenters: int) -> tuple[Tensor, Tensor]:
    """(values (B, k) acc dtype, columns (B, k) int64); no autograd."""
    _require_loaded()
    values, columns = torch.ops.marginops.topk(features, weight, exclude_col, int(k),
                                               bool(normalize_weight), int(subcenters))
    return values, columns
