"""The providers: everything a case is timed with, each under the name a reader of the tables and
plots knows it by (``LABELS``); the CSV keeps the short ids (``--providers`` takes them).

    naive PyTorch            marginops.reference: eager, full B×C logits + F.cross_entropy
    naive + torch.compile    torch.compile of that same function (compile time reported apart)
    marginops torch / cpp / cuda / triton   marginops' backends (backend_status decides)
    F.linear_cross_entropy   torch.nn.functional.linear_cross_entropy, chunked (plain CE only)
    pytorch-metric-learning  pytorch_metric_learning.losses.{ArcFace,CosFace,NormalizedSoftmax}Loss
    bare GEMMs               the GEMMs of the same shapes: X·Wᵀ (forward), dZ·W, dZᵀ·X (backward)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import marginops
from marginops import functional as mf
from marginops import reference as ref

from .common import ARC_MARGIN, COS_MARGIN, DTYPES, SCALE, Case

LABELS = {
    "reference": "naive PyTorch",
    "reference_compiled": "naive + torch.compile",
    "torch": "marginops torch",
    "cpp": "marginops cpp",
    "cuda": "marginops cuda",
    "triton": "marginops triton",
    "linear_cross_entropy": "F.linear_cross_entropy",
    "pml": "pytorch-metric-learning",
    "gemm": "bare GEMMs",
}
PROVIDERS = tuple(LABELS)
FUSED = ("torch", "cpp", "cuda", "triton")
NAIVE = ("reference", "reference_compiled", "pml")   # materialise B×C: subject to --mem-cap


def provider_reason(provider: str, case: Case) -> str | None:
    """None if ``provider`` applies to and can run for ``case``, else 'unavailable: ...' /
    'n/a: ...' (not applicable: no row is written) / 'skipped: ...'."""
    if provider in FUSED:
        reason = marginops.backend_status(case.device)[provider]
        if reason is not None:
            return f"unavailable: {reason}"
        if provider == "triton" and case.device == "cpu":
            return "skipped: Triton on CPU is the interpreter (a test tool, not a benchmark)"
        return None
    if provider == "linear_cross_entropy":
        if case.family != "ce":
            return "n/a: plain cross-entropy only (normalize_weight=False, no margin)"
        if not hasattr(F, "linear_cross_entropy"):
            return f"unavailable: torch {torch.__version__} has no F.linear_cross_entropy"
        return None
    if provider == "pml":
        if case.family == "ce":
            return "n/a: pytorch-metric-learning has no plain linear cross-entropy loss"
        try:
            import pytorch_metric_learning  # noqa: F401
        except ImportError as err:
            return f"unavailable: {err}"
        return None
    return None


def naive_bytes(case: Case) -> int:
    """Rough footprint of a naive provider: ~6 fp32-sized B×C buffers (cosines, scaled logits,
    mask, logits, log-softmax, their gradients) plus ~3 C×D buffers (Ŵ, its gradient, W.grad).
    (Measured at B=256, C=1M, D=512 fp32: 9.8 GB beyond the inputs and their gradients.)"""
    elt = torch.finfo(DTYPES[case.dtype]).bits // 8
    return 6 * case.B * case.C * 4 + 3 * case.C * case.D * elt


def reference_fn(family: str):
    if family == "arcface":
        return lambda x, w, y: ref.arcface_loss(x, w, y, scale=SCALE, margin=ARC_MARGIN)
    if family == "cosface":
        return lambda x, w, y: ref.cosface_loss(x, w, y, scale=SCALE, margin=COS_MARGIN)
    if family == "normface":
        return lambda x, w, y: ref.normface_loss(x, w, y, scale=SCALE)
    if family == "ce":
        return lambda x, w, y: F.cross_entropy(x @ w.t(), y)
    raise ValueError(family)


def fused_fn(family: str, backend: str):
    if family == "arcface":
        return lambda x, w, y: mf.arcface_loss(x, w, y, scale=SCALE, margin=ARC_MARGIN,
                                               backend=backend)
    if family == "cosface":
        return lambda x, w, y: mf.cosface_loss(x, w, y, scale=SCALE, margin=COS_MARGIN,
                                               backend=backend)
    if family == "normface":
        return lambda x, w, y: mf.normface_loss(x, w, y, scale=SCALE, backend=backend)
    if family == "ce":   # plain linear CE on raw features: lse over all classes − x·W_y
        def ce(x, w, y):
            lse_neg, dot_y = marginops.margin_lse(x, w, y, 1.0, normalize_weight=False,
                                                  backend=backend)
            return F.softplus(lse_neg - dot_y).mean()
        return ce
    raise ValueError(family)


@dataclass
class Step:
    """One provider ready to run: ``fn()`` returns the loss; ``leaves`` get their grads cleared."""
    fn: object
    leaves: list
    grad_bytes: int
    note: str = ""


def make_step(provider: str, case: Case, x, w, y, opts: dict) -> Step:
    elt = x.element_size()
    grad_bytes = (case.B * case.D + case.C * case.D) * elt
    if provider == "reference":
        f = reference_fn(case.family)
        return Step(lambda: f(x, w, y), [x, w], grad_bytes)
    if provider == "reference_compiled":
        import torch._inductor.config as inductor_config
        inductor_config.compile_threads = 1   # 2 shared cores: no compile-worker pool
        dynamic = not opts.get("compile_static", False)
        f = torch.compile(reference_fn(case.family), dynamic=dynamic)
        return Step(lambda: f(x, w, y), [x, w], grad_bytes,
                    note=f"torch.compile(dynamic={dynamic})")
    if provider in FUSED:
        f = fused_fn(case.family, provider)
        return Step(lambda: f(x, w, y), [x, w], grad_bytes)
    if provider == "linear_cross_entropy":
        options = torch.nn.LinearCrossEntropyOptions() if hasattr(
            torch.nn, "LinearCrossEntropyOptions") else None
        note = "chunked (LinearCrossEntropyOptions())" if options is not None else "reference path"
        return Step(lambda: F.linear_cross_entropy(x, w, y, options=options), [x, w], grad_bytes,
                    note=note)
    if provider == "pml":
        from pytorch_metric_learning import losses as pml_losses
        if case.family == "arcface":   # pml takes the margin in degrees, W as (D, C)
            mod = pml_losses.ArcFaceLoss(case.C, case.D, margin=math.degrees(ARC_MARGIN),
                                         scale=SCALE)
        elif case.family == "cosface":
            mod = pml_losses.CosFaceLoss(case.C, case.D, margin=COS_MARGIN, scale=SCALE)
        else:
            mod = pml_losses.NormalizedSoftmaxLoss(case.C, case.D, temperature=1.0 / SCALE)
        mod = mod.to(device=x.device, dtype=x.dtype)
        with torch.no_grad():
            mod.W.copy_(w.detach().t())
        return Step(lambda: mod(x, y), [x, mod.W], grad_bytes, note="W stored (D, C)")
    raise ValueError(provider)


