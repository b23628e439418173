"""The compiled core op (``torch.ops.marginops.margin_lse`` / ``topk``) against the dense oracle.

Backends "cpp" (CPU kernels) and "cuda" (CUDA kernels) of ``marginops.ops.cpp``; every check runs on
CPU here and again on CUDA where a GPU exists. Reference: tests/contract_oracle.py (materialises
the logits, autograd for the gradients). Tolerances: tests/tolerance.py.

Chunk boundaries: ``MARGINOPS_CPU_TILE_KB=1`` makes the CPU kernel use 16-column chunks at these
batch sizes, so C = 16·k ± 1 exercises partial chunks and several chunks per thread.
"""

from __future__ import annotations

import pytest
import torch
from contract_oracle import margin_lse_dense, topk_dense
from tolerance import MIN_GAP, assert_tight, assert_within_budget, cosines, routing_gap

from marginops.ops import cpp

_CPU_REASON = cpp.availability("cpp", torch.device("cpu"))


def runs_without_extension(fn):
    """Static checks of the sources run even when the extension cannot be built here."""
    fn.runs_without_extension = True
    return fn


@pytest.fixture(autouse=True)
def _needs_extension(request):
    if _CPU_REASON is not None and not getattr(request.function, "runs_without_extension", False):
        pytest.skip(f"C++ backend: {_CPU_REASON}")

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")]),
]


def _skip_unless_available(device: str) -> None:
    backend = "cpp" if device == "cpu" else "cuda"
    reason = cpp.availability(backend, torch.device(device))
    if reason is not None:
        pytest.skip(f"backend {backend!r}: {reason}")


@pytest.fixture
def small_chunks(monkeypatch):
    """16-column chunks on CPU, a few columns per chunk on CUDA (1 KiB tiles), so a handful of
    classes spans several chunks."""
    monkeypatch.setenv("MARGINOPS_CPU_TILE_KB", "1")
    monkeypatch.setenv("MARGINOPS_CUDA_TILE_KB", "1")


# ------------------------------------------------------------------------------------------------
# Case construction and comparison helpers
# ------------------------------------------------------------------------------------------------

def make_case(B, D, C, *, K=1, dtype=torch.float64, wdtype=None, bias=False, class_index=False,
              hard=False, normalize=True, scale=(1.0, 16.0), device="cpu", seed=0,
              no_target_rows=True):
    """Inputs of the low-level contract; features are unit rows like x̂."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    wdtype = wdtype or dtype
    f = torch.randn(B, D, generator=g, dtype=torch.float64)
    f = f / f.norm(dim=1, keepdim=True)
    w = torch.randn(C * K, D, generator=g, dtype=torch.float64)
    if not normalize:
        w = w * 0.3
    s = torch.empty(B, dtype=torch.float64).uniform_(*scale, generator=g)
    b = torch.randn(C, generator=g, dtype=torch.float64) * 0.5 if bias else None
    if class_index:
        ci = torch.randperm(C, generator=g)[: max(1, (2 * C) // 3)]
        N = ci.numel()
    else:
        ci, N = None, C
    tc = torch.randint(0, N, (B,), generator=g)
    if no_target_rows and B > 1:
        tc[::3] = -1
    tau = torch.empty(B, dtype=torch.float64).uniform_(-0.2, 0.3, generator=g) if hard else None
    t = torch.tensor(0.25, dtype=torch.float64) if hard else None
    case = dict(features=f.to(dtype), weight=w.to(wdtype), scale=s.to(acc),
                bias=None if b is None else b.to(acc), target_col=tc, class_index=ci,
                hard_tau=None if tau is None else tau.to(acc),
                hard_t=None if t is None else t.to(acc), normalize_weight=normalize, subcenters=K)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def case_gap(case, topk=None):
    """Routing gap (tests/tolerance.py) of a case: sub-centers, hard negatives, top-k."""
    cos = cosines(case["features"].cpu(), case["weight"].cpu(), case["subcenters"],
                  case["normalize_weight"])
    if case["class_index"] is not None:
        cos = cos[:, case["class_index"].cpu()]
    tau = None if case["hard_tau"] is None else case["hard_tau"].cpu()
    return routing_gap(cos, case["target_col"].cpu(), hard_tau=tau, topk=topk)


def needed_gap(case):
    """fp64 rounding (~1e-16) needs only a token gap; lower precisions need MIN_GAP."""
    low = torch.float64 not in (case["features"].dtype, case["weight"].dtype)
    return MIN_GAP if low else 1e-9


def gapped_case(*args, topk=None, seed=0, **kw):
    """make_case, moved to the next seed until every routing decision (best sub-center, hard
    negative, top-k set and order) is a needed_gap away from its switch, so that kernel and
    oracle, summing in different orders, route alike. The first seed is kept when it qualifies."""
    for attempt in range(1000):
        case = make_case(*args, seed=seed + 7919 * attempt, **kw)
        if case_gap(case, topk) >= needed_gap(case):
            return case
    raise AssertionError("no seed gives a routing gap: use fewer classes")


DIFF = ("features", "weight", "scale", "bias")


def run(fn, case, grad_seed=1):
    """Outputs and gradients of (features, weight, scale, bias) for random output cotangents."""
    inputs = {k: (v.detach().clone().requires_grad_(True) if k in DIFF and v is not None else v)
              for k, v in case.items()}
    lse, dot = fn(**inputs)
    g = torch.Generator().manual_seed(grad_seed)
    gl = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse)
    gd = torch.randn(dot.shape, generator=g, dtype=torch.float64).to(dot)
    leaves = [inputs[k] for k in DIFF if inputs[k] is not None]
    grads = torch.autograd.grad((lse, dot), leaves, (gl, gd))
    names = [k for k in DIFF if inputs[k] is not None]
    return {"lse_neg": lse.detach(), "dot_y": dot.detach(), **{f"grad_{n}": gr for n, gr in
                                                                 zip(names, grads)}}


def ours(**kw):
    return cpp.margin_lse(**kw)


def oracle(**kw):
    return margin_lse_dense(**kw)


def as_fp64(case):
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in case.items()}


def check_tight(case):
    got, want = run(ours, case), run(oracle, case)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert_tight(got[k], want[k], name=k)
    return got


def check_budget(case, dtype):
    """Low precision: error vs fp64 truth within 2× the same-precision oracle's error. Kernel and
    oracle sum in different orders, so the case must have a routing gap (gapped_case)."""
    assert case_gap(case) >= needed_gap(case), "build low-precision cases with gapped_case"
    got, base, truth = run(ours, case), run(oracle, case), run(oracle, as_fp64(case))
    for k in truth:
        assert got[k].dtype == base[k].dtype, k
        assert_within_budget(got[k], base[k], truth[k], dtype, name=k)
    return got


# ------------------------------------------------------------------------------------------------
# margin_lse: values and gradients against the oracle
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("class_index", [False, True])
@pytest.mark.parametrize("hard", [False, True])
def test_options_fp64(device, normalize, bias, K, class_index, hard, small_chunks):
    _skip_unless_available(device)
    dtype = torch.float64 if device == "cpu" else torch.float32
    case = gapped_case(7, 13, 41, K=K, dtype=dtype, bias=bias, class_index=class_index, hard=hard,
                       normalize=normalize, device=device)
    if device == "cpu":
        check_tight(case)
    else:
        check_budget(case, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,D,C,K", [
    (4, 3, 47, 1), (4, 3, 48, 1), (4, 3, 49, 1),      # C = 16·3 - 1, 16·3, 16·3 + 1
    (5, 13, 31, 2), (5, 13, 33, 2),                   # K = 2: 16-column chunks of 32 rows
    (3, 13, 5, 1),                                    # C smaller than one chunk
    (6, 13, 1, 1), (6, 13, 1, 3),                     # C = 1 (rows with the target: no negatives)
    (1, 13, 40, 1), (1, 3, 17, 3),                    # B = 1
])
def test_shapes(device, B, D, C, K, small_chunks):
    _skip_unless_available(device)
    dtype = torch.float64 if device == "cpu" else torch.float32
    case = gapped_case(B, D, C, K=K, dtype=dtype, bias=True, hard=True, device=device, seed=B + C)
    got = check_tight(case) if device == "cpu" else check_budget(case, dtype)
    if C == 1:  # a row whose target is the only class has no negatives: −inf, and no NaN
        has_t = case["target_col"] >= 0
        assert torch.isneginf(got["lse_neg"][has_t]).all()
        assert torch.isfinite(got["grad_features"]).all()


def test_default_chunking_many_chunks():
    """Default tile sizes, with more chunks than threads (several per group)."""
    case = make_case(3, 5, 9000, K=1, bias=True, class_index=True, hard=True, seed=3)
    check_tight(case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fdtype,wdtype", [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),    # bf16 activations, fp32 master weights
    (torch.float32, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
])
def test_low_precision_within_budget(device, fdtype, wdtype, small_chunks):
    _skip_unless_available(device)
    case = gapped_case(6, 13, 45, K=2, dtype=fdtype, wdtype=wdtype, bias=True, hard=True,
                       class_index=True, device=device, scale=(8.0, 32.0))
    got = check_budget(case, fdtype if fdtype != torch.float32 else wdtype)
    assert got["grad_features"].dtype == fdtype and got["grad_weight"].dtype == wdtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_cosines_scale_64(device, dtype, small_chunks):
    """Features equal to a class weight (cos = 1) and to its negation (cos = −1), at s = 64."""
    _skip_unless_available(device)
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("the CUDA kernels take bf16/fp16/fp32")
    case = make_case(6, 13, 40, dtype=dtype, device=device, scale=(64.0, 64.0), seed=5,
                     no_target_rows=False)
    w = case["weight"]
    wn = w / w.norm(dim=1, keepdim=True)
    f = case["features"].clone()
    f[0], f[1], f[2] = wn[7], -wn[7], wn[case["target_col"][2]]   # hit a negative, its opposite,
    f[3] = wn[case["target_col"][3]] * -1.0                        # the target, minus the target
    case["features"] = f
    got = check_tight(case) if dtype == torch.float64 else check_budget(case, dtype)
    for k, v in got.items():
        assert torch.isfinite(v).all(), k


@pytest.mark.parametrize("device", DEVICES)
def test_class_index_gradient_exactly_zero_elsewhere(device):
    _skip_unless_available(device)
    dtype = torch.float64 if device == "cpu" else torch.float32
    case = make_case(5, 13, 30, K=2, dtype=dtype, class_index=True, bias=True, device=device)
    got = run(ours, case)
    sampled = torch.zeros(30, dtype=torch.bool, device=device)
    sampled[case["class_index"]] = True
    gw = got["grad_weight"].view(30, 2, 13)
    assert (gw[~sampled] == 0).all()
    assert (gw[sampled].abs().sum(dim=(1, 2)) > 0).all()
    assert (got["grad_bias"][~sampled] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_class_index_accumulates(device, small_chunks):
    """The contract: repeated classes are separate columns whose gradients add up (grad_W rows,
    grad_bias), on every backend — the CUDA op overwrote rows and raced on grad_bias. CPU: the
    cpp op and the torch backend's op, tight in fp64; CUDA: fp32 within budget."""
    from marginops.ops import torch_chunked

    _skip_unless_available(device)
    dtype = torch.float64 if device == "cpu" else torch.float32
    case = make_case(5, 13, 40, K=2, bias=True, hard=True, dtype=dtype, device=device)
    case["class_index"] = torch.tensor([3, 17, 3, 30, 17, 5] * 4 + [39, 0], device=device)
    tc = case["target_col"]
    case["target_col"] = torch.where(tc >= 0, tc % 26, tc)
    if device == "cpu":
        check_tight(case)
        got, want = run(torch_chunked.margin_lse, case), run(oracle, case)
        for k in want:
            assert_tight(got[k], want[k], name=f"torch backend {k}")
        return
    got, base, truth = run(ours, case), run(oracle, case), run(oracle, as_fp64(case))
    for k in truth:
        assert_within_budget(got[k], base[k], truth[k], dtype, name=k)


@pytest.mark.parametrize("device", DEVICES)
def test_ignored_rows(device):
    """target_col = −1: dot_y = 0, every column is a negative, grad_dot has no effect."""
    _skip_unless_available(device)
    dtype = torch.float64 if device == "cpu" else torch.float32
    case = make_case(4, 13, 20, dtype=dtype, device=device)
    case["target_col"] = torch.full_like(case["target_col"], -1)
    got = check_tight(case) if device == "cpu" else check_budget(case, dtype)
    assert (got["dot_y"] == 0).all()


def test_deterministic(small_chunks):
    case = make_case(9, 13, 200, K=2, dtype=torch.float32, bias=True, hard=True)
    a, b = run(ours, case), run(ours, case)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_inputs_not_mutated():
    case = make_case(5, 13, 40, dtype=torch.float32, bias=True, hard=True, class_index=True)
    before = {k: v.clone() for k, v in case.items() if isinstance(v, torch.Tensor)}
    run(ours, case)
    for k, v in before.items():
        assert torch.equal(case[k], v), k


# ------------------------------------------------------------------------------------------------
# Autograd: gradcheck through the registered op, needs_input_grad, no bias
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("K,hard,normalize,class_index,bias", [
    (1, False, True, False, True),
    (2, True, True, True, True),
    (1, True, False, False, False),
    (3, False, False, True, True),
])
def test_gradcheck_fp64(K, hard, normalize, class_index, bias, small_chunks):
    case = make_case(4, 5, 35, K=K, bias=bias, hard=hard, normalize=normalize,
                     class_index=class_index, scale=(1.0, 3.0), seed=11)
    diff = [k for k in DIFF if case[k] is not None]

    def fn(*tensors):
        kw = dict(case)
        kw.update(zip(diff, tensors))
        return torch.ops.marginops.margin_lse(*(kw[k] for k in (
            "features", "weight", "scale", "bias", "target_col", "class_index", "hard_tau",
            "hard_t", "normalize_weight", "subcenters")))

    inputs = tuple(case[k].clone().requires_grad_(True) for k in diff)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_partial_requires_grad():
    """Only the weight needs a gradient; bias None; the op still differentiates correctly."""
    case = make_case(4, 13, 30, bias=False)
    w = case["weight"].clone().requires_grad_(True)
    lse, dot = cpp.margin_lse(**{**case, "weight": w})
    (gw,) = torch.autograd.grad(lse.sum() + dot.sum(), [w])
    w2 = case["weight"].clone().requires_grad_(True)
    lse2, dot2 = margin_lse_dense(**{**case, "weight": w2})
    (gw2,) = torch.autograd.grad(lse2.sum() + dot2.sum(), [w2])
    assert_tight(gw, gw2, name="grad_weight")


# ------------------------------------------------------------------------------------------------
# opcheck: schema, fake kernels, autograd registration, AOT dispatch
# ------------------------------------------------------------------------------------------------

ARGS = ("features", "weight", "scale", "bias", "target_col", "class_index", "hard_tau", "hard_t",
        "normalize_weight", "subcenters")


def _opcheck_samples(device):
    dtype = torch.float64 if device == "cpu" else torch.float32
    return [
        make_case(4, 13, 20, dtype=dtype, device=device),
        make_case(5, 7, 9, K=2, dtype=dtype, bias=True, hard=True, class_index=True,
                  device=device, seed=2),
        make_case(3, 5, 11, dtype=torch.float32, wdtype=torch.bfloat16, normalize=False,
                  device=device, seed=3),
        make_case(2, 5, 6, dtype=torch.bfloat16, wdtype=torch.float32, bias=True, device=device,
                  seed=4),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_margin_lse(device):
    _skip_unless_available(device)
    for i, case in enumerate(_opcheck_samples(device)):
        args = tuple(case[k] for k in ARGS)
        if i % 2 == 0:  # with and without inputs that require grad
            args = tuple(a.clone().requires_grad_(True) if k in ("features", "weight", "scale")
                         else a for k, a in zip(ARGS, args))
        torch.library.opcheck(torch.ops.marginops.margin_lse.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_margin_lse_backward(device):
    _skip_unless_available(device)
    for case in _opcheck_samples(device):
        lse, _ = torch.ops.marginops.margin_lse(*(case[k] for k in ARGS))
        acc = lse.dtype
        B = lse.shape[0]
        g = torch.Generator().manual_seed(0)
        gl = torch.randn(B, generator=g).to(device=device, dtype=acc)
        gd = torch.randn(B, generator=g).to(device=device, dtype=acc)
        torch.library.opcheck(torch.ops.marginops.margin_lse_backward.default,
                              (gl, gd, lse, *(case[k] for k in ARGS)))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_topk(device):
    _skip_unless_available(device)
    for case, k in zip(_opcheck_samples(device), (3, 1, 5, 4)):
        torch.library.opcheck(torch.ops.marginops.topk.default,
                              (case["features"], case["weight"], case["target_col"], k,
                               case["normalize_weight"], case["subcenters"]))


def test_torch_compile_fullgraph():
    """A margin loss over the op compiles without graph breaks and matches eager."""
    case = make_case(6, 13, 50, dtype=torch.float32, bias=True)

    def loss_fn(f, w, s, b, tc):
        lse, dot = torch.ops.marginops.margin_lse(f, w, s, b, tc, None, None, None, True, 1)
        target = s * torch.cos(torch.acos(dot.clamp(-1 + 1e-6, 1 - 1e-6)) + 0.3)
        return torch.nn.functional.softplus(lse - target).mean()

    def grads(fn):
        leaves = [case[k].clone().requires_grad_(True) for k in ("features", "weight", "bias")]
        loss = fn(leaves[0], leaves[1], case["scale"], leaves[2], case["target_col"])
        return [loss.detach(), *torch.autograd.grad(loss, leaves)]

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for a, b in zip(grads(compiled), grads(loss_fn)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# topk
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,D,C,K,k,normalize", [
    (5, 13, 47, 1, 5, True), (5, 13, 49, 2, 7, False), (1, 3, 20, 1, 1, True),
    (4, 13, 70, 3, 16, True), (3, 5, 6, 1, 6, True),
])
def test_topk_matches_dense(device, B, D, C, K, k, normalize, small_chunks):
    _skip_unless_available(device)
    dtype = torch.float64 if device == "cpu" else torch.float32
    # indices compared with torch.equal: the top-k set and order need a gap (gapped_case)
    case = gapped_case(B, D, C, K=K, dtype=dtype, normalize=normalize, device=device, seed=C,
                       topk=k)
    args = (case["features"], case["weight"], case["target_col"], k, normalize, K)
    v, c = cpp.topk(*args)
    v2, c2 = topk_dense(*args)
    assert v.dtype == v2.dtype and c.dtype == torch.long
    assert torch.equal(c, c2)
    if dtype == torch.float64:
        assert_tight(v, v2, name="values")
    else:
        torch.testing.assert_close(v, v2, rtol=1e-5, atol=1e-5)
    # the excluded column never appears with a finite value
    hit = (c == case["target_col"][:, None]) & torch.isfinite(v)
    assert not hit.any()


@pytest.mark.parametrize("device", DEVICES)
def test_topk_ties_lower_column_first(device, small_chunks):
    _skip_unless_available(device)
    dtype = torch.float64 if device == "cpu" else torch.float32
    f = torch.randn(3, 5, dtype=dtype, device=device)
    w = torch.randn(40, 5, dtype=dtype, device=device)
    # identical rows in different chunks: equal values. Integer entries make every dot product
    # and norm exact, so the tie is exact whatever order a chunk's GEMM sums in.
    w[2] = torch.tensor([1.0, -2.0, 0.0, 3.0, 1.0], dtype=dtype, device=device)
    w[33] = w[2]
    w[20] = w[2]
    f[:] = w[2]
    v, c = cpp.topk(f, w, torch.tensor([-1, 20, 2], device=device), 3, True, 1)
    assert c[0].tolist() == [2, 20, 33]
    assert c[1].tolist() == [2, 33, c[1, 2].item()]
    assert c[2].tolist()[:2] == [20, 33]
    assert v[0, 0] == v[0, 1] == v[0, 2]


# ------------------------------------------------------------------------------------------------
# Backend reporting
# ------------------------------------------------------------------------------------------------

def test_availability_messages():
    assert cpp.availability("cpp", torch.device("cpu")) is None
    assert "CUDA tensors" in cpp.availability("cuda", torch.device("cpu"))
    assert "CPU tensors" in cpp.availability("cpp", torch.device("cuda"))
    if not torch._C._dispatch_has_kernel_for_dispatch_key("marginops::margin_lse", "CUDA"):
        assert "without CUDA" in cpp.availability("cuda", torch.device("cuda"))


# A build that fails (warning once, backend unavailable, auto falls back): tests/test_install.py


# ------------------------------------------------------------------------------------------------
# CUDA op: device discipline (issue 11 item 3)
# ------------------------------------------------------------------------------------------------

_CU = __import__("pathlib").Path(__file__).parent.parent / "marginops" / "csrc" / "cuda" / "margin_lse.cu"


@runs_without_extension
def test_cuda_prepare_checks_every_tensor_device_then_guards():
    """Static check of margin_lse.cu (no GPU here): prepare() checks the device of every tensor
    argument before anything touches a pointer, then sets the device guard; every entry point goes
    through it, and the backward also checks its extra tensors."""
    import re

    src = _CU.read_text()
    body = src[src.index("inline Prepared prepare("):]
    body = body[:body.index("\n}\n")]
    params = re.findall(r"(?:Tensor|std::optional<Tensor>)&\s+(\w+)", body[:body.index("{")])
    assert {"features", "weight", "scale", "bias", "target_col", "class_index", "hard_tau",
            "hard_t"} <= set(params)
    for name in params:
        if name != "features":
            assert re.search(rf"check_device\({name},", body), f"prepare() never checks {name}"
    assert body.index("check_device(") < body.index("guard.set_device") < body.index(".contiguous()")
    for entry in ("margin_lse_cuda(", "margin_lse_backward_cuda(", "topk_cuda("):
        fn = src[src.index(f"{entry}"):]
        fn = fn[:fn.index("\n}\n")]
        assert "OptionalCUDAGuard guard;" in fn and "prepare(guard," in fn, entry
    bwd = src[src.index("margin_lse_backward_cuda("):]
    for name in ("grad_lse", "grad_dot", "lse_neg"):
        assert f"check_device({name}," in bwd, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["weight", "scale", "bias", "target_col", "class_index",
                                  "hard_tau", "hard_t"])
def test_cuda_op_refuses_a_tensor_on_another_device(name):
    """A CPU tensor among CUDA inputs raised an illegal-address fault (dead context) before."""
    _skip_unless_available("cuda")
    case = make_case(5, 16, 30, dtype=torch.float32, bias=True, class_index=True, hard=True,
                     device="cuda")
    case[name] = case[name].cpu()
    with pytest.raises(RuntimeError, match=name):
        torch.ops.marginops.margin_lse(*(case[k] for k in (
            "features", "weight", "scale", "bias", "target_col", "class_index", "hard_tau",
            "hard_t", "normalize_weight", "subcenters")))
    torch.cuda.synchronize()  # the context is still alive


def _fp32_copy_problems(src: str, gemm_src: str) -> list[str]:
    """Why margin_lse.cu (``src``) / tc_gemm.h (``gemm_src``) would run GEMMs on fp32 copies."""
    problems = []
    body = src[src.index("inline Prepared prepare("):]
    body = body[:body.index("\n}\n")]
    for name in ("features", "weight"):
        line = next(ln for ln in body.splitlines() if f"= {name}.detach()" in ln)
        if ".to(" in line:
            problems.append(f"prepare() converts {name}: {line.strip()}")
    for call in ("at::mm", "mm_out(", "addmm", "matmul("):
        if call in src:
            problems.append(f"margin_lse.cu calls {call} (ATen GEMM in the tile's dtype)")
    if "cublasGemmEx" not in gemm_src or "CUBLAS_COMPUTE_32F_FAST_TF32" not in gemm_src:
        problems.append("tc_gemm.h: no cublasGemmEx with a TF32 compute type")
    if "allowTF32CuBLAS()" not in gemm_src or "l2CacheSize" not in gemm_src:
        problems.append("tc_gemm.h: TF32 not tied to torch's switch, or chunks not sized to L2")
    return problems


@runs_without_extension
def test_cuda_gemms_read_the_inputs_in_their_dtype():
    """Static check (no GPU here) of issue 12's cuda item: F and W reach the GEMMs in their own
    dtype (no fp32 copies, no ATen fp32 GEMMs), through cublasGemmEx with fp32 output, TF32 only
    by torch's switch, chunks sized from the device's L2. tests/test_cuda_gpu.py checks the
    numbers on a GPU."""
    gemm = (_CU.parent / "tc_gemm.h").read_text() if (_CU.parent / "tc_gemm.h").exists() else ""
    assert _fp32_copy_problems(_CU.read_text(), gemm) == []
