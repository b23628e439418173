"""The Triton backend in Triton's CPU interpreter against the dense oracle (tests/contract_oracle.py).

Triton fixes interpreter vs compiled mode when a kernel is *defined*, so these checks need
TRITON_INTERPRET=1 in the environment before anything imports marginops.triton. Two ways to run:

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_triton_interpreter.py   # direct
    .venv/bin/python -m pytest tests/                                                 # whole suite

In a process without the variable (the normal suite), every check here is skipped except
``test_interpreter_subprocess``, which re-runs this file in a child pytest with TRITON_INTERPRET=1,
so the rest of the suite keeps compiled-mode Triton and never sees the variable.

Shapes are small and odd (B = 5, 37; C = 1, 129, 1000; D = 3, 40, 130) with 16×16×16 tiles and
several class splits, so every case crosses tile and split boundaries. bf16 is not run here
(``tl.dot`` on bf16 is wrong in the interpreter); its code path is the fp16 one, and
tests/test_triton_aot.py compiles it.
"""

from __future__ import annotations

import time

import pytest
import torch
from contract_oracle import margin_lse_dense, topk_dense
from interpreter import INTERP, outside_interp, run_in_interpreter
from tolerance import MIN_GAP, assert_within_budget, routing_gap

# numpy warns on log(0) inside the interpreter even where tl.where discards the result
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")

requires_interp = pytest.mark.skipif(
    not INTERP, reason="runs under TRITON_INTERPRET=1 (see test_interpreter_subprocess)")


@outside_interp
def test_interpreter_subprocess():
    t0 = time.time()
    tail = run_in_interpreter(__file__)
    print(f"interpreter run took {time.time() - t0:.0f}s\n{tail}")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _ops():
    import marginops.ops.triton as binding

    assert binding.availability("triton", torch.device("cpu")) is None
    return binding


def _near_ties(p, topk=None):
    """(B,) rows with a routing decision (best sub-center, hard negative, top-k set and order)
    within MIN_GAP of its switch, in fp64 or after rounding the inputs to fp16 (tolerance.py)."""
    near = torch.zeros(p["f"].shape[0], dtype=torch.bool)
    for dtype in (torch.float64, torch.float16):
        w = p["w"].to(dtype).double()
        if p["normalize"]:
            w = torch.nn.functional.normalize(w, dim=1)
        d = (p["f"].to(dtype).double() @ w.t()).view(p["f"].shape[0], -1, p["K"])
        if p["cidx"] is not None:
            d = d[:, p["cidx"]]
        for i in range(d.shape[0]):
            tau = None if p["tau"] is None else p["tau"][i:i + 1]
            near[i] |= routing_gap(d[i:i + 1], p["tcol"][i:i + 1], hard_tau=tau,
                                   topk=topk) < MIN_GAP
    return near


def _problem(B, C, D, K=1, *, normalize=True, bias=False, index=False, hard=False,
             zero_row=False, seed=0, topk=None):
    """Leaf tensors in fp64 (truth) plus the non-differentiable contract inputs. Kernel, oracle
    and truth sum in different orders and precisions, so feature rows with a near-tie in any
    routing decision are redrawn (``_near_ties``)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, D, generator=g, dtype=torch.float64)
    if normalize:
        f = f / f.norm(dim=1, keepdim=True)  # face embeddings are normalised before the op
    w = torch.randn(C * K, D, generator=g, dtype=torch.float64) * (1.0 if normalize else 0.3)
    if zero_row:
        w[1] = 0.0  # ‖W_r‖ = 0: the Jacobian must degrade to G_r / 1e-12 without NaN
    scale = torch.rand(B, generator=g, dtype=torch.float64) * 40 + 8
    b = torch.randn(C, generator=g, dtype=torch.float64) if bias else None
    if index:
        cidx = torch.randperm(C, generator=g)[: max(C // 2, 1)]
        N = cidx.numel()
    else:
        cidx, N = None, C
    tcol = torch.randint(0, N, (B,), generator=g)
    tcol[::4] = -1  # ignored rows / target outside this shard
    tau = torch.rand(B, generator=g, dtype=torch.float64) * 0.3 if hard else None
    if hard:
        tau[1::5] = float("inf")  # hard negatives disabled on some rows
    t = torch.tensor(0.2, dtype=torch.float64) if hard else None
    p = dict(f=f, w=w, scale=scale, bias=b, tcol=tcol, cidx=cidx, tau=tau, t=t,
             normalize=normalize, K=K)
    for _ in range(100):
        near = _near_ties(p, topk)
        if not near.any():
            return p
        fresh = torch.randn(int(near.sum()), D, generator=g, dtype=torch.float64)
        f[near] = fresh / fresh.norm(dim=1, keepdim=True) if normalize else fresh
    raise AssertionError(f"no feature rows with a routing gap of {MIN_GAP} in 100 draws")


def _run(fn, p, fdt, wdt, grad_lse, grad_dot):
    """Forward + backward of ``fn`` with the float leaves cast to (fdt, wdt, acc)."""
    acc = torch.float64 if fdt == torch.float64 else torch.float32
    f = p["f"].to(fdt).requires_grad_()
    w = p["w"].to(wdt).requires_grad_()
    scale = p["scale"].to(acc).requires_grad_()
    bias = p["bias"].to(acc).requires_grad_() if p["bias"] is not None else None
    tau = p["tau"].to(acc) if p["tau"] is not None else None
    t = p["t"].to(acc) if p["t"] is not None else None
    lse, dot = fn(f, w, scale, bias, p["tcol"], p["cidx"], tau, t, p["normalize"], p["K"])
    finite = torch.isfinite(lse)
    loss = (torch.where(finite, lse, 0.0) * grad_lse.to(acc)).sum() + (dot * grad_dot.to(acc)).sum()
    leaves = [f, w, scale] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(loss, leaves)
    return [lse.detach(), dot.detach()] + [gr.detach() for gr in grads]


NAMES = ["lse_neg", "dot_y", "grad_features", "grad_weight", "grad_scale", "grad_bias"]


def _compare(p, dtype, wdtype=None, splits=3, cfg=None, check_lse_grad=True, resident=None,
             factors=None):
    from marginops.triton import configs

    wdtype = wdtype or dtype
    B = p["f"].shape[0]
    g = torch.Generator().manual_seed(1)
    grad_lse = torch.randn(B, generator=g, dtype=torch.float64)
    grad_dot = torch.randn(B, generator=g, dtype=torch.float64)
    if not check_lse_grad:
        grad_lse.zero_()  # rows without any negative column: the oracle's logsumexp grad is NaN
    truth = _run(margin_lse_dense, p, torch.float64, torch.float64, grad_lse, grad_dot)
    base = _run(margin_lse_dense, p, dtype, wdtype, grad_lse, grad_dot)
    forced = {k: cfg for k in ("fwd", "bwd_df", "bwd_dw", "merge")} if cfg else {}
    with configs.force(splits=splits, resident=resident, **forced):
        ours = _run(_ops().margin_lse, p, dtype, wdtype, grad_lse, grad_dot)
    assert ours[0].dtype == torch.float32 and ours[2].dtype == dtype and ours[3].dtype == wdtype
    # the ±inf pattern of lse_neg must agree exactly; finite values within budget
    assert torch.equal(torch.isfinite(ours[0]), torch.isfinite(truth[0]))
    fin = torch.isfinite(truth[0])
    ours[0], base[0], truth[0] = ours[0][fin], base[0][fin], truth[0][fin]
    for name, a, b_, t in zip(NAMES, ours, base, truth):
        assert torch.isfinite(a).all(), name
        assert_within_budget(a, b_, t, dtype, factor=(factors or {}).get(name, 2.0),
                             name=f"{name} ({dtype})")
    if p["cidx"] is not None:  # Partial FC: rows never iterated get exactly zero gradient
        C = p["w"].shape[0] // p["K"]
        untouched = torch.ones(C, dtype=torch.bool)
        untouched[p["cidx"]] = False
        rows = untouched.repeat_interleave(p["K"])
        assert (ours[3][rows] == 0).all()
        if p["bias"] is not None:
            assert (ours[5][untouched] == 0).all()


# ---------------------------------------------------------------------------------------------
# margin_lse forward + backward vs the oracle
# ---------------------------------------------------------------------------------------------

CASES = {
    # id: (B, C, D, K, options)
    "plain-37x129x40": (37, 129, 40, 1, {}),
    "all-options-K3": (37, 129, 40, 3, dict(bias=True, index=True, hard=True)),
    "unnormalized-bias-5x1000x130": (5, 1000, 130, 1, dict(normalize=False, bias=True)),
    "hard-D3-37x1000": (37, 1000, 3, 1, dict(hard=True)),
    "index-K3-unnormalized-5x129x130": (5, 129, 130, 3, dict(normalize=False, index=True,
                                                              bias=True)),
    "zero-weight-row": (5, 129, 40, 1, dict(zero_row=True, bias=True)),
}


@requires_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_margin_lse_matches_oracle(case, dtype):
    B, C, D, K, opts = CASES[case]
    if dtype == torch.float16 and case == "unnormalized-bias-5x1000x130":
        pytest.skip("covered in fp32; keeps the interpreter run short")
    # zero row in fp16: fp32 master weights (G/1e-12 overflows an fp16 grad_W on any backend);
    # the feature gradient was NaN there (dd/wn = ±inf in fp16 times the zero row)
    wdtype = torch.float32 if case == "zero-weight-row" else None
    _compare(_problem(B, C, D, K, **opts), dtype, wdtype)


@requires_interp
def test_fp32_master_weights_with_half_features():
    """Autocast layout: fp16 features, fp32 weight read as is and converted tile by tile."""
    _compare(_problem(37, 129, 40, 1, bias=True, hard=True), torch.float16, torch.float32)


@requires_interp
def test_single_class_and_all_targets():
    """C = 1: rows whose target is the only class have no negative column (lse_neg = -inf)."""
    p = _problem(5, 1, 3)
    p["tcol"] = torch.tensor([0, -1, 0, 0, -1])
    _compare(p, torch.float32, check_lse_grad=False)


@requires_interp
@pytest.mark.parametrize("splits", [1, 7])
def test_split_counts(splits):
    _compare(_problem(37, 129, 40, 1, bias=True, hard=True), torch.float32, splits=splits)


@requires_interp
def test_gpu_default_tiles():
    """The GPU default configuration's tile sizes (larger than the problem: masks everywhere)."""
    from marginops.triton import configs

    p = _problem(37, 129, 40, 3, bias=True, index=True, hard=True)
    for kernel in ("fwd", "bwd_df", "bwd_dw"):
        with configs.force(**{kernel: configs.default(kernel, "half")}):
            _compare(p, torch.float32, splits=2)


@requires_interp
def test_empty_class_index():
    binding = _ops()
    f = torch.randn(5, 16, requires_grad=True)
    w = torch.randn(10, 16, requires_grad=True)
    scale = torch.full((5,), 30.0, requires_grad=True)
    lse, dot = binding.margin_lse(f, w, scale, None, torch.full((5,), -1), torch.empty(0,
                                  dtype=torch.int64), None, None, True, 1)
    assert torch.isneginf(lse).all() and (dot == 0).all()
    (dot.sum()).backward()
    assert (f.grad == 0).all() and (w.grad == 0).all()


@requires_interp
def test_fp64_is_refused_clearly():
    binding = _ops()
    f = torch.randn(5, 16, dtype=torch.float64)
    w = torch.randn(10, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        binding.margin_lse(f, w, torch.ones(5, dtype=torch.float64), None,
                           torch.zeros(5, dtype=torch.int64), None, None, None, True, 1)


# ---------------------------------------------------------------------------------------------
# topk
# ---------------------------------------------------------------------------------------------


@requires_interp
@pytest.mark.parametrize("k,K,normalize,B,C,D", [(5, 3, True, 37, 129, 40), (16, 1, False, 5, 1000, 130),
                                               (1, 1, True, 37, 129, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_topk_matches_oracle(k, K, normalize, B, C, D, dtype):
    from marginops.triton import configs

    p = _problem(B, C, D, K, normalize=normalize, topk=k)  # columns compared exactly below
    excl = p["tcol"]
    f, w = p["f"].to(dtype), p["w"].to(dtype)
    with configs.force(splits=3):
        vals, cols = _ops().topk(f, w, excl, k, normalize, K)
    assert vals.shape == (B, k) and vals.dtype == torch.float32 and cols.dtype == torch.int64
    tv, tc = topk_dense(f.double(), w.double(), excl, k, normalize, K)
    bv, _ = topk_dense(f, w, excl, k, normalize, K)
    assert_within_budget(vals, bv, tv, dtype, name="topk values")
    assert (vals[:, :-1] >= vals[:, 1:]).all()  # descending
    assert not (cols == excl[:, None]).any()  # the label is excluded
    if dtype == torch.float32:
        assert torch.equal(cols, tc)
    else:  # near-ties may swap in half precision: our columns must carry the values we report
        from contract_oracle import dense_cosines
        d = dense_cosines(f, w, None, normalize, K)
        assert_within_budget(d.gather(1, cols), bv, tv, dtype, name="topk columns")


@requires_interp
def test_topk_ties_prefer_lower_column():
    f = torch.ones(3, 16)
    w = torch.ones(40, 16)  # every cosine equal
    vals, cols = _ops().topk(f, w, torch.tensor([-1, 0, 5]), 4, True, 1)
    assert cols.tolist() == [[0, 1, 2, 3], [1, 2, 3, 4], [0, 1, 2, 3]]
    assert torch.allclose(vals, torch.full_like(vals, 4.0))


# ---------------------------------------------------------------------------------------------
# registered ops: schema, fake kernels, autograd registration
# ---------------------------------------------------------------------------------------------


@requires_interp
def test_opcheck_margin_lse():
    _ops()
    p = _problem(5, 20, 16, 2, bias=True, index=True, hard=True)
    args = (p["f"].float().requires_grad_(), p["w"].float().requires_grad_(),
            p["scale"].float().requires_grad_(), p["bias"].float().requires_grad_(), p["tcol"],
            p["cidx"], p["tau"].float(), p["t"].float(), True, 2)
    torch.library.opcheck(torch.ops.marginops.margin_lse_triton.default, args)
    plain = (args[0], args[1], args[2], None, p["tcol"].clamp(max=19), None, None, None, False, 1)
    torch.library.opcheck(torch.ops.marginops.margin_lse_triton.default, plain)


@requires_interp
def test_opcheck_backward_and_topk():
    _ops()
    p = _problem(5, 20, 16, 1, bias=True)
    f, w, s, b = p["f"].float(), p["w"].float(), p["scale"].float(), p["bias"].float()
    lse, _ = torch.ops.marginops.margin_lse_triton(f, w, s, b, p["tcol"], None, None, None,
                                                    True, 1)
    torch.library.opcheck(torch.ops.marginops.margin_lse_triton_backward.default,
                          (torch.randn(5), torch.randn(5), lse, f, w, s, b, p["tcol"], None,
                           None, None, True, 1))
    torch.library.opcheck(torch.ops.marginops.topk_triton.default, (f, w, p["tcol"], 3, True, 1))


# ---------------------------------------------------------------------------------------------
# every family through backend="triton", against the independent reference
# ---------------------------------------------------------------------------------------------


@requires_interp
def test_every_family_through_triton():
    from test_families import FAMILIES, compare, gapped_batch, make

    B, D, C = 5, 8, 20
    for name in FAMILIES:
        truth_module = make(name, D, C, "torch")
        x, y = gapped_batch(name, truth_module, B, D, C)  # fp32 vs fp64: no near-ties
        (lt, gt), _ = compare(name, truth_module, x, y)
        ours = make(name, D, C, "triton", dtype=torch.float32)
        (l32, g32), (lb, gb) = compare(name, ours, x.float(), y)
        assert_within_budget(l32, lb, lt, torch.float32, name=f"{name} loss")
        for i, (a, b, t) in enumerate(zip(g32, gb, gt)):
            assert_within_budget(a, b, t, torch.float32, name=f"{name} grad {i}")


# ---------------------------------------------------------------------------------------------
# issue 11: defects found by review of the GPU path
# ---------------------------------------------------------------------------------------------


@requires_interp
@pytest.mark.parametrize("api", ["cuda.matmul", "global"])
def test_fp32_call_under_new_tf32_api(api):
    """torch's new precision API (``fp32_precision = "tf32"``) made reading the legacy
    ``allow_tf32`` raise "mix of the legacy and new APIs", so every fp32 call failed."""
    from marginops.triton import margin_lse as ml

    owner = torch.backends.cuda.matmul if api == "cuda.matmul" else torch.backends
    if not hasattr(owner, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    saved = owner.fp32_precision
    owner.fp32_precision = "tf32"
    try:
        p = _problem(5, 20, 16)
        assert ml._dot_precision(p["f"].float()) == "tf32"
        lse, _dot = _ops().margin_lse(p["f"].float(), p["w"].float(), p["scale"].float(), None,
                                      p["tcol"], None, None, None, True, 1)
        assert torch.isfinite(lse).all()
    finally:
        owner.fp32_precision = saved


@requires_interp
def test_duplicate_class_index_accumulates():
    """Partial FC with a class sampled twice: its gradient is the sum of both columns' (the
    oracle indexes the dense logits with class_index, so autograd accumulates the same way)."""
    p = _problem(37, 40, 24, 2, bias=True, index=True, hard=True)
    p["cidx"] = torch.tensor([3, 7, 3, 11, 7, 7, 0, 39, 3, 20, 21, 22, 23, 24, 25, 26, 27, 3])
    p["tcol"] = p["tcol"].clamp(max=p["cidx"].numel() - 1)
    _compare(p, torch.float32, splits=2)


def _fraction_zero_rows(fn, p, dtype):
    """Forward + backward with the issue's numbers (grad_lse = 1/8192, s = 64, no grad_dot) and
    fp32 master weights (so grad_W is fp32): the fraction of non-target weight rows whose
    gradient is exactly 0."""
    B = p["f"].shape[0]
    grad_lse = torch.full((B,), 1.0 / 8192, dtype=torch.float64)
    out = _run(fn, p, dtype, torch.float32, grad_lse, torch.zeros(B, dtype=torch.float64))
    gw = out[3]
    nontarget = torch.ones(gw.shape[0], dtype=torch.bool)
    nontarget[p["tcol"][p["tcol"] >= 0]] = False
    return (gw[nontarget] == 0).all(dim=1).double().mean().item()


@requires_interp
def test_fp16_weight_gradient_does_not_underflow():
    """fp16 features, fp32 master weights: dd (≈ 1/8192 · p · 64) was cast to fp16 before the
    dW GEMM and flushed to zero; the fp32 oracle keeps every row."""
    from marginops.triton import configs

    p = _problem(8, 1024, 32)
    p["scale"] = torch.full_like(p["scale"], 64.0)
    oracle = _fraction_zero_rows(margin_lse_dense, p, torch.float32)
    wide = configs.KernelConfig(16, 128, 32, num_warps=1, num_stages=1)  # fewer, larger programs
    with configs.force(splits=1, fwd=wide, bwd_df=wide, bwd_dw=wide):
        ours = _fraction_zero_rows(_ops().margin_lse, p, torch.float16)
    assert ours == oracle, f"{ours:.1%} of fp16 weight-gradient rows are 0 (fp32 oracle: {oracle:.1%})"


@requires_interp
@pytest.mark.parametrize("index", [False, True], ids=["all-classes", "class_index"])
def test_half_weight_gradient_has_no_fp32_copy(index):
    """Half-precision weights: the dW kernel stores grad_W once, in the weight's dtype, from its
    register accumulator — no fp32 (R, D) buffer in the backward (12 GB at R = 6M, D = 512).
    fp16 weights take bf16's path (bf16 cannot run here). With class_index only the per-column
    (N, D) fp32 buffer exists (N < R)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from marginops.triton import margin_lse as ml

    p = _problem(37, 129, 40, 1, bias=True, index=index)
    R, D = p["w"].shape
    f, w = p["f"].half(), p["w"].half()
    scale, bias = p["scale"].float(), p["bias"].float()
    a = ml._Args(f, w, scale, bias, p["tcol"], p["cidx"], None, None, True, 1)
    lse, _dot = ml._forward(a)
    fp32_rd = []

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= R * D:
                    fp32_rd.append((str(func), tuple(t.shape)))
            return out

    ones = torch.ones(37)
    with Allocations():
        grad_f, grad_w, _gs, _gb = ml._backward(a, lse, ones, ones)
    assert grad_w.dtype == torch.float16 and grad_w.shape == (R, D)
    assert not fp32_rd, f"fp32 buffers of ≥ R·D elements in the backward: {fp32_rd}"


@requires_interp
def test_bf16_is_refused_under_the_interpreter():
    p = _problem(5, 20, 16)
    for fdt, wdt in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.bfloat16)):
        with pytest.raises(TypeError, match="bfloat16.*interpreter|interpreter.*bfloat16"):
            _ops().margin_lse(p["f"].to(fdt), p["w"].to(wdt), p["scale"].float(), None,
                              p["tcol"], None, None, None, True, 1)
        with pytest.raises(TypeError, match="bfloat16"):
            _ops().topk(p["f"].to(fdt), p["w"].to(wdt), p["tcol"], 3, True, 1)


def _topk_reference(f, w, excl, k, normalize, K):
    """The contract's top-k by a stable sort: exclude_col counts as −inf, NaN ranks above +inf,
    ties (NaN vs NaN too) go to the lower column."""
    from contract_oracle import dense_cosines

    d = dense_cosines(f, w, None, normalize, K).float()
    cols = torch.arange(d.shape[1])
    d = d.masked_fill(cols[None, :] == excl[:, None], float("-inf"))
    order = d.argsort(dim=1, descending=True, stable=True)[:, :k]
    return d.gather(1, order), order


def _topk_backends():
    out = [("triton", _ops().topk)]
    import marginops.ops.cpp as cpp

    try:
        cpp._require_loaded()
        out.append(("cpp", cpp.topk))
    except Exception:  # the C++ extension is not built here: the triton check still runs
        pass
    return out


@requires_interp
def test_topk_fewer_eligible_columns_than_k():
    """k = N with an excluded column: the last slot is (−inf, exclude_col) — on every backend
    (Triton returned the out-of-range column N)."""
    p = _problem(6, 13, 16)
    f, w = p["f"].float(), p["w"].float()
    excl = torch.tensor([0, 12, -1, 5, 5, 7])
    tv, tc = _topk_reference(f, w, excl, 13, True, 1)
    from marginops.triton import configs

    for name, fn in _topk_backends():
        with configs.force(splits=3):
            vals, cols = fn(f, w, excl, 13, True, 1)
        assert torch.equal(cols, tc), name
        torch.testing.assert_close(vals.float(), tv, msg=name)
        rows = excl >= 0
        assert torch.equal(cols[rows, -1], excl[rows]), name
        assert torch.isneginf(vals[rows, -1]).all(), name


@requires_interp
def test_topk_nan_ranks_first_ties_by_lower_column():
    """Lead's decision: NaN ranks above +inf (like torch.topk); NaN vs NaN and equal values go
    to the lower column. Columns 2, 9, 17 have NaN weights; 4 and 11 are equal."""
    from marginops.triton import configs

    g = torch.Generator().manual_seed(3)
    f = torch.randn(5, 16, generator=g)
    w = torch.randn(20, 16, generator=g)
    w[11] = w[4]
    w[[2, 9, 17], 3] = float("nan")
    excl = torch.tensor([9, -1, 4, 0, 19])
    tv, tc = _topk_reference(f, w, excl, 6, True, 1)
    assert torch.isnan(tv[:, 0]).all()  # the case really has NaN on top
    with configs.force(splits=2):
        vals, cols = _ops().topk(f, w, excl, 6, True, 1)
    assert torch.equal(cols, tc)
    torch.testing.assert_close(vals, tv, equal_nan=True)
