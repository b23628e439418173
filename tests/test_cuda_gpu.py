"""The ``cuda`` backend's tensor-core path on a real GPU (csrc/cuda/margin_lse.cu, tc_gemm.h).

What these cover, against the dense oracle (tests/contract_oracle.py) with the budget of
tests/tolerance.py (error vs fp64 truth within 2× the same-precision oracle's + a dtype floor):

* GEMMs in the inputs' dtype — bf16, fp16, fp32, and mixed feature / weight dtypes (the weight
  chunk converted to the features' dtype) — with every op option;
* D = 512 (aligned), 100 and 13 (leading dimensions that are not a multiple of 8 elements: cuBLAS
  cannot use 16-byte loads, results must not change; the weight chunk's pointer is unaligned too);
* C not a multiple of the chunk: the default L2-sized chunks and ``MARGINOPS_CUDA_TILE_KB`` of
  1 or 16 KiB (a few columns per chunk, the last one partial);
* fp32 on TF32 exactly when torch allows it (``torch.backends.cuda.matmul.allow_tf32``), IEEE
  fp32 otherwise;
* fp16 with weight rows of tiny norm (1/‖W_r‖ ≫ fp16's range: the backward's unscaled-DD path);
* the workspace: no fp32 copy of W or F, the tile within the L2 budget.

Skipped without a CUDA device (no machine of this project has one); ``make gpu-check`` runs them.
"""

from __future__ import annotations

import pytest
import torch
from contract_oracle import topk_dense
from test_cpp_op import as_fp64, check_budget, gapped_case, oracle, ours, run
from tolerance import assert_within_budget

from marginops.ops import cpp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"


@pytest.fixture(autouse=True)
def _cuda_backend():
    reason = cpp.availability("cuda", torch.device(DEV))
    if reason is not None:
        pytest.skip(f"backend 'cuda': {reason}")


def _set_tile(monkeypatch, kib):
    """The default L2-sized chunks (None), or a tile budget of ``kib`` KiB: a few columns per
    chunk, so C spans many chunks and the last one is partial."""
    if kib is None:
        monkeypatch.delenv("MARGINOPS_CUDA_TILE_KB", raising=False)
    else:
        monkeypatch.setenv("MARGINOPS_CUDA_TILE_KB", str(kib))


@pytest.fixture
def tf32():
    """Set torch's TF32 switch for cuBLAS inside a test; restored afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32

    def set_(on: bool) -> None:
        torch.backends.cuda.matmul.allow_tf32 = on

    yield set_
    torch.backends.cuda.matmul.allow_tf32 = old


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (features, weight): same dtypes, then bf16 / fp16 activations with fp32 master weights, and fp32
# features with a bf16 weight (the chunk is converted up, exactly).
DTYPES = [(F32, F32), (BF16, BF16), (F16, F16), (BF16, F32), (F16, F32), (F32, BF16)]


def _budget_dtype(fdtype, wdtype):
    return fdtype if fdtype != F32 else wdtype


OPTIONS = {
    "arcface": dict(),
    "bias + class_index": dict(bias=True, class_index=True),
    "unnormalised + bias": dict(bias=True, normalize=False),
}


@pytest.mark.parametrize("fdtype,wdtype", DTYPES)
@pytest.mark.parametrize("D", [512, 13])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("tile_kib", [None, 16])
def test_tensor_core_gemms_match_the_oracle(fdtype, wdtype, D, option, tile_kib, monkeypatch,
                                            tf32):
    """B = 37, C = 1001 (odd; 16 KiB tiles: 8 to 44 columns per chunk, the last one partial);
    K = 1 and no hard negatives, so no routing decision needs a gap; scale up to 32."""
    _set_tile(monkeypatch, tile_kib)
    tf32(False)
    case = gapped_case(37, D, 1001, dtype=fdtype, wdtype=wdtype, device=DEV, scale=(8.0, 32.0),
                       **OPTIONS[option])
    got = check_budget(case, _budget_dtype(fdtype, wdtype))
    assert got["grad_features"].dtype == fdtype and got["grad_weight"].dtype == wdtype


@pytest.mark.parametrize("fdtype,wdtype", DTYPES)
@pytest.mark.parametrize("D", [100, 13])
@pytest.mark.parametrize("tile_kib", [None, 1])
def test_routing_options_match_the_oracle(fdtype, wdtype, D, tile_kib, monkeypatch, tf32):
    """Sub-centers (K = 3), hard negatives, bias, class_index at a size where every routing
    decision can keep a gap (tests/tolerance.py); 1 KiB tiles: 1 to 5 columns per chunk."""
    _set_tile(monkeypatch, tile_kib)
    tf32(False)
    case = gapped_case(6, D, 45, K=3, dtype=fdtype, wdtype=wdtype, bias=True, hard=True,
                       class_index=True, device=DEV, scale=(8.0, 32.0))
    check_budget(case, _budget_dtype(fdtype, wdtype))


def test_fp32_follows_torch_tf32_switch(tf32):
    """allow_tf32 off: IEEE fp32, within the fp32 budget (a TF32 GEMM misses it by ~1e-3·s);
    on: TF32, within 2× the error of torch's own TF32 matmuls, and different from IEEE."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("TF32 needs sm_80 or newer")
    case = gapped_case(64, 512, 4099, dtype=F32, device=DEV, bias=True, scale=(32.0, 64.0))
    truth = run(oracle, as_fp64(case))
    got = {}
    for on in (False, True):
        tf32(on)
        got[on], base = run(ours, case), run(oracle, case)
        for k in truth:
            assert_within_budget(got[on][k], base[k], truth[k], F32, name=f"tf32={on} {k}")
    assert not torch.equal(got[True]["lse_neg"], got[False]["lse_neg"]), (
        "allow_tf32 did not change the fp32 GEMMs")


def test_fp16_tiny_norm_rows_do_not_overflow(tf32):
    """fp16, weight normalisation, rows of norm ~1e-5 aligned with a feature (p ≈ 1, 1/‖W_r‖ ≈
    1e5): dd/‖W_r‖ exceeds fp16's 65504, so the backward must not put it in an fp16 tile (it
    keeps dd unscaled and multiplies normalised rows instead). A zero row is exact (inv = 1e12)."""
    tf32(False)
    case = gapped_case(8, 64, 50, dtype=F16, device=DEV, scale=(64.0, 64.0))
    w = case["weight"].float()
    f = case["features"].float()
    w[3] = 1e-5 * f[0] / f[0].norm()            # feature 0's direction, tiny norm
    w[7] = 1e-5 * f[1] / f[1].norm()
    w[9] = 0.0
    case["weight"] = w.half()
    case["target_col"][2] = 3                   # a target on a tiny row: dd = grad_dot there
    got, base, truth = run(ours, case), run(oracle, case), run(oracle, as_fp64(case))
    for k in ("lse_neg", "dot_y", "grad_features", "grad_scale"):
        assert torch.isfinite(got[k]).all(), k
        assert_within_budget(got[k], base[k], truth[k], F16, name=k)
    normal = torch.ones(50, dtype=torch.bool, device=DEV)
    normal[[3, 7, 9]] = False                   # their true weight gradient is ~1e5: not fp16
    assert_within_budget(got["grad_weight"][normal], base["grad_weight"][normal],
                         truth["grad_weight"][normal], F16, name="grad_weight")


@pytest.mark.parametrize("fdtype,wdtype", [(F32, F32), (BF16, BF16), (F16, F16), (F32, BF16)])
@pytest.mark.parametrize("tile_kib", [None, 1])
def test_topk_on_tensor_cores(fdtype, wdtype, tile_kib, monkeypatch, tf32):
    """Top-k values and columns (gapped, so the order is decided), D = 100. The GEMM products of
    16-bit inputs are exact in fp32, so values agree with the fp32 oracle to fp32 rounding (mixed
    bf16 / fp32 would round W to bf16: covered by the budget tests above instead)."""
    _set_tile(monkeypatch, tile_kib)
    tf32(False)
    case = gapped_case(6, 100, 60, dtype=fdtype, wdtype=wdtype, device=DEV, topk=5)
    f, w, excl = case["features"], case["weight"], case["target_col"]
    vals, cols = cpp.topk(f, w, excl, 5, True, 1)
    tv, tc = topk_dense(f, w, excl, 5, True, 1)
    torch.testing.assert_close(vals, tv, rtol=1e-5, atol=1e-5)
    assert torch.equal(cols, tc)


def test_workspace_within_the_l2_budget():
    """B = 1024, C = 200K, D = 512, bf16: the forward's extra memory stays under the L2 size (its
    fp32 tile is sized to L2/2 with 6 bytes per logit; before, a 64 MB tile, a 32 MB fp32 weight
    chunk and an fp32 copy of F), the backward's under the gradients it returns + 2 × L2."""
    B, C, D = 1024, 200_000, 512
    l2 = torch.cuda.get_device_properties(DEV).L2_cache_size
    g = torch.Generator(DEV).manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(B, D, device=DEV, generator=g), dim=1)
    f = f.bfloat16().requires_grad_()
    w = torch.randn(C, D, device=DEV, generator=g).bfloat16().requires_grad_()
    scale = torch.full((B,), 64.0, device=DEV)
    tcol = torch.randint(0, C, (B,), device=DEV, generator=g)
    args = (scale, None, tcol, None, None, None, True, 1)
    cpp.margin_lse(f[:8].detach(), w[:1000].detach(), scale[:8], None, tcol[:8] % 1000,
                   None, None, None, True, 1)          # cuBLAS handle and workspace, off the books
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    lse, dot = cpp.margin_lse(f, w, *args)
    torch.cuda.synchronize()
    fwd = torch.cuda.max_memory_allocated() - base
    per_row = 8 * C + 64 * B                           # 1/‖W‖ and ‖W‖² per row; per-row vectors
    assert fwd <= l2 + per_row, f"forward used {fwd / 2**20:.1f} MiB, L2 is {l2 / 2**20:.0f} MiB"
    torch.cuda.reset_peak_memory_stats()
    mid = torch.cuda.memory_allocated()
    gf, gw = torch.autograd.grad(lse.sum() - dot.sum(), (f, w))
    torch.cuda.synchronize()
    bwd = torch.cuda.max_memory_allocated() - mid
    outputs = gw.numel() * gw.element_size() + gf.numel() * 4 * 2   # grad_W, fp32 ∂F + its cast
    assert bwd <= outputs + 2 * l2 + per_row, f"backward used {bwd / 2**20:.1f} MiB"
    assert torch.isfinite(lse).all() and torch.isfinite(gw.float()).all()
