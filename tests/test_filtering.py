"""``interclass_filtering_threshold`` (insightface arcface_torch) on every backend.

The reference is written from arcface_torch's ``CombinedMarginLoss.forward``: on the full (B, C)
cosines, under ``no_grad``, ``dirty = logits > thr``, the target of every labelled row is cleared
from ``dirty``, and ``logits = (1 - dirty) * logits`` — a filtered column stays in the softmax with
cosine 0 and gets no gradient; rows without a (local) target have every column above ``thr``
filtered. Then the margin, the scale and ``F.cross_entropy``. Everything is fp64 here, except the
Triton interpreter cases (fp32 / fp16 inputs against the fp64 reference).

Every cosine is at least MIN_GAP from the threshold and every sub-center max has a winner by at
least MIN_GAP, so all backends and the reference filter the same columns and route to the same
rows whatever their summation order.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from interpreter import not_interp, outside_interp, requires_interp, run_in_interpreter
from tolerance import MIN_GAP, assert_tight

import marginops as mo
from marginops.compat.insightface import CombinedMarginLoss

F64 = torch.float64
# numpy warns on log(0) inside the interpreter even where tl.where discards the result
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")

# (name, kwargs of the case): B rows, C classes, K sub-centers, D dims, threshold, options
CASES = {
    "plain": dict(B=7, C=13, K=1, D=5, thr=0.3),
    "subcenters": dict(B=6, C=9, K=3, D=4, thr=0.45),
    "class_index": dict(B=7, C=12, K=1, D=5, thr=0.25, class_index=[5, 0, 3, 7, 2, 9, 11]),
    "shard": dict(B=8, C=10, K=2, D=4, thr=0.35, start=4, num_global=20),
    "bias_hard": dict(B=6, C=11, K=1, D=5, thr=0.4, bias=True, hard=(0.2, 0.3)),
}


# ----------------------------------------------------------------------------- data and reference

def _subcenter_cosines(x, w, K):
    """(B, C, K) cosines f_i · ŵ_r (features used as they are: the op's contract)."""
    return (x @ F.normalize(w, dim=1).t()).view(x.shape[0], -1, K)


def gapped_case(name: str, dtype=F64):
    """Inputs of case ``name``: features redrawn until every cosine is MIN_GAP away from the
    threshold (and from the hard-negative tau) and every sub-center max wins by MIN_GAP."""
    c = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    B, C, K, D = c["B"], c["C"], c["K"], c["D"]
    w = torch.randn(C * K, D, generator=g, dtype=F64)
    x = F.normalize(torch.randn(B, D, generator=g, dtype=F64), dim=1)
    start = c.get("start", 0)
    labels = torch.randint(start, start + C, (B,), generator=g)
    labels[1] = -1                                       # an ignored row
    if "num_global" in c:
        labels[2] = 0                                    # another shard's class
    if "class_index" in c:
        absent = sorted(set(range(C)) - set(c["class_index"]))[0]
        labels[3] = absent                               # target not among the sampled classes
    cuts = [c["thr"]] + ([c["hard"][0]] if "hard" in c else [])
    for _ in range(200):
        d_k = _subcenter_cosines(x, w, K)
        top2 = d_k.topk(min(2, K), dim=2).values
        near = torch.zeros(B, dtype=torch.bool)
        for cut in cuts:
            near |= ((top2[..., 0] - cut).abs() < MIN_GAP).any(1)
        if K > 1:
            near |= ((top2[..., 0] - top2[..., 1]) < MIN_GAP).any(1)
        if not near.any():
            break
        x[near] = F.normalize(torch.randn(int(near.sum()), D, generator=g, dtype=F64), dim=1)
    else:
        raise AssertionError(f"{name}: no gapped draw in 200 tries")
    scale = (torch.rand(B, generator=g, dtype=F64) * 20 + 10)
    bias = torch.randn(C, generator=g, dtype=F64) if c.get("bias") else None
    index = torch.tensor(c["class_index"]) if "class_index" in c else None
    kw = dict(subcenters=K, interclass_filtering_threshold=c["thr"], class_index=index)
    if "num_global" in c:
        kw["class_range"] = (start, C)
    if "hard" in c:
        kw["hard_negative"] = c["hard"]
    x, w, scale = x.to(dtype), w.to(dtype), scale.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    return x, w, labels, scale, bias, kw


def reference(x, w, labels, scale, bias, *, subcenters, interclass_filtering_threshold,
              class_index=None, class_range=None, hard_negative=None):
    """(lse_neg, dot_y) the dense way, filtering as arcface_torch does (see the module doc)."""
    d = _subcenter_cosines(x, w, subcenters).amax(2)             # (B, C_local)
    cls = torch.arange(d.shape[1]) if class_index is None else class_index
    d = d[:, cls]
    start = 0 if class_range is None else class_range[0]
    local = labels - start
    is_target = (cls[None, :] == local[:, None]) & (labels[:, None] >= 0)
    with torch.no_grad():
        dirty = (d > interclass_filtering_threshold) & ~is_target
    d_f = d * (~dirty).to(d.dtype)                               # arcface_torch: tensor_mul · logits
    if hard_negative is not None:
        tau, t = hard_negative
        hard = (~is_target) & (d_f > tau)
        d_f = torch.where(hard, d_f * (t + d_f), d_f)
    z = scale[:, None] * d_f
    if bias is not None:
        z = z + bias[cls][None, :]
    lse_neg = z.masked_fill(is_target, float("-inf")).logsumexp(1)
    dot_y = torch.where(is_target, d, torch.zeros_like(d)).sum(1)
    return lse_neg, dot_y, dirty


def _outputs_and_grads(fn, x, w, scale, bias):
    """(lse_neg, dot_y) and the gradients of a fixed random combination of them."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, scale)]
    b = bias.detach().clone().requires_grad_(True) if bias is not None else None
    lse_neg, dot_y = fn(*leaves, b)[:2]
    g = torch.Generator().manual_seed(7)
    u = torch.rand(lse_neg.shape[0], generator=g, dtype=F64).to(lse_neg.dtype)
    v = torch.randn(lse_neg.shape[0], generator=g, dtype=F64).to(lse_neg.dtype)
    loss = (u * lse_neg).sum() + (v * dot_y).sum()
    grads = torch.autograd.grad(loss, leaves + ([b] if b is not None else []))
    return lse_neg.detach(), dot_y.detach(), grads


def check_backend(name: str, backend: str, dtype=F64, rtol=1e-9, atol=1e-9):
    x, w, labels, scale, bias, kw = gapped_case(name, dtype)
    xr, wr, sr, br = (t if t is None else t.double() for t in (x, w, scale, bias))
    _, _, dirty = reference(xr, wr, labels, sr, br, **kw)
    # the data filters some non-target columns, and not all of them
    assert 0 < int(dirty.sum()) < dirty.numel() - labels.numel(), name
    ref = _outputs_and_grads(lambda a, b_, c, d: reference(a, b_, labels, c, d, **kw),
                             xr, wr, sr, br)
    ours = _outputs_and_grads(
        lambda a, b_, c, d: mo.margin_lse(a, b_, labels, c, d, backend=backend, **kw),
        x, w, scale, bias)
    for what, a, e in (("lse_neg", ours[0], ref[0]), ("dot_y", ours[1], ref[1])):
        assert_tight(a, e, rtol=rtol, atol=atol, name=f"{backend} {name} {what}")
    for what, a, e in zip(("features", "weight", "scale", "bias"), ours[2], ref[2]):
        assert_tight(a, e, rtol=rtol, atol=atol, name=f"{backend} {name} grad {what}")


# ----------------------------------------------------------------------------- torch and cpp, fp64

@not_interp
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_core_op_against_dense_reference(backend, name):
    check_backend(name, backend)


@not_interp
@pytest.mark.parametrize("keep_budget", [0, 1 << 30], ids=["recompute", "keep"])
def test_cpp_keep_and_recompute_paths(keep_budget):
    from marginops.ops import cpp

    old = cpp.set_keep_budget(keep_budget)
    try:
        check_backend("subcenters", "cpp")
        check_backend("bias_hard", "cpp")
    finally:
        cpp.set_keep_budget(old)


@not_interp
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_threshold_zero_or_above_every_cosine_is_bit_identical(backend):
    """A threshold no cosine exceeds runs the filtering code and must change nothing, bit for bit,
    against the op without the option (threshold 0: the code path of before)."""
    x, w, labels, scale, bias, kw = gapped_case("bias_hard", torch.float32)
    off = {**kw, "interclass_filtering_threshold": 0.0}
    on = {**kw, "interclass_filtering_threshold": 1.5}          # |cosine| <= 1 < 1.5
    a = _outputs_and_grads(lambda *t: mo.margin_lse(*t[:2], labels, *t[2:], backend=backend,
                                                     **off), x, w, scale, bias)
    b = _outputs_and_grads(lambda *t: mo.margin_lse(*t[:2], labels, *t[2:], backend=backend,
                                                     **on), x, w, scale, bias)
    for p, q in zip([a[0], a[1], *a[2]], [b[0], b[1], *b[2]]):
        assert torch.equal(p, q)


@not_interp
def test_threshold_validation():
    x, w, labels, scale, bias, kw = gapped_case("plain")
    for bad, err in ((-0.1, ValueError), (float("nan"), ValueError), ("0.4", TypeError)):
        with pytest.raises(err, match="interclass_filtering_threshold"):
            mo.margin_lse(x, w, labels, scale, interclass_filtering_threshold=bad,
                          backend="torch")
        with pytest.raises(err, match="interclass_filtering_threshold"):
            mo.ArcFaceLoss(5, 13, interclass_filtering_threshold=bad)


# ----------------------------------------------------------------------------- opcheck

def _op_args(name):
    x, w, labels, scale, bias, kw = gapped_case(name, torch.float32)
    from marginops.core import target_columns

    target_col = target_columns(labels, w.shape[0] // kw["subcenters"], None, kw["class_index"])
    return (x, w, scale, bias, target_col, kw["class_index"], None, None, True, kw["subcenters"],
            kw["interclass_filtering_threshold"])


@not_interp
@pytest.mark.parametrize("op", ["margin_lse_torch", "margin_lse", "margin_lse_keep"])
@pytest.mark.parametrize("name", ["plain", "subcenters"])
def test_opcheck(op, name):
    if op != "margin_lse_torch":
        assert mo.backend_status("cpu")["cpp"] is None
    args = _op_args(name)
    grad_args = tuple(a.clone().requires_grad_(True) if i in (0, 1, 2) else a
                      for i, a in enumerate(args))
    forward = getattr(torch.ops.marginops, op)
    torch.library.opcheck(forward.default, args)
    torch.library.opcheck(forward.default, grad_args)
    backward = {"margin_lse_torch": "margin_lse_torch_backward",
                "margin_lse": "margin_lse_backward",
                "margin_lse_keep": "margin_lse_backward_kept"}[op]
    out = forward(*args)
    g = torch.Generator().manual_seed(3)
    gl, gd = torch.rand(2, args[0].shape[0], generator=g)
    kept = (out[2],) if op == "margin_lse_keep" else ()
    torch.library.opcheck(getattr(torch.ops.marginops, backward).default,
                          (gl, gd, out[0], *kept, *args))


# ----------------------------------------------------------------------------- families and compat

def insightface_cross_entropy(x, w, labels, s, thr, psi):
    """arcface_torch: normalised embeddings and weight, filtering, margin ψ on the targets, s,
    cross-entropy over the labelled rows."""
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()
    valid = labels >= 0
    col = labels.clamp_min(0)[:, None]
    with torch.no_grad():
        dirty = (cos > thr) & ~torch.zeros_like(cos, dtype=torch.bool).scatter(1, col,
                                                                               valid[:, None])
    cos = cos * (~dirty).to(cos.dtype)
    t = cos.gather(1, col).squeeze(1)
    logits = s * cos.scatter(1, col, torch.where(valid, psi(t), t)[:, None])
    return F.cross_entropy(logits, labels, ignore_index=-1), logits


@not_interp
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_compat_combined_margin_loss_filter04(backend):
    """CombinedMarginLoss(64, 1, 0.5, 0, interclass_filtering_threshold=0.4): its dense forward
    and the fused family it selects both equal arcface_torch's formula."""
    x, w, labels, _, _, _ = gapped_case("plain")
    x, w = x * 3, w[:11]
    labels = labels.clamp_max(10)
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()
    assert ((cos - 0.4).abs() > MIN_GAP).all() and (cos > 0.4).any()
    compat = CombinedMarginLoss(64, 1, 0.5, 0, interclass_filtering_threshold=0.4)

    def psi(t):  # arcface_torch: cos(arccos t + m2) under no_grad → straight-through
        return t + (torch.cos(torch.acos(t) + 0.5) - t).detach()

    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref_loss, ref_logits = insightface_cross_entropy(xr, wr, labels, 64.0, 0.4, psi)
    ref_grads = torch.autograd.grad(ref_loss, (xr, wr))
    # the module on dense logits, as arcface_torch's is called
    c = (F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()).requires_grad_(True)
    assert_tight(compat(c, labels), ref_logits.detach(), rtol=1e-12, atol=1e-12, name="logits")
    # the fused family, as PartialFC_V2 runs it
    family, kwargs = compat.family()
    assert kwargs["interclass_filtering_threshold"] == 0.4
    torch.manual_seed(0)
    module = family(5, 11, backend=backend, **kwargs).to(F64)
    with torch.no_grad():
        module.weight.copy_(w)
    xo = x.clone().requires_grad_(True)
    loss = module(xo, labels)
    grads = torch.autograd.grad(loss, (xo, module.weight))
    assert_tight(loss.detach(), ref_loss.detach(), rtol=1e-9, atol=1e-9, name="loss")
    for what, a, e in zip(("embeddings", "weight"), grads, ref_grads):
        assert_tight(a, e, rtol=1e-9, atol=1e-9, name=f"grad {what}")


@not_interp
def test_cosface_family_option():
    """The option on a family (CosFace, s = 30, m = 0.35) with sub-centers: fused = dense."""
    x, w, labels, _, _, kw = gapped_case("subcenters")
    thr, K = kw["interclass_filtering_threshold"], kw["subcenters"]
    torch.manual_seed(0)
    module = mo.CosFaceLoss(x.shape[1], w.shape[0] // K, scale=30.0, margin=0.35, subcenters=K,
                            interclass_filtering_threshold=thr, backend="torch").to(F64)
    with torch.no_grad():
        module.weight.copy_(w)
    xo = x.clone().requires_grad_(True)
    loss = module(xo, labels)
    (gx,) = torch.autograd.grad(loss, xo)
    xr = x.clone().requires_grad_(True)
    cos = (F.normalize(xr, dim=1) @ F.normalize(w, dim=1).t()).view(x.shape[0], -1, K).amax(2)
    valid = labels >= 0
    col = labels.clamp_min(0)[:, None]
    with torch.no_grad():
        dirty = (cos > thr) & ~torch.zeros_like(cos, dtype=torch.bool).scatter(1, col,
                                                                               valid[:, None])
    cos = cos * (~dirty).to(cos.dtype)
    logits = 30.0 * (cos - 0.35 * F.one_hot(col.squeeze(1), cos.shape[1]))
    ref = F.cross_entropy(logits, labels, ignore_index=-1)
    (gr,) = torch.autograd.grad(ref, xr)
    assert int(dirty.sum()) > 0
    assert_tight(loss.detach(), ref.detach(), name="loss")
    assert_tight(gx, gr, name="grad embeddings")
    assert "interclass_filtering_threshold=0.45" in repr(module)


@not_interp
@pytest.mark.parametrize("loss_name", ["arcface_loss", "cosface_loss", "normface_loss"])
def test_functional_losses_take_the_option(loss_name):
    """marginops.functional's losses pass the threshold through: equal to the module with it, and
    different from the unfiltered loss (so the argument is not dropped on the way)."""
    x, w, labels, _, _, kw = gapped_case("plain")
    thr = kw["interclass_filtering_threshold"]
    family = {"arcface_loss": mo.ArcFaceLoss, "cosface_loss": mo.CosFaceLoss,
              "normface_loss": mo.NormFaceLoss}[loss_name]
    module = family(x.shape[1], w.shape[0], scale=30.0, interclass_filtering_threshold=thr,
                    backend="torch").to(F64)
    with torch.no_grad():
        module.weight.copy_(w)
    fn = getattr(mo.functional, loss_name)
    filtered = fn(x, w, labels, scale=30.0, interclass_filtering_threshold=thr, backend="torch")
    plain = fn(x, w, labels, scale=30.0, backend="torch")
    assert_tight(filtered, module(x, labels), rtol=1e-12, atol=1e-12, name="loss")
    assert (filtered - plain).abs() > 1e-6


# ----------------------------------------------------------------------------- Triton (interpreter)

@requires_interp
@pytest.mark.parametrize("name", ["plain", "subcenters", "class_index", "bias_hard"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_against_dense_reference(name, dtype):
    # fp32 tiles; fp16 inputs are rounded before the reference sees them (it takes the same
    # rounded values in fp64), so only the accumulation order and fp16 GEMM operands differ
    tol = 2e-4 if dtype == torch.float32 else 2e-2
    x, w, labels, scale, bias, kw = gapped_case(name)
    x, w = x.to(dtype), w.to(dtype)
    scale = scale.float()
    bias = bias.float() if bias is not None else None
    xr, wr = x.double(), w.double()
    # the rounding to fp16 must not move a cosine across the threshold
    d = _subcenter_cosines(xr, wr, kw["subcenters"]).amax(2)
    assert ((d - kw["interclass_filtering_threshold"]).abs() > MIN_GAP / 2).all()
    ref = _outputs_and_grads(lambda a, b_, c, e: reference(a, b_, labels, c, e, **kw),
                             xr, wr, scale.double(), bias.double() if bias is not None else None)
    ours = _outputs_and_grads(
        lambda a, b_, c, e: mo.margin_lse(a, b_, labels, c, e, backend="triton", **kw),
        x, w, scale, bias)
    outs = [ours[0], ours[1], *ours[2]]
    refs = [ref[0], ref[1], *ref[2]]
    for what, a, e in zip(("lse_neg", "dot_y", "grad f", "grad w", "grad scale", "grad bias"),
                          outs, refs):
        assert_tight(a.double(), e, rtol=tol, atol=tol, name=f"triton {name} {what}")


@requires_interp
def test_triton_opcheck():
    args = _op_args("plain")
    grad_args = tuple(a.clone().requires_grad_(True) if i in (0, 1, 2) else a
                      for i, a in enumerate(args))
    torch.library.opcheck(torch.ops.marginops.margin_lse_triton.default, grad_args)
    lse, _ = torch.ops.marginops.margin_lse_triton(*args)
    g = torch.Generator().manual_seed(3)
    gl, gd = torch.rand(2, args[0].shape[0], generator=g)
    torch.library.opcheck(torch.ops.marginops.margin_lse_triton_backward.default,
                          (gl, gd, lse, *args))


@outside_interp
def test_triton_interpreter_child():
    tail = run_in_interpreter(__file__, "-k", "test_triton_ and not child")
    assert " passed" in tail and "skipped" not in tail, tail


@not_interp
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_torch_compile_traces_the_threshold(backend):
    """The threshold is a float of the op's schema: torch.compile (fullgraph) passes it through;
    the compiled op gives the eager results bit for bit (the op is one opaque node)."""
    x, w, labels, scale, bias, kw = gapped_case("subcenters", torch.float32)

    def run(a, b_, c, d):
        return mo.margin_lse(a, b_, labels, c, d, backend=backend, **kw)

    torch._dynamo.reset()
    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)
    eager = _outputs_and_grads(run, x, w, scale, bias)
    traced = _outputs_and_grads(compiled, x, w, scale, bias)
    for a, b in zip([eager[0], eager[1], *eager[2]], [traced[0], traced[1], *traced[2]]):
        assert torch.equal(a, b)
