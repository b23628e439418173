"""Backends of the core op, one file each, all behind one contract.

The contract (shared/DESIGN.md §2), as every backend implements it
=================================================================

Low-level inputs are already validated and normalised by ``marginops.core``:

    features     (B, D)  fp32 / fp64 / fp16 / bf16, contiguous
    weight       (R, D)  R = C_local · K rows (row = class·K + k); any float dtype, contiguous.
                         fp64 only together with fp64 features.
    scale        (B,)    acc dtype (fp64 if features are fp64, else fp32)
    bias         (C_local,) acc dtype, or None; indexed by class, not by sub-center row
    target_col   (B,)    int64: the column (position in the iterated class list) that is this
                         row's target, or -1 when the target is not in this shard / row ignored
    class_index  (N,)    int64 or None: iterate only these classes (Partial FC); column n is class
                         class_index[n]. None means column n is class n, N = C_local.
                         Entries may repeat: each column is a logit of its own, and the gradients
                         of columns naming the same class accumulate (grad_W, grad_bias sums).
    hard_tau     (B,)    acc dtype or None (CurricularFace threshold; +inf disables a row)
    hard_t       ()      acc dtype 0-d tensor or None (CurricularFace t); given iff hard_tau is
    normalize_weight bool; subcenters int K >= 1
    filter_threshold float (last argument, default 0.0): insightface arcface_torch's
                         ``interclass_filtering_threshold``; > 0 enables filtering, <= 0 disables it

Math (acc dtype throughout; never exponentiate in half precision):

    wn_r   = max(‖W_r‖, 1e-12) if normalize_weight else 1
    d_ir   = f_i · W_r / wn_r
    d_in   = max_k d_{i, c_n·K + k}          (c_n the class of column n; sub-center max)
    filtered_in = filter_threshold > 0 and n != target_col_i and d_in > filter_threshold
    d'_in  = 0                   if filtered_in                  (the column stays in the softmax
                                                                   with z_in = bias_{c_n})
           = d_in · (t + d_in)   elif hard and n != target_col_i and d_in > tau_i
           = d_in                otherwise
    z_in   = scale_i · d'_in + bias_{c_n}
    lse_neg_i = log Σ_{n != target_col_i} exp(z_in)     (-inf if there is no such column)
    dot_y_i   = d_{i, target_col_i}  (unmodulated, unscaled, no bias), 0 if target_col_i = -1

Outputs ``(lse_neg, dot_y)``, both (B,) in acc dtype.

NaN in, NaN out (DESIGN §8): a NaN z_in at any non-target column makes lse_neg_i NaN, and a NaN
d at the target makes dot_y_i NaN, on every backend — max and exp must not drop NaN. NaN features,
scale or bias, and a NaN or ±inf entry in a normalised weight row (ŵ = inf/inf = NaN) all give a
NaN z; the sub-center max keeps a NaN (like torch.amax). A +inf z gives a non-finite lse_neg
(+inf or NaN, by backend); a -inf z is an ordinary logit that contributes exp(-inf) = 0. The
backward follows the formulas below, so NaN flows on into the gradients of the rows it touched.

Backward, given grad_lse (B,), grad_dot (B,), and the saved lse_neg:

    g_in        = grad_lse_i · exp(z_in - lse_neg_i)       for n != target_col_i, else 0
    grad_scale_i = Σ_n g_in · d'_in
    grad_bias_c  = Σ_i g_in                                  (scattered to class c_n)
    dd_in       = g_in · scale_i · (0 if filtered, t + 2 d_in if modulated, else 1)
                  + [n == target_col_i]·grad_dot_i
    grad_f_i    = Σ_n dd_in · W_{r*(i,n)} / wn_{r*}          r* = the argmax sub-center row
    G_r         = Σ_i dd_{i,n(r)} f_i   over rows i whose argmax for column n(r) is r
    grad_W_r    = (G_r - ŵ_r (ŵ_r · G_r)) / wn_r  if normalize_weight and ‖W_r‖ > 1e-12
                  G_r / wn_r otherwise;  rows never iterated (class_index) get exactly 0.

Interclass filtering follows arcface_torch's ``CombinedMarginLoss``: under ``no_grad`` every
cosine above the threshold is multiplied by 0, except the target of rows with a label — so a row
whose target is absent (target_col_i = -1: another shard's class, or an ignored row) has every
column above the threshold filtered, as arcface_torch's rows labelled -1 do. It tests d_in after
the sub-center max and before the CurricularFace modulation (a filtered column is never
modulated); its zero slope means no gradient reaches the argmax sub-center row either. NaN d_in is
never above the threshold (NaN in, NaN out); a NaN g_in still gives a NaN dd_in (NaN · 0).

Returns ``(grad_features, grad_weight, grad_scale, grad_bias)``: grad_features in features' dtype,
grad_weight in weight's dtype (full (R, D)), grad_scale and grad_bias in acc dtype; grad_bias
is an empty tensor when bias is None. No gradient flows to target_col, class_index, hard_tau, hard_t.

topk: ``topk(features, weight, exclude_col, k, normalize_weight, subcenters)`` returns
``(values (B, k) acc dtype, columns (B, k) int64)``: the k largest d_in per row over columns
n != exclude_col_i (exclude_col = -1 excludes nothing), values descending; ties broken by the lower
column. NaN ranks as the largest value (above +inf), like ``torch.topk``, and NaN vs NaN is a tie
(lower column first): a NaN weight row that is not excluded comes first in every row, never
dropped. It has no autograd: callers recompute the k values differentiably from the columns
(B·k·D work, see ``marginops.core.topk_dot``).

topk with fewer than k columns other than exclude_col_i (k = N, exclude_col_i in range): the
excluded column fills the last slot with value -inf — the result is the top k of the row with
d_{i, exclude_col_i} replaced by -inf, on every backend (never an out-of-range column).

Registered op names (``torch.ops.marginops.*``): ``margin_lse_torch`` / ``margin_lse_torch_backward``
(this package's Python), ``margin_lse`` / ``margin_lse_backward`` / ``topk`` (C++: CPU and CUDA
dispatch keys), ``margin_lse_triton`` / ``margin_lse_triton_backward`` / ``topk_triton``.
Every backward op takes ``(grad_lse, grad_dot, lse_neg, <the forward's inputs>)``; the
``margin_lse*`` ops end with ``filter_threshold`` (default 0.0 in every schema). CPU only:
``margin_lse_keep`` / ``margin_lse_backward_kept`` (the kept dots), and ``margin_loss`` /
``margin_loss_backward``, the fixed-margin families' whole loss (``marginops/ops/cpp_loss.py``).
"""

from collections.abc import Callable

import torch
from torch.utils.weak import WeakTensorKeyDictionary

# Classifier weights whose optimizer step is fused into this backward (``marginops.optim``
# registers them): weight -> callable(backward_op, kept, <the backward op's arguments>) returning
# (grad_features, None, grad_scale, grad_bias) after stepping the weight in place, or None when
# its optimizer is gone. Keyed by the Parameter itself (the saved input is that same object).
FUSED_STEPS = WeakTensorKeyDictionary()


def register_core_autograd(forward_op, backward_op: Callable, kept: bool = False) -> None:
    """Attach the one autograd formula of the core op to a backend's registered forward op.

    ``backward_op(grad_lse, grad_dot, lse_neg, features, weight, scale, bias, target_col,
    class_index, hard_tau, hard_t, normalize_weight, subcenters, filter_threshold)`` is the
    backend's registered backward op (so torch.compile sees it as one node). Forward inputs and
    the saved lse_neg are all it needs: the backward recomputes the tiles instead of storing B×C.

    ``kept=True``: the forward op returns a third, non-differentiable output (tiles it kept, e.g.
    the cpp backend's dots when they fit its budget), saved and passed to ``backward_op`` right
    after ``lse_neg``.

    A weight registered in ``FUSED_STEPS`` (``marginops.optim``) has its optimizer step fused
    here: the registered callable runs ``backward_op`` chunk by chunk, steps the weight in place
    and returns no weight gradient (every backend: this is the one backward they all pass through).
    """

    def setup_context(ctx, inputs, output):
        (features, weight, scale, bias, target_col, class_index, hard_tau, hard_t,
         normalize_weight, subcenters, *rest) = inputs
        extra = (output[2],) if kept else ()
        if kept:
            ctx.mark_non_differentiable(output[2])
            # No zero gradient of size B·C for the kept tiles: unused output gradients stay None
            # (the backward below fills grad_lse / grad_dot itself).
            ctx.set_materialize_grads(False)
        ctx.save_for_backward(features, weight, scale, bias, target_col, class_index, hard_tau,
                              hard_t, output[0], *extra)
        ctx.normalize_weight = normalize_weight
        ctx.subcenters = subcenters
        ctx.filter_threshold = float(rest[0]) if rest else 0.0  # the schema's default

    def backward(ctx, grad_lse, grad_dot, *_grad_kept):
        (features, weight, scale, bias, target_col, class_index, hard_tau, hard_t,
         lse_neg, *extra) = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if not any(needs[:4]):
            return (None,) * 10
        grad_lse = torch.zeros_like(lse_neg) if grad_lse is None else grad_lse.contiguous()
        grad_dot = torch.zeros_like(lse_neg) if grad_dot is None else grad_dot.contiguous()
        args = (features, weight, scale, bias, target_col, class_index, hard_tau, hard_t,
                ctx.normalize_weight, ctx.subcenters, ctx.filter_threshold)
        fused = FUSED_STEPS.get(weight) if needs[1] else None
        grads = fused(backward_op, extra, grad_lse, grad_dot, lse_neg, *args) if fused is not None else None
        if grads is None:
            grads = backward_op(grad_lse, grad_dot, lse_neg, *extra, *args)
        grads = [g if need else None for g, need in zip(grads, needs[:4])]
        if bias is None:
            grads[3] = None
        return (*grads, *(None,) * (len(needs) - 4))

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
