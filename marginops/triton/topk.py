"""Streaming per-row top-k of cosines (``torch.ops.marginops.topk_triton``), no logits in memory.

For each batch row i, the k largest d_in over the iterated columns (d as in the contract:
normalised, sub-center max), the column exclude_col_i counting as −inf; values descending, NaN
ranked above +inf (like torch.topk), ties (NaN vs NaN included) broken by the lower column.

Kernel: grid (row tiles × class splits), like the forward of margin_lse.py. Each program keeps
a running list of KP = next_pow2(k) (value, column) pairs per row in registers. For each cosine tile
it runs k selection steps: take the tile's best candidate (NaN or the largest value, then the lowest
column), and if it beats the list's worst entry it replaces it; the candidate is then
removed from the tile. After k steps every tile element that belongs in the top-k has been
inserted (the tile's j-th best can only enter at step j). Per split lists go to a small
(splits × B × KP) buffer, merged by a stable sort in torch (B × splits·KP elements). Its
backward is sparse and lives in plain PyTorch (``marginops.core.topk_dot`` recomputes the k values
from the columns), so this op has no autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import configs
from .launch import _Args, _config, _split_columns, device_guard
from .tiles import _class_of, _cosine_tile

MAX_K = 16


@triton.jit
def _beats(nan_a, va, ca, nan_b, vb, cb):
    """(value, column) a ranks before b: NaN above everything (+inf included), then the larger
    value, then the lower column (NaN vs NaN too)."""
    same = (va == vb) | (nan_a & nan_b)
    return (nan_a & ~nan_b) | ((nan_a == nan_b) & ((va > vb) | (same & (ca < cb))))


@triton.jit
def _topk_kernel(f_ptr, w_ptr, excl_ptr, val_ptr, col_ptr,  # (splits, B, KP) partial lists
                 B, N, D, K, TOPK, cols_per_split, stride_f, stride_w,
                 NORMALIZE: tl.constexpr, HAS_SUB: tl.constexpr, DOT_PREC: tl.constexpr,
                 KP: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    excl = tl.load(excl_ptr + rows, mask=row_mask, other=-1)
    slot = tl.arange(0, KP)
    live = slot < TOPK
    # Empty live slots hold (−inf, N + slot): distinct sentinels that every real column beats
    # (the excluded one, at −inf, by its lower column), so "the worst entry" is unique.
    # Padding slots (k ≤ slot < KP) hold (NaN, −1), the best possible entry: never the worst.
    best_v = tl.where(live, float("-inf"), float("nan"))[None, :] + tl.zeros((BLOCK_B, KP),
                                                                           tl.float32)
    best_c = tl.where(live, N + slot, -1)[None, :] + tl.zeros((BLOCK_B, KP), tl.int32)
    big = 2147483647
    n_start = split * cols_per_split
    n_end = tl.minimum(n_start + cols_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n_end
        cls = _class_of(cols, col_mask, excl_ptr, False)
        d, _kb = _cosine_tile(f_ptr, w_ptr, excl_ptr, rows, row_mask, cols, cls, col_mask, K, D,
                              stride_f, stride_w, NORMALIZE, True, HAS_SUB, DOT_PREC,
                              BLOCK_B, BLOCK_N, BLOCK_D)
        # the excluded column competes with value −inf (contract); padding columns never
        cand = tl.where(cols[None, :] == excl[:, None], float("-inf"), d)
        avail = col_mask[None, :] & (rows >= 0)[:, None]
        for _step in range(TOPK):
            # tile's best available: a NaN (lowest column) if any, else the largest value
            nan_t = cand != cand
            has_nan = tl.max(tl.where(avail & nan_t, 1, 0), axis=1) > 0
            v = tl.max(tl.where(avail & ~nan_t, cand, float("-inf")), axis=1)
            in_best = tl.where(has_nan[:, None], nan_t, ~nan_t & (cand == v[:, None])) & avail
            c = tl.min(tl.where(in_best, cols[None, :], big), axis=1)
            v = tl.where(has_nan, float("nan"), v)
            # list's worst: the smallest non-NaN value, highest column; all NaN: highest column
            nan_l = best_v != best_v
            any_num = tl.max(tl.where(nan_l, 0, 1), axis=1) > 0
            wv = tl.min(tl.where(nan_l, float("inf"), best_v), axis=1)
            in_worst = tl.where(any_num[:, None], ~nan_l & (best_v == wv[:, None]), nan_l)
            wc = tl.max(tl.where(in_worst, best_c, -1), axis=1)
            take = (c < big) & _beats(has_nan, v, c, ~any_num, wv, wc)
            hit = in_worst & (best_c == wc[:, None]) & take[:, None]
            best_v = tl.where(hit, v[:, None], best_v)
            best_c = tl.where(hit, c[:, None], best_c)
            avail = avail & (cols[None, :] != c[:, None])
    out = (split * B + rows)[:, None] * KP + slot[None, :]
    omask = row_mask[:, None] & live[None, :]
    tl.store(val_ptr + out, best_v, mask=omask)
    tl.store(col_ptr + out, best_c, mask=omask)


def _topk(features: Tensor, weight: Tensor, exclude_col: Tensor, k: int, normalize_weight: bool,
          subcenters: int, cfg=None) -> tuple[Tensor, Tensor]:
    if not 1 <= k <= MAX_K:
        raise ValueError(f"backend 'triton': topk needs 1 <= k <= {MAX_K}, got k={k}")
    a = _Args(features, weight, weight.new_empty(0, dtype=torch.float32), None, exclude_col,
              None, None, None, normalize_weight, subcenters)
    dev = a.f.device
    if a.N < k:
        raise ValueError(f"topk: k={k} exceeds the {a.N} columns")
    if a.B == 0:
        return (torch.empty((0, k), dtype=torch.float32, device=dev),
                torch.empty((0, k), dtype=torch.int64, device=dev))
    cfg = cfg or _config("topk", a)
    kp = triton.next_power_of_2(k)
    splits, cps = _split_columns(a.B, a.N, cfg, dev, "topk", a.variant)
    vals = torch.empty((splits, a.B, kp), dtype=torch.float32, device=dev)
    cols = torch.empty((splits, a.B, kp), dtype=torch.int32, device=dev)
    grid = (triton.cdiv(a.B, cfg.block_b), splits)
    with device_guard(dev):
        _topk_kernel[grid](a.f, a.w, a.tcol, vals, cols, a.B, a.N, a.D, a.K, k, cps,
                           a.f.stride(0), a.w.stride(0), NORMALIZE=a.normalize, HAS_SUB=a.K > 1,
                           DOT_PREC=a.flags["DOT_PREC"], KP=kp, **cfg.meta(), **cfg.launch())
    # merge the splits: order by column, then a stable sort by value descending (torch sorts
    # NaN above +inf, and keeps equal values — NaN with NaN too — in column order)
    vals = vals[:, :, :k].permute(1, 0, 2).reshape(a.B, -1)
    cols = cols[:, :, :k].permute(1, 0, 2).reshape(a.B, -1).long()
    by_col = cols.argsort(dim=1, stable=True)
    vals, cols = vals.gather(1, by_col), cols.gather(1, by_col)
    by_val = vals.argsort(dim=1, descending=True, stable=True)[:, :k]
    return vals.gather(1, by_val), cols.gather(1, by_val)


@torch.library.custom_op("marginops::topk_triton", mutates_args=())
def topk_triton(features: Tensor, weight: Tensor, exclude_col: Tensor, k: int,
                normalize_weight: bool, subcenters: int) -> tuple[Tensor, Tensor]:
    return _topk(features, weight, exclude_col, k, normalize_weight, subcenters)


@topk_triton.register_fake
def _(features, weight, exclude_col, k, normalize_weight, subcenters):
    B = features.shape[0]
    return (features.new_empty((B, k), dtype=torch.float32),
            features.new_empty((B, k), dtype=torch.int64))


__all__ = ["topk_triton", "MAX_K", "configs"]
