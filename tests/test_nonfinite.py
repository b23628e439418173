"""Numerics under bad data and autocast (issue 10, items 1, 2, 8, 9).

* NaN in, NaN out (DESIGN §8; contract in marginops/ops/__init__.py): NaN or ±inf in the weight,
  a NaN bias, scale or feature gives a NaN lse_neg — and NaN gradients — on every CPU backend, in
  the rows it touches, while the other rows still match the dense oracle. Checked at the backend
  level (contract inputs, no validation in the way) with chunks small enough that the NaN must
  survive the per-chunk max, the chunk merges and the thread-group merges.
* top-k NaN policy: NaN ranks above +inf, ties by the lower column, identical on torch and cpp.
  The Triton backend runs the same checks in the interpreter, as strict xfails until
  marginops/triton implements the policy (see the section at the end).
* The torch backend under CPU autocast computes what it computes without it (forward and the
  recomputing backward alike).
* An all-zero fp16 embedding row gets a zero, not infinite, gradient in every family.
* softmax_rows (softplus) is correctly rounded in fp64 beyond F.softplus's threshold of 20.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from contract_oracle import dense_cosines, margin_lse_dense
from interpreter import outside_interp, requires_interp, run_in_interpreter
from tolerance import assert_tight

import marginops
from marginops.ops import cpp, torch_chunked

NAN, INF = float("nan"), float("inf")
CPP_REASON = cpp.availability("cpp", torch.device("cpu"))
BACKEND_PARAMS = [pytest.param(torch_chunked, id="torch"),
                  pytest.param(cpp, id="cpp", marks=pytest.mark.skipif(
                      CPP_REASON is not None, reason=f"C++ backend: {CPP_REASON}"))]


@pytest.fixture
def small_chunks(monkeypatch):
    """16-column chunks in the C++ kernel (C = 37 spans three chunks and both thread groups) and
    in the torch backend at B = 5 (so its running top-k list meets several chunks)."""
    monkeypatch.setenv("MARGINOPS_CPU_TILE_KB", "1")
    monkeypatch.setattr(torch_chunked, "TILE_ELEMENTS", 5 * 16)


def make_case(kind: str, col: int, B: int = 6, C: int = 37, D: int = 24, dtype=torch.float32):
    """Contract inputs with one non-finite entry; rows 0 and 1 target column ``col`` (so the
    poisoned column is masked there), the others target elsewhere or nothing."""
    g = torch.Generator().manual_seed(7)
    f = torch.randn(B, D, generator=g, dtype=torch.float64)
    f = f / f.norm(dim=1, keepdim=True)
    normalize = kind not in ("nan_bias", "nan_among_masked")
    w = torch.randn(C, D, generator=g, dtype=torch.float64) * (1.0 if normalize else 0.3)
    scale = torch.empty(B, dtype=torch.float64).uniform_(8.0, 64.0, generator=g)
    bias = torch.randn(C, generator=g, dtype=torch.float64) * 0.5 if not normalize else None
    target = torch.tensor([col, col, 3, (col + 7) % C, -1, 0][:B])
    if kind == "nan_weight":
        w[col, 2] = NAN
    elif kind == "inf_weight":
        w[col, 2] = INF
    elif kind == "neg_inf_weight":
        w[col, 2] = -INF
    elif kind == "nan_bias":
        bias[col] = NAN
    elif kind == "nan_among_masked":  # every other logit is -inf: the NaN is the chunk's only value
        bias.fill_(-INF)
        bias[col] = NAN
    elif kind == "nan_scale":
        scale[3] = NAN
    elif kind == "nan_features":
        f[2, 5] = NAN
    else:
        raise AssertionError(kind)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return dict(features=f.to(dtype), weight=w.to(dtype), scale=scale.to(acc),
                bias=None if bias is None else bias.to(acc), target_col=target, class_index=None,
                hard_tau=None, hard_t=None, normalize_weight=normalize, subcenters=1)


KINDS = ("nan_weight", "inf_weight", "neg_inf_weight", "nan_bias", "nan_among_masked", "nan_scale",
         "nan_features")


def _with_grads(fn, case):
    leaves = {k: case[k].detach().clone().requires_grad_(True)
              for k in ("features", "weight", "scale") if case[k] is not None}
    lse, dot = fn(**{**case, **leaves})
    g = torch.Generator().manual_seed(1)
    gl = torch.rand(lse.shape, generator=g, dtype=torch.float64).to(lse) + 0.5
    gd = torch.rand(dot.shape, generator=g, dtype=torch.float64).to(dot) + 0.5
    grads = torch.autograd.grad((lse, dot), list(leaves.values()), (gl, gd))
    return lse.detach(), dot.detach(), dict(zip(leaves, grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("col", [5, 36])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_nan_in_nan_out(backend, kind, col, dtype, small_chunks):
    check_nan_in_nan_out(backend, kind, col, dtype)


def check_nan_in_nan_out(backend, kind, col, dtype):
    case = make_case(kind, col, dtype=dtype)
    lse, dot, grads = _with_grads(backend.margin_lse, case)
    with torch.no_grad():
        want_lse, _ = margin_lse_dense(**case)
        # dot_y = d at the target only (the oracle's d · onehot would leak NaN · 0 into every row)
        d = dense_cosines(case["features"], case["weight"], None, case["normalize_weight"], 1)
        tc = case["target_col"]
        want_dot = torch.where(tc >= 0, d.gather(1, tc.clamp_min(0)[:, None])[:, 0], 0.0)
    # NaN exactly where the dense oracle (plain PyTorch) has it, never a finite stand-in
    assert torch.equal(torch.isnan(lse), torch.isnan(want_lse)), (lse, want_lse)
    assert torch.equal(torch.isnan(dot), torch.isnan(want_dot)), (dot, want_dot)
    assert torch.isnan(lse).any() or torch.isnan(dot).any(), "the case must poison some row"
    ok = ~torch.isnan(want_lse)
    assert_tight(lse[ok], want_lse[ok], rtol=1e-5 if dtype == torch.float32 else 1e-9,
                 atol=1e-5 if dtype == torch.float32 else 1e-9, name="finite rows")
    # rows whose lse is NaN get NaN feature gradients (grad_lse is finite here, so only the
    # kernel's own exp can carry it)
    bad = torch.isnan(lse)
    assert not torch.isfinite(grads["features"][bad]).all(dim=1).any(), grads["features"]
    if bad.any():
        assert not torch.isfinite(grads["weight"]).all()


@pytest.mark.parametrize("nan_k", [0, 1, 2])
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_nan_in_one_subcenter(backend, nan_k, small_chunks):
    """The sub-center max keeps NaN wherever it sits among the K rows (a plain > drops it unless
    it is the first)."""
    g = torch.Generator().manual_seed(9)
    B, C, K, D = 4, 37, 3, 16
    f = torch.nn.functional.normalize(torch.randn(B, D, generator=g))
    w = torch.randn(C * K, D, generator=g)
    w[20 * K + nan_k, 4] = NAN
    case = dict(features=f, weight=w, scale=torch.full((B,), 30.0), bias=None,
                target_col=torch.tensor([20, 3, -1, 36]), class_index=None, hard_tau=None,
                hard_t=None, normalize_weight=True, subcenters=K)
    lse, dot = backend.margin_lse(**case)
    want_lse, _ = margin_lse_dense(**case)
    assert torch.equal(torch.isnan(lse), torch.tensor([False, True, True, True]))
    assert torch.equal(torch.isnan(dot), torch.tensor([True, False, False, False]))
    torch.testing.assert_close(lse[0], want_lse[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("value", [NAN, INF])
def test_module_loss_is_nan_with_a_bad_weight(backend, value):
    """The issue's repro: a NaN/inf class row must not give a finite (healthy-looking) loss."""
    if backend == "cpp" and CPP_REASON is not None:
        pytest.skip(f"C++ backend: {CPP_REASON}")
    torch.manual_seed(0)
    m = marginops.ArcFaceLoss(8, 6, backend=backend)
    with torch.no_grad():
        m.weight[5, 0] = value
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    loss = m(x, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert math.isnan(loss.item())
    assert torch.isnan(x.grad).any() and torch.isnan(m.weight.grad).any()


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_crystal_nan_bias_of_a_non_target_class_gives_nan(backend):
    if backend == "cpp" and CPP_REASON is not None:
        pytest.skip(f"C++ backend: {CPP_REASON}")
    torch.manual_seed(0)
    m = marginops.CrystalLoss(8, 6, backend=backend)
    with torch.no_grad():
        m.bias[5] = NAN  # no label is 5: only lse_neg can carry it
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    assert math.isnan(m(x, torch.tensor([0, 1, 2, 3])).item())


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_functional_nan_scale_gives_nan(backend):
    if backend == "cpp" and CPP_REASON is not None:
        pytest.skip(f"C++ backend: {CPP_REASON}")
    g = torch.Generator().manual_seed(3)
    f = torch.nn.functional.normalize(torch.randn(4, 8, generator=g))
    w = torch.randn(6, 8, generator=g)
    labels = torch.tensor([0, 1, 2, 3])
    # A NaN scale tensor (e.g. a learnable scale that diverged) propagates...
    lse, _ = marginops.core.margin_lse(f, w, labels, torch.tensor(NAN), backend=backend)
    assert torch.isnan(lse).all(), lse
    # ...while a NaN Python number is a configuration error, named at once (issue 10 item 7).
    with pytest.raises(ValueError, match="scale"):
        marginops.core.margin_lse(f, w, labels, NAN, backend=backend)


# ------------------------------------------------------------------------------------ top-k NaN

def _topk_case(nan_rows, C=37, B=5, D=16):
    g = torch.Generator().manual_seed(11)
    f = torch.nn.functional.normalize(torch.randn(B, D, generator=g))
    w = torch.randn(C, D, generator=g)
    for r in nan_rows:
        w[r, 1] = NAN
    return f, w


def _expected_topk(f, w, exclude, k, normalize=True):
    """The contract's order by a plain sort over (NaN first, value descending, column ascending)."""
    d = f.double() @ (torch.nn.functional.normalize(w.double()) if normalize else w.double()).t()
    out = []
    for i in range(d.shape[0]):
        keys = [(0 if math.isnan(v) else 1, -v if not math.isnan(v) else 0.0, j)
                for j, v in enumerate(d[i].tolist()) if j != exclude[i]]
        out.append([j for _, _, j in sorted(keys)[:k]])
    return torch.tensor(out)


@pytest.mark.parametrize("k", [3, 36])
@pytest.mark.parametrize("nan_rows", [(20,), (30, 4)], ids=["one", "two"])
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_topk_nan_ranks_first_ties_by_column(backend, nan_rows, k, small_chunks):
    """k = 36 = every column but the excluded one: cpp used to leave an empty slot (column 2^63-1)
    because NaN beat nothing, and topk_dot then raised IndexError."""
    check_topk_nan(backend, nan_rows, k)


def check_topk_nan(backend, nan_rows, k):
    f, w = _topk_case(nan_rows)
    exclude = torch.tensor([0, 4, 36, 20, -1])
    vals, cols = backend.topk(f, w, exclude, k, True, 1)
    want = _expected_topk(f, w, exclude.tolist(), k)
    assert torch.equal(cols, want), (cols, want)
    for i in range(f.shape[0]):
        expected_nans = [r for r in sorted(nan_rows) if r != exclude[i]]
        assert cols[i, :len(expected_nans)].tolist() == expected_nans[:k]
        assert torch.isnan(vals[i, :len(expected_nans)]).all()
        assert not torch.isnan(vals[i, len(expected_nans):]).any()


@pytest.mark.parametrize("k", [1, 4, 9, 36])
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_topk_exact_ties_by_lower_column(backend, k, small_chunks):
    """Exactly equal values (integer features and weights, no normalisation: every dot product is
    exact in any summation order) across chunk boundaries, a NaN row among them: lower column
    first, on the chunk boundary of the running list too."""
    g = torch.Generator().manual_seed(2)
    f = torch.randint(-2, 3, (5, 8), generator=g).float()
    w = torch.randint(-2, 3, (37, 8), generator=g).float()
    w[[7, 15, 16, 30, 31, 36]] = w[2].clone()  # a class repeated in every chunk
    w[[9, 25]] = w[4].clone()
    w[20, 3] = NAN
    exclude = torch.tensor([15, -1, 2, 36, 0])
    vals, cols = backend.topk(f, w, exclude, k, False, 1)
    assert torch.equal(cols, _expected_topk(f, w, exclude.tolist(), k, normalize=False))
    assert torch.equal(torch.isnan(vals[:, 0]), exclude != 20) and vals.shape == (5, k)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_topk_dot_with_a_nan_row_all_columns(backend):
    if backend == "cpp" and CPP_REASON is not None:
        pytest.skip(f"C++ backend: {CPP_REASON}")
    f, w = _topk_case((3,), C=6, B=4, D=8)
    labels = torch.tensor([0, 1, 2, 3])
    vals, classes = marginops.core.topk_dot(f, w, 5, exclude=labels, backend=backend)
    want = _expected_topk(f, w, labels.tolist(), 5)
    assert torch.equal(classes, want)
    assert torch.isnan(vals[:3, 0]).all() and not torch.isnan(vals[3]).any()


# ------------------------------------------------------------------------------------ autocast

def _loss_and_grads(m, x, y, autocast: bool):
    m = copy.deepcopy(m)  # the same state for both runs (SphereFace advances its iteration)
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = m(x, y)
    loss.backward()  # outside the autocast region, as in a training loop
    return loss.detach(), x.grad, m.weight.grad


@pytest.mark.parametrize("family", ["ArcFaceLoss", "SphereFaceLoss"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_autocast_changes_nothing_inside_the_op(backend, family):
    """Under CPU bf16 autocast the op still computes in fp32 (forward and the recomputing
    backward alike), so loss and gradients equal the no-autocast fp32 run up to fp32 rounding —
    a bound 1000× below bf16's 2^-8 (the torch backend was off by 3.6 % with a bf16 forward GEMM)."""
    if backend == "cpp" and CPP_REASON is not None:
        pytest.skip(f"C++ backend: {CPP_REASON}")
    torch.manual_seed(0)
    m = getattr(marginops, family)(64, 500, backend=backend)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 64, generator=g) * (300.0 if family == "SphereFaceLoss" else 1.0)
    y = torch.randint(0, 500, (32,), generator=g)
    want = _loss_and_grads(m, x, y, autocast=False)
    got = _loss_and_grads(m, x, y, autocast=True)
    for name, a, b in zip(("loss", "grad x", "grad W"), got, want):
        assert a.dtype == b.dtype == torch.float32, name
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err <= 4e-6, f"{name}: relative error {err:.2e} under autocast"


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_autocast_softmax_of_the_backward_sums_to_one(backend):
    """Forward/backward consistency of the op itself: with a bias, Σ_c grad_bias_c = Σ_i grad_lse_i
    exactly when the backward's softmax (recomputed) is normalised by the forward's lse_neg."""
    g = torch.Generator().manual_seed(5)
    B, C, D = 16, 300, 32
    f = torch.nn.functional.normalize(torch.randn(B, D, generator=g))
    w = (torch.randn(C, D, generator=g) * 0.3).requires_grad_(True)
    bias = (torch.randn(C, generator=g) * 0.5).requires_grad_(True)
    scale = torch.full((B,), 64.0)
    target = torch.randint(0, C, (B,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lse, dot = backend.margin_lse(f, w, scale, bias, target, None, None, None, False, 1)
    grad_lse = torch.rand(B, generator=g) + 0.5
    (gb,) = torch.autograd.grad((lse, dot), (bias,), (grad_lse, torch.zeros(B)))
    assert lse.dtype == torch.float32
    torch.testing.assert_close(gb.sum(), grad_lse.sum(), rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------ zero embeddings

@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.float32], ids=["fp16W", "fp32W"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_all_zero_fp16_embedding_row_has_finite_gradients(backend, weight_dtype):
    """An all-zero fp16 row (a dead backbone output) used to get ±inf gradients (1/1e-12 cast to
    fp16) in every family; a GradScaler then skips every step. Now its gradient is exactly 0
    (test_normalize_rows_zero_row checks that the other rows' gradients are unchanged)."""
    if backend == "cpp" and CPP_REASON is not None:
        pytest.skip(f"C++ backend: {CPP_REASON}")
    from test_families import FAMILIES, make

    for name in FAMILIES:
        m = make(name, 8, 6, backend, dtype=weight_dtype)
        g = torch.Generator().manual_seed(4)
        x = torch.randn(4, 8, generator=g)
        x[1] = 0.0
        x = x.half().requires_grad_(True)
        loss = m(x, torch.tensor([0, 1, 2, 3]))
        loss.backward()
        assert torch.isfinite(loss), name
        assert torch.isfinite(x.grad).all(), f"{name}: {x.grad}"
        assert (x.grad[1] == 0).all(), name
        assert torch.isfinite(m.weight.grad).all(), name


def test_normalize_rows_zero_row():
    from marginops.functional import normalize_rows

    x = torch.tensor([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0], [NAN, 1.0, 0.0]],
                     dtype=torch.float64, requires_grad=True)
    x_hat, norms = normalize_rows(x)
    want = torch.nn.functional.normalize(x.detach(), eps=1e-12)
    assert torch.equal(x_hat[:2].detach(), want[:2]) and torch.isnan(x_hat[2]).all()
    assert torch.equal(norms[:2].detach(), torch.tensor([0.0, 5.0], dtype=torch.float64))
    (gx,) = torch.autograd.grad(x_hat[:2].sum() + norms[:2].sum(), x)
    assert torch.equal(gx[0], torch.zeros(3, dtype=torch.float64))
    ref = x.detach()[1:2].clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(torch.nn.functional.normalize(ref).sum() + ref.norm(), ref)
    assert_tight(gx[1], gr[0])


# ------------------------------------------------------------------------------ exact softplus

def _softplus_and_sigmoid_exact(x: float) -> tuple[float, float]:
    """log(1 + eˣ) and 1/(1 + e⁻ˣ) to 50 digits, rounded to fp64."""
    from decimal import Decimal, getcontext

    getcontext().prec = 50
    ex = Decimal(x).exp()
    return float((1 + ex).ln()), float(ex / (1 + ex))


@pytest.mark.parametrize("x", [25.0, 40.0, 20.5, 3.0, 0.0, -7.0, -40.0, -745.0])
def test_softmax_rows_is_exact_in_fp64(x):
    """F.softplus returned x unchanged above 20: at x = 25 that is off by e⁻²⁵ = 1.4e-11 (about
    4000 ulp). Now value and gradient (sigmoid) are correct to an ulp of fp64."""
    from marginops.functional import softmax_rows

    lse = torch.tensor([x + 1.5], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1.5], dtype=torch.float64)
    value = softmax_rows(lse, target)
    (grad,) = torch.autograd.grad(value.sum(), lse)
    want_value, want_grad = _softplus_and_sigmoid_exact(x)
    assert value.item() == pytest.approx(want_value, rel=4e-16, abs=1e-320)
    assert grad.item() == pytest.approx(want_grad, rel=4e-15, abs=1e-320)


def test_softmax_rows_without_negatives_is_zero():
    from marginops.functional import softmax_rows

    lse = torch.tensor([-INF, -INF], dtype=torch.float64, requires_grad=True)
    value = softmax_rows(lse, torch.tensor([0.3, -2.0], dtype=torch.float64))
    (grad,) = torch.autograd.grad(value.sum(), lse)
    assert torch.equal(value.detach(), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(grad, torch.zeros(2, dtype=torch.float64))


# ----------------------------------------------------------- Triton, in the interpreter (child)
# The same NaN checks for the Triton backend, run the way tests/test_triton_interpreter.py runs
# its checks: Triton fixes interpreter vs compiled mode when a kernel is defined, so a child
# pytest with TRITON_INTERPRET=1 runs the test_triton_* cases below.



def _triton_binding():
    import marginops.ops.triton as binding

    reason = binding.availability("triton", torch.device("cpu"))
    if reason is not None:  # a RuntimeError, not an AssertionError: never absorbed by the xfail
        raise RuntimeError(f"triton backend unavailable in the interpreter child: {reason}")
    return binding


@requires_interp
@pytest.mark.parametrize("col", [5, 36])
@pytest.mark.parametrize("kind", KINDS)
def test_triton_nan_in_nan_out(kind, col):
    check_nan_in_nan_out(_triton_binding(), kind, col, torch.float32)  # Triton has no fp64


@requires_interp
@pytest.mark.parametrize("nan_rows", [(20,), (30, 4)], ids=["one", "two"])
def test_triton_topk_nan_ranks_first_ties_by_column(nan_rows):
    check_topk_nan(_triton_binding(), nan_rows, 3)  # Triton's top-k takes k <= 16


@outside_interp
def test_triton_interpreter_child():
    tail = run_in_interpreter(__file__, "-k", "test_triton_ and not child")
    assert " passed" in tail or " xfailed" in tail, tail
