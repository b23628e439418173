"""The cpp backend's one-op loss for the fixed-margin families (CPU, eager).

``torch.ops.marginops.margin_loss`` (marginops/csrc/cpu/margin_loss.cpp) computes NormFace,
CosFace, ArcFace and the combined margin with m1 = 1 in one call: normalise the embeddings, the
core op, the target logit s·ψ(c_y), softplus and the reduction; ``margin_loss_backward`` is its
gradient. The loss modules and ``marginops.functional`` take it when :func:`applies` says so, and
otherwise run the same math as B-sized PyTorch ops around the core op, which stays the reference.

Why: at B = 64, C = 10K, D = 128 (bf16) those ~25 small ops and their autograd nodes cost as much
as the three GEMMs (~0.4 ms per step warm, ~0.6 ms cold); here they are a few loops over B values.

ψ (marginops/margins.py): ``arc`` gives cos(θ + m) under the angle policy (fallback / none /
easy; "clip" is not fused), then ψ −= ``offset``; ``straight_through`` keeps the value and takes
dψ/dc = 1. The forward keeps a (B + 1, C) block for the backward — the exps of its fixed-shift
log-sum-exp (scale <= 75, no filtering; else the dots) and the weight rows' squared norms — when
it fits the ``marginops.ops.cpp`` keep budget.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import FUSED_STEPS, cpp

POLICIES = {"fallback": 0, "none": 1, "easy": 2}
REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}


class Psi(NamedTuple):
    """The target-logit function of a fixed-margin family, as margin_loss takes it."""
    arc: bool = False
    margin: float = 0.0
    offset: float = 0.0
    policy: str = "fallback"
    straight_through: bool = False


def normface() -> Psi:
    return Psi()


def _floats(*values) -> bool:
    """Margins the op can take: Python numbers (a tensor margin, per row or not, is not fused)."""
    return all(isinstance(v, float | int) and not isinstance(v, bool) for v in values)


def cosface(margin: float | Tensor) -> Psi | None:
    return Psi(offset=float(margin)) if _floats(margin) else None


def arcface(margin: float | Tensor, angle_policy: str, grad_mode: str,
            offset: float = 0.0) -> Psi | None:
    """ArcFace (and the combined margin with m1 = 1: margin m2, offset m3); None for "clip" and
    tensor margins."""
    if angle_policy not in POLICIES or not _floats(margin, offset):
        return None
    return Psi(True, float(margin), float(offset), angle_policy, grad_mode == "straight_through")


def applies(backend: str, embeddings: Tensor, weight: Tensor, scale) -> bool:
    """Whether margin_loss serves this call: backend ``cpp`` (resolved), eager (torch.compile
    traces the Python pipeline), a float scale, and a weight without a fused optimizer step
    (``marginops.optim``, which hooks into the core op's backward)."""
    return (backend == "cpp" and embeddings.device.type == "cpu" and cpp.loaded()
            and not torch.compiler.is_compiling()
            and _floats(scale)
            and getattr(FUSED_STEPS.get(weight), "__self__", None) is None)  # None: it is gone


def margin_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, psi: Psi, scale: float,
                filter_threshold: float, reduction: str) -> Tensor:
    """The loss (scalar, or (B,) rows for reduction "none"), differentiable w.r.t. embeddings
    (B, D) and weight (C, D); labels (B,) with -1 = ignored row, already checked.

    Equivalent PyTorch (the functional path)::

        c = F.normalize(embeddings) @ F.normalize(weight).T
        logits = scale * c.scatter(1, labels[:, None], psi(c.gather(1, labels[:, None])))
        F.cross_entropy(logits, labels, ignore_index=-1, reduction=reduction)
    """
    keep = cpp._keeps(embeddings, weight, None, 1, extra_rows=1)
    outputs = torch.ops.marginops.margin_loss(
        embeddings.contiguous(), weight.contiguous(), labels, float(scale), psi.arc,
        psi.margin, psi.offset, POLICIES[psi.policy], psi.straight_through,
        float(filter_threshold), REDUCTIONS[reduction], keep)
    return outputs[0]


def register() -> None:
    """Fake kernels of margin_loss and its backward (shapes for opcheck and tracing); called once
    the extension is loaded. Its autograd is registered in C++ (margin_loss.cpp)."""

    @torch.library.register_fake("marginops::margin_loss")
    def _margin_loss_fake(embeddings, weight, labels, scale, arc, margin, offset, angle_policy,
                          straight_through, filter_threshold, reduction, keep):
        acc = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        batch = embeddings.shape[0]
        rows = embeddings.new_empty((batch,), dtype=acc)
        loss = rows if reduction == REDUCTIONS["none"] else rows.new_empty(())
        # kept: B rows of exps and the weight rows' squared norms (margin_loss.cpp)
        dots = embeddings.new_empty((batch + 1, weight.shape[0]) if keep else (0, 0), dtype=acc)
        return (loss, torch.empty_like(embeddings), embeddings.new_empty((batch,), dtype=acc),
                rows.new_empty((batch,)), rows.new_empty((batch,)), dots)

    @torch.library.register_fake("marginops::margin_loss_backward")
    def _margin_loss_backward_fake(grad_loss, embeddings, x_hat, norms, lse_neg, dot_y, dots,
                                   weight, *rest):
        return torch.empty_like(embeddings), torch.empty_like(weight)
