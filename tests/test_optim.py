"""marginops.optim: the classifier's optimizer step fused into the backward.

The fused optimizers are compared with torch.optim on a deep copy of the same module, over 20
steps with a StepLR schedule: weights, bias and optimizer state, on every CPU backend (the Triton
interpreter runs in a TRITON_INTERPRET=1 child), with several chunks per backward (``chunk_bytes``
of a few classes, C not a multiple of it). Sharded + Partial FC on 2 gloo ranks:
tests/test_optim_distributed.py.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from interpreter import not_interp, outside_interp, requires_interp, run_in_interpreter
from tolerance import cosines

import marginops as mo

F64 = torch.float64

B, D, C = 6, 8, 23           # C = 23 classes: 5 chunks of 5 classes, the last one of 3
CHUNK_CLASSES = 5
RTOL = {torch.float32: 1e-6, F64: 1e-12}
# Optimizer state is gradient-sized, and the torch backend rounds its per-chunk GEMMs differently
# from one GEMM over all classes (a few fp32 ulps of the gradient): states get 10 × in fp32.
STATE_RTOL = {torch.float32: 1e-5, F64: 1e-12}

OPTIMIZERS = {  # name: (marginops class, torch class, kwargs)
    "sgd": (mo.optim.SGD, torch.optim.SGD, dict(lr=0.1)),
    "sgd_momentum_wd": (mo.optim.SGD, torch.optim.SGD,
                        dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
    "sgd_dampening": (mo.optim.SGD, torch.optim.SGD,
                      dict(lr=0.1, momentum=0.8, dampening=0.3, weight_decay=1e-3)),
    "sgd_nesterov": (mo.optim.SGD, torch.optim.SGD,
                     dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)),
    "adamw": (mo.optim.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
}
MODULES = {  # name: (family, kwargs)
    "arcface_subcenters_bias": (mo.SubCenterArcFaceLoss, dict(subcenters=2, bias=True)),
    "cosface_raw_weight": (mo.CosFaceLoss, dict(normalize_weight=False)),
}


def chunk_bytes(module) -> int:
    return CHUNK_CLASSES * module.subcenters * D * module.weight.element_size()


def batch(dtype, gen, rows=B):
    x = torch.randn(rows, D, generator=gen, dtype=dtype)
    y = torch.randint(0, C, (rows,), generator=gen)
    y[::4] = -1                                             # ignored rows
    return x, y


def assert_gap(module, x):
    """Sub-center routing (argmax over K) compared across reduction orders needs a gap."""
    K = module.subcenters
    if K > 1:
        cos = cosines(x, module.weight, K, module.normalize_weight).sort(dim=2).values
        gap = 1e-12 if x.dtype == F64 else 2e-6  # far above the rounding of a D = 8 dot
        assert (cos[..., -1] - cos[..., -2]).min() > gap, "test data: sub-centers nearly tied"


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def assert_same(m, ref, opt, ref_opt, dtype, what=""):
    tol = RTOL[dtype]
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        assert rel(p, q) <= tol, f"{what} {name}: {rel(p, q):.2e}"
        for key, value in ref_opt.state[q].items():
            got = opt.state[p][key]
            assert rel(got, value) <= STATE_RTOL[dtype], f"{what} {name} state {key}: {rel(got, value):.2e}"


def train_pair(m, opt_name, dtype, steps=20, loss_fn=None):
    """Train ``m`` with marginops.optim and a deep copy with torch.optim; compare every step."""
    ours_cls, theirs_cls, kw = OPTIMIZERS[opt_name]
    ref = copy.deepcopy(m)
    opt = ours_cls(m.parameters(), chunk_bytes=chunk_bytes(m), **kw)
    ref_opt = theirs_cls(ref.parameters(), **kw)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=6, gamma=0.5) for o in (opt, ref_opt)]
    gen = torch.Generator().manual_seed(7)
    loss_fn = loss_fn or (lambda module, x, y: module(x, y))
    for step in range(steps):
        x, y = batch(dtype, gen)
        assert_gap(ref, x)
        loss_fn(m, x, y).backward()
        assert m.weight.grad is None
        opt.step()
        opt.zero_grad()
        loss_fn(ref, x, y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        for s in scheds:
            s.step()
        assert_same(m, ref, opt, ref_opt, dtype, f"step {step}")
    return m, opt


def make(family, kw, dtype, backend):
    """A module with O(1) weights: the N(0, 0.01) init is far smaller than one SGD update, which
    would make the relative comparison of weights a comparison of gradients."""
    module = family(D, C, scale=16.0, backend=backend, dtype=dtype, **kw)
    with torch.no_grad():
        module.weight.normal_()
        if module.bias is not None:  # zeros would make its comparison one of gradients
            module.bias.normal_()
    return module


# ----------------------------------------------------------------------------- torch, cpp

@not_interp
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("module", list(MODULES))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_matches_torch_optim(backend, opt_name, module, dtype):
    family, kw = MODULES[module]
    train_pair(make(family, kw, dtype, backend), opt_name, dtype)


@not_interp
@pytest.mark.parametrize("keep_budget", [0, 1 << 30], ids=["recompute", "kept"])
def test_cpp_kept_dots_are_sliced_per_chunk(keep_budget):
    from marginops.ops import cpp
    old = cpp.set_keep_budget(keep_budget)
    try:
        family, kw = MODULES["arcface_subcenters_bias"]
        train_pair(make(family, kw, torch.float32, "cpp"), "sgd_momentum_wd", torch.float32,
                   steps=5)
    finally:
        cpp.set_keep_budget(old)


def partial_fc_loss(module, x, y, gen):
    """The core op over a sorted unique sample of classes (Partial FC's class_index), every
    sampled class set containing the batch's labels: rows not sampled get a zero gradient."""
    keep = torch.rand(C, generator=gen) < 0.3
    keep[y.clamp_min(0)] = True
    class_index = keep.nonzero().flatten()  # test-side only: the real sampler has static size
    x_hat = F.normalize(x, dim=1)
    lse, dot = mo.margin_lse(x_hat, module.weight, y, 16.0, module.bias, class_index=class_index,
                             subcenters=module.subcenters, backend=module.backend)
    rows = F.softplus(lse - 16.0 * dot)
    return rows[y >= 0].mean()


def partial_fc(m):
    """A loss_fn for train_pair: ``m`` and its twin draw the same class samples."""
    gens = {True: torch.Generator().manual_seed(3), False: torch.Generator().manual_seed(3)}
    return lambda module, x, y: partial_fc_loss(module, x, y, gens[module is m])


def hard_negative_loss(module, x, y):
    """The core op with CurricularFace's hard-negative modulation at a fixed threshold τ = 0.2,
    t = 0.3 (the chunks split target_col as filtering does); cosines kept away from τ."""
    x_hat = F.normalize(x, dim=1)
    gap = (cosines(x, module.weight) - 0.2).abs().min()
    assert gap > (1e-12 if x.dtype == F64 else 2e-6), "test data: a cosine at the threshold"
    lse, dot = mo.margin_lse(x_hat, module.weight, y, 16.0, module.bias, backend=module.backend,
                             hard_negative=(0.2, 0.3))
    return F.softplus(lse - 16.0 * dot)[y >= 0].mean()


@not_interp
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_hard_negatives(backend, dtype):
    m = make(mo.ArcFaceLoss, dict(bias=True), dtype, backend)
    train_pair(m, "sgd_momentum_wd", dtype, loss_fn=hard_negative_loss)


@not_interp
def test_bf16_features():
    # bf16 embeddings (autocast's dtype) with fp32 master weights: the GEMMs run in bf16 with
    # fp32 sums, per chunk; the fused steps follow torch.optim's to 1e-6 like fp32
    m = make(mo.ArcFaceLoss, {}, torch.float32, "cpp")
    train_pair(m, "sgd_momentum_wd", torch.float32,
               loss_fn=lambda module, x, y: module(x.bfloat16(), y))


@not_interp
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("opt_name", ["sgd_momentum_wd", "sgd_nesterov", "adamw"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_partial_fc_class_index(backend, opt_name, dtype):
    # unsampled rows still get weight decay and momentum (moment decay for AdamW), as torch.optim
    # gives them with the dense gradient's zero rows; the same sample for both twins
    family, kw = MODULES["arcface_subcenters_bias"]
    m = make(family, kw, dtype, backend)
    train_pair(m, opt_name, dtype, steps=20, loss_fn=partial_fc(m))


# ----------------------------------------------------------------------------- the C++ update

def step_ops():
    """The cpp extension's one-pass updates (csrc/cpu/optim_step.cpp), loaded."""
    from marginops.ops import cpp
    assert cpp.availability("cpp", torch.device("cpu")) is None
    return torch.ops.marginops


# Unit tolerances of the one-pass op against torch's functional, per element: the same operations
# in the same order (measured bit-identical for SGD on this machine), except where ATen's
# vectorised kernels round differently from IEEE (AdamW's fp32 sqrt: 1 ulp in ~17% of elements)
# or its scalar tail loops contract a mul and an add (1 ulp). A few ulps, never more.
def assert_ulps(got, want, dtype):
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got, want, rtol=8 * eps, atol=8 * eps, equal_nan=True)


SGD_CASES = {  # name: (kwargs of torch.optim.sgd.sgd, first step)
    "plain": (dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False), False),
    "wd_only": (dict(momentum=0.0, dampening=0.0, weight_decay=1e-2, nesterov=False), False),
    "momentum_first": (dict(momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False), True),
    "momentum": (dict(momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False), False),
    "dampening": (dict(momentum=0.8, dampening=0.3, weight_decay=1e-3, nesterov=False), False),
    "nesterov_first": (dict(momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True), True),
    "nesterov": (dict(momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True), False),
}
STEP_N = 70_001  # odd: not a multiple of any vector width; > 2 parallel grains of 32768


def step_inputs(dtype, seed, nan=False):
    gen = torch.Generator().manual_seed(seed)
    p, g, buf = (torch.randn(STEP_N, generator=gen, dtype=dtype) for _ in range(3))
    if nan:  # NaN in, NaN out: a NaN gradient, a NaN weight, a NaN state element
        g[5], p[40_000], buf[STEP_N - 1] = float("nan"), float("nan"), float("nan")
    return p, g, buf


@not_interp
@pytest.mark.parametrize("nan", [False, True], ids=["finite", "nan"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("case", list(SGD_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
def test_sgd_step_op_matches_torch_functional(dtype, case, maximize, nan):
    from torch.optim.sgd import sgd
    kw, first = SGD_CASES[case]
    p, g, buf = step_inputs(dtype, 20, nan)
    want_p, want_bufs = p.clone(), [None if first else buf.clone()]
    sgd([want_p], [g.clone()], want_bufs, foreach=False, lr=0.05, maximize=maximize, **kw)
    got_buf = torch.empty_like(buf) if first else buf.clone()
    step_ops().sgd_step_(p, g, got_buf if kw["momentum"] else None, 0.05, kw["weight_decay"],
                         kw["momentum"], kw["dampening"], kw["nesterov"], maximize, first)
    assert_ulps(p, want_p, dtype)
    if kw["momentum"]:
        assert_ulps(got_buf, want_bufs[0], dtype)
    if nan:
        assert p[5].isnan() and p[40_000].isnan()


@not_interp
@pytest.mark.parametrize("nan", [False, True], ids=["finite", "nan"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("beta1", [0.9, 0.3])  # lerp's two branches: 1 − β1 below / above 0.5
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
def test_adamw_step_op_matches_torch_functional(dtype, weight_decay, beta1, maximize, nan):
    from torch.optim.adam import adam
    p, g, m = step_inputs(dtype, 21, nan)
    v = torch.rand(STEP_N, generator=torch.Generator().manual_seed(22), dtype=dtype)
    want = [t.clone() for t in (p, m, v)]
    for step in (1, 7):  # the bias corrections of the first and of a later step
        adam([want[0]], [g], [want[1]], [want[2]], [], [torch.tensor(step - 1.0)], foreach=False,
             decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=0.999, lr=1e-2,
             weight_decay=weight_decay, eps=1e-8, maximize=maximize)
        step_ops().adamw_step_(p, g, m, v, 1e-2, weight_decay, beta1, 0.999, 1e-8, float(step),
                               maximize)
        for got, ref in zip((p, m, v), want):
            assert_ulps(got, ref, dtype)
    if nan:
        assert p[5].isnan() and m[5].isnan() and v[5].isnan() and p[40_000].isnan()


@not_interp
def test_step_ops_opcheck_and_errors():
    ops = step_ops()
    p, g, buf = step_inputs(torch.float32, 23)
    torch.library.opcheck(ops.sgd_step_, (p, g, buf, 0.1, 5e-4, 0.9, 0.0, False, False, False))
    torch.library.opcheck(ops.sgd_step_, (p, g, None, 0.1, 0.0, 0.0, 0.0, False, False, False))
    m, v = g.clone(), g.abs()
    torch.library.opcheck(ops.adamw_step_, (p, g, m, v, 1e-3, 1e-2, 0.9, 0.999, 1e-8, 3.0, False))
    before = p.clone()
    with pytest.raises(RuntimeError, match="param must be float32 or float64"):
        ops.sgd_step_(p.half(), g.half(), None, 0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match="grad has dtype"):
        ops.sgd_step_(p, g.double(), None, 0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match="grad must be contiguous"):
        ops.sgd_step_(p[:100], g[:200:2], None, 0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match="needs a momentum_buffer"):
        ops.sgd_step_(p, g, None, 0.1, 0.0, 0.9, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match="exp_avg_sq has 10 elements"):
        ops.adamw_step_(p, g, m, v[:10], 1e-3, 0.0, 0.9, 0.999, 1e-8, 1.0, False)
    with pytest.raises(RuntimeError, match="step must be"):
        ops.adamw_step_(p, g, m, v, 1e-3, 0.0, 0.9, 0.999, 1e-8, 0.0, False)
    assert torch.equal(p, before)  # checks first: nothing changed


@not_interp
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("opt_name", ["sgd_momentum_wd", "sgd_nesterov", "adamw"])
def test_cpu_fused_step_takes_the_one_pass_op(opt_name, dtype, monkeypatch):
    # on CPU fp32/fp64 the chunks are stepped by the C++ op, never by torch's multi-pass
    # functional (which the masked Partial FC pass and other devices still use)
    def slow(*args, **kwargs):
        raise AssertionError("torch's functional ran on the CPU fast path")
    monkeypatch.setattr(mo.optim, "_sgd", slow)
    monkeypatch.setattr(mo.optim, "_adam", slow)
    family, kw = MODULES["arcface_subcenters_bias"]
    train_pair(make(family, kw, dtype, "cpp"), opt_name, dtype, steps=3)


@not_interp
@pytest.mark.parametrize("opt_name", ["sgd_momentum_wd", "adamw"])
def test_functional_fallback_matches_torch_optim(opt_name, monkeypatch):
    # the path of other devices and dtypes (torch's functional per chunk), on CPU
    monkeypatch.setattr(mo.optim, "_USE_STEP_OPS", False)
    family, kw = MODULES["arcface_subcenters_bias"]
    train_pair(make(family, kw, torch.float32, "cpp"), opt_name, torch.float32, steps=6)


# ----------------------------------------------------------------------------- API behaviour

@not_interp
def test_grad_none_bias_and_other_params_stepped_like_torch():
    # the bias and a parameter outside marginops (a projection) keep .grad and are stepped by
    # torch.optim's own step(); the classifier weight never gets a .grad
    m = mo.CrystalLoss(D, C, backend="cpp", bias=True)
    proj = torch.nn.Linear(D, D)
    ref_m, ref_proj = copy.deepcopy(m), copy.deepcopy(proj)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt = mo.optim.SGD([*m.parameters(), *proj.parameters()], chunk_bytes=chunk_bytes(m), **kw)
    ref_opt = torch.optim.SGD([*ref_m.parameters(), *ref_proj.parameters()], **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = batch(torch.float32, gen)
        m(proj(x), y).backward()
        assert m.weight.grad is None and m.bias.grad is not None
        assert proj.weight.grad is not None
        opt.step()
        opt.zero_grad(set_to_none=False)
        ref_m(ref_proj(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=False)
    for p, q in zip([*m.parameters(), *proj.parameters()],
                    [*ref_m.parameters(), *ref_proj.parameters()]):
        assert rel(p, q) <= 1e-6


# The feature gradient is a sum over chunks of partials rounded in fp32, then the normalisation
# Jacobian (I − x̂x̂ᵀ)/‖x‖ cancels its radial part: one step's grad x differs from the one-pass
# backward by 7.7e-7 relative on the torch backend (7.8e-8 cpp; 1e-15 in fp64), measured.
BACKBONE_RTOL = {torch.float32: 2e-5, F64: 1e-12}


@not_interp
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("family", ["sphereface", "arcface_filter04"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_backbone_gradient_through_the_fused_backward(backend, family, dtype):
    # grad_features and grad_scale summed over the chunks reach the backbone (a projection):
    # SphereFace's scale is ‖x‖ (differentiable), filtering zeroes columns above 0.4 per chunk
    cls, kw = {"sphereface": (mo.SphereFaceLoss, {}),
               "arcface_filter04": (mo.ArcFaceLoss, dict(interclass_filtering_threshold=0.4))}[family]
    m = cls(D, C, backend=backend, dtype=dtype, **kw)
    with torch.no_grad():
        m.weight.normal_()  # O(1) weights, as in make()
    proj = torch.nn.Linear(D, D, dtype=dtype)
    ref_m, ref_proj = copy.deepcopy(m), copy.deepcopy(proj)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt = mo.optim.SGD([*m.parameters(), *proj.parameters()], chunk_bytes=chunk_bytes(m), **kw)
    ref_opt = torch.optim.SGD([*ref_m.parameters(), *ref_proj.parameters()], **kw)
    gen = torch.Generator().manual_seed(12)
    for step in range(8):
        x, y = batch(dtype, gen)
        if family == "arcface_filter04":  # the threshold routes: keep cosines away from it
            gap = (cosines(ref_proj(x), ref_m.weight) - 0.4).abs().min()
            assert gap > (1e-12 if dtype == F64 else 2e-6), "test data: a cosine at the threshold"
        m(proj(x), y).backward()
        opt.step()
        opt.zero_grad()
        ref_m(ref_proj(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        for p, q in zip([*m.parameters(), *proj.parameters()],
                        [*ref_m.parameters(), *ref_proj.parameters()]):
            assert rel(p, q) <= BACKBONE_RTOL[dtype], f"step {step}: {rel(p, q):.2e}"


@not_interp
@pytest.mark.parametrize("opt_name", ["sgd_momentum_wd", "adamw"])
def test_state_dict_round_trip_resumes_identically(opt_name):
    family, kw = MODULES["arcface_subcenters_bias"]
    ours_cls, theirs_cls, okw = OPTIMIZERS[opt_name]
    m = make(family, kw, F64, "cpp")
    opt = ours_cls(m.parameters(), chunk_bytes=chunk_bytes(m), **okw)
    gen = torch.Generator().manual_seed(2)
    data = [batch(F64, gen) for _ in range(6)]

    def steps(module, optimizer, chunk):
        for x, y in chunk:
            module(x, y).backward()
            optimizer.step()
            optimizer.zero_grad()

    steps(m, opt, data[:3])
    saved_m, saved_opt = copy.deepcopy(m.state_dict()), copy.deepcopy(opt.state_dict())
    # the keys are torch.optim's: a torch.optim optimizer loads it as is
    ref_opt = theirs_cls(copy.deepcopy(m).parameters(), **okw)
    ref_opt.load_state_dict(saved_opt)
    steps(m, opt, data[3:])
    resumed = make(family, kw, F64, "cpp")
    resumed.load_state_dict(saved_m)
    opt2 = ours_cls(resumed.parameters(), chunk_bytes=chunk_bytes(m), **okw)
    opt2.load_state_dict(saved_opt)
    steps(resumed, opt2, data[3:])
    for p, q in zip(resumed.parameters(), m.parameters()):
        assert torch.equal(p, q)
    for key, value in opt.state[m.weight].items():
        assert torch.equal(opt2.state[resumed.weight][key], value), key


@not_interp
def test_saved_and_copied_modules_stay_fusable():
    # the classifier tag is a registry, not a Parameter attribute: torch.save(module) works, and
    # a deep copy or an unpickled module is tagged again (MarginSoftmaxLoss.__setstate__)
    import io
    m = make(mo.ArcFaceLoss, {}, torch.float32, "cpp")
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    x, y = batch(torch.float32, torch.Generator().manual_seed(13))
    for copied in (torch.load(buf, weights_only=False), copy.deepcopy(m)):
        opt = mo.optim.SGD(copied.parameters(), lr=0.1)
        before = copied.weight.detach().clone()
        copied(x, y).backward()
        assert copied.weight.grad is None and not torch.equal(copied.weight, before)
        opt.step()  # (the optimizer must live: the registry holds it weakly)


@not_interp
def test_lr_scheduler_changes_take_effect():
    # the fused step reads the group's lr at backward time: a scheduler's change applies at once
    m = make(mo.ArcFaceLoss, {}, F64, "cpp")
    opt = mo.optim.SGD(m.parameters(), lr=0.1, chunk_bytes=chunk_bytes(m))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.0 if epoch == 1 else 1.0)
    x, y = batch(F64, torch.Generator().manual_seed(4))
    for epoch, moves in enumerate((True, False, True)):
        before = m.weight.detach().clone()
        m(x, y).backward()
        assert torch.equal(m.weight, before) != moves, f"epoch {epoch}"
        opt.step()
        sched.step()


@not_interp
def test_step_closure_and_add_param_group():
    m1, m2 = make(mo.ArcFaceLoss, {}, F64, "cpp"), make(mo.CosFaceLoss, {}, F64, "cpp")
    r1, r2 = copy.deepcopy(m1), copy.deepcopy(m2)
    opt = mo.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9, chunk_bytes=chunk_bytes(m1))
    opt.add_param_group({"params": m2.parameters(), "lr": 0.05})
    ref = torch.optim.SGD(r1.parameters(), lr=0.1, momentum=0.9)
    ref.add_param_group({"params": r2.parameters(), "lr": 0.05})
    x, y = batch(F64, torch.Generator().manual_seed(5))

    def closure(optimizer, a, b):
        def run():  # torch.optim's closure pattern: zero_grad, forward, backward
            optimizer.zero_grad()
            loss = a(x, y) + b(x, y)
            loss.backward()
            return loss
        return run

    for _ in range(2):
        loss = opt.step(closure(opt, m1, m2))
        ref_loss = ref.step(closure(ref, r1, r2))
        assert m1.weight.grad is None and m2.weight.grad is None
        assert torch.allclose(loss, ref_loss, rtol=1e-12)
    for p, q in zip([*m1.parameters(), *m2.parameters()], [*r1.parameters(), *r2.parameters()]):
        assert rel(p, q) <= 1e-12


@not_interp
@pytest.mark.parametrize("sampled", [False, True], ids=["all_classes", "class_index"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_fused_step_is_sync_free(backend, sampled):
    # DESIGN §8: the chunk loop, the Partial FC mask and torch.optim's SGD update read nothing
    # back from the device (AdamW's step count is a CPU scalar, as in torch.optim)
    from test_sync_free import count_syncs
    family, kw = MODULES["arcface_subcenters_bias"]
    m = make(family, kw, torch.float32, backend)
    opt = mo.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3,
                       chunk_bytes=chunk_bytes(m))
    x, y = batch(torch.float32, torch.Generator().manual_seed(10))
    class_index = torch.arange(0, C, 3)
    y = torch.where(y % 3 == 0, y, -1)  # labels among the sampled classes

    def loss():
        if not sampled:
            return m(x, y)
        lse, dot = mo.margin_lse(F.normalize(x, dim=1), m.weight, y, 16.0, m.bias,
                                 class_index=class_index, subcenters=2, backend=backend)
        return F.softplus(lse - 16.0 * dot).sum()

    with count_syncs() as hits:
        for _ in range(2):
            loss().backward()
            opt.step()
            opt.zero_grad()
    assert hits == [] and len(opt.state[m.weight]) == 1


# ----------------------------------------------------------------------------- what cannot work

@not_interp
def test_bad_hyperparameters_raise_like_torch_optim():
    m = make(mo.ArcFaceLoss, {}, torch.float32, "torch")
    for kw in (dict(lr=-1.0), dict(lr=0.1, momentum=-0.5), dict(lr=0.1, weight_decay=-1.0),
               dict(lr=0.1, nesterov=True)):
        with pytest.raises(ValueError) as theirs:
            torch.optim.SGD(m.parameters(), **kw)
        with pytest.raises(ValueError, match=str(theirs.value).replace("(", r"\(")):
            mo.optim.SGD(m.parameters(), **kw)
    for kw in (dict(lr=-1.0), dict(eps=-1.0), dict(betas=(1.0, 0.9)), dict(weight_decay=-1.0)):
        with pytest.raises(ValueError) as theirs:
            torch.optim.AdamW(m.parameters(), **kw)
        with pytest.raises(ValueError, match=str(theirs.value).replace("(", r"\(")):
            mo.optim.AdamW(m.parameters(), **kw)
    with pytest.raises(ValueError, match="chunk_bytes"):
        mo.optim.SGD(m.parameters(), lr=0.1, chunk_bytes=0)


@not_interp
def test_gradient_accumulation_raises_before_changing_anything():
    m = make(mo.ArcFaceLoss, {}, torch.float32, "cpp")
    opt = mo.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, chunk_bytes=chunk_bytes(m))
    x, y = batch(torch.float32, torch.Generator().manual_seed(6))
    m(x, y).backward()
    weight, buf = m.weight.detach().clone(), opt.state[m.weight]["momentum_buffer"].clone()
    with pytest.raises(RuntimeError, match=r"second backward.*opt\.step\(\).*torch\.optim"):
        m(x, y).backward()
    assert torch.equal(m.weight, weight)
    assert torch.equal(opt.state[m.weight]["momentum_buffer"], buf)
    opt.step()
    m(x, y).backward()  # after a step it is fine again


@not_interp
def test_fp16_and_grad_scaler_raise():
    m = make(mo.ArcFaceLoss, {}, torch.float32, "torch")
    opt = mo.optim.SGD(m.parameters(), lr=0.1, chunk_bytes=chunk_bytes(m))
    x, y = batch(torch.float32, torch.Generator().manual_seed(8))
    before = m.weight.detach().clone()
    with pytest.raises(RuntimeError, match="fp16.*bf16.*torch.optim"):
        m(x.half(), y).backward()
    assert torch.equal(m.weight, before)
    scaler = torch.amp.GradScaler("cpu")
    assert scaler.is_enabled()
    scaler.scale(m(x, y)).backward()
    with pytest.raises(RuntimeError, match="GradScaler.*bf16.*torch.optim"):
        scaler.step(opt)


@not_interp
def test_families_reading_the_weight_elsewhere_refuse_at_construction():
    npt = mo.NPTLoss(D, C)
    with pytest.raises(ValueError, match="NPTLoss.*torch.optim.SGD"):
        mo.optim.SGD(npt.parameters(), lr=0.1)
    vmf = mo.UncertaintyMarginLoss(D, C)
    with pytest.raises(ValueError, match="UncertaintyMarginLoss.*torch.optim.AdamW"):
        mo.optim.AdamW(vmf.parameters())
    mo.optim.AdamW(mo.UncertaintyMarginLoss(D, C, push_weight=0, proxy_weight=0).parameters())


@not_interp
def test_a_weight_gradient_from_outside_the_fused_op_raises_at_step():
    # e.g. a user term that reads loss_fn.weight: its gradient would arrive after the fused step
    m = make(mo.ArcFaceLoss, {}, torch.float32, "cpp")
    opt = mo.optim.SGD(m.parameters(), lr=0.1, chunk_bytes=chunk_bytes(m))
    x, y = batch(torch.float32, torch.Generator().manual_seed(14))
    (m(x, y) + m.weight.square().sum()).backward()
    before = m.weight.detach().clone()
    with pytest.raises(RuntimeError, match="outside the fused op.*torch.optim"):
        opt.step()
    assert torch.equal(m.weight, before)


@not_interp
def test_one_optimizer_per_weight():
    m = make(mo.ArcFaceLoss, {}, torch.float32, "torch")
    first = mo.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="already stepped by another"):
        mo.optim.SGD(m.parameters(), lr=0.1)
    del first
    mo.optim.SGD(m.parameters(), lr=0.1)  # the old one is gone: a new one may take the weight


@not_interp
def test_torch_compile_falls_back_to_the_dense_step_with_a_warning(monkeypatch, tmp_path):
    # AOTAutograd traces the backward ahead of time, where the step cannot be fused: the weight
    # gets a dense .grad and opt.step() applies torch.optim's update to it (the same numbers)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    m = make(mo.ArcFaceLoss, {}, torch.float32, "cpp")
    ref = copy.deepcopy(m)
    opt = mo.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, chunk_bytes=chunk_bytes(m))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    compiled = torch.compile(m, backend="aot_eager")
    x, y = batch(torch.float32, torch.Generator().manual_seed(9))
    for step in range(2):
        compiled(x, y).backward()
        assert m.weight.grad is not None
        if step == 0:
            with pytest.warns(RuntimeWarning, match="torch.compile.*eagerly"):
                opt.step()
        else:
            opt.step()
        opt.zero_grad()
        ref(x, y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert rel(m.weight, ref.weight) <= 1e-6


# ----------------------------------------------------------------------------- Triton interpreter

@requires_interp
@pytest.mark.parametrize("opt_name", ["sgd_momentum_wd", "adamw"])
@pytest.mark.parametrize("module", list(MODULES))
def test_triton_matches_torch_optim(opt_name, module):
    family, kw = MODULES[module]
    train_pair(make(family, kw, torch.float32, "triton"), opt_name, torch.float32, steps=20)


@requires_interp
def test_triton_partial_fc_class_index():
    family, kw = MODULES["arcface_subcenters_bias"]
    m = make(family, kw, torch.float32, "triton")
    train_pair(m, "sgd_momentum_wd", torch.float32, steps=6, loss_fn=partial_fc(m))


@outside_interp
def test_triton_interpreter_child():
    tail = run_in_interpreter(__file__, "-k", "test_triton_ and not child")
    assert " passed" in tail and "skipped" not in tail, tail


# ----------------------------------------------------------------------------- memory

MEMORY_SCRIPT = r"""
import json, sys
import torch, torch.nn.functional as F
import marginops as mo

def status(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

from marginops.ops import cpp

B, C, D, CHUNK = 64, 250_000, 128, 8 << 20      # W = 128 MB, chunks of 8 MiB
cpp.set_keep_budget(0)  # the forward's kept dots are the backend's own budget: not measured here
torch.manual_seed(0)
m = mo.ArcFaceLoss(D, C, backend="cpp")
opt = mo.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, chunk_bytes=CHUNK)
x, y = torch.randn(B, D), torch.randint(0, C, (B,))
class_index = torch.arange(0, C, 3)
y_sampled = y - y % 3

def step(sampled):
    if sampled:
        lse, dot = mo.margin_lse(F.normalize(x, dim=1), m.weight, y_sampled, 64.0,
                                 class_index=class_index, backend="cpp")
        loss = F.softplus(lse - 64.0 * dot).mean()
    else:
        loss = m(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad()

out = {"W": m.weight.numel() * 4, "chunk": CHUNK}
for sampled in (False, True):
    step(sampled)                      # warm-up: the momentum buffer exists from here on
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")                  # reset the peak (VmHWM) to the current RSS
    out["reset_ok"] = status("VmHWM") <= base + (4 << 20)
    step(sampled)
    out["growth_sampled" if sampled else "growth"] = status("VmHWM") - base
print(json.dumps(out))
"""


@not_interp
@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_fused_step_extra_memory_is_bounded_by_the_chunk_budget():
    """A full step (forward, backward with the fused update, opt.step) at W = 128 MB grows the
    peak resident memory by a few 8 MiB chunks — the gradient chunk, torch.optim's temporaries on
    it, the backend's tiles — never by a W-sized gradient (torch.optim's step: + 2 W)."""
    # glibc: a fixed mmap threshold and one arena, so that freed chunks go back to the system
    # and the peak measures live memory, not the allocator's caching (which varied 2× run to run)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}
    r = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True,
                       timeout=600, check=False, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["reset_ok"], "could not reset the peak RSS"
    # all classes: the gradient chunk and SGD's d_p = g + wd·p on it (+ tiles): <= 3 chunks;
    # Partial FC adds the gathered rows and the masked pass's copies: <= 5 (measured 2.6, 4)
    assert out["growth"] <= 3 * out["chunk"] + (4 << 20), out
    assert out["growth_sampled"] <= 5 * out["chunk"] + (4 << 20), out
    assert max(out["growth"], out["growth_sampled"]) < out["W"] / 2, out
