"""Resident-tile Triton kernels of the core op (FlashAttention's shape), for bf16 on sm_90.

margin_lse.py's kernels stream *both* operands of every GEMM through a loop over D chunks and
reload them for each output chunk. Here the tile a program owns stays in shared memory over the
whole D, and each streamed tile is loaded once and feeds every GEMM of its step:

    kernel   resident (loaded once)       streamed per step            GEMMs per step
    fwd      F rows (BLOCK_B × D; at      W columns (BLOCK_N × D)      d = F·Wᵀ
             D ≥ 256 the first chunk in
             registers, REG0)
    bwd_df   F rows (BLOCK_B × D)         W columns (BLOCK_N × D)      d = F·Wᵀ;  dF[c] += dd·W[c]
    bwd_dw   W columns (BLOCK_N × D)      F rows (BLOCK_B × D)         dᵀ = W·Fᵀ;  G[c] += ddᵀ·F[c]

D is held as one or two chunks of c = min(D, 256) columns (D ∈ configs.RESIDENT_DIMS: 128, 256,
512; ``TWO``): every ``tl.dot`` spans a whole chunk, so the only loop is over streamed tiles and
the pipeliner prefetches whole tiles ``num_stages − 1`` steps ahead. A backward program owns one
output chunk [c] (program axis 2 / 1: ``own``); with two chunks it still needs the other chunk
of both operands for the cosines, and recomputes the whole logit tile. Why one output chunk per
program, and why 128 rows (fwd, bwd_df) or columns (bwd_dw) per program: an fp32 accumulator of
128 × 256 is 128 registers per thread over 8 warps (one of 128 × 512 would need 256), and Triton
lays out a dot that feeds another dot with all warps along M — with 64-row tiles both
warpgroups would compute the same logit tile (TTGIR ``warpsPerCTA = [8, 1]``). Hence the dW
kernel computes dᵀ = W·Fᵀ, its 128 columns as the GEMM's M.

The feature gradient at D = 512 (``UNCHAINED``, configs.RESIDENT_WIDE_DF) is the exception: a
64-row program owns all 512 columns (a 64 × 512 accumulator, 128 registers per thread), and its
logit GEMM sits behind an always-taken branch (``_unchained``) that hides its use by the second
GEMM from Triton's chained-dot rule: both GEMMs get the two warpgroups side by side along N
(``[4, 2]``: each computes half the logit columns, then half of D), so the logit tile is
computed once — 4·B·C·D, not 6·B·C·D. dd crosses between the warpgroups through shared memory
(its K = BLOCK_N columns are split between them). Its class ids and target columns are held as
int32 to fit under Triton 3.5 too; 64×64 tiles still spill 152 B. The weight gradient
stays in two chunk programs: its 64-column analogue (both chunks in two accumulators, the
epilogue one chunk at a time) spills 112–264 B with 32-row F tiles (40–216 B with int32 target
columns) and 16–64 B with 16-row ones, which would save no shared-memory traffic.

Cost (e = 2 bytes, q = D / c chunk programs per output; bwd_df at D = 512: q = 1, 64-row tiles):

    kernel   tensor-core FLOPs     L2 → SM bytes                             grid
    fwd      2·B·C·D               ⌈B/128⌉·C·D·e (W) + splits·B·D·e (F)      ⌈B/128⌉ × splits
    bwd_df   (2q + 2)·B·C·D        q·⌈B/BB⌉·C·D·e + q·splits·B·D·e           ⌈B/BB⌉ × splits × q
    bwd_dw   (2q + 2)·B·C·D        q·⌈C/128⌉·B·D·e (F) + (q + 1)·C·D·e (W)   ⌈C/128⌉ × q

(BB = 128, 64 at D = 512; plus 1/‖W‖ and per-row vectors): 10·B·C·D in all at D ≤ 256,
12·B·C·D at D = 512 — the dW kernel's second chunk programs recompute the logit tile. At
B = 4096, C = 2^20, D = 512: ≈ 34 + 69 + 72 GB loaded, against 891 GB for margin_lse.py's
kernels at that shape. At D = 256 and 512 without bias the launcher takes chunked.py's backward
instead (configs.chunked_applies): one recompute per chunk of classes, in this file's forward
tiles, stores dd and feeds two GEMMs — 8·B·C·D; the two backward kernels here serve D = 128 and
bias (and ``configs.force(chunked=False)``).

Shared memory bounds these kernels before the tensor cores do (benchmarks/model.py models it):
the logit GEMM reads its resident operand once per streamed tile and warpgroup, and the
streamed tiles are narrow (16–32 columns per warpgroup, what the registers and the 228 KB allow),
so at D = 512 the backward kernels move 0.058 (bwd_df) and 0.063 (bwd_dw) bytes of shared
memory per FLOP against the 0.031 (128 bytes per SM clock for 4096 bf16 FLOPs) that keeps the
tensor cores busy, and so did the forward (0.055) with all of F in shared memory.

The forward at D ≥ 256 (``REG0``, configs.RESIDENT_WIDE_FWD) holds F's first 256-column chunk — at
D = 256 all of F — in registers: Triton keeps a loaded, loop-invariant dot operand in shared
memory (reloading it inside the loop once it is converted or carried), but keeps a dot's *value*
in registers where it feeds another dot as A — the chained-dot path FlashAttention's P takes.
``_in_registers`` makes the chunk such a value exactly (F + 0·0 through the accumulator: NaN and
±inf kept, where F·I would turn an inf row into NaN). The chunk then costs 64 registers per thread
and no shared memory, the second chunk stays resident (64 KB), and two stages of 64-column W tiles
fit (128 KB): 0.031 bytes per FLOP, 240 registers, no spills (at D = 256: 0.023, 222 registers;
tests/test_triton_aot.py checks the register operand in the TTGIR). All 512 columns in registers
(128 per thread) spill 160–248 B even in a bare forward loop (BN 16–64; Triton 3.9). chunked.py's
dd kernel takes the same first chunk in registers with 32-column W tiles (64 spill beside the
backward epilogue).

Shared memory allocated: 192 KB (fwd at D = 512; 64 KB at D = 256, 48 at 128), 135 KB (bwd_df at
D = 512; 128 KB at D = 256), 160 KB (bwd_dw), one program per SM at D = 512; registers and
spills: configs.py (compiled and checked by tests/test_triton_aot.py: zero spills at D = 128,
256, 512 with every option flag on and off).

What differs from margin_lse.py's kernels (same contract, same outputs):
  * 1/‖W_r‖ comes from ``_inv_norm_kernel``'s (N,) buffer in every pass, the forward included: the
    sum of squares of a BLOCK_N × D tile would have to sit in registers.
  * dF = Σ_n (dd_in / wn_n) W_n: the 1/wn column scale is folded into dd before the second GEMM,
    so the streamed W tile feeds it as loaded. For fp16 a zero row's 1/wn = 10^12 would overflow
    the fp16 operand (and, through ``_rescaled``'s per-row scale, flush the row's other terms):
    its W is 0, so its term is 0 and the scale is set to 0 (``_col_scale``). A non-zero fp16 row
    has ‖W‖ ≥ 2^-24, so no other row is touched.
  * Chosen (``configs.resident_applies``) on sm_90 (H100 / H200) for bf16 features and weight, one
    sub-center and D ∈ RESIDENT_DIMS (aligned); everything else takes margin_lse.py's kernels.
    The interpreter cannot run bf16 dots: tests force these kernels on fp32 and fp16 inputs
    (``configs.force(resident=True)``), whose code is bf16's but for fp16's operand rescaling.

Not measured on a GPU (none was available): counts and compiler output, not timings.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import (
    _NEG_INF,
    _class_of,
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
)


@triton.jit
def _chunk(ptr, idx, mask, stride, c, BLOCK_D: tl.constexpr):
    """(len(idx), BLOCK_D) tile of rows ``idx``, embedding columns c·BLOCK_D … (c + 1)·BLOCK_D − 1
    (D is a multiple of BLOCK_D here: no per-column predicate)."""
    dcol = c * BLOCK_D + tl.arange(0, BLOCK_D)
    return tl.load(ptr + idx[:, None] * stride + dcol[None, :], mask=mask[:, None], other=0.0)


@triton.jit
def _chunks(ptr, idx, mask, stride, first, BLOCK_D: tl.constexpr, TWO: tl.constexpr, dtype):
    """Rows ``idx`` as their chunk ``first`` and, with TWO, the other chunk (else the same
    tile again), in ``dtype``."""
    x0 = _chunk(ptr, idx, mask, stride, first, BLOCK_D).to(dtype)
    if TWO:
        x1 = _chunk(ptr, idx, mask, stride, 1 - first, BLOCK_D).to(dtype)
    else:
        x1 = x0
    return x0, x1


@triton.jit
def _resident_f(f_ptr, rows, row_mask, stride_f, BLOCK_D: tl.constexpr, TWO: tl.constexpr,
                REG0: tl.constexpr):
    """The row tile's F as the forward-shaped kernels hold it: chunk 0 and, with TWO, chunk 1
    (``_chunks``), chunk 0 a register operand with REG0 (``_in_registers``)."""
    f0, f1 = _chunks(f_ptr, rows, row_mask, stride_f, 0, BLOCK_D, TWO, f_ptr.dtype.element_ty)
    if REG0:
        f0 = _in_registers(f0)
    return f0, f1


@triton.jit
def _dots(a0, b0, a1, b1, TWO: tl.constexpr, DOT_PREC: tl.constexpr):
    """a·bᵀ over the whole D from its one or two chunks: a0·b0ᵀ (+ a1·b1ᵀ), fp32."""
    acc = tl.dot(a0, tl.trans(b0), input_precision=DOT_PREC)
    if TWO:
        acc = tl.dot(a1, tl.trans(b1), acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _unchained(a, b, live, DOT_PREC: tl.constexpr):
    """a·bᵀ over one chunk, behind a branch that is always taken (``live`` is true).

    Triton lays out a dot whose result reaches another dot with all warps along M
    (AccelerateMatmul's chained-dot rule, made for FlashAttention): for a 64-row tile and 8
    warps both warpgroups would compute the same 64 × BLOCK_N logit tile. The rule follows the
    dot's uses, and they stop at the branch's yield, so this GEMM gets the layout of a lone
    dot — the two warpgroups side by side along N (TTGIR ``warpsPerCTA = [4, 2]``) — and the
    tile is computed once. The branch costs one compare per tile; were a compiler to fold it,
    results would not change, only the speed (tests/test_triton_aot.py checks the layout)."""
    if live:
        acc = tl.dot(a, tl.trans(b), input_precision=DOT_PREC)
    else:
        acc = tl.zeros((a.shape[0], b.shape[0]), tl.float32)
    return acc


@triton.jit
def _in_registers(x):
    """x (rows × chunk) as the value of a dot: x + 0·0 through tl.dot's accumulator (exact; NaN
    and ±inf kept). Triton keeps a dot's value in registers where it feeds another dot as its A
    operand (the chained-dot path FlashAttention's P takes), so the wgmma reads it from registers
    on every tile step; a loaded tile would stay in shared memory and be read from there."""
    zeros_a = tl.zeros((x.shape[0], 16), x.dtype)
    zeros_b = tl.zeros((16, x.shape[1]), x.dtype)
    return tl.dot(zeros_a, zeros_b, x.to(tl.float32)).to(x.dtype)


@triton.jit
def _inv_cols(inv_ptr, cols, col_mask, NORMALIZE: tl.constexpr):
    """1/wn of the columns (``_inv_norm_kernel``'s buffer), or ones without normalisation."""
    if NORMALIZE:
        return tl.load(inv_ptr + cols, mask=col_mask, other=1.0)
    return tl.full(cols.shape, 1.0, tl.float32)


@triton.jit
def _col_scale(inv, dot_ty: tl.constexpr):
    """1/wn as a factor of the GEMM operand dd: 0 for an fp16 zero row (module docstring)."""
    if dot_ty == tl.float16:
        return tl.where(inv > 1e10, 0.0, inv)
    return inv


# =============================================================================================
# Forward
# =============================================================================================


@triton.jit
def _fwd_res_kernel(f_ptr, w_ptr, scale_ptr, bias_ptr, tcol_ptr, cidx_ptr, tau_ptr, t_ptr,
                    inv_ptr, m_ptr, s_ptr, y_ptr,  # (splits, B) fp32 partials
                    B, N, D, cols_per_split, stride_f, stride_w, thr,
                    HAS_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr, HARD: tl.constexpr,
                    FILTER: tl.constexpr, NORMALIZE: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    TWO: tl.constexpr, REG0: tl.constexpr):
    """margin_lse.py's ``_fwd_kernel`` with the row tile's F resident over the whole D (one or
    two BLOCK_D chunks; with REG0 the first chunk in registers, ``_in_registers``)."""
    pid_b = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    scale, tcol, tau = _row_inputs(scale_ptr, tcol_ptr, tau_ptr, rows, row_mask, HARD)
    t = _hard_t(t_ptr, HARD)
    f0, f1 = _resident_f(f_ptr, rows, row_mask, stride_f, BLOCK_D, TWO, REG0)

    m = tl.full((BLOCK_B,), _NEG_INF, tl.float32)  # online logsumexp: lse = m + log s
    s = tl.zeros((BLOCK_B,), tl.float32)
    dot_y = tl.zeros((BLOCK_B,), tl.float32)
    n_start, n_end = _split_range(split, cols_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n_end
        cls = _class_of(cols, col_mask, cidx_ptr, HAS_INDEX)
        w0, w1 = _chunks(w_ptr, cls, col_mask, stride_w, 0, BLOCK_D, TWO, f0.dtype)
        d = _dots(f0, w0, f1, w1, TWO, DOT_PREC) * _inv_cols(inv_ptr, cols, col_mask, NORMALIZE)[None, :]
        is_t, _dmod, _slope, z = _logit_tile(d, cols, col_mask, tcol, scale, bias_ptr, cls,
                                             tau, t, thr, HAS_BIAS, HARD, FILTER)
        dot_y += tl.sum(tl.where(is_t, d, 0.0), axis=1)  # raw target cosine
        m, s = _lse_step(m, s, z)
    _store_partials(m_ptr, s_ptr, y_ptr, split, B, rows, row_mask, m, s, dot_y)


# =============================================================================================
# Backward
# =============================================================================================


@triton.jit
def _bwd_df_res_kernel(f_ptr, w_ptr, scale_ptr, bias_ptr, tcol_ptr, cidx_ptr, tau_ptr, t_ptr,
                       lse_ptr, glse_ptr, gdot_ptr, inv_ptr,
                       df_ptr, gs_ptr,  # (splits, B, D) and (splits, B) fp32, written once
                       B, N, D, cols_per_split, stride_f, stride_w, thr,
                       HAS_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr, HARD: tl.constexpr,
                       FILTER: tl.constexpr, NORMALIZE: tl.constexpr, DOT_PREC: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       TWO: tl.constexpr, UNCHAINED: tl.constexpr):
    """grad_f_i[chunk] = Σ_n (dd_in / wn_n) W_n[chunk] over one split, for the D chunk of program
    axis 2 (its own chunk; the other one, with TWO, only completes the cosines), in one register
    accumulator; grad_scale_i = Σ_n g_in d'_in (chunk 0 stores it). F's chunks are resident; each
    W tile is loaded once and feeds both GEMMs. UNCHAINED (D = 512 in one chunk, 64-row tiles):
    the logit GEMM through ``_unchained``, so each warpgroup owns half the tile's columns and,
    in the second GEMM, half of D."""
    pid_b = tl.program_id(0)
    split = tl.program_id(1)
    own = tl.program_id(2)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    scale, tcol, tau = _row_inputs(scale_ptr, tcol_ptr, tau_ptr, rows, row_mask, HARD)
    tcol = tcol.to(tl.int32)  # column ids < 2^31 (see the class ids below)
    t = _hard_t(t_ptr, HARD)
    lse, glse, gdot = _grad_rows(lse_ptr, glse_ptr, gdot_ptr, rows, row_mask)
    dot_ty = f_ptr.dtype.element_ty
    f_own, f_oth = _chunks(f_ptr, rows, row_mask, stride_f, own, BLOCK_D, TWO, dot_ty)

    acc = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)  # up · Σ_n (dd_in / wn_n) W_n[own chunk]
    up = _up_start(dot_ty, BLOCK_B)
    gs = tl.zeros((BLOCK_B,), tl.float32)
    n_start, n_end = _split_range(split, cols_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n_end
        # class ids and target columns held as int32 (< 2^31: a weight of 2^31 rows would be
        # 512 GB at D = 128), the W row offset formed in 64 bits: the registers this saves let
        # D = 512's 64 × 512 accumulator compile without spills under Triton 3.5 too
        cls = _class_of(cols, col_mask, cidx_ptr, HAS_INDEX).to(tl.int32)
        w_own, w_oth = _chunks(w_ptr, cls.to(tl.int64), col_mask, stride_w, own, BLOCK_D, TWO,
                               dot_ty)
        inv = _inv_cols(inv_ptr, cols, col_mask, NORMALIZE)
        if UNCHAINED:
            d = _unchained(f_own, w_own, n0 < n_end, DOT_PREC)
        else:
            d = _dots(f_own, w_own, f_oth, w_oth, TWO, DOT_PREC)
        d = d * inv[None, :]
        g, dmod, dd = _grad_logits(d, cols, col_mask, tcol, scale, bias_ptr, cls, tau, t, thr,
                                   lse, glse, gdot, HAS_BIAS, HARD, FILTER)
        gs += tl.sum(g * dmod, axis=1)
        if NORMALIZE:
            dd = dd * _col_scale(inv, dot_ty)[None, :]
        acc, dd, up = _rescaled(acc, dd, up, dot_ty, 1)
        acc = tl.dot(dd.to(dot_ty), w_own, acc, input_precision=DOT_PREC)
    # the split's (B, D) slice: a scalar 64-bit base, then 32-bit offsets within it (B·D < 2^31)
    dcol = own * BLOCK_D + tl.arange(0, BLOCK_D)
    df_split = df_ptr + split.to(tl.int64) * B * D
    tl.store(df_split + rows[:, None] * D + dcol[None, :], acc / up[:, None],
             mask=row_mask[:, None])
    if own == 0:
        tl.store(gs_ptr + split * B + rows, gs, mask=row_mask)


@triton.jit
def _bwd_dw_res_kernel(f_ptr, w_ptr, scale_ptr, bias_ptr, tcol_ptr, cidx_ptr, tau_ptr, t_ptr,
                       lse_ptr, glse_ptr, gdot_ptr, inv_ptr,
                       wj_ptr,  # W again, for the Jacobian epilogue (see there)
                       gw_ptr,  # (R, D) grad_weight in weight's dtype, each element written once
                       gb_ptr,  # (C_local,) fp32 grad_bias; with HAS_INDEX both per column
                       B, N, D, stride_f, stride_w, thr,
                       HAS_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr, HARD: tl.constexpr,
                       FILTER: tl.constexpr, NORMALIZE: tl.constexpr, DOT_PREC: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       TWO: tl.constexpr):
    """One program owns BLOCK_N columns and one D chunk (program axis 1), their W resident (both
    chunks with TWO), and loops over the batch: the cosines as Wᵀ-major tiles dᵀ = W·Fᵀ (so the
    owned columns are the GEMM's M, one warpgroup per 64 of them), G_r[chunk] = Σ_i dd_ir f_i in
    registers, each F tile loaded once for both GEMMs; then the Jacobian of W/‖W‖,
    grad_W_r = (G_r − ŵ_r (ŵ_r·G_r)) / wn_r, stored once in W's dtype."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    own = tl.program_id(1)
    col_mask = cols < N
    cls = _class_of(cols, col_mask, cidx_ptr, HAS_INDEX)
    dot_ty = f_ptr.dtype.element_ty
    w_own, w_oth = _chunks(w_ptr, cls, col_mask, stride_w, own, BLOCK_D, TWO, dot_ty)
    inv = _inv_cols(inv_ptr, cols, col_mask, NORMALIZE)
    t = _hard_t(t_ptr, HARD)

    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)  # up · G_r[own chunk]
    up = _up_start(dot_ty, BLOCK_N)
    proj = tl.zeros((BLOCK_N,), tl.float32)  # ŵ_r·G_r = Σ_i dd_ir d_ir
    gb = tl.zeros((BLOCK_N,), tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        scale, tcol, tau = _row_inputs(scale_ptr, tcol_ptr, tau_ptr, rows, row_mask, HARD)
        lse, glse, gdot = _grad_rows(lse_ptr, glse_ptr, gdot_ptr, rows, row_mask)
        f_own, f_oth = _chunks(f_ptr, rows, row_mask, stride_f, own, BLOCK_D, TWO, dot_ty)
        d = tl.trans(_dots(w_own, f_own, w_oth, f_oth, TWO, DOT_PREC)) * inv[None, :]
        g, _dmod, dd = _grad_logits(d, cols, col_mask, tcol, scale, bias_ptr, cls, tau, t, thr,
                                    lse, glse, gdot, HAS_BIAS, HARD, FILTER)
        if HAS_BIAS:
            gb += tl.sum(g, axis=0)
        if NORMALIZE:
            proj += tl.sum(dd * d, axis=0)
        acc, dd, up = _rescaled(acc, dd, up, dot_ty, 0)
        acc = tl.dot(tl.trans(dd.to(dot_ty)), f_own, acc, input_precision=DOT_PREC)  # G += ddᵀ·F
    if HAS_BIAS and own == 0:
        if HAS_INDEX:
            tl.store(gb_ptr + cols, gb, mask=col_mask)  # per column, summed per class after
        else:
            tl.store(gb_ptr + cls, gb, mask=col_mask)

    if NORMALIZE:
        # W's chunk again, through another pointer argument: the compiler would otherwise keep
        # the resident tile's 16 addresses per thread (its load above) alive across the loop
        w_c = _chunk(wj_ptr, cls, col_mask, stride_w, own, BLOCK_D).to(tl.float32)
        grad = (acc / up[:, None] - w_c * (proj * inv)[:, None]) * inv[:, None]
    else:
        grad = acc / up[:, None]
    dcol = own * BLOCK_D + tl.arange(0, BLOCK_D)
    orow = _out_row(cols, cls, 1, 0, HAS_INDEX)
    tl.store(gw_ptr + orow[:, None] * D + dcol[None, :], grad.to(gw_ptr.dtype.element_ty),
             mask=col_mask[:, None])
