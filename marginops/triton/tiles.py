"""Tile helpers shared by the Triton kernels (margin_lse.py, topk.py), inlined into each kernel.

    _cosine_tile   (BLOCK_B, BLOCK_N) cosines d_in = max_k f_i·W_r / wn_r, fp32 accumulation
    _row_inputs, _grad_rows, _hard_t   the per-row (and t) inputs of a row tile
    _logit_tile    the epilogue: target mask, filtering, hard-negative modulation, scale, bias → z
    _lse_step, _store_partials   the forward's online logsumexp and its per-split results
    _grad_logits   the backward epilogue: g = grad_lse·softmax and dd = ∂loss/∂d of a cosine tile
    _out_row       the weight-gradient row a dW program writes for a column
    _up_start, _rescaled   dd as the operand of a register-accumulated second GEMM (fp16: running scale)
    _split_range / _class_of   a split's columns, a column's class

``interpreting()`` tells whether these were defined under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import triton
import triton.language as tl

NEG_INF: float = float("-inf")
_NEG_INF = tl.constexpr(NEG_INF)  # what the kernels read (globals must be constexpr)


def interpreting() -> bool:
    """Were the kernels defined under TRITON_INTERPRET=1 (run on CPU tensors)?"""
    return type(_cosine_tile).__name__ == "InterpretedFunction"


# =============================================================================================
# Tile helpers (inlined into every kernel)
# =============================================================================================


@triton.jit
def _cosine_tile(f_ptr, w_ptr, inv_ptr, rows, row_mask, cols, cls, col_mask, K, D,
                 stride_f, stride_w,
                 NORMALIZE: tl.constexpr, NORM_IN_LOOP: tl.constexpr, HAS_SUB: tl.constexpr,
                 DOT_PREC: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_B, BLOCK_N) tile of d_in = max_k f_i·W_{c_n K + k} / wn, in fp32.

    1/wn comes either from the sum of squares of the W tiles this loop loads anyway
    (NORM_IN_LOOP, the forward) or from the (N, K) buffer of ``_inv_norm_kernel`` (backward, where
    it is needed again later). With sub-centers (HAS_SUB) it also returns the winning k per element
    (the gradient of a max flows to its argmax only; ties keep the lower k), else zeros.
    """
    d_best = tl.full((BLOCK_B, BLOCK_N), _NEG_INF, tl.float32)
    k_best = tl.zeros((BLOCK_B, BLOCK_N), tl.int32)
    offs = tl.arange(0, BLOCK_D)
    for k in range(K):
        wrow = cls * K + k  # int64 row index into W (R = C_local·K rows)
        acc = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
        wsq = tl.zeros((BLOCK_N,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dcol = d0 + offs
            dmask = dcol < D
            f = tl.load(f_ptr + rows[:, None] * stride_f + dcol[None, :],
                        mask=row_mask[:, None] & dmask[None, :], other=0.0)
            w = tl.load(w_ptr + wrow[:, None] * stride_w + dcol[None, :],
                        mask=col_mask[:, None] & dmask[None, :], other=0.0)
            if NORMALIZE and NORM_IN_LOOP:
                wf = w.to(tl.float32)
                wsq += tl.sum(wf * wf, axis=1)  # ‖W_r‖² from the tile already loaded
            # f_i · W_r, fp32 accumulation; W converted on load to the features' dtype
            acc = tl.dot(f, tl.trans(w.to(f.dtype)), acc, input_precision=DOT_PREC)
        if NORMALIZE:
            if NORM_IN_LOOP:
                inv = 1.0 / tl.maximum(tl.sqrt(wsq), 1e-12)  # 1/wn_r: a per-column scale
            else:
                inv = tl.load(inv_ptr + cols * K + k, mask=col_mask, other=1.0)
            dk = acc * inv[None, :]
        else:
            dk = acc
        if HAS_SUB:
            better = dk > d_best
            d_best = tl.where(better, dk, d_best)
            k_best = tl.where(better, k, k_best)
        else:
            d_best = dk
    return d_best, k_best


@triton.jit
def _row_inputs(scale_ptr, tcol_ptr, tau_ptr, rows, row_mask, HARD: tl.constexpr):
    """Per-row inputs of a row tile: scale_i, target column y_i and the hard-negative
    threshold tau_i (scale when HARD is off: never read)."""
    scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tcol = tl.load(tcol_ptr + rows, mask=row_mask, other=-1)
    if HARD:
        tau = tl.load(tau_ptr + rows, mask=row_mask, other=float("inf")).to(tl.float32)
    else:
        tau = scale
    return scale, tcol, tau


@triton.jit
def _grad_rows(lse_ptr, glse_ptr, gdot_ptr, rows, row_mask):
    """Per-row inputs of the backward: lse_i, grad_lse_i, grad_dot_i (fp32)."""
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    glse = tl.load(glse_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    gdot = tl.load(gdot_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    return lse, glse, gdot


@triton.jit
def _hard_t(t_ptr, HARD: tl.constexpr):
    """CurricularFace's t (the hard-negative modulation), 0 when HARD is off (never used)."""
    if HARD:
        return tl.load(t_ptr).to(tl.float32)
    return 0.0


@triton.jit
def _logit_tile(d, cols, col_mask, tcol, scale, bias_ptr, cls, tau, t, thr,
                HAS_BIAS: tl.constexpr, HARD: tl.constexpr, FILTER: tl.constexpr):
    """Epilogue on a cosine tile: returns (is_target, d', dd'/dd, z with -inf where excluded).

    FILTER (insightface's interclass filtering, thr > 0): a non-target d above thr becomes
    d' = 0 with slope 0, before and instead of the hard-negative modulation.

    z is -inf on the target column and on padding columns, so exp(z − ·) is exactly 0 there.
    """
    is_t = (cols[None, :] == tcol[:, None]) & col_mask[None, :]
    if HARD:
        # CurricularFace: a non-target cosine above tau_i becomes d (t + d); derivative t + 2d
        hard = (d > tau[:, None]) & (~is_t)
        dmod = tl.where(hard, d * (t + d), d)
        slope = tl.where(hard, t + 2.0 * d, 1.0)
    else:
        dmod = d
        slope = 1.0
    if FILTER:
        filtered = (d > thr) & (~is_t)
        dmod = tl.where(filtered, 0.0, dmod)
        slope = tl.where(filtered, 0.0, slope)
    z = scale[:, None] * dmod
    if HAS_BIAS:
        b = tl.load(bias_ptr + cls, mask=col_mask, other=0.0).to(tl.float32)
        z += b[None, :]
    z = tl.where(col_mask[None, :] & (~is_t), z, _NEG_INF)
    return is_t, dmod, slope, z


@triton.jit
def _lse_step(m, s, z):
    """One tile of a row-wise online logsumexp, lse = m + log s: (m, s) after the logits z
    (BLOCK_B × BLOCK_N, −inf where excluded)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    m_ref = tl.where(m_new == _NEG_INF, 0.0, m_new)  # no finite logit yet: avoid −inf − −inf
    s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref[:, None]), axis=1)
    return m_new, s


@triton.jit
def _store_partials(m_ptr, s_ptr, y_ptr, split, B, rows, row_mask, m, s, dot_y):
    """A forward program's three per-row results into the (splits, B) partial buffers."""
    out = split * B + rows
    tl.store(m_ptr + out, m, mask=row_mask)
    tl.store(s_ptr + out, s, mask=row_mask)
    tl.store(y_ptr + out, dot_y, mask=row_mask)


@triton.jit
def _grad_logits(d, cols, col_mask, tcol, scale, bias_ptr, cls, tau, t, thr, lse, glse, gdot,
                 HAS_BIAS: tl.constexpr, HARD: tl.constexpr, FILTER: tl.constexpr):
    """g_in = grad_lse_i · exp(z_in − lse_i) (0 on the target) and
    dd_in = g_in · scale_i · dd'/dd + [n = y_i] grad_dot_i, the gradient w.r.t. the cosine d_in."""
    is_t, dmod, slope, z = _logit_tile(d, cols, col_mask, tcol, scale, bias_ptr, cls, tau, t,
                                       thr, HAS_BIAS, HARD, FILTER)
    lse_ref = tl.where(lse == _NEG_INF, 0.0, lse)  # such rows have z = −inf everywhere: p = 0
    g = glse[:, None] * tl.exp(z - lse_ref[:, None])
    dd = g * scale[:, None] * slope + tl.where(is_t, gdot[:, None], 0.0)
    return g, dmod, dd


@triton.jit
def _out_row(cols, cls, K, k, HAS_INDEX: tl.constexpr):
    """Row of the dW kernel's outputs for sub-center k of each column: the weight row c_n·K + k,
    or, with class_index, the column's own row n·K + k of an (N·K, D) buffer — two columns may
    name the same class, and each program must own the rows it writes."""
    if HAS_INDEX:
        return cols.to(tl.int64) * K + k
    return cls * K + k


@triton.jit
def _split_range(split, cols_per_split, N):
    """Columns [n_start, n_end) of a class split (cols_per_split is a multiple of BLOCK_N)."""
    n_start = split * cols_per_split
    n_end = tl.minimum(n_start + cols_per_split, N)
    return n_start, n_end


@triton.jit
def _class_of(cols, col_mask, cidx_ptr, HAS_INDEX: tl.constexpr):
    """Class id (int64) of each column: class_index[n] (Partial FC, indirect rows) or n."""
    if HAS_INDEX:
        cls = tl.load(cidx_ptr + cols, mask=col_mask, other=0)
    else:
        cls = cols.to(tl.int64)
    return cls


@triton.jit
def _up_start(dot_ty: tl.constexpr, SIZE: tl.constexpr):
    """Initial per-row operand scale of ``_rescaled``: 2^110 for fp16 (the largest it can
    pick; any first non-zero tile lowers it), 1 for the other dtypes (never changed)."""
    if dot_ty == tl.float16:
        return tl.full((SIZE,), 2.0 ** 110, tl.float32)
    return tl.full((SIZE,), 1.0, tl.float32)


@triton.jit
def _rescaled(acc, dd, up, dot_ty: tl.constexpr, AXIS: tl.constexpr):
    """Prepare dd (fp32) as the operand of a second GEMM whose fp32 accumulator ``acc`` stays in
    registers across many tiles: returns (acc', dd', up') with ``acc' = acc · up'/up`` (per acc
    row) and ``dd' = dd · up'`` (per output row), so ``tl.dot(dd'.to(dot_ty), X, acc')`` keeps the
    invariant ``acc == up · Σ_tiles dd·X``; the caller divides by ``up`` once, at the end.

    fp16 has 5 exponent bits: softmax gradients are tiny (grad_lse · p · s, e.g. 1/8192 · p · 64)
    and would flush to zero when cast as they are (42 % of weight-gradient rows at C = 4096). So
    for fp16 each output row (the reduction runs along the other axis: AXIS = 1 for dF = dd·W,
    AXIS = 0 for G = ddᵀ·F) carries a running power of two ``up`` (from ``_up_start``) that
    brings the largest |dd| seen so far into [2^14, 2^15). Like the running max of an online
    softmax it only decreases, and the partial sums already in ``acc`` are rescaled by
    up'/up ≤ 1: exact (powers of two), and what it pushes below fp32's range was below 2^-96 of
    the row's largest term. All-zero rows keep their ``up``. A ±inf dd gives up' = 0 and a NaN
    result (NaN in, NaN out). bf16 has fp32's exponent range and fp32 needs no cast: for those
    acc, dd and up (ones) are returned unchanged.
    """
    if dot_ty == tl.float16:
        m = tl.max(tl.abs(dd), axis=AXIS)
        # e ≥ −96 keeps up ≤ 2^110 finite (a subnormal m would give inf, and 0 · inf = NaN)
        e = tl.maximum(tl.floor(tl.log2(tl.where(m > 0.0, m, 1.0))), -96.0)
        up_new = tl.where(m > 0.0, tl.minimum(up, tl.exp2(14.0 - e)), up)
        acc = acc * (up_new / up)[:, None]
        dd = dd * tl.expand_dims(up_new, AXIS)
        up = up_new
    return acc, dd, up
