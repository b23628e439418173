"""The core op every softmax family is written over, and the backend dispatch.

``margin_lse`` computes, without ever holding the B×C logits,

    lse_neg_i = log Σ_{j ≠ y_i} exp(scale_i · c'_ij + bias_j)      c_ij = f_i · ŵ_j
    dot_y_i   = f_i · ŵ_{y_i}

and a family then forms its target logit t_i from dot_y (B values, plain PyTorch) and the loss
``softplus(lse_neg − t) = logsumexp(all logits) − t``. The backends (``marginops/ops/``) implement
one low-level contract, documented in ``marginops/ops/__init__.py``.
"""

from __future__ import annotations

import functools
import importlib
from typing import NamedTuple

import torch
from torch import Tensor

from ._validation import (
    check_class_index,
    check_embeddings,
    check_int,
    check_labels,
    check_real,
    check_validate,
    check_weight,
)

BACKENDS = ("torch", "cpp", "cuda", "triton")
_BACKEND_MODULES = {"torch": "torch_chunked", "cpp": "cpp", "cuda": "cpp", "triton": "triton"}


class MarginLSE(NamedTuple):
    """Output of :func:`margin_lse`: ``lse_neg`` and ``dot_y``, both (B,) in fp32 (fp64 for fp64)."""

    lse_neg: Tensor
    dot_y: Tensor


_LOADED: dict[str, object] = {}


def _backend_module(name: str):
    # A plain dict lookup once loaded, so torch.compile traces through it (it cannot trace
    # importlib); _resolve, run before any call, has loaded the module.
    if name not in _LOADED:
        _LOADED[name] = importlib.import_module(f"marginops.ops.{_BACKEND_MODULES[name]}")
    return _LOADED[name]


def backend_status(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """For each backend: None if it can run on ``device``, else the reason it cannot."""
    device = torch.device(device)
    status: dict[str, str | None] = {}
    for name in BACKENDS:
        try:
            status[name] = _backend_module(name).availability(name, device)
        except ImportError as err:  # a backend file that is not there yet / failed to import
            status[name] = f"marginops.ops.{_BACKEND_MODULES[name]} failed to import: {err}"
    return status


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32,
                    shape: tuple | None = None) -> str:
    """``"auto"``: on CUDA tensors the measured-fastest of triton and cuda for this GPU, dtype and
    ``shape`` = (B, C, D) when ``make gpu-check`` has written its table (marginops/backend_table.py),
    else the one the performance model predicts faster at the shape's power-of-two bucket
    (backend_table.static_choice), the other next, then torch (fp64 goes to torch: the GPU kernels
    have no fp64 path; a GPU the model has no figures for: triton, cuda, torch); cpp, then torch
    on CPU."""
    sizes = (None, None, None)
    if shape is not None and device.type == "cuda":
        # symbolic sizes (torch.compile, dynamic shapes) are not looked up: they match any table
        # entry, and the model's pick takes backend_table.MODEL_SHAPE's size
        sizes = tuple(n if type(n) is int else None for n in shape)
    return _resolve(backend, device.type, dtype == torch.float64, str(dtype).split(".")[-1],
                    device.index, *sizes)


@functools.cache
def _backend_available(name: str, device_type: str) -> str | None:
    return backend_status(torch.device(device_type))[name]


@functools.cache
def _cuda_arch(index: int | None) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"{major}.{minor}"


@torch.compiler.assume_constant_result
def _resolve(backend: str, device_type: str, fp64: bool, dtype: str = "float32",
             index: int | None = None, B: int | None = None, C: int | None = None,
             D: int | None = None) -> str:
    # Every argument is a Python constant and the answer depends on nothing else that changes in a
    # process (extensions imported, the table file read once): torch.compile treats it as a
    # constant of the graph. No GPU work: a cached device-property query and a cached file read.
    device = torch.device(device_type)
    if backend == "auto":
        order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpp", "torch")
        if fp64:
            order = tuple(name for name in order if name not in ("triton", "cuda"))
        elif device.type == "cuda":
            from . import backend_table

            # measured by gpu-check, else the performance model's pick for the shape's bucket
            arch = _cuda_arch(index)
            fastest = (backend_table.choose(arch, dtype, B, C, D)
                       or backend_table.static_choice(arch, dtype, B, C, D))
            if fastest is not None:
                order = (fastest, *(name for name in order if name != fastest))
        return next(name for name in order if _backend_available(name, device_type) is None)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; choose one of 'auto', "
                         + ", ".join(map(repr, BACKENDS)) + ".")
    reason = _backend_available(backend, device_type)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot run on {device}: {reason}. "
                           "Use backend='auto' to pick what is available "
                           "(python -m marginops.info lists the backends).")
    return backend


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_vector(name: str, value, batch: int, like: Tensor, checked: bool = False) -> Tensor:
    """A float or a 0-d / (B,) tensor as a (B,) tensor in acc dtype (differentiable).
    ``checked``: a float the caller validated already (see ``margin_lse_checked``)."""
    acc = _acc(like.dtype)
    if not isinstance(value, Tensor):
        value = value if checked else check_real(name, value)
        return torch.full((batch,), value, dtype=acc, device=like.device)
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}.")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but features are on {like.device}; move it.")
    if value.dim() == 0:
        return value.to(acc).expand(batch).contiguous()
    if value.shape != (batch,):
        raise ValueError(f"{name} must be a float, a 0-d tensor or a ({batch},) tensor, got shape "
                         f"{tuple(value.shape)}.")
    return value.to(dtype=acc).contiguous()


def _scalar(name: str, value, like: Tensor) -> Tensor:
    """A float or a one-element tensor as a 0-d tensor in acc dtype (not differentiated)."""
    if not isinstance(value, Tensor):
        return torch.tensor(check_real(name, value), dtype=_acc(like.dtype), device=like.device)
    if not value.dtype.is_floating_point or value.numel() != 1:
        raise ValueError(f"{name} must be a float or a one-element float tensor, got "
                         f"{value.dtype} of shape {tuple(value.shape)}.")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but features are on {like.device}; move it.")
    return value.detach().to(_acc(like.dtype)).reshape(())


def _check_features_weight(features: Tensor, weight: Tensor, subcenters: int) -> int:
    """Metadata checks shared by margin_lse and topk_dot; returns the class count C = rows / K."""
    check_embeddings(features, name="features", allow_empty=True)
    check_weight(weight, features)
    return class_count(weight, check_int("subcenters", subcenters))


def class_count(weight: Tensor, subcenters: int) -> int:
    """C = weight rows / K for a checked int K, with the error when K does not divide them."""
    if weight.shape[0] % subcenters:
        raise ValueError(f"subcenters={subcenters!r} must be a positive int dividing weight's "
                         f"{weight.shape[0]} rows.")
    return weight.shape[0] // subcenters


def target_columns(labels: Tensor, num_local: int, class_range: tuple[int, int] | None,
                   class_index: Tensor | None) -> Tensor:
    """Column of each row's target among the iterated classes, -1 if absent or ignored."""
    start = 0 if class_range is None else int(class_range[0])
    local = labels - start
    present = (labels >= 0) & (local >= 0) & (local < num_local)
    if class_index is None:
        return torch.where(present, local, torch.full_like(local, -1))
    position = torch.full((num_local,), -1, dtype=torch.long, device=labels.device)
    position[class_index] = torch.arange(class_index.numel(), device=labels.device)
    return torch.where(present, position[local.clamp(0, num_local - 1)], torch.full_like(local, -1))


def margin_lse(features: Tensor, weight: Tensor, labels: Tensor, scale: float | Tensor = 1.0,
               bias: Tensor | None = None, *, normalize_weight: bool = True,
               class_range: tuple[int, int] | None = None, class_index: Tensor | None = None,
               hard_negative: tuple[Tensor | float, Tensor | float] | None = None,
               subcenters: int = 1, interclass_filtering_threshold: float = 0.0,
               backend: str = "auto", validate: str = "device") -> MarginLSE:
    """Log-sum-exp over the non-target logits and the target dot product, streamed over classes.

    Args:
        features: (B, D) — typically x̂ (normalised embeddings); any float dtype.
        weight: (C_local·K, D) classifier rows, row = class·K + k; normalised inside when
            ``normalize_weight``.
        labels: (B,) int64 global class ids, -1 for ignored rows.
        scale: float, 0-d or (B,) tensor s_i (differentiable).
        bias: optional (C_local,) per-class bias b_j (differentiable).
        class_range: ``(start, C_local)`` — this shard owns classes [start, start + C_local).
        class_index: optional (N,) int64 local class ids to iterate (Partial FC); others are
            skipped and get zero gradient.
        hard_negative: ``(tau, t)`` — CurricularFace: for j ≠ y with c_ij > tau_i, c_ij becomes
            c_ij·(t + c_ij). tau (B,) or scalar, t scalar; neither is differentiated.
        subcenters: K; class j's cosine is the max over rows j·K .. j·K+K-1.
        interclass_filtering_threshold: insightface arcface_torch's option, a finite float >= 0;
            0 (default) disables it. When > 0, every non-target cosine c_ij (after the sub-center
            max, before the hard-negative modulation) above it counts as 0 in the softmax (logit
            ``scale_i·0 + bias_j``) and gets no gradient. Rows without a local target (another
            shard's class, ignored rows) have all their columns above it filtered, as in
            arcface_torch. The target and ``dot_y`` are never filtered.
        backend: "auto", "torch", "cpp", "cuda" or "triton".
        validate: "device" (default: label and class_index values checked by device-side
            asserts, no host sync) or "full" (host-side checks that list the bad values).

    Returns:
        ``MarginLSE(lse_neg, dot_y)``, each (B,) in fp32 (fp64 for fp64 inputs).

    Equivalent PyTorch (materialising B×C)::

        c = features @ F.normalize(weight).T            # (B, C), then max over sub-centers
        z = scale[:, None] * c + bias                   # with hard negatives modulated
        dot_y = c[arange(B), labels]
        # with interclass_filtering_threshold = thr > 0, before z is formed:
        #     c' = c.masked_fill((c > thr) & ~onehot(labels), 0)   (the mask under no_grad)
        lse_neg = z.masked_fill(onehot(labels), -inf).logsumexp(1)
    """
    # Metadata first (free, raises at once), then value checks (device asserts by default).
    check_validate(validate)
    num_local = _check_features_weight(features, weight, subcenters)
    start = 0
    if class_range is not None:
        if len(class_range) != 2:
            raise ValueError(f"class_range={class_range!r} must be (start, num_local_classes).")
        start = check_int("class_range start", class_range[0], minimum=0)
        if check_int("class_range size", class_range[1]) != num_local:
            raise ValueError(f"class_range={tuple(class_range)} says this shard owns "
                             f"{class_range[1]} classes but weight has {num_local} (= "
                             f"{weight.shape[0]} rows / {subcenters} sub-centers).")
        class_range = (start, num_local)
    # Labels are global ids: a shard (class_range) cannot bound them from above.
    check_labels(labels, features.shape[0], num_local if class_range is None else None,
                 features.device, validate=validate)
    if class_index is not None:
        check_class_index(class_index, num_local, features.device, validate=validate)
    return margin_lse_checked(features, weight, labels, scale, bias,
                              normalize_weight=normalize_weight, class_range=class_range,
                              class_index=class_index, hard_negative=hard_negative,
                              subcenters=int(subcenters),
                              interclass_filtering_threshold=interclass_filtering_threshold,
                              backend=backend, validate=validate)


def margin_lse_checked(features: Tensor, weight: Tensor, labels: Tensor, scale: float | Tensor,
                       bias: Tensor | None, *, normalize_weight: bool,
                       class_range: tuple[int, int] | None, class_index: Tensor | None,
                       hard_negative: tuple[Tensor | float, Tensor | float] | None,
                       subcenters: int, interclass_filtering_threshold: float, backend: str,
                       validate: str, floats_checked: bool = False) -> MarginLSE:
    """:func:`margin_lse` after its caller ran the checks of features, weight, subcenters,
    class_range, labels and class_index (``margin_lse`` itself, or a module's ``_check_inputs``):
    the module path validates each input once per call. ``class_range=None`` promises labels were
    checked to lie in [-1, C) (C = weight rows / subcenters); ``(start, C)`` that start is an int
    >= 0 and C that count. Checks the rest (scale, bias, hard_negative, the threshold), except
    that ``floats_checked=True`` promises a float scale and the threshold were validated when the
    caller (a module) was configured: under torch.compile a module float seen with two values
    becomes symbolic, and a check of its value would break the graph."""
    num_local = weight.shape[0] // subcenters
    filter_threshold = interclass_filtering_threshold
    if not floats_checked:
        filter_threshold = check_real("interclass_filtering_threshold", filter_threshold, low=0.0)
    batch = features.shape[0]
    acc = _acc(features.dtype)
    scale_rows = _row_vector("scale", scale, batch, features, checked=floats_checked)
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (num_local,):
            got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"bias must have shape ({num_local},), got {got}.")
        if not bias.dtype.is_floating_point:
            raise TypeError(f"bias must be a floating tensor, got {bias.dtype}.")
        if bias.device != features.device:
            raise ValueError(f"bias is on {bias.device} but features are on {features.device}; "
                             "move it.")
        bias = bias.to(acc)
    hard_tau = hard_t = None
    if hard_negative is not None:
        if not isinstance(hard_negative, tuple | list) or len(hard_negative) != 2:
            raise ValueError("hard_negative must be a pair (tau, t).")
        tau, t = hard_negative
        hard_tau = _row_vector("hard_negative tau", tau, batch, features).detach()
        hard_t = _scalar("hard_negative t", t, features)
    name = resolve_backend(backend, features.device, features.dtype,
                           (batch, num_local, features.shape[1]))
    if class_range is None and class_index is None and (
            validate == "device" or not torch.compiler.is_compiling()):
        # labels in [-1, C) were checked (a device assert, or on the host): each is its own
        # target column, -1 = none, which is what target_columns would compute, minus 4 ops.
        # (validate="full" under torch.compile checks nothing: target_columns then maps bad
        # labels to -1 as before.)
        target_col = labels.contiguous()
    else:
        target_col = target_columns(labels, num_local, class_range, class_index)
    lse_neg, dot_y = _backend_module(name).margin_lse(
        features.contiguous(), weight.contiguous(), scale_rows, bias, target_col, class_index,
        hard_tau, hard_t, bool(normalize_weight), subcenters, filter_threshold)
    return MarginLSE(lse_neg, dot_y)


def topk_dot(features: Tensor, weight: Tensor, k: int, *, exclude: Tensor | None = None,
             normalize_weight: bool = True, subcenters: int = 1,
             backend: str = "auto", validate: str = "device") -> tuple[Tensor, Tensor]:
    """The k largest f_i·ŵ_j per row (sub-center max), optionally excluding class ``exclude_i``.

    Streams over classes with a running top-k: no B×C logits. Returns ``(values, classes)``, each
    (B, k): values descending, differentiable w.r.t. features and weight (the backward is sparse:
    B·k rows), classes int64. Equivalent PyTorch::

        c = features @ F.normalize(weight).T   (then max over sub-centers)
        c[arange(B), exclude] = -inf
        values, classes = c.topk(k, dim=1)
    """
    check_validate(validate)
    num_classes = _check_features_weight(features, weight, subcenters)
    batch = features.shape[0]
    k = check_int("k", k)
    if exclude is not None:  # class ids in [0, C); -1 excludes nothing on that row
        check_labels(exclude, batch, num_classes, features.device, "exclude", validate=validate)
    available = num_classes - (1 if exclude is not None else 0)
    if not k <= available:
        raise ValueError(f"k={k} must be between 1 and {available} (the number of classes"
                         + (" other than the excluded label)." if exclude is not None else ")."))
    exclude_col = (torch.full((batch,), -1, dtype=torch.long, device=features.device)
                   if exclude is None else target_columns(exclude, num_classes, None, None))
    name = resolve_backend(backend, features.device, features.dtype)
    with torch.no_grad():
        _, classes = _backend_module(name).topk(features.contiguous(), weight.contiguous(),
                                                exclude_col, k, bool(normalize_weight), subcenters)
    # Recompute the k values differentiably: only B·k·K rows are read, so the backward is sparse.
    rows = weight.view(num_classes, subcenters, -1)[classes]          # (B, k, K, D)
    if normalize_weight:
        rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    acc = _acc(features.dtype)
    values = torch.einsum("bd,bkmd->bkm", features.to(acc), rows.to(acc)).amax(dim=-1)
    return values, classes
