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


# Routed quantities switch branch at a point: the best sub-center, the top-k set, a margin's
# branch on the target cosine (ArcFace "fallback" at c = cos(π − m), "easy" at c = 0),
# CurricularFace's hard negatives (c > cos(θ_y + m)). Two computations of the same data in
# different summation orders (shards, chunks, threads, fp32 vs fp64) can land on different sides
# when a cosine is within rounding of the switch, and then a whole gradient row moves. A test that
# compares such quantities across orders uses data whose every decision is at least MIN_GAP (in
# cosine) from its switch point: fp32 cosines carry ~1e-6 of error, so 1e-3 leaves a wide margin.
MIN_GAP = 1e-3


def cosines(x, w, subcenters: int = 1, normalize_weight: bool = True) -> torch.Tensor:
    """(B, C, K) fp64 cosines x̂·ŵ of ``x`` (B, D) with ``w`` (C·K, D); x̂·w with
    ``normalize_weight=False``. Equivalent: ``(normalize(x) @ normalize(w).T).view(B, -1, K)``."""
    x = torch.nn.functional.normalize(x.detach().double(), dim=1)
    w = w.detach().double()
    if normalize_weight:
        w = torch.nn.functional.normalize(w, dim=1)
    return (x @ w.t()).view(x.shape[0], -1, subcenters)


def routing_gap(cos_k, y, *, target_switches=(), hard_margin=None, hard_tau=None,
                topk: int | None = None) -> float:
    """Smallest distance, in cosine, of any routing decision from its switch point, given the
    fp64 cosines ``cos_k`` (B, C, K) (see :func:`cosines`) and labels ``y`` (B,); with a label
    ``y < 0`` the row has no target and only its sub-center and top-k decisions count:

    - K > 1: best minus second-best sub-center cosine of every (row, class);
    - ``target_switches``: cosines where ψ(c_y) changes branch, e.g. ``-cos(m)`` for "fallback";
    - ``hard_margin`` m or ``hard_tau`` (B,): |c_ij − τ_i| for j ≠ y, τ_i = cos(θ_y + m) (rows
      with a target) or given (every row);
    - ``topk`` k: gaps between the k + 1 largest non-target class cosines of every row (the
      set and its order).
    """
    gaps = [torch.tensor([float("inf")], dtype=torch.float64)]
    if cos_k.shape[2] > 1:
        top2 = cos_k.topk(2, dim=2).values
        gaps.append((top2[..., 0] - top2[..., 1]).flatten())
    cos = cos_k.amax(dim=2)
    has_y = y >= 0
    target = torch.zeros_like(cos, dtype=torch.bool)
    target[has_y, y[has_y]] = True
    c_y = cos[target]
    for switch in target_switches:
        gaps.append((c_y - switch).abs())
    if hard_margin is not None:  # τ from the target: rows without one have no hard negatives
        hard_tau = torch.full_like(cos[:, 0], float("inf"))
        hard_tau[has_y] = torch.cos(torch.acos(c_y.clamp(-1, 1)) + hard_margin)
    if hard_tau is not None:  # a given τ applies to every row (the contract: target elsewhere)
        gaps.append((cos - hard_tau.double()[:, None]).abs()[~target])
    if topk is not None:
        ranked = cos.masked_fill(target, float("-inf")).topk(min(topk + 1, cos.shape[1]),
                                                               dim=1).values
        step = (ranked[:, :-1] - ranked[:, 1:]).flatten()
        gaps.append(step.nan_to_num(nan=float("inf")))  # −inf − (−inf): past the last column
    return torch.cat(gaps).min().item()
