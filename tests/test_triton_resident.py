"""resident.py's Triton kernels (FlashAttention-shaped: the program's own tile resident over the
whole D) in Triton's CPU interpreter against the dense oracle (tests/contract_oracle.py), with
test_triton_interpreter.py's harness.

On a GPU they run for bf16 on sm_90 only; the interpreter cannot run bf16 dots, so these tests
force them (``configs.force(resident=True)``) onto fp32 and fp16 inputs, whose code is bf16's but
for fp16's operand rescaling. D ∈ configs.RESIDENT_DIMS: 128 (one chunk) and 512 (two; the
feature gradient's UNCHAINED kernel holds all 512 in one).

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_triton_resident.py   # direct
    .venv/bin/python -m pytest tests/test_triton_resident.py   # re-runs itself in a child
"""

from __future__ import annotations

import time

import pytest
import torch
from contract_oracle import margin_lse_dense
from interpreter import outside_interp, requires_interp, run_in_interpreter
from test_triton_interpreter import _compare, _ops, _problem, _run
from tolerance import assert_within_budget

try:  # the register-operand helper's test kernel (its globals must name the helper's module)
    import triton
    import triton.language as tl

    from marginops.triton import resident as _resident
except ImportError:  # no Triton: the tests below skip (requires_interp)
    triton = None

# numpy warns on log(0) inside the interpreter even where tl.where discards the result
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")


@outside_interp
def test_interpreter_subprocess():
    t0 = time.time()
    tail = run_in_interpreter(__file__)
    print(f"interpreter run took {time.time() - t0:.0f}s\n{tail}")


RESIDENT_CASES = {
    # id: (B, C, D, options); D in configs.RESIDENT_DIMS: one chunk (128) or two (512)
    "plain-37x129x128": (37, 129, 128, {}),
    "all-options-37x129x512": (37, 129, 512, dict(bias=True, index=True, hard=True)),
    "unnormalized-bias-5x300x128": (5, 300, 128, dict(normalize=False, bias=True)),
    "zero-weight-row-21x70x512": (21, 70, 512, dict(zero_row=True, bias=True)),
}


class _Counting:
    """Wraps a Triton kernel and counts its launches (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@requires_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(RESIDENT_CASES))
def test_resident_kernels_match_oracle(case, dtype, monkeypatch):
    """resident.py's kernels (chosen on a GPU for bf16; forced here on fp32 / fp16, whose code
    is bf16's but for fp16's operand rescaling) against the oracle, and they did run."""
    from marginops.triton import resident

    B, C, D, opts = RESIDENT_CASES[case]
    if dtype == torch.float16 and opts.get("zero_row"):
        pytest.skip("an fp16 zero row's grad_W is G/1e-12 = inf on any backend: "
                    "test_resident_fp16_zero_row_feature_gradient checks its dF")
    kernels = ("_fwd_res_kernel", "_bwd_df_res_kernel", "_bwd_dw_res_kernel")
    counters = {k: _Counting(getattr(resident, k)) for k in kernels}
    for name, counter in counters.items():
        monkeypatch.setattr(resident, name, counter)
    factors = None
    if not opts.get("normalize", True) and dtype == torch.float32:
        # |z| reaches 400 here (unnormalised rows, s ≤ 48), where an fp32 ulp is 3e-5: the dW
        # kernel recomputes the cosines as W·Fᵀ tiles, rounded otherwise than the forward's F·Wᵀ
        # (PyTorch reuses its logits), so p = exp(z − lse) carries ~1e-4 relative error there
        factors = {"grad_weight": 20.0, "grad_bias": 20.0}
    _compare(_problem(B, C, D, **opts), dtype, resident=True, factors=factors)
    assert all(c.launches == 1 for c in counters.values()), {
        k: c.launches for k, c in counters.items()}


@requires_interp
@pytest.mark.parametrize("splits", [1, 7])
@pytest.mark.parametrize("D", [128, 512])
def test_resident_splits_single_row_and_duplicate_classes(splits, D):
    """The resident kernels across split counts, with one row (B = 1) and with a class sampled
    several times (Partial FC: its gradient is the sum of its columns')."""
    _compare(_problem(1, 45, D, bias=True, hard=True), torch.float32, splits=splits, resident=True)
    p = _problem(19, 40, D, bias=True, index=True, hard=True)
    p["cidx"] = torch.tensor([3, 7, 3, 11, 7, 7, 0, 39, 3, 20, 21, 22, 23, 24, 25, 26, 27, 3])
    p["tcol"] = p["tcol"].clamp(max=p["cidx"].numel() - 1)
    _compare(p, torch.float32, splits=splits, resident=True)


@requires_interp
@pytest.mark.parametrize("D", [128, 512])
def test_resident_fp16_zero_row_feature_gradient(D):
    """fp16: a zero weight row's 1/wn = 1e12 would overflow the dd operand (and, through the
    per-row rescaling, flush the row's other terms); its term is 0 exactly (resident.py)."""
    from marginops.triton import configs

    p = _problem(21, 70, D, zero_row=True)
    g = torch.Generator().manual_seed(1)
    grad_lse = torch.randn(21, generator=g, dtype=torch.float64)
    grad_dot = torch.randn(21, generator=g, dtype=torch.float64)
    truth = _run(margin_lse_dense, p, torch.float64, torch.float64, grad_lse, grad_dot)
    base = _run(margin_lse_dense, p, torch.float16, torch.float16, grad_lse, grad_dot)
    with configs.force(resident=True):
        ours = _run(_ops().margin_lse, p, torch.float16, torch.float16, grad_lse, grad_dot)
    assert torch.isfinite(ours[2]).all()
    assert_within_budget(ours[2], base[2], truth[2], torch.float16, name="grad_features")


@requires_interp
def test_resident_is_not_chosen_where_it_does_not_apply():
    """Sub-centers, D outside configs.RESIDENT_DIMS, mixed dtypes: the general kernels."""
    from marginops.triton import configs, margin_lse

    def args(D, K=1, wdt=torch.float32):
        f = torch.randn(4, D)
        w = torch.randn(6 * K, D, dtype=wdt)
        return margin_lse._Args(f, w, torch.ones(4), None, torch.zeros(4, dtype=torch.long),
                                None, None, None, True, K)

    with configs.force(resident=True):
        assert args(128).resident and args(512).resident
        assert not args(128, K=2).resident
        assert not args(96).resident and not args(1024).resident
        assert not args(128, wdt=torch.float16).resident
    assert not args(128).resident  # not forced: the interpreter has no sm_90


@requires_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_register_operand_keeps_every_value(dtype):
    """resident.py's ``_in_registers`` (x + 0·0 through a dot's accumulator: how the forward
    keeps F's first chunk in registers at D = 512) returns x exactly — NaN and ±inf included,
    where an x·I product would turn an inf row into NaN. (−0 may come back as +0.)"""
    copy = _register_copy_kernel()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 32, generator=g) * 100).to(dtype)
    x[0, 3], x[1, 5], x[2, 7] = float("nan"), float("inf"), -float("inf")
    y = torch.empty_like(x)
    copy[(1,)](x, y, R=16, C=32)
    assert torch.equal(y.isnan(), x.isnan())
    assert torch.equal(y[~x.isnan()], x[~x.isnan()])



def _register_copy_kernel():
    """y = resident._in_registers(x) over one (R, C) tile."""

    @triton.jit
    def copy(x_ptr, y_ptr, R: tl.constexpr, C: tl.constexpr):
        offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
        tl.store(y_ptr + offs, _resident._in_registers(tl.load(x_ptr + offs)))

    return copy
