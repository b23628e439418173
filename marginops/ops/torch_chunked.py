"""The `torch` backend: the core op streamed over class chunks in plain PyTorch.

Portable (any device torch runs on) and memory-saving: it never holds B×C, only one B×chunk tile
at a time, in forward and in backward (which recomputes the tile). The math is the contract in
``marginops/ops/__init__.py``; this file reads top-down: tile → forward op → backward op → autograd.

Autocast is switched off inside every op: the backward recomputes the forward's tiles and must get
the same logits, but it runs outside the user's autocast region, so a forward GEMM in bf16 would
not match the saved lse_neg (the softmax would not sum to one). All tile math is in the acc dtype
(fp32, fp64 for fp64), as in the C++ backend, whatever the autocast state.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from . import register_core_autograd

NAMES = ("torch",)

# Elements of one B×(chunk·K) tile. 1M fp32 = 4 MB: large enough for an efficient GEMM, small
# enough that the handful of tile-sized temporaries stay far below a B×C buffer.
TILE_ELEMENTS = 1 << 20


def availability(backend: str, device: torch.device) -> str | None:
    return None


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _autocast_off(op: Callable) -> Callable:
    """Run ``op`` with autocast off on its first argument's device (see the module docstring)."""

    @functools.wraps(op)
    def run(*args, **kwargs):
        device = args[0].device.type
        off = (torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device)
               else contextlib.nullcontext())
        with off:
            return op(*args, **kwargs)

    return run


class Tile(NamedTuple):
    classes: Tensor      # (n,) class ids (rows of bias) of this chunk's columns
    rows: Tensor | slice  # weight rows of the chunk, n·K of them, class-major
    w_hat: Tensor        # (n·K, D) acc-dtype weight rows, normalised if asked
    w_norm: Tensor       # (n·K, 1) the clamped norms (ones when not normalising)
    d: Tensor            # (B, n) cosines after the sub-center max, before modulation
    best: Tensor | None  # (B, n) argmax sub-center, None when K = 1
    is_target: Tensor    # (B, n) bool
    hard: Tensor | None  # (B, n) bool: hard negatives modulated d·(t+d)
    filtered: Tensor | None  # (B, n) bool: interclass-filtered columns (d' = 0, slope 0)
    d_mod: Tensor        # (B, n) cosines after filtering and the hard-negative modulation
    z: Tensor            # (B, n) logits, -inf at the target


def _tiles(f: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None, target_col: Tensor,
           class_index: Tensor | None, hard_tau: Tensor | None, hard_t: Tensor | None,
           normalize_weight: bool, K: int,
           filter_threshold: float = 0.0) -> Iterator[tuple[int, Tile]]:
    """Yield (first column, tile) over all columns; f is already in acc dtype."""
    B = f.shape[0]
    n_cols = weight.shape[0] // K if class_index is None else class_index.numel()
    chunk = max(1, min(n_cols, TILE_ELEMENTS // max(1, B * K)))
    sub = torch.arange(K, device=f.device)
    for n0 in range(0, n_cols, chunk):
        n1 = min(n_cols, n0 + chunk)
        if class_index is None:
            classes = torch.arange(n0, n1, device=f.device)
            rows: Tensor | slice = slice(n0 * K, n1 * K)
            w = weight[rows]
        else:
            classes = class_index[n0:n1]
            rows = (classes[:, None] * K + sub).flatten()
            w = weight.index_select(0, rows)  # chunk-sized gather, never the whole sampled set
        w = w.to(f.dtype)
        if normalize_weight:
            w_norm = w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        else:
            w_norm = torch.ones_like(w[:, :1])
        w_hat = w / w_norm
        d = (f @ w_hat.t()).view(B, n1 - n0, K)
        best = None
        if K > 1:
            d, best = d.max(dim=2)
        else:
            d = d.squeeze(2)
        cols = torch.arange(n0, n1, device=f.device)
        is_target = cols[None, :] == target_col[:, None]
        hard = None
        d_mod = d
        if hard_tau is not None:
            hard = (~is_target) & (d > hard_tau[:, None])
            d_mod = torch.where(hard, d * (hard_t + d), d)
        filtered = None
        if filter_threshold > 0:  # insightface: non-target d above the threshold count as 0
            filtered = (~is_target) & (d > filter_threshold)
            d_mod = d_mod.masked_fill(filtered, 0.0)
        z = scale[:, None] * d_mod
        if bias is not None:
            z = z + bias[classes][None, :]
        z = z.masked_fill(is_target, float("-inf"))
        yield n0, Tile(classes, rows, w_hat, w_norm, d, best, is_target, hard, filtered, d_mod,
                   z)


# ---------------------------------------------------------------- forward op
@torch.library.custom_op("marginops::margin_lse_torch", mutates_args=())
@_autocast_off
def margin_lse_op(features: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None,
                  target_col: Tensor, class_index: Tensor | None, hard_tau: Tensor | None,
                  hard_t: Tensor | None, normalize_weight: bool,
                  subcenters: int, filter_threshold: float = 0.0) -> tuple[Tensor, Tensor]:
    acc = acc_dtype(features.dtype)
    f = features.to(acc)
    lse_neg = torch.full((f.shape[0],), float("-inf"), dtype=acc, device=f.device)
    dot_y = torch.zeros_like(lse_neg)
    for _, t in _tiles(f, weight, scale, bias, target_col, class_index, hard_tau, hard_t,
                       normalize_weight, subcenters, filter_threshold):
        # online log-sum-exp: log(e^a + e^b) merges the running value with this chunk's
        lse_neg = torch.logaddexp(lse_neg, torch.logsumexp(t.z, dim=1))
        # where, not d · is_target: a NaN elsewhere in the row must not leak into dot_y (NaN · 0)
        dot_y = dot_y + torch.where(t.is_target, t.d, 0.0).sum(dim=1)
    return lse_neg, dot_y


@margin_lse_op.register_fake
def _(features, weight, scale, bias, target_col, class_index, hard_tau, hard_t,
      normalize_weight, subcenters, filter_threshold=0.0):
    acc = acc_dtype(features.dtype)
    return features.new_empty(features.shape[0], dtype=acc), features.new_empty(
        features.shape[0], dtype=acc)


# ---------------------------------------------------------------- backward op
@torch.library.custom_op("marginops::margin_lse_torch_backward", mutates_args=())
@_autocast_off
def margin_lse_backward_op(grad_lse: Tensor, grad_dot: Tensor, lse_neg: Tensor, features: Tensor,
                           weight: Tensor, scale: Tensor, bias: Tensor | None, target_col: Tensor,
                           class_index: Tensor | None, hard_tau: Tensor | None,
                           hard_t: Tensor | None, normalize_weight: bool, subcenters: int,
                           filter_threshold: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    K = subcenters
    acc = acc_dtype(features.dtype)
    f = features.to(acc)
    B = f.shape[0]
    grad_f = torch.zeros_like(f)
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    grad_scale = torch.zeros_like(scale)
    grad_bias = torch.zeros_like(bias) if bias is not None else scale.new_zeros(0)
    # rows whose lse_neg is -inf have no negatives: every p is 0 there (shift by 0 instead of
    # -inf, which would give exp(-inf + inf) = NaN). NaN and +inf stay: NaN in, NaN out.
    finite_lse = lse_neg.masked_fill(lse_neg == float("-inf"), 0.0)
    for _, t in _tiles(f, weight, scale, bias, target_col, class_index, hard_tau, hard_t,
                        normalize_weight, K, filter_threshold):
        # dL/dz_in = grad_lse_i · softmax over the negatives (0 at the target: z = -inf there)
        g = grad_lse[:, None] * torch.exp(t.z - finite_lse[:, None])
        grad_scale += (g * t.d_mod).sum(dim=1)
        if bias is not None:
            grad_bias.index_add_(0, t.classes, g.sum(dim=0))
        dd = g * scale[:, None]
        if t.hard is not None:  # d/dd of d·(t + d) is t + 2d
            dd = torch.where(t.hard, dd * (hard_t + 2 * t.d), dd)
        if t.filtered is not None:  # a filtered column is a constant 0: slope 0 (NaN · 0 = NaN)
            dd = torch.where(t.filtered, dd * 0.0, dd)
        dd = dd + t.is_target * grad_dot[:, None]
        if K > 1:  # route each column's gradient to its argmax sub-center row
            dd = torch.zeros(B, dd.shape[1], K, dtype=acc, device=f.device).scatter_(
                2, t.best[..., None], dd[..., None]).view(B, -1)
        grad_f += dd @ t.w_hat
        g_what = dd.t() @ f  # (n·K, D): gradient w.r.t. the normalised rows
        if normalize_weight:  # Jacobian of w/‖w‖: (I − ŵŵᵀ)/‖w‖, identity/eps in the clamp
            radial = (t.w_hat * g_what).sum(dim=1, keepdim=True)
            clamped = t.w_norm <= 1e-12
            g_what = torch.where(clamped, g_what, g_what - t.w_hat * radial) / t.w_norm
        if isinstance(t.rows, slice):
            grad_w[t.rows] = g_what
        else:
            # repeated class_index entries accumulate (contract); deterministic on CUDA too
            grad_w.index_put_((t.rows,), g_what, accumulate=True)
    return grad_f.to(features.dtype), grad_w.to(weight.dtype), grad_scale, grad_bias


@margin_lse_backward_op.register_fake
def _(grad_lse, grad_dot, lse_neg, features, weight, scale, bias, target_col, class_index, hard_tau,
      hard_t, normalize_weight, subcenters, filter_threshold=0.0):
    grad_bias = torch.empty_like(bias) if bias is not None else scale.new_empty(0)
    return (torch.empty_like(features), torch.empty_like(weight), torch.empty_like(scale),
            grad_bias)


# ---------------------------------------------------------------- autograd
register_core_autograd(margin_lse_op, margin_lse_backward_op)


def margin_lse(features, weight, scale, bias, target_col, class_index, hard_tau, hard_t,
               normalize_weight: bool, subcenters: int,
               filter_threshold: float = 0.0) -> tuple[Tensor, Tensor]:
    return margin_lse_op(features, weight, scale, bias, target_col, class_index, hard_tau, hard_t,
                         normalize_weight, subcenters, float(filter_threshold))


# ---------------------------------------------------------------- top-k (no autograd)
def _top_k_by_value_then_column(val: Tensor, col: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best (B, n) entries per row in the contract's order: value descending with NaN
    first (as torch.topk ranks it), ties by the lower column. Equal values must appear in ``val``
    in column order (true of the running list followed by the next chunk).

    torch.topk finds the k-th value exactly but does not say which of several equal values it
    keeps, so the set is chosen by a second topk over distinct integer keys: every entry strictly
    better than the k-th value first, then the entries equal to it, lowest position first. Cheaper
    than a stable sort of the whole chunk (measured 9× slower than topk); no host sync.
    """
    n = val.shape[1]
    kth = torch.topk(val, k, dim=1).values[:, -1:]
    nan, kth_nan = torch.isnan(val), torch.isnan(kth)
    better = ~kth_nan & ((val > kth) | nan)                # NaN beats every number
    equal = torch.where(kth_nan, nan, val == kth)          # NaN ties with NaN
    key_dtype = torch.int32 if 2 * n < 2**31 else torch.int64
    rank = torch.arange(n, 0, -1, dtype=key_dtype, device=val.device)  # lower position: higher
    key = torch.where(better, rank + n, torch.where(equal, rank, 0))
    pick = torch.topk(key, k, dim=1).indices                # distinct keys: no tie left to break
    vals, cols = val.gather(1, pick), col.gather(1, pick)
    # by value, descending; the stable sort keeps the lower column first among equal values
    vals, order = torch.sort(vals, dim=1, descending=True, stable=True)
    return vals, cols.gather(1, order)


@torch.library.custom_op("marginops::topk_torch", mutates_args=())
@_autocast_off
def topk_op(features: Tensor, weight: Tensor, exclude_col: Tensor, k: int,
            normalize_weight: bool, subcenters: int) -> tuple[Tensor, Tensor]:
    acc = acc_dtype(features.dtype)
    f = features.to(acc)
    B = f.shape[0]
    best_val = f.new_full((B, 0), float("-inf"))
    best_col = exclude_col.new_zeros((B, 0))
    ones = f.new_ones(B)
    for n0, t in _tiles(f, weight, ones, None, exclude_col, None, None, None, normalize_weight,
                        subcenters):
        cols = torch.arange(n0, n0 + t.d.shape[1], device=f.device).expand(B, -1)
        val = torch.cat([best_val, t.d.masked_fill(t.is_target, float("-inf"))], dim=1)
        col = torch.cat([best_col, cols], dim=1)
        best_val, best_col = _top_k_by_value_then_column(val, col, min(k, val.shape[1]))
    return best_val, best_col


@topk_op.register_fake
def _(features, weight, exclude_col, k, normalize_weight, subcenters):
    acc = acc_dtype(features.dtype)
    B = features.shape[0]
    return features.new_empty(B, k, dtype=acc), exclude_col.new_empty(B, k)


def topk(features, weight, exclude_col, k: int, normalize_weight: bool,
         subcenters: int) -> tuple[Tensor, Tensor]:
    return topk_op(features, weight, exclude_col, k, normalize_weight, subcenters)
