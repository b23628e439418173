"""The chunked-gradient backward: one logit recompute and two plain GEMMs, 8·B·C·D in all.

resident.py's backward computes both gradients inside the kernels that recompute the logits, so
each kernel holds a second GEMM's fp32 accumulator in registers: at D = 512 that forces a 64-row
feature-gradient tile and a weight-gradient kernel that recomputes the logit tile once per
256-column chunk of D (12·B·C·D in all; 10 at D = 256), with 16-row streamed tiles whose
shared-memory reads bound it. Here the classes are taken in chunks of CC columns; per chunk

    kernel    what it does                                               tensor-core FLOPs
    _dd       F resident (resident.py's forward shape, its first chunk    2·B·CC·D
              in registers: REG0), W streamed:
              d = F·Ŵᵀ, dd_in = ∂loss/∂d_in (tiles._grad_logits), and
              stores dd'_in = dd_in / wn_n into a (B, CC) buffer in the
              operands' dtype; per row tile Σ_i dd'_in d_in (the
              Jacobian's ŵ·G) and per row Σ_n g_in d'_in (grad_scale)
    _df_gemm  dF[split] (+)= dd'[:, K range] · W[chunk rows]              2·B·CC·D
              (M = B, N = D, K = CC split across programs)
    _dw_gemm  grad_W[chunk rows] = dd'ᵀ · F − ŵ_n (Σ_i dd'_in d_in)       2·B·CC·D
              (M = CC, N = D, K = B), the normalisation's Jacobian in
              its epilogue, stored once in W's dtype

with the forward's 2·B·C·D that is the 8·B·C·D floor: the logits are recomputed once and feed
both gradients. Why it is right: dF_i = Σ_n dd_in ŵ_n = Σ_n dd'_in W_n, and with
G'_n = Σ_i dd'_in f_i = G_n / wn_n the Jacobian of W/‖W‖ is
grad_W_n = (G_n − ŵ_n (ŵ_n·G_n)) / wn_n = G'_n − ŵ_n Σ_i dd'_in d_in (ŵ_n·f_i = d_in).

The price is the dd' buffer: B × CC elements (waves.plan_chunk: whole waves of the dW GEMM within
waves.CHUNK_BYTES), against none for resident.py's backward. The two GEMMs are what cuBLAS-shaped
Triton GEMMs do well (128 × 256 tiles, K pipelined, no epilogue in the loop); at D = 512 their
operand reads from shared memory per FLOP are half the resident dW kernel's (0.031 B/FLOP,
what keeps the tensor cores busy), and L2 bounds them instead (85 FLOPs per byte loaded).
benchmarks/model.py models every launch (model_triton.chunked_launches).

Where it runs (configs.chunked_applies): where resident.py's kernels apply, at D = 256 and 512
(at D = 128 the GEMMs' 256-wide tiles would be half empty), without bias (a bias keeps
resident.py's backward), on bf16 (the GPU) or, forced, on fp32 (the interpreter). With
class_index (Partial FC) the kernels gather W's rows by class and the dW GEMM writes per column;
margin_lse sums a class's columns after. The forward is resident.py's.

Not measured on a GPU (none was available): counts and compiler output, not timings.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import configs, waves
from .launch import _Args, _device_slots_info, device_guard
from .resident import _chunks, _dots, _inv_cols, _resident_f
from .tiles import _class_of, _grad_logits, _grad_rows, _hard_t, _row_inputs, interpreting


@triton.jit
def _dd_kernel(f_ptr, w_ptr, scale_ptr, bias_ptr, tcol_ptr, cidx_ptr, tau_ptr, t_ptr,
               lse_ptr, glse_ptr, gdot_ptr, inv_ptr,
               dd_ptr,    # (B, CC) dd'_in = dd_in / wn_n of the chunk's columns, operand dtype
               proj_ptr,  # (row tiles, CC) fp32: Σ_i over the tile's rows of dd'_in d_in
               gs_ptr,    # (splits, B) fp32: Σ_n g_in d'_in over the split's columns so far
               B, c0, c_end, cols_per_split, accumulate, stride_f, stride_w, thr, CC,
               HAS_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr, HARD: tl.constexpr,
               FILTER: tl.constexpr, NORMALIZE: tl.constexpr, DOT_PREC: tl.constexpr,
               BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               TWO: tl.constexpr, REG0: tl.constexpr):
    """Program (row tile, split) of chunk [c0, c_end): resident.py's forward loop (F resident in
    one or two BLOCK_D chunks, with REG0 the first in registers; each W tile loaded once) with
    the backward's epilogue, dd' stored (module docstring). grad_scale's partial is read and
    written once per chunk (``accumulate``: 0 on the first); a split past the chunk's end adds
    nothing."""
    pid_b = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    scale, tcol, tau = _row_inputs(scale_ptr, tcol_ptr, tau_ptr, rows, row_mask, HARD)
    t = _hard_t(t_ptr, HARD)
    lse, glse, gdot = _grad_rows(lse_ptr, glse_ptr, gdot_ptr, rows, row_mask)
    dot_ty = f_ptr.dtype.element_ty
    f0, f1 = _resident_f(f_ptr, rows, row_mask, stride_f, BLOCK_D, TWO, REG0)

    gs = tl.zeros((BLOCK_B,), tl.float32)
    n_start = c0 + split * cols_per_split
    n_end = tl.minimum(n_start + cols_per_split, c_end)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n_end
        cls = _class_of(cols, col_mask, cidx_ptr, HAS_INDEX)
        w0, w1 = _chunks(w_ptr, cls, col_mask, stride_w, 0, BLOCK_D, TWO, dot_ty)
        inv = _inv_cols(inv_ptr, cols, col_mask, NORMALIZE)
        d = _dots(f0, w0, f1, w1, TWO, DOT_PREC) * inv[None, :]
        g, dmod, dd = _grad_logits(d, cols, col_mask, tcol, scale, bias_ptr, cls, tau, t, thr,
                                   lse, glse, gdot, HAS_BIAS, HARD, FILTER)
        gs += tl.sum(g * dmod, axis=1)
        local = cols - c0  # the chunk's own column, 0 … CC − 1
        if NORMALIZE:
            dd = dd * inv[None, :]
            tl.store(proj_ptr + pid_b * CC + local, tl.sum(dd * d, axis=0), mask=col_mask)
        tl.store(dd_ptr + rows.to(tl.int64)[:, None] * CC + local[None, :], dd.to(dot_ty),
                 mask=row_mask[:, None] & col_mask[None, :])
    keep = tl.full((BLOCK_B,), accumulate, tl.int32) != 0  # the previous chunks' sums (not on
    gs += tl.load(gs_ptr + split * B + rows, mask=row_mask & keep, other=0.0)  # the first)
    tl.store(gs_ptr + split * B + rows, gs, mask=row_mask)


@triton.jit
def _tile_offsets(rows, cols, stride):
    """rows[:, None]·stride + cols[None, :], the row products formed before broadcasting."""
    return (rows * stride)[:, None] + cols[None, :]


@triton.jit
def _df_gemm_kernel(dd_ptr, w_ptr, cidx_ptr,
                    out_ptr,  # (splits, B, D) fp32 partial feature gradients
                    B, D, c0, k_valid, k_pad, k_tiles_per_split, accumulate, stride_w, CC,
                    HAS_INDEX: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[split, rows, dcols] (+)= dd'[rows, K range] · W[class of c0 + K range, dcols]:
    program (row tile, D tile, split), the split's K range of the chunk's k_valid columns
    (padded to k_pad, a multiple of BLOCK_K: dd' is zero there, W's rows masked); a column's
    W row is class_index[column] with HAS_INDEX (Partial FC), else the column. The partial is
    read and written once per chunk, outside the K loop (``accumulate``: 0 on the first).

    Every load is masked along its non-contiguous axis only, and K steps start at multiples of
    BLOCK_K: the loads then vectorise, and Triton pipelines them (cp.async) with asynchronous
    wgmma (tests/test_triton_aot.py)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < B
    dcol_mask = dcols < D
    k_start = split * k_tiles_per_split * BLOCK_K
    k_end = tl.minimum(k_start + k_tiles_per_split * BLOCK_K, k_pad)
    # the previous chunks' partial is the accumulator's start (a second 128 × 256 fp32 tile
    # after the loop would spill); nothing is read on the first chunk. The store's addresses are
    # formed again after the loop (``_tile_offsets`` vs the inline form: not merged by CSE), so
    # no 128 × 256 address tile stays live across it.
    part = out_ptr + split.to(tl.int64) * B * D
    mask = row_mask[:, None] & dcol_mask[None, :]
    keep = tl.full((BLOCK_M,), accumulate, tl.int32) != 0
    acc = tl.load(part + rows[:, None] * D + dcols[None, :], mask=mask & keep[:, None], other=0.0)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(dd_ptr + rows.to(tl.int64)[:, None] * CC + ks[None, :], mask=row_mask[:, None],
                    other=0.0)
        k_mask = ks < k_valid
        wrow = _class_of(c0 + ks, k_mask, cidx_ptr, HAS_INDEX)
        b = tl.load(w_ptr + wrow[:, None] * stride_w + dcols[None, :],
                    mask=k_mask[:, None] & dcol_mask[None, :], other=0.0)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=DOT_PREC)
    tl.store(part + _tile_offsets(rows, dcols, D), acc, mask=mask)


@triton.jit
def _dw_gemm_kernel(dd_ptr, f_ptr, w_ptr, cidx_ptr, inv_ptr, proj_ptr,
                    gw_ptr,  # (C, D) grad_weight in W's dtype (with HAS_INDEX (N, D), per
                             # column), each element written once
                    B, D, c0, k_valid, row_tiles, stride_f, stride_w, CC,
                    HAS_INDEX: tl.constexpr, NORMALIZE: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_W[c0 + cl, dcols] = Σ_i dd'[i, cl] f_i[dcols] − ŵ_cl[dcols] Σ_i dd'_i,cl d_i,cl:
    program (class tile of the chunk, D tile), K = the batch; the second term sums the dd
    kernel's per-row-tile partials (module docstring). dd'ᵀ is read unmasked along its classes
    (contiguous: the load vectorises; CC is a multiple of BLOCK_M, so it stays in the buffer):
    a column past k_valid only reaches accumulator rows that are never stored."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cl = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cl_mask = cl < k_valid
    dcol_mask = dcols < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, B, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < B
        a = tl.load(dd_ptr + ks.to(tl.int64)[None, :] * CC + cl[:, None],  # dd'ᵀ: (classes, rows)
                    mask=k_mask[None, :], other=0.0)
        b = tl.load(f_ptr + ks[:, None] * stride_f + dcols[None, :],
                    mask=k_mask[:, None] & dcol_mask[None, :], other=0.0)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=DOT_PREC)
    # the output row: the column's own with HAS_INDEX (two columns may name one class)
    col = (c0 + cl).to(tl.int64)
    mask = cl_mask[:, None] & dcol_mask[None, :]
    if NORMALIZE:
        proj = tl.zeros((BLOCK_M,), tl.float32)
        for r in range(row_tiles):
            proj += tl.load(proj_ptr + r * CC + cl, mask=cl_mask, other=0.0)
        inv = tl.load(inv_ptr + c0 + cl, mask=cl_mask, other=1.0)
        wrow = _class_of(col, cl_mask, cidx_ptr, HAS_INDEX)  # W's rows again, for the Jacobian
        w = tl.load(w_ptr + wrow[:, None] * stride_w + dcols[None, :], mask=mask, other=0.0)
        acc = acc - w.to(tl.float32) * (proj * inv)[:, None]
    tl.store(gw_ptr + col[:, None] * D + dcols[None, :], acc.to(gw_ptr.dtype.element_ty),
             mask=mask)


# =============================================================================================
# Launcher
# =============================================================================================


def backward(a: _Args, lse: Tensor, grad_lse: Tensor, grad_dot: Tensor, inv: Tensor):
    """(grad_f, grad_w, grad_scale) of margin_lse_triton_backward by chunks (module docstring);
    ``inv`` holds 1/‖W_n‖ (_inv_norm_kernel) when normalising. With class_index grad_w is per
    column, (N, D) in W's dtype: the caller sums columns into their classes."""
    dev, B, N, D = a.f.device, a.B, a.N, a.D
    dd_cfg, df_cfg, dw_cfg = (_kernel_config(k) for k in ("dd", "df_gemm", "dw_gemm"))
    meta = configs.resident_meta("fwd", D)
    n_sm = None
    if dev.type == "cuda" and not interpreting():
        n_sm = _device_slots_info(dev.index if dev.index is not None
                                  else torch.cuda.current_device())[0]
    plan = waves.chunked_plan(B, N, D, n_sm, a.f.element_size(), dd_cfg, df_cfg, dw_cfg,
                              chunk=configs.forced_chunk(), splits=configs.forced_splits())
    cc, row_tiles = plan.cc, plan.dd_grid[0]
    if cc % df_cfg.block_d or cc % dw_cfg.block_b or cc % dd_cfg.block_n:
        raise ValueError(f"chunk of {cc} columns: not a multiple of the kernels' tiles")

    # dd' is addressed in 64 bits (B·CC can pass 2^31 at k = 1 from B ≈ 254K rows)
    dd = torch.empty((B, cc), dtype=a.f.dtype, device=dev)
    proj = torch.empty((row_tiles, cc), dtype=torch.float32, device=dev)
    gs = torch.empty((plan.dd_grid[1], B), dtype=torch.float32, device=dev)
    dfp = torch.empty((plan.df_grid[2], B, D), dtype=torch.float32, device=dev)
    # grad_W in W's dtype: per column with class_index (margin_lse._scatter_to_classes sums a
    # class's columns after, in W's dtype too: no fp32 copy), else per class
    grad_w = (torch.empty((N, D), dtype=a.w.dtype, device=dev) if a.cidx is not None
              else torch.empty_like(a.w))
    cidx = a.cidx if a.cidx is not None else a.tcol  # dummy pointer, never read without it
    strides = (a.f.stride(0), a.w.stride(0))

    def gemm(cfg: configs.KernelConfig) -> dict:
        return dict(HAS_INDEX=a.cidx is not None, DOT_PREC=a.flags["DOT_PREC"],
                    BLOCK_M=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_d,
                    **cfg.launch())

    with device_guard(dev):  # (the caller's too: nested, the same device)
        for c in range(plan.chunks):
            c0 = c * cc
            k_valid = min(cc, N - c0)
            k_pad = triton.cdiv(k_valid, df_cfg.block_d) * df_cfg.block_d
            if k_pad > k_valid:  # the last chunk's padding: the dF GEMM reads it (× masked W rows)
                dd[:, k_valid:k_pad].zero_()
            _dd_kernel[plan.dd_grid](
                *a.ptrs, lse, grad_lse, grad_dot, inv, dd, proj, gs, B, c0, c0 + k_valid,
                plan.cols_per_split, int(c > 0), *strides, a.thr, cc, **a.flags,
                BLOCK_B=dd_cfg.block_b, BLOCK_N=dd_cfg.block_n, **meta, **dd_cfg.launch())
            _df_gemm_kernel[plan.df_grid](
                dd, a.w, cidx, dfp, B, D, c0, k_valid, k_pad, plan.k_tiles_per_split,
                int(c > 0), a.w.stride(0), cc, **gemm(df_cfg))
            _dw_gemm_kernel[(triton.cdiv(k_valid, dw_cfg.block_b), plan.dw_grid[1])](
                dd, a.f, a.w, cidx, inv, proj, grad_w, B, D, c0, k_valid, row_tiles, *strides,
                cc, NORMALIZE=a.normalize, **gemm(dw_cfg))
    return dfp.sum(0).to(a.f.dtype), grad_w, gs.sum(0).to(a.acc)


def _kernel_config(kernel: str) -> configs.KernelConfig:
    """A kernel's tiles (the GEMMs' block_b, block_n, block_d = M, N, K): forced, the
    interpreter's, or configs.CHUNKED's."""
    forced = configs.forced(kernel)
    if forced is not None:
        return forced
    if interpreting():
        return configs.INTERPRETER["fwd"] if kernel == "dd" else configs.INTERPRETER_GEMM
    return configs.CHUNKED[kernel]
