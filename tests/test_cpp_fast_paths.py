"""The cpp backend's fast paths (issue 13): its own AVX-512 GEMMs (fp32, and bf16 on the matrix
units), kept dots.

* fp32 path — fp32-accumulated inputs on a CPU with AVX-512 run every GEMM on the kernel of
  csrc/cpu/gemm.h (fp32 FMAs). Error budget: within 2× the fp32 naive PyTorch error versus fp64
  truth, on odd shapes (D not a multiple of 16 and above the kernel's 128-deep k slices; B not a
  multiple of its 6-row blocks; partial chunks; sub-centers, class_index, bias, hard negatives,
  plain in-place weights). ``MARGINOPS_CPU_F32_GEMM=0`` switches it off (ATen's sgemm instead).
  The path is really taken: the profiler sees no ATen GEMM (aten::mm, aten::addmm_) under the op,
  and sees them with the knob off.
* bf16 path — bf16 features on a CPU with AVX512-BF16: every GEMM multiplies bf16 operands with
  fp32 sums into an fp32 tile. Error budget: within 2× the same-precision naive PyTorch error
  versus fp64 truth (tests/tolerance.py), on odd shapes (D, B odd; C not a multiple of 16;
  sub-centers, class_index, bias, hard negatives). ``MARGINOPS_CPU_BF16_GEMM=0`` switches the
  path off, which shows the path is really taken (bf16 rounding of the weight changes the dots).
* keep path — when the B × N·K dots fit ``cpp.set_keep_budget`` (default 32 MiB) the forward keeps
  them and the backward reads them: the same outputs and gradients as recomputing, bit for bit;
  the budget boundary is exact, and above it nothing of size B·C is saved for the backward.
"""

from __future__ import annotations

import pytest
import torch
from contract_oracle import margin_lse_dense
from test_cpp_op import ARGS, as_fp64, gapped_case, make_case, run
from tolerance import assert_within_budget

from marginops.ops import cpp

_REASON = cpp.availability("cpp", torch.device("cpu"))
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"C++ backend: {_REASON}")


def _cpu_has_bf16_units() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            return any(line.startswith("flags") and " avx512_bf16" in line for line in fh)
    except OSError:
        return False


def _cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            return any(line.startswith("flags") and all(f" {f}" in line for f in (
                "avx512f", "avx512bw", "avx512vl")) for line in fh)
    except OSError:
        return False


needs_bf16_units = pytest.mark.skipif(not _cpu_has_bf16_units(),
                                      reason="the bf16 GEMM path needs AVX512-BF16")
needs_avx512 = pytest.mark.skipif(not _cpu_has_avx512(),
                                  reason="the fp32 GEMM kernel needs AVX-512 (F, BW, VL)")


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setenv("MARGINOPS_CPU_TILE_KB", "1")


@pytest.fixture
def keep_budget():
    """Restores the keep budget after the test."""
    old = cpp.set_keep_budget(cpp.DEFAULT_KEEP_BUDGET)
    yield cpp.set_keep_budget
    cpp.set_keep_budget(old)


def ours(**kw):
    return cpp.margin_lse(**kw)


# ------------------------------------------------------------------------------------------------
# fp32 GEMM kernel
# ------------------------------------------------------------------------------------------------

def _aten_gemms(case) -> set[str]:
    """ATen GEMM ops the profiler sees during a forward + backward of the op."""
    with torch.profiler.profile() as prof:
        run(ours, case)
    return {e.name for e in prof.events() if e.name in ("aten::mm", "aten::addmm", "aten::addmm_")}


F32_CASES = [  # B, D, C, options
    (7, 300, 100, dict(bias=True)),                            # D > one 128-deep k slice
    (64, 33, 257, dict(bias=True)),
    (6, 13, 45, dict(K=2, bias=True, hard=True, class_index=True)),
    (13, 17, 50, dict(K=3, normalize=False)),                 # plain weights, read in place
    (1, 130, 40, dict()),
]


@needs_avx512
@pytest.mark.parametrize("chunks", ["default", "small"])
@pytest.mark.parametrize("B,D,C,opts", F32_CASES)
def test_f32_gemm_path_within_budget(B, D, C, opts, chunks, monkeypatch):
    if chunks == "small":
        monkeypatch.setenv("MARGINOPS_CPU_TILE_KB", "1")
    case = gapped_case(B, D, C, dtype=torch.float32, scale=(16.0, 64.0), **opts)
    got, base, truth = run(ours, case), run(margin_lse_dense, case), run(margin_lse_dense,
                                                                         as_fp64(case))
    assert _aten_gemms(case) == set()   # the path is really taken
    monkeypatch.setenv("MARGINOPS_CPU_F32_GEMM", "0")
    aten = run(ours, case)
    assert _aten_gemms(case) == {"aten::mm", "aten::addmm_"}
    for k in truth:
        assert got[k].dtype == base[k].dtype == aten[k].dtype, k
        assert_within_budget(got[k], base[k], truth[k], torch.float32, name=k)
        assert_within_budget(aten[k], base[k], truth[k], torch.float32, name=k)


@pytest.mark.parametrize("knob", ["1", "0"])
def test_f32_gemm_empty_sums(knob, monkeypatch):
    """D = 0: every dot is an empty sum (0), so lse_neg = log(#negatives); B = 0: ∂W = 0 exactly.
    (The kernel writes C = 0 for K = 0 instead of leaving the tile uninitialised.)"""
    monkeypatch.setenv("MARGINOPS_CPU_F32_GEMM", knob)
    C = 40
    tc = torch.tensor([5, -1, 39])
    case = make_case(3, 4, C, dtype=torch.float32)
    case.update(features=torch.zeros(3, 0), weight=torch.randn(C, 0), target_col=tc)
    got = run(ours, case)
    want = torch.log(torch.tensor([C - 1.0, C, C - 1.0]))
    torch.testing.assert_close(got["lse_neg"], want)
    assert torch.equal(got["dot_y"], torch.zeros(3))
    case = make_case(3, 13, C, dtype=torch.float32)
    case.update(features=torch.zeros(0, 13), scale=torch.ones(0),
                target_col=torch.zeros(0, dtype=torch.long))
    got = run(ours, case)
    assert torch.equal(got["grad_weight"], torch.zeros(C, 13))


@needs_avx512
def check_nan_in_nan_out(kind: str, dtype: torch.dtype) -> None:
    """A NaN or inf weight entry, or a NaN feature, through the op's GEMM path for ``dtype``
    features (fp32 weights): NaN lse_neg exactly where the dense oracle has it, and non-finite
    gradients on the rows and weight it touched."""
    case = make_case(6, 19, 40, dtype=dtype, wdtype=torch.float32, no_target_rows=False, seed=3)
    f, w = case["features"].clone(), case["weight"].clone()
    if kind == "nan_weight":
        w[7, 4] = float("nan")        # class 7: a non-target column of every row
    elif kind == "inf_weight":
        w[7, 4] = float("inf")        # ‖W_7‖ = inf: ŵ_7 = inf/inf = NaN, as in PyTorch
    else:
        f[2, 5] = float("nan")
    case["features"], case["weight"] = f, w
    got = run(ours, case)
    want_lse, _ = margin_lse_dense(**case)
    assert torch.equal(torch.isnan(got["lse_neg"]), torch.isnan(want_lse))
    assert torch.isnan(got["lse_neg"]).any()
    bad = torch.isnan(got["lse_neg"])
    assert not torch.isfinite(got["grad_features"][bad].float()).all(dim=1).any()
    assert not torch.isfinite(got["grad_weight"]).all()


@pytest.mark.parametrize("kind", ["nan_weight", "inf_weight", "nan_features"])
def test_f32_gemm_path_nan_in_nan_out(kind, small_chunks):
    check_nan_in_nan_out(kind, torch.float32)


# ------------------------------------------------------------------------------------------------
# bf16 GEMMs
# ------------------------------------------------------------------------------------------------

BF16_CASES = [  # B, D, C, options
    (6, 13, 45, dict(K=2, bias=True, hard=True, class_index=True)),
    (7, 128, 100, dict()),
    (64, 33, 257, dict(bias=True)),
    (5, 17, 31, dict(K=3, normalize=False)),
]


@needs_bf16_units
@pytest.mark.parametrize("chunks", ["default", "small"])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32], ids=["bf16_w", "fp32_w"])
@pytest.mark.parametrize("B,D,C,opts", BF16_CASES)
def test_bf16_gemm_path_within_budget(B, D, C, opts, wdtype, chunks, monkeypatch):
    if chunks == "small":
        monkeypatch.setenv("MARGINOPS_CPU_TILE_KB", "1")
    case = make_case(B, D, C, dtype=torch.bfloat16, wdtype=wdtype, scale=(16.0, 64.0), **opts)
    got, base, truth = run(ours, case), run(margin_lse_dense, case), run(margin_lse_dense,
                                                                         as_fp64(case))
    for k in truth:
        assert got[k].dtype == base[k].dtype, k
        assert_within_budget(got[k], base[k], truth[k], torch.bfloat16, name=k)
    # The path is really taken: with it off, the weight is not rounded to bf16 and dot_y moves
    # (a bf16 weight that is not normalised is exact either way).
    if wdtype == torch.float32 or opts.get("normalize", True):
        monkeypatch.setenv("MARGINOPS_CPU_BF16_GEMM", "0")
        off = run(ours, case)
        assert not torch.equal(off["dot_y"], got["dot_y"])


@needs_bf16_units
@pytest.mark.parametrize("kind", ["nan_weight", "inf_weight", "nan_features"])
def test_bf16_gemm_path_nan_in_nan_out(kind, small_chunks):
    check_nan_in_nan_out(kind, torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# Kept dots
# ------------------------------------------------------------------------------------------------

def _saved_bytes(case):
    """Bytes of every tensor autograd saves that is neither an input nor differentiable (the
    inputs' clones and the lse_neg output require grad; the kept dots do not)."""
    inputs = {id(v) for v in case.values() if isinstance(v, torch.Tensor)}
    sizes = []

    def pack(t):
        if id(t) not in inputs and not t.requires_grad:
            sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run(ours, case)
    return sizes, out


KEEP_CASES = [
    (6, 13, 45, dict(K=2, bias=True, hard=True, class_index=True), torch.float64),
    (9, 31, 100, dict(bias=True), torch.float32),
    (7, 20, 33, dict(K=3, normalize=False), torch.float32),
    (8, 24, 50, dict(hard=True), torch.bfloat16),
]


@pytest.mark.parametrize("chunks", ["default", "small"])
@pytest.mark.parametrize("B,D,C,opts,dtype", KEEP_CASES)
def test_keep_path_equals_recompute_bit_for_bit(B, D, C, opts, dtype, chunks, keep_budget,
                                                monkeypatch):
    if chunks == "small":
        monkeypatch.setenv("MARGINOPS_CPU_TILE_KB", "1")
    case = make_case(B, D, C, dtype=dtype, scale=(8.0, 32.0), **opts)
    keep_budget(1 << 30)
    kept_sizes, kept = _saved_bytes(case)
    keep_budget(0)
    rec_sizes, recomputed = _saved_bytes(case)
    N = case["class_index"].numel() if case["class_index"] is not None else C
    acc_size = 8 if dtype == torch.float64 else 4
    assert B * N * case["subcenters"] * acc_size in kept_sizes   # the dots were kept
    assert max(rec_sizes, default=0) < B * N * case["subcenters"] * acc_size
    for k in recomputed:
        assert torch.equal(kept[k], recomputed[k]), k


def test_keep_budget_boundary_and_memory(keep_budget):
    """Kept iff B·N·K·acc bytes <= budget; above it, saved extras are B-sized whatever C is."""
    B, D, C = 8, 16, 64
    case = make_case(B, D, C, dtype=torch.float32)
    dots = B * C * 4
    keep_budget(dots)
    sizes, _ = _saved_bytes(case)
    assert dots in sizes
    keep_budget(dots - 1)
    sizes, _ = _saved_bytes(case)
    assert max(sizes, default=0) <= B * 4   # lse_neg only: nothing grows with B·C
    keep_budget(1 << 20)
    for C_big in (40_000, 80_000):   # B·C·4 = 1.3 MB, 2.6 MB > 1 MiB
        sizes, _ = _saved_bytes(make_case(B, D, C_big, dtype=torch.float32))
        assert max(sizes, default=0) <= B * 4


def test_keep_path_backward_makes_no_bxc_tensor(keep_budget):
    """The kept dots' own gradient is never materialised: autograd would otherwise hand the
    backward a B×C tensor of zeros, doubling the keep path's memory (measured before the fix:
    2 × the dots at the peak)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    B, D, C = 8, 4, 64   # C·D < B·C: only a B×C tensor can reach B·C elements
    case = make_case(B, D, C, dtype=torch.float32)
    inputs = {k: (v.clone().requires_grad_(True) if k in ("features", "weight") else v)
              for k, v in case.items()}
    lse, dot = ours(**inputs)
    big = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.numel() >= B * C:
                    big.append((str(func), tuple(t.shape)))
            return out

    with Record():
        (lse - dot).sum().backward()
    assert big == []
    assert inputs["weight"].grad is not None


def test_keep_path_not_taken_without_grad(keep_budget):
    case = make_case(4, 8, 20, dtype=torch.float32)
    with torch.no_grad():
        lse, dot = ours(**case)
    want = torch.ops.marginops.margin_lse(*(case[k] for k in ARGS))
    assert torch.equal(lse, want[0]) and torch.equal(dot, want[1])


@pytest.mark.parametrize("bad", [-1, 1.5, True, "32M"])
def test_set_keep_budget_rejects_bad_values(bad, keep_budget):
    with pytest.raises(ValueError, match="set_keep_budget"):
        cpp.set_keep_budget(bad)
    assert cpp.set_keep_budget(cpp.DEFAULT_KEEP_BUDGET) == cpp.DEFAULT_KEEP_BUDGET  # unchanged


def test_opcheck_keep_ops():
    samples = [
        make_case(4, 13, 20, dtype=torch.float64),
        make_case(5, 7, 9, K=2, dtype=torch.float64, bias=True, hard=True, class_index=True,
                  seed=2),
        make_case(2, 5, 6, dtype=torch.bfloat16, wdtype=torch.float32, bias=True, seed=4),
    ]
    for i, case in enumerate(samples):
        args = tuple(case[k] for k in ARGS)
        if i % 2 == 0:
            args = tuple(a.clone().requires_grad_(True) if k in ("features", "weight", "scale")
                         else a for k, a in zip(ARGS, args))
        torch.library.opcheck(torch.ops.marginops.margin_lse_keep.default, args)
        plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        lse, _, dots = torch.ops.marginops.margin_lse_keep(*plain)
        g = torch.Generator().manual_seed(0)
        gl = torch.randn(lse.shape, generator=g).to(lse)
        gd = torch.randn(lse.shape, generator=g).to(lse)
        torch.library.opcheck(torch.ops.marginops.margin_lse_backward_kept.default,
                              (gl, gd, lse, dots, *plain))


def test_backward_kept_rejects_wrong_dots():
    case = make_case(4, 8, 20, dtype=torch.float32)
    args = tuple(case[k] for k in ARGS)
    lse, _, dots = torch.ops.marginops.margin_lse_keep(*args)
    with pytest.raises(RuntimeError, match="dots must be the"):
        torch.ops.marginops.margin_lse_backward_kept(lse, lse, lse, dots[:, :-1], *args)


def test_torch_compile_through_keep_path(keep_budget):
    case = make_case(6, 13, 50, dtype=torch.float32, bias=True)

    def loss_fn(f, w, s, b, tc):
        lse, dot = cpp.margin_lse(f, w, s, b, tc, None, None, None, True, 1)
        return torch.nn.functional.softplus(lse - s * dot).mean()

    def grads(fn):
        leaves = [case[k].clone().requires_grad_(True) for k in ("features", "weight", "bias")]
        loss = fn(leaves[0], leaves[1], case["scale"], leaves[2], case["target_col"])
        return [loss.detach(), *torch.autograd.grad(loss, leaves)]

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for a, b in zip(grads(compiled), grads(loss_fn)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    traced = []

    def capture(gm, example_inputs):
        traced.extend(str(node.target) for node in gm.graph.nodes)
        return gm

    grads(torch.compile(loss_fn, fullgraph=True, backend=capture))
    assert "marginops.margin_lse_keep" in traced   # the keep path is what gets traced


# ------------------------------------------------------------------------------------------------
# Small shapes: the fixed per-call cost (issue 13). A module or functional call validates each
# input once: the core op does not check labels again (a device assert is a few small ops and a
# dispatch, paid on every step).
# ------------------------------------------------------------------------------------------------

class _CountAsserts(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._assert_async.msg, torch.ops.aten._assert_async.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("entry", ["module", "functional"])
def test_one_label_check_per_call(entry):
    import marginops

    torch.manual_seed(0)
    B, C, D = 6, 11, 8
    x = torch.randn(B, D, requires_grad=True)
    labels = torch.tensor([0, 3, -1, 10, 5, 3])
    loss_fn = marginops.ArcFaceLoss(D, C, backend="cpp")
    with _CountAsserts() as mode:
        if entry == "module":
            loss = loss_fn(x, labels)
        else:
            loss = marginops.functional.arcface_loss(x, loss_fn.weight, labels, backend="cpp")
    assert mode.count == 1
    loss.backward()  # the call still works end to end
    # and the one check still rejects a bad label, before anything is computed
    with pytest.raises(RuntimeError, match="labels has values outside"):
        loss_fn(x, torch.tensor([0, 3, -1, 11, 5, 3]))


def test_checked_core_op_equals_public_op_bit_for_bit():
    """Unsharded, each label is its own target column (-1: none): the same results as the
    general target_columns path, taken here through an explicit class_range (0, C)."""
    import marginops
    from marginops.core import margin_lse_checked

    torch.manual_seed(0)
    B, C, D = 7, 13, 9
    x = torch.nn.functional.normalize(torch.randn(B, D, dtype=torch.float64)).requires_grad_()
    w = torch.randn(C, D, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 12, -1, 5, 5, -1, 7])
    outs = []
    for fast in (True, False):
        x.grad = w.grad = None
        if fast:
            lse, dot = margin_lse_checked(
                x, w, labels, 3.0, None, normalize_weight=True, class_range=None,
                class_index=None, hard_negative=None, subcenters=1,
                interclass_filtering_threshold=0.0, backend="cpp", validate="device")
        else:
            lse, dot = marginops.margin_lse(x, w, labels, 3.0, class_range=(0, C), backend="cpp")
        (lse.sin().sum() + dot.cos().sum()).backward()
        outs.append((lse.detach(), dot.detach(), x.grad.clone(), w.grad.clone()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@needs_avx512
@pytest.mark.parametrize("fdtype,wdtype", [(torch.float32, torch.float32),
                                           (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32),
                                           (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("D", [21, 48])
def test_jacobian_rows_with_repeated_classes(fdtype, wdtype, D, small_chunks):
    """The weight rows' normalisation Jacobian on AVX-512 (one fused call per row, fp32 and bf16
    weights, D with and without a tail of < 16): written once per row, and accumulated where
    class_index repeats a class (the rows' accumulate path). Within budget of the naive loss in
    the features' dtype versus fp64 truth."""
    case = make_case(5, D, 40, bias=True, dtype=fdtype, wdtype=wdtype, scale=(16.0, 64.0))
    case["class_index"] = torch.tensor([3, 17, 3, 30, 17, 5] * 4 + [39, 0])
    tc = case["target_col"]
    case["target_col"] = torch.where(tc >= 0, tc % 26, tc)
    got, base, truth = run(ours, case), run(margin_lse_dense, case), run(margin_lse_dense,
                                                                         as_fp64(case))
    for k in truth:
        assert_within_budget(got[k], base[k], truth[k], fdtype, name=k)
    # no repeated class: every row written once, rows never iterated exactly 0
    case["class_index"] = torch.tensor([3, 17, 30, 5, 39, 0, 11, 22])
    case["target_col"] = torch.where(tc >= 0, tc % 8, tc)
    got, base, truth = run(ours, case), run(margin_lse_dense, case), run(margin_lse_dense,
                                                                         as_fp64(case))
    for k in truth:
        assert_within_budget(got[k], base[k], truth[k], fdtype, name=k)
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[case["class_index"]] = False
    assert (got["grad_weight"][untouched] == 0).all()
