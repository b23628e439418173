"""Dense, obviously-correct oracle of the low-level core-op contract (marginops/ops/__init__.py).

It materialises the B×N logits and lets autograd differentiate them, so it is the yardstick
every backend's `margin_lse` / `topk` is compared with at small shapes.
"""

from __future__ import annotations

import torch


def dense_cosines(features, weight, class_index, normalize_weight, subcenters):
    """(B, N) matrix d_in in acc dtype, differentiable w.r.t. features and weight."""
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    f = features.to(acc)
    w = weight.to(acc)
    if normalize_weight:
        w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    d = (f @ w.t()).view(f.shape[0], -1, subcenters).amax(dim=2)  # (B, C_local)
    if class_index is not None:
        d = d[:, class_index]
    return d


def margin_lse_dense(features, weight, scale, bias, target_col, class_index, hard_tau, hard_t,
                     normalize_weight, subcenters):
    d = dense_cosines(features, weight, class_index, normalize_weight, subcenters)
    cols = torch.arange(d.shape[1], device=d.device)
    is_target = cols[None, :] == target_col[:, None]
    if hard_tau is not None:
        hard = (~is_target) & (d > hard_tau[:, None])
        d_mod = torch.where(hard, d * (hard_t + d), d)
    else:
        d_mod = d
    z = scale[:, None] * d_mod
    if bias is not None:
        b = bias if class_index is None else bias[class_index]
        z = z + b[None, :]
    lse_neg = torch.logsumexp(z.masked_fill(is_target, float("-inf")), dim=1)
    dot_y = torch.where(target_col >= 0, (d * is_target).sum(dim=1), torch.zeros_like(lse_neg))
    return lse_neg, dot_y


def topk_dense(features, weight, exclude_col, k, normalize_weight, subcenters):
    with torch.no_grad():
        d = dense_cosines(features, weight, None, normalize_weight, subcenters)
        cols = torch.arange(d.shape[1], device=d.device)
        d = d.masked_fill(cols[None, :] == exclude_col[:, None], float("-inf"))
        return torch.topk(d, k, dim=1)
