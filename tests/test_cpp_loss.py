"""The cpp backend's one-op loss (marginops/ops/cpp_loss.py, csrc/cpu/margin_loss.cpp): NormFace,
CosFace, ArcFace (policies fallback / none / easy, exact and straight-through gradients) and the
combined margin with m1 = 1, as ``torch.ops.marginops.margin_loss`` and its C++ autograd.

Its reference is the Python pipeline it replaces (marginops/functional.py, modules/base.py: the
same core op between B-sized PyTorch ops), run here by switching ``cpp_loss.applies`` off:
* fp64: the two agree to rounding (``assert_tight``), losses and both gradients, every family,
  reduction and angle policy, ignored rows, B = 1, C and D not multiples of any tile;
* fp32 and bf16 (features and weight, and bf16 features with fp32 weight): within the error
  budget of tests/tolerance.py against the fp64 pipeline, the same-precision pipeline as baseline;
* gradcheck in fp64, opcheck of both ops, cos → ±1, NaN and inf in, every routing decision.
Routed values (ArcFace's fallback at c = cos(π − m), the easy policy at c = 0, interclass
filtering) are compared only on data whose decisions are at least MIN_GAP from their switch.
"""

from __future__ import annotations

import math

import pytest
import torch
from tolerance import MIN_GAP, assert_tight, assert_within_budget, cosines

import marginops
from marginops import functional as mf
from marginops.ops import cpp, cpp_loss

_REASON = cpp.availability("cpp", torch.device("cpu"))
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"C++ backend: {_REASON}")

ONE_OP = "MarginLoss"  # in the C++ autograd node's name: the loss came from margin_loss

# name -> (functional loss, its keyword arguments, the switch points of its target cosine)
FAMILIES = {
    "arcface": (mf.arcface_loss, {"margin": 0.5}, (math.cos(math.pi - 0.5),)),
    "arcface-none": (mf.arcface_loss, {"margin": 0.5, "angle_policy": "none"}, ()),
    "arcface-easy": (mf.arcface_loss, {"margin": 0.4, "angle_policy": "easy"}, (0.0,)),
    "arcface-straight-through": (mf.arcface_loss,
                                 {"margin": 0.5, "grad_mode": "straight_through"},
                                 (math.cos(math.pi - 0.5),)),
    "cosface": (mf.cosface_loss, {"margin": 0.35}, ()),
    "normface": (mf.normface_loss, {}, ()),
    "normface-filtered": (mf.normface_loss, {"interclass_filtering_threshold": 0.25}, ()),
}
SHAPES = [(1, 7, 5), (9, 50, 16), (33, 301, 24)]


def _data(B, C, D, dtype=torch.float64, wdtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    w = torch.randn(C, D, generator=g, dtype=torch.float64) * 0.01
    y = torch.randint(0, C, (B,), generator=g)
    if B > 2:
        y[1] = -1
    return x.to(dtype), w.to(wdtype or dtype), y


def _run(fn, x, w, y, one_op: bool, grad_seed=1, **kw):
    """(loss, ∂x, ∂w, whether the one-op loss ran) under a fixed random output gradient."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    applies = cpp_loss.applies
    if not one_op:
        cpp_loss.applies = lambda *args: False
    try:
        loss = fn(x, w, y, backend="cpp", **kw)
    finally:
        cpp_loss.applies = applies
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_seed),
                    dtype=torch.float64).to(loss.dtype)
    loss.backward(g)
    return loss.detach(), x.grad, w.grad, ONE_OP in loss.grad_fn.name()


def _routed(fn_kw, x, w, y, gap):
    """The family's keyword arguments for this data, asserting that every routed decision is at
    least ``gap`` (in cosine) from its switch: target cosines from the margin's branch points; for
    interclass filtering, a threshold near the configured one placed in a gap of the cosines."""
    kw, switches = dict(fn_kw[1]), fn_kw[2]
    c = cosines(x, w).squeeze(2)
    valid = y >= 0
    c_y = c[valid, y[valid]]
    for s in switches:
        assert (c_y - s).abs().min() > gap, "pick another seed: a target cosine sits on a switch"
    near = kw.get("interclass_filtering_threshold")
    if near:
        cuts = torch.cat([c.flatten(), torch.tensor([near - 0.2, near + 0.2], dtype=c.dtype)])
        cuts = cuts[(cuts >= near - 0.2) & (cuts <= near + 0.2)].sort().values
        widths = cuts[1:] - cuts[:-1]
        i = int(widths.argmax())
        assert widths[i] > 2 * gap, "pick another seed: no gap in the cosines for the threshold"
        kw["interclass_filtering_threshold"] = float(cuts[i] + cuts[i + 1]) / 2
    return kw


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_op_matches_the_pipeline_fp64(family, reduction):
    fn = FAMILIES[family][0]
    for B, C, D in SHAPES:
        x, w, y = _data(B, C, D)
        kw = _routed(FAMILIES[family], x, w, y, gap=1e-9)  # fp64 vs fp64: orders differ by ~1e-16
        ours = _run(fn, x, w, y, True, reduction=reduction, **kw)
        theirs = _run(fn, x, w, y, False, reduction=reduction, **kw)
        assert ours[3] and not theirs[3]
        for a, b, name in zip(ours[:3], theirs[:3], ("loss", "grad x", "grad W")):
            assert_tight(a, b, name=f"{family} {reduction} {(B, C, D)} {name}")


LOW = [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)]
LOW_IDS = ["fp32", "bf16", "bf16-features-fp32-weight"]


@pytest.mark.parametrize("dtypes", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("family", ["arcface", "cosface", "normface"])
def test_one_op_low_precision_within_budget(family, dtypes):
    _within_budget(family, *dtypes, gap=2e-2)  # bf16 cosines carry ~1e-3 of error


@pytest.mark.parametrize("family", ["arcface-easy", "normface-filtered"])
def test_one_op_fp32_routed_within_budget(family):
    _within_budget(family, torch.float32, None, gap=MIN_GAP)


def _within_budget(family, dtype, wdtype, gap):
    fn = FAMILIES[family][0]
    for B, C, D in SHAPES[1:]:
        x64, w64, y = _data(B, C, D)
        x, w = x64.to(dtype), w64.to(wdtype or dtype)
        kw = _routed(FAMILIES[family], x.double(), w.double(), y, gap)
        truth = _run(fn, x.double(), w.double(), y, False, **kw)
        ours = _run(fn, x, w, y, True, **kw)
        baseline = _run(fn, x, w, y, False, **kw)
        assert ours[3]
        for a, b, t, name in zip(ours[:3], baseline[:3], truth[:3], ("loss", "grad x", "grad W")):
            assert_within_budget(a, b, t, dtype, name=f"{family} {dtype}/{wdtype} {(B, C, D)} {name}")


# straight-through takes dψ/dc = 1 on purpose: not the derivative of ψ, so not gradcheck-able
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "arcface-straight-through"])
def test_one_op_gradcheck(family):
    fn = FAMILIES[family][0]
    x, w, y = _data(5, 11, 6, seed=3)
    kw = _routed(FAMILIES[family], x, w, y, gap=1e-3)  # gradcheck's finite differences: 1e-6
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda a, b, reduction=reduction: fn(a, b, y, backend="cpp", reduction=reduction,
                                                 **kw),
            (x.clone().requires_grad_(True), w.clone().requires_grad_(True)))


def _op_args(dtype, keep, reduction=0, seed=5):
    x, w, y = _data(6, 13, 9, dtype=dtype, seed=seed)
    return (x, w, y, 64.0, True, 0.5, 0.1, 0, False, 0.0, reduction, keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_margin_loss(dtype):
    for keep, reduction in ((False, 0), (True, 2)):
        args = list(_op_args(dtype, keep, reduction))
        torch.library.opcheck(torch.ops.marginops.margin_loss.default, tuple(args))
        args[0] = args[0].clone().requires_grad_(True)
        args[1] = args[1].clone().requires_grad_(True)
        torch.library.opcheck(torch.ops.marginops.margin_loss.default, tuple(args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_margin_loss_backward(dtype):
    for keep, reduction in ((False, 1), (True, 2)):
        args = _op_args(dtype, keep, reduction)
        loss, x_hat, norms, lse, dot, dots = torch.ops.marginops.margin_loss(*args)
        grad = torch.randn(loss.shape, generator=torch.Generator().manual_seed(0)).to(loss.dtype)
        x, w, y = args[:3]
        torch.library.opcheck(torch.ops.marginops.margin_loss_backward.default,
                              (grad, x, x_hat, norms, lse, dot, dots, w, y, *args[3:11]))


@pytest.mark.parametrize("shape", [(9, 51, 16), (4, 37, 37)])
@pytest.mark.parametrize("dtypes", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("scale", [64.0, 100.0])
def test_keep_and_recompute_agree(dtypes, scale, shape):
    """The backward reads what the forward kept — exps and weight norms under the fixed shift
    (s <= 75; bf16: straight into the bf16 DD and weight operands), dots above it — or recomputes
    the dots: the same gradients, bit for bit. (The bf16 forward packs its weight operand straight
    from the rows; a backward that recomputes goes through bf16 rows: equal dots too.) C and B
    odd, D odd and above 32: the bf16 layouts' tails."""
    x, w, y = _data(*shape, dtype=dtypes[0], wdtype=dtypes[1])
    kept = _run(mf.arcface_loss, x, w, y, True, scale=scale)
    old = cpp.set_keep_budget(0)
    try:
        recomputed = _run(mf.arcface_loss, x, w, y, True, scale=scale)
    finally:
        cpp.set_keep_budget(old)
    assert kept[3] and recomputed[3]
    for a, b in zip(kept[:3], recomputed[:3]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scale", [1.0, 30.0, 75.0, 75.5, 100.0])
@pytest.mark.parametrize("family", ["arcface", "cosface"])
def test_fixed_shift_and_max_shift_scales(family, scale):
    """Up to s = 75 the forward sums exp(s·c − (s − 70)) in one pass and the backward scales kept
    exps (row_kernels.h's fixed shift); above, the max-shifted two-pass path runs. Both match the
    pipeline: tight in fp64, within the fp32 budget — at the extremes too, embeddings on and
    opposite weight rows (cosines ±1, the shifted exponent at its bound −2s + 70)."""
    fn, kw = FAMILIES[family][:2]
    x64, w64, y = _data(9, 50, 16, seed=4)
    x64[0], x64[2] = 5 * w64[y[0]], -3 * w64[7]
    w64[8] = -w64[y[3]]
    kw = dict(kw, scale=scale)
    ours = _run(fn, x64, w64, y, True, **kw)
    theirs = _run(fn, x64, w64, y, False, **kw)
    assert ours[3] and not theirs[3]
    for a, b, name in zip(ours[:3], theirs[:3], ("loss", "grad x", "grad W")):
        assert torch.isfinite(a).all(), name
        assert_tight(a, b, name=f"{family} s={scale} {name}")
    x, w = x64.float(), w64.float()
    ours = _run(fn, x, w, y, True, **kw)
    baseline = _run(fn, x, w, y, False, **kw)
    truth = _run(fn, x64, w64, y, False, **kw)
    for a, b, t, name in zip(ours[:3], baseline[:3], truth[:3], ("loss", "grad x", "grad W")):
        assert_within_budget(a, b, t, torch.float32, name=f"{family} s={scale} fp32 {name}")


@pytest.mark.parametrize("family", ["arcface", "arcface-none", "arcface-easy", "cosface"])
def test_cosines_at_plus_and_minus_one(family):
    """Embeddings on (and opposite) their target rows: c_y = ±1, where ArcFace clamps c̃ and its
    derivative is taken through the clamp (0) or the linear branch."""
    fn, kw, _ = FAMILIES[family]
    x, w, y = _data(6, 10, 8, seed=7)
    y = torch.tensor([0, 3, 3, 9, 5, -1])
    x[0], x[1], x[2], x[3] = 3 * w[0], -2 * w[3], w[3], -w[9]
    for reduction in ("mean", "none"):
        ours = _run(fn, x, w, y, True, reduction=reduction, **kw)
        theirs = _run(fn, x, w, y, False, reduction=reduction, **kw)
        for a, b in zip(ours[:3], theirs[:3]):
            assert torch.isfinite(a).all()
            assert_tight(a, b, name=family)


def test_nan_and_inf_propagate_like_the_pipeline():
    """NaN in the weight (the audit's finite-loss bug), a NaN or inf embedding row, an ignored NaN
    row: the one-op loss gives exactly the pipeline's NaN pattern, and NaN in the weight gives a
    NaN loss."""
    x, w, y = _data(5, 12, 8, dtype=torch.float32, seed=2)
    cases = {}
    w_nan = w.clone()
    w_nan[4, 3] = float("nan")
    cases["nan weight"] = (x, w_nan)
    x_nan = x.clone()
    x_nan[2, 0] = float("nan")
    cases["nan row"] = (x_nan, w)
    x_ignored = x.clone()
    x_ignored[1, 5] = float("nan")  # row 1 is ignored (label -1)
    cases["ignored nan row"] = (x_ignored, w)
    x_inf = x.clone()
    x_inf[3, 1] = float("inf")
    cases["inf row"] = (x_inf, w)
    for name, (xc, wc) in cases.items():
        for reduction in ("mean", "none"):
            ours = _run(mf.arcface_loss, xc, wc, y, True, reduction=reduction)
            theirs = _run(mf.arcface_loss, xc, wc, y, False, reduction=reduction)
            for a, b in zip(ours[:3], theirs[:3]):
                assert torch.equal(a.isnan(), b.isnan()), name
                torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-4, atol=1e-4)
    assert _run(mf.arcface_loss, x, w_nan, y, True)[0].isnan()


def _module_takes_one_op(module, x, y, **kw) -> bool:
    loss = module(x.clone().requires_grad_(True), y, **kw)
    return ONE_OP in loss.grad_fn.name()


def test_routing_of_the_modules():
    """The four fixed-margin families themselves take the one-op loss on the cpp backend;
    anything that changes a step of the pipeline keeps the Python pipeline."""
    torch.manual_seed(0)
    x, _, y = _data(4, 20, 8, dtype=torch.float32)
    takes = {
        "ArcFace": marginops.ArcFaceLoss(8, 20, backend="cpp"),
        "CosFace": marginops.CosFaceLoss(8, 20, backend="cpp"),
        "NormFace": marginops.NormFaceLoss(8, 20, backend="cpp"),
        "combined m1 = 1": marginops.CombinedMarginLoss(8, 20, m2=0.3, m3=0.2, backend="cpp"),
        "auto on CPU": marginops.ArcFaceLoss(8, 20),
    }
    for name, module in takes.items():
        assert _module_takes_one_op(module, x, y), name
    keeps = {
        "torch backend": marginops.ArcFaceLoss(8, 20, backend="torch"),
        "clip policy": marginops.ArcFaceLoss(8, 20, backend="cpp", angle_policy="clip"),
        "combined m1 != 1": marginops.CombinedMarginLoss(8, 20, m1=0.9, backend="cpp"),
        "learnable scale": marginops.NormFaceLoss(8, 20, learnable_scale=True, backend="cpp"),
        "sub-centers": marginops.SubCenterArcFaceLoss(8, 20, backend="cpp"),
        "bias": marginops.CrystalLoss(8, 20, backend="cpp"),
        "a subclass": type("MyArcFace", (marginops.ArcFaceLoss,), {})(8, 20, backend="cpp"),
    }
    for name, module in keeps.items():
        assert not _module_takes_one_op(module, x, y), name


def test_routing_under_compile_and_fused_optimizer():
    """torch.compile traces the Python pipeline; a weight whose optimizer step is fused into the
    core op's backward (marginops.optim) keeps it too."""
    torch.manual_seed(0)
    x, _, y = _data(4, 20, 8, dtype=torch.float32)
    module = marginops.ArcFaceLoss(8, 20, backend="cpp")
    eager = module(x, y)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)(x, y)
    torch.testing.assert_close(compiled, eager)
    opt = marginops.optim.SGD([module.weight], lr=0.1)
    assert not _module_takes_one_op(module, x, y)
    del opt  # the fused step is gone with its optimizer: the one-op loss again
    assert _module_takes_one_op(module, x, y)


def test_functional_routing():
    x, w, y = _data(4, 20, 8, dtype=torch.float32)
    assert _run(mf.arcface_loss, x, w, y, True)[3]
    assert not _run(mf.arcface_loss, x, w, y, True, angle_policy="clip")[3]
    # tensor margins (per row, or 0-d) keep the pipeline: the op takes Python floats only
    for margin in (torch.full((4,), 0.5), torch.tensor(0.5)):
        pipeline = _run(mf.arcface_loss, x, w, y, True, margin=margin)
        assert not pipeline[3]
        one_op = _run(mf.arcface_loss, x, w, y, True, margin=0.5)
        for a, b in zip(pipeline[:3], one_op[:3]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert not _run(mf.cosface_loss, x, w, y, True, margin=margin)[3]
    assert not _run(lambda *a, **k: mf.margin_cross_entropy(*a, **k), x, w, y, True)[3]
