"""Every family module (core-op path) against the independent naive reference.

Loss and gradients (embeddings, weight, learnable scale/α, bias) in fp64 (tight) and fp32 (within
the same-precision budget of tests/tolerance.py), gradcheck in fp64, odd shapes, ignored rows,
and confident / opposite rows at s=64. Runs on every CPU backend this install has.
"""

from __future__ import annotations

import math

import pytest
import torch
from tolerance import MIN_GAP, assert_tight, assert_within_budget, cosines, routing_gap

import marginops as mo
from marginops import reference as ref
from marginops.core import backend_status

CPU_BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(
    backend_status("cpu")[name] is not None, reason=f"{name}: {backend_status('cpu')[name]}"))
    for name in ("torch", "cpp")]


def _norm_mean(m):
    return m.norm_mean.double()


# name -> (module factory kwargs, reference call taking (module, x, w, y) in eval mode)
FAMILIES = {
    "normface": (mo.NormFaceLoss, {},
                 lambda m, x, w, y, r: ref.normface_loss(x, w, y, scale=m.scale, reduction=r)),
    "normface_learnable": (mo.NormFaceLoss, {"learnable_scale": True},
                           lambda m, x, w, y, r: ref.normface_loss(x, w, y, scale=m.scale,
                                                                   reduction=r)),
    "crystal": (mo.CrystalLoss, {"learnable_alpha": True},
                lambda m, x, w, y, r: ref.crystal_loss(x, w, y, alpha=m.alpha, bias=m.bias,
                                                       reduction=r)),
    "cosface": (mo.CosFaceLoss, {},
                lambda m, x, w, y, r: ref.cosface_loss(x, w, y, scale=64.0, margin=0.35,
                                                       reduction=r)),
    "arcface": (mo.ArcFaceLoss, {},
                lambda m, x, w, y, r: ref.arcface_loss(x, w, y, reduction=r)),
    "arcface_none_st": (mo.ArcFaceLoss, {"angle_policy": "none", "grad_mode": "straight_through",
                                         "margin": 1.2},
                        lambda m, x, w, y, r: ref.arcface_loss(
                            x, w, y, margin=1.2, angle_policy="none",
                            grad_mode="straight_through", reduction=r)),
    "arcface_easy": (mo.ArcFaceLoss, {"angle_policy": "easy"},
                     lambda m, x, w, y, r: ref.arcface_loss(x, w, y, angle_policy="easy",
                                                            reduction=r)),
    "arcface_clip": (mo.ArcFaceLoss, {"angle_policy": "clip", "margin": 1.0},
                     lambda m, x, w, y, r: ref.arcface_loss(x, w, y, angle_policy="clip",
                                                            margin=1.0, reduction=r)),
    "combined": (mo.CombinedMarginLoss, {"m1": 0.9, "m2": 0.4, "m3": 0.15},
                 lambda m, x, w, y, r: ref.combined_margin_loss(x, w, y, m1=0.9, m2=0.4, m3=0.15,
                                                                reduction=r)),
    "combined_arc": (mo.CombinedMarginLoss, {"m1": 1.0, "m2": 0.3, "m3": 0.2},
                     lambda m, x, w, y, r: ref.combined_margin_loss(x, w, y, m1=1.0, m2=0.3,
                                                                    m3=0.2, reduction=r)),
    "sphereface": (mo.SphereFaceLoss, {},
                   lambda m, x, w, y, r: ref.sphereface_loss(x, w, y, margin=4,
                                                             lambda_=m.lambda_.item(), reduction=r)),
    "curricularface": (mo.CurricularFaceLoss, {},
                       lambda m, x, w, y, r: ref.curricularface_loss(x, w, y, t=m.t.double(),
                                                                     reduction=r)),
    "adaface": (mo.AdaFaceLoss, {},
                lambda m, x, w, y, r: ref.adaface_loss(
                    x, w, y, batch_mean=m.batch_mean.double(), batch_std=m.batch_std.double(),
                    reduction=r)),
    "magface": (mo.MagFaceLoss, {},
                lambda m, x, w, y, r: ref.magface_loss(x, w, y, reduction=r)),
    "elastic_arc": (mo.ElasticArcFaceLoss, {"seed": 3},  # eval mode: the mean margin
                    lambda m, x, w, y, r: ref.arcface_loss(x, w, y, margin=0.5, reduction=r)),
    "elastic_cos": (mo.ElasticCosFaceLoss, {"seed": 3},
                    lambda m, x, w, y, r: ref.cosface_loss(x, w, y, margin=0.35, reduction=r)),
    "subcenter": (mo.SubCenterArcFaceLoss, {"subcenters": 3},
                  lambda m, x, w, y, r: ref.subcenter_arcface_loss(x, w, y, subcenters=3,
                                                                   reduction=r)),
    "npt": (mo.NPTLoss, {"k": 2},
            lambda m, x, w, y, r: ref.npt_loss(x, w, y, k=2, reduction=r)),
    "uncertainty": (mo.UncertaintyMarginLoss, {},
                    lambda m, x, w, y, r: ref.uncertainty_margin_loss(
                        x, w, y, norm_mean=_norm_mean(m), reduction=r)),
}


def make(name: str, D: int, C: int, backend: str, dtype=torch.float64, **extra):
    cls, kwargs, _ = FAMILIES[name]
    torch.manual_seed(1)
    module = cls(D, C, backend=backend, **{**kwargs, **extra}).to(dtype).eval()
    with torch.no_grad():  # weights of unit-ish norm so that cosines spread over [-1, 1]
        module.weight.normal_()
        if module.bias is not None:
            module.bias.normal_(std=0.5)
    return module


def batch(B: int, D: int, C: int, dtype=torch.float64, ignore=(1,)):
    g = torch.Generator().manual_seed(B * 1000 + D * 10 + C)
    x = (torch.randn(B, D, generator=g) * 7).to(dtype)
    y = torch.randint(0, C, (B,), generator=g)
    for i in ignore:
        if i < B:
            y[i] = -1
    return x, y


def family_gap(name: str, module, x, y) -> torch.Tensor:
    """(B,) routing gap of each row (tests/tolerance.py) for this family's decisions: the best
    sub-center, ψ's branch switch on c_y, CurricularFace's hard negatives, NPT's top-k set and
    hinge, MagFace's norm clamp. SphereFace's k switch and AdaFace's clips are continuous with a
    continuous derivative (or act on detached norms) and need no gap."""
    K = module.subcenters
    cos_k = cosines(x, module.weight, K)
    norms = x.detach().double().norm(dim=1)
    spec, extra = {}, []
    policy = getattr(module, "angle_policy", None)
    margin = getattr(module, "margin", None)
    if name == "uncertainty":  # per-row margin from the (detached) norm
        margin = (module.margin * norms / module.norm_mean.double()).clamp(0, module.margin_max)
    switch = None  # c_y where ψ changes branch: a float or one per row
    if name.startswith("combined"):
        switch = {"fallback": math.cos((math.pi - module.m2) / module.m1), "easy": 0.0}.get(policy)
    elif policy in ("fallback", "clip"):  # θ + m reaches π at c_y = cos(π − m) = −cos m
        switch = -torch.cos(torch.as_tensor(margin, dtype=torch.float64)).expand(x.shape[0])
    elif policy == "easy":
        switch = 0.0
    if name == "magface":  # a = clamp(‖x‖, l_a, u_a) is not detached
        extra = [(norms - module.l_a).abs(), (norms - module.u_a).abs()]
    if name == "curricularface":
        spec["hard_margin"] = module.margin
    if name == "npt":
        spec["topk"] = module.k
        cos = cos_k.amax(dim=2)
        c_y = cos.gather(1, y.clamp_min(0)[:, None])
        neg = cos.scatter(1, y.clamp_min(0)[:, None], float("-inf")).topk(module.k, dim=1).values
        hinge = (neg - c_y + module.delta).abs().amin(dim=1)
        extra.append(torch.where(y >= 0, hinge, float("inf")))
    gaps = []
    for i in range(x.shape[0]):
        sw = () if switch is None else (float(switch[i] if torch.is_tensor(switch) else switch),)
        gaps.append(routing_gap(cos_k[i:i + 1], y[i:i + 1], target_switches=sw, **spec))
    gap = torch.tensor(gaps, dtype=torch.float64)
    for e in extra:
        gap = torch.minimum(gap, e)
    return gap


def gapped_batch(name: str, module, B: int, D: int, C: int, **kw):
    """``batch``, with every row whose routing gap is below MIN_GAP redrawn, so that fp32 (any
    backend, any summation order) and fp64 take the same branches and winners."""
    x, y = batch(B, D, C, **kw)
    g = torch.Generator().manual_seed(B * 1000 + D * 10 + C + 1)
    for _ in range(100):
        near = family_gap(name, module, x, y) < MIN_GAP
        if not near.any():
            return x, y
        x[near] = (torch.randn(int(near.sum()), D, generator=g) * 7).to(x.dtype)
    raise AssertionError(f"{name}: no rows with a routing gap of {MIN_GAP} in 100 draws")


def params_of(module):
    """The differentiable leaves the reference sees: weight, then scale/α and bias if learnable."""
    out = [module.weight]
    if isinstance(module.scale, torch.nn.Parameter):
        out.append(module.scale)
    if module.bias is not None:
        out.append(module.bias)
    return out


def loss_and_grads(fn, x, leaves):
    x = x.detach().clone().requires_grad_()
    loss = fn(x)
    grads = torch.autograd.grad(loss.sum(), [x, *leaves], allow_unused=True)
    return loss.detach(), grads


def compare(name, module, x, y, reduction="mean"):
    """(ours, reference) losses and gradient lists for the module in its current state."""
    ref_fn = FAMILIES[name][2]
    leaves = params_of(module)
    ours = loss_and_grads(lambda xx: module(xx, y), x, leaves)
    theirs = loss_and_grads(lambda xx: ref_fn(module, xx, module.weight, y, reduction), x, leaves)
    return ours, theirs


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("shape", [(9, 13, 7), (1, 3, 7), (33, 8, 50)])
def test_family_matches_reference_fp64(name, backend, shape):
    B, D, C = shape
    module = make(name, D, C, backend)
    x, y = batch(B, D, C, ignore=(1,) if B > 1 else ())
    for reduction in ("mean", "none"):
        module.reduction = reduction
        (l1, g1), (l2, g2) = compare(name, module, x, y, reduction)
        assert_tight(l1, l2, name=f"{name} loss {reduction}")
        for i, (a, b) in enumerate(zip(g1, g2)):
            assert_tight(a, b, name=f"{name} grad {i} {reduction}")
        if B > 1:  # ignored row: nothing in the loss, nothing in the gradient
            assert g1[0][1].abs().max() == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_fp32_within_budget(name, backend):
    B, D, C = 17, 24, 300
    truth_module = make(name, D, C, "torch")
    x, y = gapped_batch(name, truth_module, B, D, C)  # fp32 vs fp64: no near-ties (tolerance.py)
    (lt, gt), _ = compare(name, truth_module, x, y)
    ours_module = make(name, D, C, backend, dtype=torch.float32)
    (l32, g32), (lb, gb) = compare(name, ours_module, x.float(), y)
    assert_within_budget(l32, lb, lt, torch.float32, name=f"{name} loss")
    for i, (a, b, t) in enumerate(zip(g32, gb, gt)):
        assert a.dtype == torch.float32
        assert_within_budget(a, b, t, torch.float32, name=f"{name} grad {i}")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_gradcheck(name):
    # straight-through is deliberately not the derivative; gradcheck its exact twin instead
    module = make(name, 4, 5, "torch", **({"grad_mode": "exact"} if name.endswith("_st") else {}))
    if hasattr(module, "scale") and not isinstance(module.scale, torch.nn.Parameter) \
            and module.scale == 64.0:
        module.scale = 8.0  # keeps finite differences well-conditioned; s=64 is checked above
    x, y = batch(3, 4, 5, ignore=())
    x = x.detach().requires_grad_()
    w = module.weight.detach().clone().requires_grad_()

    def f(xx, ww):
        return torch.func.functional_call(module, {"weight": ww}, (xx, y))

    if name in ("adaface", "uncertainty"):
        # their margins read ‖x‖ detached (by the papers' design), so d/dx is not the derivative
        assert torch.autograd.gradcheck(lambda ww: f(x.detach(), ww), (w,), eps=1e-6, atol=1e-6)
    else:
        assert torch.autograd.gradcheck(f, (x, w), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_extreme_cosines_stay_finite(name, backend):
    """Rows equal to their class weight (cos = 1) and to its negation (cos = −1), s = 64."""
    D, C = 6, 5
    module = make(name, D, C, backend)
    w = module.weight.view(C, module.subcenters, D)[:, 0]
    y = torch.tensor([0, 1, 2, 3])
    x = torch.stack([w[0] * 3, -w[1] * 3, w[2] * 40, -w[3] * 0.5]).detach()
    (l1, g1), (l2, g2) = compare(name, module, x, y)
    assert torch.isfinite(l1).all() and all(torch.isfinite(g).all() for g in g1)
    assert_tight(l1, l2, rtol=1e-7, atol=1e-7, name=f"{name} extreme loss")
    for a, b in zip(g1, g2):
        assert_tight(a, b, rtol=1e-6, atol=1e-6, name=f"{name} extreme grad")


def test_straight_through_gradient_is_softmax_minus_onehot():
    """Same loss as exact; d loss / d cos = s·(p − onehot) where p uses the margin logits."""
    D, C, B, s = 8, 6, 5, 64.0
    module = make("arcface", D, C, "torch")
    x, y = batch(B, D, C, ignore=())
    exact = mo.ArcFaceLoss(D, C, backend="torch").double()
    st = mo.ArcFaceLoss(D, C, backend="torch", grad_mode="straight_through").double()
    exact.load_state_dict(module.state_dict())
    st.load_state_dict(module.state_dict())
    assert_tight(exact(x, y), st(x, y))
    # gradient w.r.t. the cosine matrix: feed cosines through a leaf by hand
    cos = (torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(module.weight).t())
    cos = cos.detach().requires_grad_()
    logits = ref.arcface_logits(cos, y, scale=s, margin=0.5, grad_mode="straight_through")
    torch.nn.functional.cross_entropy(logits, y, reduction="sum").backward()
    p = torch.softmax(logits.detach(), dim=1)
    assert_tight(cos.grad, s * (p - torch.nn.functional.one_hot(y, C)))
    # and the module's embedding gradient equals the chain rule through that cosine gradient
    xx = x.clone().requires_grad_()
    st.reduction = "sum"
    st(xx, y).backward()
    x2 = x.clone().requires_grad_()
    c2 = torch.nn.functional.normalize(x2) @ torch.nn.functional.normalize(module.weight).t()
    (c2 * cos.grad).sum().backward()
    assert_tight(xx.grad, x2.grad)


def test_train_mode_state_updates_before_use():
    D, C, B = 8, 6, 10
    x, y = batch(B, D, C)
    # CurricularFace: t ← 0.01·mean(c_y) + 0.99·t, then used in the same step
    m = make("curricularface", D, C, "torch").train()
    c_y = ref._target(ref._cosines(x, m.weight.detach()), y)
    t_new = ref.curricularface_update_t(m.t.double(), c_y, labels=y)
    loss = m(x, y)
    assert_tight(m.t.double(), t_new)
    assert_tight(loss, ref.curricularface_loss(x, m.weight, y, t=t_new))
    # AdaFace: EMA of the batch norm statistics, before use
    m = make("adaface", D, C, "torch").train()
    mean, std = ref.adaface_update_stats(m.batch_mean.double(), m.batch_std.double(),
                                         x.norm(dim=1), labels=y)
    loss = m(x, y)
    assert_tight(m.batch_mean.double(), mean, rtol=1e-6)
    assert_tight(loss, ref.adaface_loss(x, m.weight, y, batch_mean=mean, batch_std=std),
                 rtol=1e-6)
    # SphereFace: λ from the iteration before the step, then the counter advances
    m = make("sphereface", D, C, "torch").train()
    lam = m.lambda_
    loss = m(x, y)
    assert int(m.iteration) == 1 and lam.item() == pytest.approx(1000.0)
    assert_tight(loss, ref.sphereface_loss(x, m.weight, y, lambda_=lam.item()))
    # Uncertainty margin: μ EMA before use
    m = make("uncertainty", D, C, "torch").train()
    mu = ref.uncertainty_update_norm_mean(m.norm_mean.double(), x.norm(dim=1), labels=y)
    loss = m(x, y)
    assert_tight(loss, ref.uncertainty_margin_loss(x, m.weight, y, norm_mean=mu), rtol=1e-6)
    # eval mode changes nothing
    for name in ("curricularface", "adaface", "sphereface", "uncertainty"):
        m = make(name, D, C, "torch").eval()
        before = {k: v.clone() for k, v in m.state_dict().items()}
        m(x, y)
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items()), name


@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("name", ["elastic_arc", "elastic_cos"])
def test_elastic_margins_seeded_and_match_reference(name, plus):
    D, C, B = 8, 6, 12
    x, y = batch(B, D, C, ignore=())
    m = make(name, D, C, "torch", plus=plus).train()
    assert m.draw_state.tolist() == [3, 0]
    loss = m(x, y)
    c_y = ref._target(ref._cosines(x, m.weight.detach()), y)
    fn = ref.elastic_arcface_loss if name == "elastic_arc" else ref.elastic_cosface_loss
    for step, out in enumerate((loss, m(x, y))):  # fresh draws each step
        draws = ref.elastic_margins(c_y, m.margin, m.std, seed=3, step=step, plus=plus)
        assert_tight(out, fn(x, m.weight, y, margins=draws))
    assert m.draw_state.tolist() == [3, 2]
    assert not torch.equal(loss, m(x, y))
    m2 = make(name, D, C, "torch", plus=plus).train()
    assert_tight(m2(x, y), loss)  # same seed, same draws


def test_magface_gradient_reaches_norm():
    m = make("magface", 8, 6, "torch")
    x, y = batch(4, 8, 6, ignore=())
    x = (x * 3).requires_grad_()  # norms inside [l_a, u_a]
    m(x, y).backward()
    radial = (x.grad * x.detach()).sum(dim=1)
    assert radial.abs().min() > 0  # the magnitude is trained, not only the direction


def test_all_rows_ignored_gives_zero_loss():
    m = make("arcface", 8, 6, "torch")
    x, _ = batch(3, 8, 6)
    x = x.requires_grad_()
    loss = m(x, torch.full((3,), -1))
    loss.backward()
    assert loss.item() == 0 and x.grad.abs().max() == 0


def test_subcenter_helpers():
    D, C, K = 8, 4, 3
    m = mo.SubCenterArcFaceLoss(D, C, subcenters=K, backend="torch").double()
    with torch.no_grad():
        m.weight.normal_()
    w = m.weight.view(C, K, D)
    y = torch.tensor([0, 0, 0, 1, 2, 2, 2])
    x = torch.stack([w[0, 2], w[0, 2] + 0.01, w[0, 1], w[1, 0], w[2, 1], 1.1 * w[2, 1],
                     -w[2, 1]]).double()
    dominant = m.dominant_subcenters(x, y)
    assert dominant.tolist() == [2, 0, 1, -1]
    keep = m.clean_mask(x, y)
    assert keep[[0, 1, 3, 4, 5]].all() and not keep[6]  # the opposite sample is 180° away


def test_crystal_alpha_low():
    assert mo.crystal_alpha_low(10_000, 0.9) == pytest.approx(11.4, abs=0.05)
    m = mo.CrystalLoss(16, 10_000)
    assert m.alpha == pytest.approx(math.log(0.9 * 9998 / 0.1))


def test_predict_and_logits():
    m = make("arcface", 8, 30, "torch")
    x, _ = batch(5, 8, 30)
    logits = m.logits(x)
    assert logits.shape == (5, 30)
    assert torch.equal(m.predict(x, k=3), logits.topk(3, dim=1).indices)
    c = make("crystal", 8, 30, "torch")
    assert torch.equal(c.predict(x, k=2), c.logits(x).topk(2, dim=1).indices)
    sphere = make("sphereface", 8, 30, "torch")  # per-row scale ‖x‖: logits are x·ŵ
    w_hat = torch.nn.functional.normalize(sphere.weight, dim=1)
    assert_tight(sphere.logits(x), x @ w_hat.t())


def test_functional_api_matches_modules():
    D, C = 8, 11
    m = make("arcface", D, C, "torch")
    x, y = batch(6, D, C)
    f = mo.functional.arcface_loss(x, m.weight, y, backend="torch")
    assert_tight(f, m(x, y))
    assert_tight(mo.functional.cosface_loss(x, m.weight, y, backend="torch"),
                 ref.cosface_loss(x, m.weight, y))
    assert_tight(mo.functional.normface_loss(x, m.weight, y, scale=10.0, backend="torch"),
                 ref.normface_loss(x, m.weight, y, scale=10.0))


def test_inputs_not_mutated():
    m = make("curricularface", 8, 6, "torch")
    x, y = batch(4, 8, 6)
    x0, y0, w0 = x.clone(), y.clone(), m.weight.detach().clone()
    m(x, y)
    assert torch.equal(x, x0) and torch.equal(y, y0) and torch.equal(m.weight, w0)
