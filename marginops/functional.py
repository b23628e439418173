"""Functional API: margin cross-entropy over the core op, and the pieces the modules share.

Every loss here is ``softplus(lse_neg − t) = logsumexp_j z_ij − z_iy`` with the target logit
``t = scale · ψ(dot_y) + bias_y`` formed from B values, so the B×C logits never exist.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import margins
from ._validation import (
    REDUCTIONS,
    check_choice,
    check_embeddings,
    check_int,
    check_labels,
    check_margin,
    check_real,
    check_scale,
    check_validate,
    check_weight,
)
from .core import class_count, margin_lse_checked, resolve_backend
from .ops import cpp_loss


def normalize_rows(embeddings: Tensor) -> tuple[Tensor, Tensor]:
    """(x̂, ‖x‖): x̂ = x / max(‖x‖, 1e-12) in the input's dtype, norms (B,) in fp32/fp64.

    The norm is taken in fp32 even for half inputs; x̂ goes back to the input dtype so that GPU
    kernels run half-precision GEMMs (they accumulate in fp32).

    An all-zero row has no direction: x̂ = 0 (as F.normalize gives) but its gradient is 0, not
    F.normalize's g/1e-12, which is ±inf once cast back to fp16 and makes a GradScaler skip every
    step. Equivalent PyTorch: ``F.normalize(x, eps=1e-12)`` with the zero rows' gradient zeroed.
    """
    acc = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    x = embeddings.to(acc)
    norms = x.norm(dim=1, keepdim=True)  # (B, 1): no unsqueeze node in the graph
    # x / inf = 0 on zero rows, with no gradient through the constant; other rows (NaN ones too)
    # are divided exactly as before.
    denom = torch.where(norms == 0, float("inf"), norms.clamp_min(1e-12))
    return (x / denom).to(embeddings.dtype), norms.squeeze(1)


def softmax_rows(lse_neg: Tensor, target_logit: Tensor) -> Tensor:
    """Per-row cross-entropy logsumexp(z) − z_y = softplus(lse_neg − z_y); exact, no p_y − 1.

    softplus(x) = log(1 + eˣ) as logaddexp(x, 0) = max(x, 0) + log1p(e^−|x|): correctly rounded
    at every x (F.softplus returns x itself above its threshold 20, off by e⁻ˣ), 0 at x = −inf
    (a row without negatives), and its gradient exp(x − softplus(x)) is sigmoid(x) to rounding,
    including 1/2 at x = 0. Shapes: (B,), (B,) → (B,).
    """
    x = lse_neg - target_logit
    return torch.logaddexp(x, x.new_zeros(()))  # a 0-d zero broadcasts: no (B,) allocation


def reduce_rows(rows: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """Mean over the non-ignored rows (0 when all are ignored), sum, or the (B,) rows themselves;
    ignored rows hold exactly 0 and receive no gradient."""
    rows = torch.where(valid, rows, rows.new_zeros(()))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().clamp_min(1)


def margin_cross_entropy(embeddings: Tensor, weight: Tensor, labels: Tensor,
                         target_fn: Callable[[Tensor], Tensor] | None = None, *,
                         scale: float | Tensor = 64.0, bias: Tensor | None = None,
                         normalize_weight: bool = True, subcenters: int = 1,
                         hard_negative: tuple[Tensor | float, Tensor | float] | None = None,
                         interclass_filtering_threshold: float = 0.0,
                         reduction: str = "mean", backend: str = "auto",
                         validate: str = "device") -> Tensor:
    """Scaled cosine cross-entropy with a margin on the target logit.

    Args:
        embeddings: (B, D) raw embeddings (normalised here).
        weight: (C·K, D) classifier, row = class·K + k.
        labels: (B,) int64 in [0, C), -1 ignores a row.
        target_fn: ψ applied to the target cosines (B,) → (B,); None means no margin.
        scale: float, 0-d or (B,) tensor s (differentiable).
        bias: optional (C,) class bias (added to every logit, target included).
        normalize_weight: False gives plain (un-normalised) weight rows (Crystal loss).
        interclass_filtering_threshold: insightface arcface_torch's option; 0 (default)
            disables it. When > 0, every non-target cosine above it enters the softmax as 0
            (logit ``scale·0 + bias``) with no gradient (see :func:`marginops.margin_lse`).
        validate: "device" (default: value checks are device-side asserts, no host sync; NaN/inf
            propagate to a NaN loss) or "full" (host-side checks listing the bad values, NaN/inf
            included).

    Equivalent PyTorch::

        c = F.normalize(embeddings) @ F.normalize(weight).T
        logits = scale * c.scatter(1, labels[:, None], target_fn(c.gather(1, labels[:, None])))
        F.cross_entropy(logits + bias, labels, ignore_index=-1, reduction=reduction)
    """
    return _margin_cross_entropy(
        embeddings, weight, labels, target_fn, None, scale=scale, bias=bias,
        normalize_weight=normalize_weight, subcenters=subcenters, hard_negative=hard_negative,
        interclass_filtering_threshold=interclass_filtering_threshold, reduction=reduction,
        backend=backend, validate=validate)


def _margin_cross_entropy(embeddings: Tensor, weight: Tensor, labels: Tensor,
                          target_fn: Callable[[Tensor], Tensor] | None,
                          psi: cpp_loss.Psi | None, *, scale: float | Tensor,
                          bias: Tensor | None, normalize_weight: bool, subcenters: int,
                          hard_negative: tuple[Tensor | float, Tensor | float] | None,
                          interclass_filtering_threshold: float, reduction: str, backend: str,
                          validate: str) -> Tensor:
    """margin_cross_entropy; ``psi``: target_fn as the cpp backend's one-op loss takes it
    (marginops/ops/cpp_loss.py), which serves the call when it applies."""
    check_choice("reduction", reduction, REDUCTIONS)
    check_validate(validate)
    check_embeddings(embeddings, validate=validate)
    check_weight(weight, embeddings)
    subcenters = check_int("subcenters", subcenters)
    num_classes = class_count(weight, subcenters)
    check_scale("scale", scale, embeddings.device)
    check_labels(labels, embeddings.shape[0], num_classes, embeddings.device, validate=validate)
    if psi is not None and bias is None and normalize_weight and subcenters == 1 and (
            hard_negative is None):
        name = resolve_backend(backend, embeddings.device, embeddings.dtype,
                               (embeddings.shape[0], num_classes, embeddings.shape[1]))
        if cpp_loss.applies(name, embeddings, weight, scale):
            threshold = check_real("interclass_filtering_threshold",
                                   interclass_filtering_threshold, low=0.0)
            return cpp_loss.margin_loss(embeddings, weight, labels, psi, scale, threshold,
                                        reduction)
    x_hat, _ = normalize_rows(embeddings)
    # every input the core op would check again was checked above: validate once per call
    lse_neg, dot_y = margin_lse_checked(
        x_hat, weight, labels, scale, bias, normalize_weight=normalize_weight, class_range=None,
        class_index=None, hard_negative=hard_negative, subcenters=subcenters,
        interclass_filtering_threshold=interclass_filtering_threshold, backend=backend,
        validate=validate)
    psi = dot_y if target_fn is None else target_fn(dot_y)
    target = scale_times(scale, psi)
    if bias is not None:
        target = target + bias.to(target.dtype)[labels.clamp_min(0)]
    return reduce_rows(softmax_rows(lse_neg, target), labels >= 0, reduction)


def scale_times(scale: float | Tensor, value: Tensor) -> Tensor:
    """scale · value for a float, 0-d or (B,) scale, in value's dtype."""
    if isinstance(scale, Tensor):
        scale = scale.to(value.dtype)
    return scale * value


# margin_cross_entropy's defaults for what the named families do not set
_PLAIN = {"bias": None, "normalize_weight": True, "subcenters": 1, "hard_negative": None}


def arcface_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, scale: float = 64.0,
                 margin: float = 0.5, angle_policy: str = "fallback", grad_mode: str = "exact",
                 interclass_filtering_threshold: float = 0.0, reduction: str = "mean",
                 backend: str = "auto", validate: str = "device") -> Tensor:
    """ArcFace: target s·cos(θ_y + m), others s·cos θ_j (arXiv 1801.07698); margin in radians."""
    check_margin("margin", margin)
    return _margin_cross_entropy(
        embeddings, weight, labels,
        lambda c: margins.arcface(c, margin, angle_policy=angle_policy, grad_mode=grad_mode),
        cpp_loss.arcface(margin, angle_policy, grad_mode), scale=scale, **_PLAIN,
        interclass_filtering_threshold=interclass_filtering_threshold, reduction=reduction,
        backend=backend, validate=validate)


def cosface_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, scale: float = 64.0,
                 margin: float = 0.35, interclass_filtering_threshold: float = 0.0,
                 reduction: str = "mean", backend: str = "auto",
                 validate: str = "device") -> Tensor:
    """CosFace: target s·(cos θ_y − m), others s·cos θ_j (arXiv 1801.09414); m is a cosine
    offset, checked like the angular margins (above π/2 looks like degrees)."""
    check_margin("margin", margin)
    return _margin_cross_entropy(embeddings, weight, labels, lambda c: margins.cosface(c, margin),
                                 cpp_loss.cosface(margin), scale=scale, **_PLAIN,
                                 interclass_filtering_threshold=interclass_filtering_threshold,
                                 reduction=reduction, backend=backend, validate=validate)


def normface_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *,
                  scale: float | Tensor = 64.0, interclass_filtering_threshold: float = 0.0,
                  reduction: str = "mean", backend: str = "auto",
                  validate: str = "device") -> Tensor:
    """NormFace: s·cos θ for every class, no margin (arXiv 1704.06369)."""
    return _margin_cross_entropy(embeddings, weight, labels, None, cpp_loss.normface(),
                                 scale=scale, **_PLAIN,
                                 interclass_filtering_threshold=interclass_filtering_threshold,
                                 reduction=reduction, backend=backend, validate=validate)
