"""Fully fused margin-softmax reduction in Triton: the core op of shared/DESIGN.md §2.

Read top-down: forward kernels → backward kernels → launchers (which also launch resident.py's
kernels where they apply) → registered ops
(``torch.ops.marginops.margin_lse_triton`` / ``..._backward``) → autograd. The tile helpers the
kernels inline (cosine tile, logit epilogue, …) are in tiles.py, shared with topk.py; the launch
helpers (device guard, dot precision, configurations, splits, autotuning) in launch.py.

The math (marginops/ops/__init__.py has the full contract). For a batch row i and an iterated column
n (class c_n = class_index[n], or n), with sub-center rows r = c_n·K + k:

    d_ir  = f_i · W_r / wn_r            wn_r = max(‖W_r‖, 1e-12), or 1 without normalisation
    d_in  = max_k d_{i, c_n·K+k}        (sub-center max; r*(i, n) is the argmax row)
    d'_in = 0                if FILTER and n ≠ y_i and d_in > thr (interclass filtering, slope 0)
          = d_in (t + d_in)  elif hard-negative and n ≠ y_i and d_in > tau_i, else d_in
    z_in  = scale_i · d'_in + bias_{c_n}
    lse_neg_i = log Σ_{n ≠ y_i} exp z_in            dot_y_i = d_{i, y_i}

Design (what runs where)
------------------------
Forward ``_fwd_kernel``: grid (row tiles × class splits). A program owns BLOCK_B rows and a
contiguous range of columns; per BLOCK_N column tile it runs ``tl.dot`` over D in BLOCK_D chunks
(fp32 accumulation, W tiles converted on load to the features' dtype), summing the squares of the
same loaded W tile so the row norm costs no extra pass, then the whole epilogue in registers
(1/‖W‖ column scale, sub-center max, target mask and dot_y capture, interclass filtering,
hard-negative modulation, scale, bias, online max / sum-exp). Each program writes three BLOCK_B
vectors (m, s, dot_y) to a (splits × B) buffer; ``_merge_kernel`` combines the splits. Nothing
B×C-sized is ever stored.

Backward: logits are recomputed, never stored; every accumulator lives in registers and every
output element is stored exactly once (no zero-fill, no read-modify-write of global memory, no
atomics: deterministic).
  * ``_bwd_df_kernel`` (row tiles × class splits × D chunks): dd_in (see contract), then
    dF_i = Σ_n dd_in ŵ_{r*}[chunk] with ŵ = W/wn of the argmax row, in a BLOCK_B × BLOCK_DO fp32
    register accumulator carried across the split's column tiles; stored once into the split's
    slice of an fp32 (splits × B × D) buffer that torch sums afterwards. It also produces
    grad_scale_i = Σ_n g_in d'_in per split.
  * ``_bwd_dw_kernel`` (class tiles × sub-centers × D chunks, looping over the whole batch):
    G_r = Σ_i dd_in f_i[chunk] for the rows r that are an argmax, in a BLOCK_N × BLOCK_DO register
    accumulator, grad_bias, and the normalisation Jacobian grad_W_r = (G_r − ŵ_r (ŵ_r·G_r)) / wn_r
    in the epilogue, stored once in the weight's dtype (no fp32 copy of grad_W). ŵ_r·G_r is
    Σ_i dd_ir d_ir, summed from the cosines at hand, so a chunk never needs the others.

Cost (K = 1; q = ⌈D / BLOCK_DO⌉ D chunks; BB, BN = BLOCK_B, BLOCK_N of that kernel; e = bytes
per element; s = splits; "L2" = bytes the programs load, L2 hits beyond the compulsory HBM bytes):

    kernel   tensor-core FLOPs  L2 → SM bytes (F; W)                      HBM (compulsory)
    bwd_df   (2q + 2)·B·C·D     q·⌈C/BN⌉·B·D·e;  (q + 1)·⌈B/BB⌉·C·D·e     F, W read; s·B·D·4 written
    bwd_dw   (2q + 2)·B·C·D     (q + 1)·⌈C/BN⌉·B·D·e;  (q·⌈B/BB⌉ + 1)·C·D·e   F, W read; grad_W C·D·e
                                                                          written (fp32 with index)

(plus 1/‖W‖ reads, 4 B per column per pass, and the per-row vectors.) Sub-centers multiply the dW
programs by K, each recomputing all K rows: its recompute costs 2q·K²·B·C·D. BLOCK_DO
(configs.py) is the widest that compiles without spills: 256 in half precision, so D ≤ 256 costs
4·B·C·D per kernel and D = 512 costs 6·B·C·D (two chunks, each recomputing the logit tile).
At B = 8192, C = 2^20, D = 512, bf16, default tiles: fwd 2 + dF 6 + dW 6 = 14·B·C·D = 61.6 TFLOP;
L2 → SM ≈ 0.96 TB (dF) + 0.69 TB (dW). The previous design (10·B·C·D = 44 TFLOP) loaded
≈ 0.62 TB and read-modified-wrote a global fp32 chunk per tile and 32-wide D chunk,
8·B·C·D·(1/BN + 1/BB) ≈ 0.83 TB more, behind a synchronous wgmma and a barrier each time. This
design has no global write inside any loop (every output element is stored once), pipelined D
loops (asynchronous wgmma with same-dtype half inputs on sm_90), and no fp32 (R, D) buffer —
but more FLOPs and L2 loads at D = 512 than before, and than the 8·B·C·D floor. Not measured on a
GPU (none was available): counts, not timings.

On sm_90 with bf16 features and weight, one sub-center and D ∈ {128, 256, 512}, resident.py's
kernels run instead (FlashAttention's shape: the program's own F or W tile stays in shared memory
over the whole D, each streamed tile is loaded once for both GEMMs; 10·B·C·D at D ≤ 256, 12 at
D = 512, a fifth of these L2 loads). Their docstring says why their tiles are what they are. At
D = 256 and 512 without bias the backward is chunked.py's instead: 8·B·C·D, with dd stored per
chunk of classes (below).

Why not 8·B·C·D here (cut-cross-entropy's one recompute feeding both gradients)? One of the two
gradients must then be reduced across programs: fp32 atomics on global memory or a dd buffer
(chunked.py takes the buffer, one chunk of classes at a time, where its GEMMs pay off). Per 64×64
tile at D = 512, 6·64·64·512 = 12.6 MFLOP meet an atomic update of a 64×512 fp32 block (128 KB
read + written): 48 FLOP/B, where an H100 needs ≈ 300 FLOP/B of L2 atomic traffic (989 TFLOP/s
over an estimated ≈ 3.3 TB/s) to stay compute-bound; and atomics make the result
non-deterministic. Nor the FlashAttention-shaped forward emitting the dF partial: every forward
(evaluation, no-grad) would pay the extra GEMM, a splits × B × D buffer and the same BLOCK_B × D
accumulator that spills here.

dtypes: features fp32 / fp16 / bf16; weight any of those (fp32 master weights with half features are
read as they are and converted tile by tile, as autocast would). fp64 is refused (the torch and
C++ backends serve fp64). fp32 dots use 3×TF32 (fp32-level accuracy) unless torch allows TF32
matmuls (``_tf32_allowed``). The second GEMMs' dd operand is cast to the features' dtype; for fp16
it is first scaled per output row by a running power of two (``_rescaled``) so small gradients
do not flush to zero. bf16 cannot run under the interpreter (its tl.dot is wrong there): refused.
Duplicate ``class_index`` entries accumulate, as on every backend: the dW kernel writes per
column and the launcher sums columns into their classes (``_scatter_to_classes``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops import register_core_autograd
from . import chunked, configs, resident, waves
from .launch import (  # noqa: F401  (_Args: part of this module's interface)
    _Args,
    _config,
    _dot_precision,
    _pick,
    _split_columns,
    device_guard,
)
from .tiles import (  # noqa: F401  (NEG_INF, interpreting: part of this module's interface)
    _NEG_INF,
    NEG_INF,
    _class_of,
    _cosine_tile,
    _grad_logits,
    _grad_rows,
    _hard_t,
    _logit_tile,
    _lse_step,
    _out_row,
    _rescaled,
    _row_inputs,
    _split_range,
    _store_partials,
    _up_start,
    interpreting,
)

# =============================================================================================
# Forward kernels
# =============================================================================================


@triton.jit
def _fwd_kernel(f_ptr, w_ptr, scale_ptr, bias_ptr, tcol_ptr, cidx_ptr, tau_ptr, t_ptr,
                m_ptr, s_ptr, y_ptr,  # (splits, B) fp32 partials
                B, N, D, K, cols_per_split, stride_f, stride_w, thr,
                HAS_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr, HARD: tl.constexpr,
                FILTER: tl.constexpr,
                NORMALIZE: tl.constexpr, HAS_SUB: tl.constexpr, DOT_PREC: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    scale, tcol, tau = _row_inputs(scale_ptr, tcol_ptr, tau_ptr, rows, row_mask, HARD)
    t = _hard_t(t_ptr, HARD)

    # online logsumexp over this split's columns: lse = m + log s
    m = tl.full((BLOCK_B,), _NEG_INF, tl.float32)
    s = tl.zeros((BLOCK_B,), tl.float32)
    dot_y = tl.zeros((BLOCK_B,), tl.float32)
    n_start, n_end = _split_range(split, cols_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n_end
        cls = _class_of(cols, col_mask, cidx_ptr, HAS_INDEX)
        d, _kb = _cosine_tile(f_ptr, w_ptr, scale_ptr, rows, row_mask, cols, cls, col_mask, K, D,
                              stride_f, stride_w, NORMALIZE, True, HAS_SUB, DOT_PREC,
                              BLOCK_B, BLOCK_N, BLOCK_D)
        is_t, _dmod, _slope, z = _logit_tile(d, cols, col_mask, tcol, scale, bias_ptr, cls,
                                             tau, t, thr, HAS_BIAS, HARD, FILTER)
        dot_y += tl.sum(tl.where(is_t, d, 0.0), axis=1)  # raw target cosine (one column at most)
        m, s = _lse_step(m, s, z)
    _store_partials(m_ptr, s_ptr, y_ptr, split, B, rows, row_mask, m, s, dot_y)


@triton.jit
def _merge_kernel(m_ptr, s_ptr, y_ptr, lse_ptr, doty_ptr, B, SPLITS, BLOCK_B: tl.constexpr):
    """lse_i = M + log Σ_s s_s exp(m_s − M) with M = max_s m_s;  dot_y_i = Σ_s dot_y_s."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = rows < B
    big_m = tl.full((BLOCK_B,), _NEG_INF, tl.float32)
    for sp in range(SPLITS):
        big_m = tl.maximum(big_m, tl.load(m_ptr + sp * B + rows, mask=mask, other=_NEG_INF))
    m_ref = tl.where(big_m == _NEG_INF, 0.0, big_m)
    total = tl.zeros((BLOCK_B,), tl.float32)
    dot_y = tl.zeros((BLOCK_B,), tl.float32)
    for sp in range(SPLITS):
        m_s = tl.load(m_ptr + sp * B + rows, mask=mask, other=_NEG_INF)
        total += tl.load(s_ptr + sp * B + rows, mask=mask, other=0.0) * tl.exp(m_s - m_ref)
        dot_y += tl.load(y_ptr + sp * B + rows, mask=mask, other=0.0)
    # total == 0: no column at all (−inf). A NaN total (a NaN logit, or +inf − +inf) must stay NaN
    # (NaN in, NaN out): `total > 0` would have read it as "no columns".
    lse = tl.where(total == 0.0, _NEG_INF, m_ref + tl.log(total))
    tl.store(lse_ptr + rows, lse, mask=mask)
    tl.store(doty_ptr + rows, dot_y, mask=mask)


# =============================================================================================
# Backward kernels
# =============================================================================================


@triton.jit
def _inv_norm_kernel(w_ptr, cidx_ptr, inv_ptr, N, D, K, stride_w,
                     HAS_INDEX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """inv[n, k] = 1 / max(‖W_{c_n K + k}‖, 1e-12) for the iterated columns only (N × K fp32)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    cls = _class_of(cols, col_mask, cidx_ptr, HAS_INDEX)
    offs = tl.arange(0, BLOCK_D)
    for k in range(K):
        wrow = cls * K + k
        wsq = tl.zeros((BLOCK_N,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dcol = d0 + offs
            w = tl.load(w_ptr + wrow[:, None] * stride_w + dcol[None, :],
                        mask=col_mask[:, None] & (dcol < D)[None, :], other=0.0).to(tl.float32)
            wsq += tl.sum(w * w, axis=1)
        tl.store(inv_ptr + cols * K + k, 1.0 / tl.maximum(tl.sqrt(wsq), 1e-12), mask=col_mask)


@triton.jit
def _bwd_df_kernel(f_ptr, w_ptr, scale_ptr, bias_ptr, tcol_ptr, cidx_ptr, tau_ptr, t_ptr,
                   lse_ptr, glse_ptr, gdot_ptr, inv_ptr,
                   df_ptr, gs_ptr,  # (splits, B, D) and (splits, B) fp32, each element written once
                   B, N, D, K, cols_per_split, stride_f, stride_w, thr,
                   HAS_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr, HARD: tl.constexpr,
                   FILTER: tl.constexpr,
                   NORMALIZE: tl.constexpr, HAS_SUB: tl.constexpr, DOT_PREC: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DO: tl.constexpr):
    """grad_f_i = Σ_n dd_in W_{r*} / wn_{r*} over one split, for the D columns of one chunk
    (program axis 2), accumulated in registers; grad_scale_i = Σ_n g_in d'_in (chunk 0 stores it)."""
    pid_b = tl.program_id(0)
    split = tl.program_id(1)
    pid_d = tl.program_id(2)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    scale, tcol, tau = _row_inputs(scale_ptr, tcol_ptr, tau_ptr, rows, row_mask, HARD)
    lse, glse, gdot = _grad_rows(lse_ptr, glse_ptr, gdot_ptr, rows, row_mask)
    t = _hard_t(t_ptr, HARD)
    dot_ty = f_ptr.dtype.element_ty
    dcol = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dmask = dcol < D
    acc = tl.zeros((BLOCK_B, BLOCK_DO), tl.float32)  # up · Σ_n dd_in ŵ_{r*}[dcol]
    up = _up_start(dot_ty, BLOCK_B)  # fp16 operand scale per row (_rescaled)
    gs = tl.zeros((BLOCK_B,), tl.float32)
    n_start, n_end = _split_range(split, cols_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n_end
        cls = _class_of(cols, col_mask, cidx_ptr, HAS_INDEX)
        d, kb = _cosine_tile(f_ptr, w_ptr, inv_ptr, rows, row_mask, cols, cls, col_mask, K, D,
                             stride_f, stride_w, NORMALIZE, False, HAS_SUB, DOT_PREC,
                             BLOCK_B, BLOCK_N, BLOCK_D)
        g, dmod, dd = _grad_logits(d, cols, col_mask, tcol, scale, bias_ptr, cls, tau, t, thr,
                                   lse, glse, gdot, HAS_BIAS, HARD, FILTER)
        gs += tl.sum(g * dmod, axis=1)
        acc, dd, up = _rescaled(acc, dd, up, dot_ty, 1)
        for k in range(K):
            # d_in = f_i·W_r*/wn_r*: the gradient reaches f_i through W_r*/wn_r* (argmax row only)
            if HAS_SUB:
                ddk = tl.where(kb == k, dd, 0.0)
            else:
                ddk = dd
            wrow = cls * K + k
            w = tl.load(w_ptr + wrow[:, None] * stride_w + dcol[None, :],
                        mask=col_mask[:, None] & dmask[None, :], other=0.0)
            if NORMALIZE:
                # ŵ = W/wn (|ŵ| ≤ 1) rather than dd/wn: a zero row (wn = 1e-12) would turn
                # dd/wn into ±inf in half precision and inf · 0 into NaN.
                inv = tl.load(inv_ptr + cols * K + k, mask=col_mask, other=0.0)
                w = w.to(tl.float32) * inv[:, None]
            acc = tl.dot(ddk.to(dot_ty), w.to(dot_ty), acc, input_precision=DOT_PREC)
    out = split.to(tl.int64) * B * D + rows[:, None] * D + dcol[None, :]
    tl.store(df_ptr + out, acc / up[:, None], mask=row_mask[:, None] & dmask[None, :])
    if pid_d == 0:
        tl.store(gs_ptr + split * B + rows, gs, mask=row_mask)


@triton.jit
def _bwd_dw_kernel(f_ptr, w_ptr, scale_ptr, bias_ptr, tcol_ptr, cidx_ptr, tau_ptr, t_ptr,
                   lse_ptr, glse_ptr, gdot_ptr, inv_ptr,
                   gw_ptr,  # (R, D) grad_weight in weight's dtype, each element written once
                   gb_ptr,  # (C_local,) fp32 grad_bias
                   # with HAS_INDEX both are per column: (N·K, D) fp32 and (N,)
                   B, N, D, K, stride_f, stride_w, thr,
                   HAS_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr, HARD: tl.constexpr,
                   FILTER: tl.constexpr,
                   NORMALIZE: tl.constexpr, HAS_SUB: tl.constexpr, DOT_PREC: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DO: tl.constexpr):
    """One program owns BLOCK_N columns, one sub-center k and one D chunk (program axis 1 is
    k · chunks + chunk) and loops over the batch: G_r = Σ_i dd_in f_i (argmax rows only) in
    registers, grad_bias_c = Σ_i g_in (the k = 0, chunk 0 program stores it), then the Jacobian
    of W/‖W‖ and one store of grad_W in the weight's dtype."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    cls = _class_of(cols, col_mask, cidx_ptr, HAS_INDEX)
    chunks = tl.cdiv(D, BLOCK_DO)
    k_own = tl.program_id(1) // chunks
    dcol = (tl.program_id(1) % chunks) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dmask = dcol < D
    dot_ty = f_ptr.dtype.element_ty
    t = _hard_t(t_ptr, HARD)
    acc = tl.zeros((BLOCK_N, BLOCK_DO), tl.float32)  # up · G_r[dcol]
    up = _up_start(dot_ty, BLOCK_N)  # fp16 operand scale per column (_rescaled)
    proj = tl.zeros((BLOCK_N,), tl.float32)  # ŵ_r·G_r, over the whole D (see below)
    gb = tl.zeros((BLOCK_N,), tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        scale, tcol, tau = _row_inputs(scale_ptr, tcol_ptr, tau_ptr, rows, row_mask, HARD)
        lse, glse, gdot = _grad_rows(lse_ptr, glse_ptr, gdot_ptr, rows, row_mask)
        d, kb = _cosine_tile(f_ptr, w_ptr, inv_ptr, rows, row_mask, cols, cls, col_mask, K, D,
                             stride_f, stride_w, NORMALIZE, False, HAS_SUB, DOT_PREC,
                             BLOCK_B, BLOCK_N, BLOCK_D)
        g, _dmod, dd = _grad_logits(d, cols, col_mask, tcol, scale, bias_ptr, cls, tau, t, thr,
                                    lse, glse, gdot, HAS_BIAS, HARD, FILTER)
        if HAS_BIAS:
            gb += tl.sum(g, axis=0)
        if HAS_SUB:
            dd = tl.where(kb == k_own, dd, 0.0)
        if NORMALIZE:
            # ŵ_r·G_r = Σ_i dd_ir (ŵ_r·f_i) = Σ_i dd_ir d_ir: the projection the Jacobian needs,
            # from the cosines at hand, so a D chunk never needs the other chunks of G_r
            proj += tl.sum(dd * d, axis=0)
        acc, dd, up = _rescaled(acc, dd, up, dot_ty, 0)
        f = tl.load(f_ptr + rows[:, None] * stride_f + dcol[None, :],
                    mask=row_mask[:, None] & dmask[None, :], other=0.0)
        # G_r += Σ_i dd_in f_i
        acc = tl.dot(tl.trans(dd.to(dot_ty)), f, acc, input_precision=DOT_PREC)
    if HAS_BIAS and tl.program_id(1) == 0:
        if HAS_INDEX:
            tl.store(gb_ptr + cols, gb, mask=col_mask)  # per column, summed per class after
        else:
            tl.store(gb_ptr + cls, gb, mask=col_mask)

    # Epilogue: grad_W_r = (G_r − ŵ_r (ŵ_r·G_r)) / wn_r with ŵ = W/wn, per row r.
    grad = acc / up[:, None]
    omask = col_mask[:, None] & dmask[None, :]
    if NORMALIZE:
        inv = tl.load(inv_ptr + cols * K + k_own, mask=col_mask, other=1.0)
        w = tl.load(w_ptr + (cls * K + k_own)[:, None] * stride_w + dcol[None, :], mask=omask,
                    other=0.0).to(tl.float32)
        # W = 0: d = 0 so proj = 0, and grad = G / 1e-12 there
        grad = (grad - w * (proj * inv)[:, None]) * inv[:, None]
    orow = _out_row(cols, cls, K, k_own, HAS_INDEX)
    tl.store(gw_ptr + orow[:, None] * D + dcol[None, :], grad.to(gw_ptr.dtype.element_ty),
             mask=omask)


# =============================================================================================
# Launchers
# =============================================================================================

def _inv_norms(a: _Args, dummy: Tensor) -> Tensor:
    """inv[n, k] = 1/‖W_r‖ of the iterated rows, (N, K) fp32 (``_inv_norm_kernel``), when the
    weight is normalised; else ``dummy``, a pointer the kernels never read."""
    if not a.normalize:
        return dummy
    inv = torch.empty((a.N, a.K), dtype=torch.float32, device=a.f.device)
    cfg = _config("norm", a)
    with device_guard(a.f.device):
        _inv_norm_kernel[(triton.cdiv(a.N, cfg.block_n),)](
            a.w, a.ptrs[5], inv, a.N, a.D, a.K, a.w.stride(0), HAS_INDEX=a.cidx is not None,
            BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, **cfg.launch())
    return inv


def _forward(a: _Args, cfg=None, merge_cfg=None) -> tuple[Tensor, Tensor]:
    dev = a.f.device
    lse = torch.full((a.B,), NEG_INF, dtype=torch.float32, device=dev)
    dot_y = torch.zeros(a.B, dtype=torch.float32, device=dev)
    if a.B == 0 or a.N == 0:
        return lse.to(a.acc), dot_y.to(a.acc)
    cfg = cfg or _config("fwd", a)
    merge_cfg = merge_cfg or _config("merge", a)
    splits, cps = _split_columns(a.B, a.N, cfg, dev, "fwd", a.variant)
    part = torch.empty((3, splits, a.B), dtype=torch.float32, device=dev)
    grid = (triton.cdiv(a.B, cfg.block_b), splits)
    with device_guard(dev):
        if a.resident:
            inv = _inv_norms(a, lse)  # 1/‖W_n‖ per column: every resident pass reads it
            resident._fwd_res_kernel[grid](
                *a.ptrs, inv, part[0], part[1], part[2], a.B, a.N, a.D, cps, a.f.stride(0),
                a.w.stride(0), a.thr, **a.flags, BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n,
                **a.res_meta["fwd"], **cfg.launch())
        else:
            _fwd_kernel[grid](*a.ptrs, part[0], part[1], part[2],
                              a.B, a.N, a.D, a.K, cps, a.f.stride(0), a.w.stride(0), a.thr,
                              **a.flags, **cfg.meta(), **cfg.launch())
        _merge_kernel[(triton.cdiv(a.B, merge_cfg.block_b),)](
            part[0], part[1], part[2], lse, dot_y, a.B, splits,
            BLOCK_B=merge_cfg.block_b, **merge_cfg.launch())
    return lse.to(a.acc), dot_y.to(a.acc)


def _backward(a: _Args, lse: Tensor, grad_lse: Tensor, grad_dot: Tensor, df_cfg=None, dw_cfg=None):
    dev = a.f.device
    grad_f = torch.zeros_like(a.f)
    grad_s = torch.zeros(a.B, dtype=a.acc, device=dev)
    grad_b = (torch.zeros(a.bias.shape, dtype=a.bias.dtype, device=dev) if a.bias is not None
              else torch.empty(0, dtype=a.acc, device=dev))
    if a.B == 0 or a.N == 0:
        return grad_f, torch.zeros_like(a.w), grad_s, grad_b
    lse = lse.to(torch.float32).contiguous()
    grad_lse = grad_lse.to(torch.float32).contiguous()
    grad_dot = grad_dot.to(torch.float32).contiguous()
    if a.chunked:  # chunked.py: one recompute, two GEMMs per chunk of classes
        grad_f, grad_w, grad_s = chunked.backward(a, lse, grad_lse, grad_dot, _inv_norms(a, lse))
        if a.cidx is not None:  # per column: duplicates summed into their classes
            grad_w, _ = _scatter_to_classes(a, grad_w)
        return grad_f, grad_w, grad_s, grad_b
    common = (a.B, a.N, a.D, a.K)
    df_cfg = df_cfg or _config("bwd_df", a)
    dw_cfg = dw_cfg or _config("bwd_dw", a)
    df_do, dw_do = _d_chunk(df_cfg, a.D), _d_chunk(dw_cfg, a.D)
    if a.resident:  # both kernels: one program per D chunk of the output (configs.resident_meta)
        df_do, dw_do = a.res_meta["bwd_df"]["BLOCK_D"], a.res_meta["bwd_dw"]["BLOCK_D"]
    splits, cps = _split_columns(a.B, a.N, df_cfg, dev, "bwd_df", a.variant,
                                 triton.cdiv(a.D, df_do))
    # feature gradient and grad_scale: rows × splits × D chunks, partial buffers summed below;
    # every element is written exactly once (no zero-fill)
    df = torch.empty((splits, a.B, a.D), dtype=torch.float32, device=dev)
    gs = torch.empty((splits, a.B), dtype=torch.float32, device=dev)
    # weight gradient and grad_bias: one program per (column tile, sub-center, D chunk), no
    # atomics, G in registers, grad_W stored once in the weight's dtype (no fp32 copy). With
    # class_index the kernel writes per *column* (rows n·K + k of an (N·K, D) buffer, bias per
    # column), and columns naming the same class are summed below: duplicates accumulate.
    if a.cidx is not None:
        gw = torch.empty((a.N * a.K, a.D), dtype=torch.float32, device=dev)
        gb = torch.empty(a.N, dtype=torch.float32, device=dev)
    else:
        gw = grad_w = torch.empty_like(a.w)
        gb = torch.empty(a.bias.shape, dtype=torch.float32, device=dev) if a.bias is not None else gs

    df_grid = (triton.cdiv(a.B, df_cfg.block_b), splits, triton.cdiv(a.D, df_do))
    dw_grid = (triton.cdiv(a.N, dw_cfg.block_n), a.K * triton.cdiv(a.D, dw_do))
    strides = (a.f.stride(0), a.w.stride(0), a.thr)
    inv = _inv_norms(a, lse)  # 1/‖W_r‖ of the iterated rows: both kernels need it per column
    with device_guard(dev):
        if a.resident:
            resident._bwd_df_res_kernel[df_grid](
                *a.ptrs, lse, grad_lse, grad_dot, inv, df, gs, a.B, a.N, a.D, cps, *strides,
                **a.flags, BLOCK_B=df_cfg.block_b, BLOCK_N=df_cfg.block_n, **a.res_meta["bwd_df"],
                **df_cfg.launch())
            resident._bwd_dw_res_kernel[dw_grid](
                *a.ptrs, lse, grad_lse, grad_dot, inv, a.w, gw, gb, a.B, a.N, a.D, *strides,
                **a.flags, BLOCK_B=dw_cfg.block_b, BLOCK_N=dw_cfg.block_n, **a.res_meta["bwd_dw"],
                **dw_cfg.launch())
        else:
            _bwd_df_kernel[df_grid](
                *a.ptrs, lse, grad_lse, grad_dot, inv, df, gs, *common, cps, *strides,
                **a.flags, **_meta(df_cfg, df_do), **df_cfg.launch())
            _bwd_dw_kernel[dw_grid](
                *a.ptrs, lse, grad_lse, grad_dot, inv, gw, gb, *common, *strides,
                **a.flags, **_meta(dw_cfg, dw_do), **dw_cfg.launch())
    grad_f = df.sum(0).to(a.f.dtype)
    grad_s = gs.sum(0).to(a.acc)
    if a.cidx is not None:
        grad_w, gb = _scatter_to_classes(a, gw, gb)
    if a.bias is not None:
        grad_b = gb.to(a.bias.dtype)
    return grad_f, grad_w, grad_s, grad_b


def _d_chunk(cfg: configs.KernelConfig, D: int) -> int:
    """D columns per program of a backward kernel (its register accumulator's width, BLOCK_DO):
    the configuration's ``block_do``, or the next power of two ≥ D (≥ 16, tl.dot's minimum)
    when that is smaller — a padded accumulator wastes registers and tensor-core work
    (waves.d_chunk, which benchmarks/model.py uses too)."""
    return waves.d_chunk(cfg.block_do, D)


def _meta(cfg: configs.KernelConfig, d_chunk: int) -> dict:
    """A backward kernel's constexpr tile sizes, with the D chunk the launch uses."""
    return {**cfg.meta(), "BLOCK_DO": d_chunk}


def _scatter_to_classes(a: _Args, g_cols: Tensor, gb_cols: Tensor | None = None
                        ) -> tuple[Tensor, Tensor | None]:
    """Sum per-column gradients into their classes: grad_W[c_n·K + k] += g_cols[n·K + k] and
    grad_bias[c_n] += gb_cols[n] (``grad_W.index_put_(rows, g, accumulate=True)``; on CUDA that
    is a sort-based, deterministic reduction). grad_W is accumulated in the weight's dtype, so
    the Partial-FC path needs no R×D fp32 buffer (C can be 10^7): a repeated class's sum is
    rounded once per repeat there; grad_bias stays fp32 (``gb_cols`` is read only with a bias,
    else returned as it is)."""
    rows = (a.cidx[:, None] * a.K + torch.arange(a.K, device=a.cidx.device)).reshape(-1)
    gw = torch.zeros_like(a.w)
    gw.index_put_((rows,), g_cols.to(gw.dtype), accumulate=True)
    gb = gb_cols
    if a.bias is not None:
        gb = torch.zeros(a.bias.shape, dtype=torch.float32, device=g_cols.device)
        gb.index_put_((a.cidx,), gb_cols, accumulate=True)
    return gw, gb


# =============================================================================================
# Registered ops
# =============================================================================================


@torch.library.custom_op("marginops::margin_lse_triton", mutates_args=())
def margin_lse_triton(features: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None,
                      target_col: Tensor, class_index: Tensor | None,
                      hard_tau: Tensor | None, hard_t: Tensor | None,
                      normalize_weight: bool, subcenters: int,
                      filter_threshold: float = 0.0) -> tuple[Tensor, Tensor]:
    a = _Args(features, weight, scale, bias, target_col, class_index, hard_tau, hard_t,
              normalize_weight, subcenters, filter_threshold)
    (cfg,) = _pick(a, "fwd", lambda c: _forward(a, c))
    return _forward(a, cfg)


@margin_lse_triton.register_fake
def _(features, weight, scale, bias, target_col, class_index, hard_tau, hard_t,
      normalize_weight, subcenters, filter_threshold=0.0):
    B = features.shape[0]
    return scale.new_empty(B), scale.new_empty(B)


@torch.library.custom_op("marginops::margin_lse_triton_backward", mutates_args=())
def margin_lse_triton_backward(grad_lse: Tensor, grad_dot: Tensor, lse_neg: Tensor,
                               features: Tensor, weight: Tensor, scale: Tensor,
                               bias: Tensor | None, target_col: Tensor,
                               class_index: Tensor | None, hard_tau: Tensor | None,
                               hard_t: Tensor | None, normalize_weight: bool,
                               subcenters: int, filter_threshold: float = 0.0,
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    a = _Args(features, weight, scale, bias, target_col, class_index, hard_tau, hard_t,
              normalize_weight, subcenters, filter_threshold)
    df_cfg, dw_cfg = _pick(a, "bwd", lambda c1, c2: _backward(a, lse_neg, grad_lse, grad_dot,
                                                               c1, c2))
    return _backward(a, lse_neg, grad_lse, grad_dot, df_cfg, dw_cfg)


@margin_lse_triton_backward.register_fake
def _(grad_lse, grad_dot, lse_neg, features, weight, scale, bias, target_col, class_index,
      hard_tau, hard_t, normalize_weight, subcenters, filter_threshold=0.0):
    gb = torch.empty_like(bias) if bias is not None else scale.new_empty(0)
    return torch.empty_like(features), torch.empty_like(weight), torch.empty_like(scale), gb


# =============================================================================================
# Autograd
# =============================================================================================


register_core_autograd(margin_lse_triton, margin_lse_triton_backward)
