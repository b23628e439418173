"""marginops.reference against an implementation nobody here wrote (pytorch-metric-learning),
plus formula sanity checks of the reference itself.

pytorch-metric-learning (pml 2.9.0) conventions, read from its source:
* ``ArcFaceLoss`` / ``SubCenterArcFaceLoss`` take the margin in DEGREES (``np.radians`` in
  ``init_margin``); ``CosFaceLoss`` takes it as a plain cosine offset.
* ``W`` is (embedding_size, num_classes): pml.W = our weight.T. For ``SubCenterArcFaceLoss`` W is
  (D, C·K) and ``get_cosine`` does ``view(-1, num_classes, sub_centers).max(2)``, i.e. column
  class·K + k — the same layout as our rows, so again pml.W = our weight.T.
* ArcFace policy: ``where(θ <= π − m, cos(θ+m), cos θ − m·sin m)``, θ = acos(clamp(c, −1, 1)):
  that is our "fallback" (identical except on the measure-zero boundary c = cos(π − m)).
* Reduction: per-row CE (``reduction_type="element"``, miner weights 1) reduced by the default
  ``MeanReducer`` (torch.mean over all B rows) == our reduction="mean" when no row is ignored;
  ``DoNothingReducer`` exposes the per-row losses == our reduction="none". pml has no ignore
  label (−1 would silently index the last class), so pml comparisons use valid labels only.
"""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.reducers import DoNothingReducer, MeanReducer

from marginops import reference as ref

B, D, C = 16, 32, 10
F64 = torch.float64


def close(a, b, rtol=1e-9, atol=1e-10, msg=""):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{msg}: {m}")


def make_data(seed=0, classes=C, rows_per_class=1, labels=None):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, D, generator=g, dtype=F64) * 3.0
    weight = torch.randn(classes * rows_per_class, D, generator=g, dtype=F64)
    if labels is None:
        labels = torch.randint(0, classes, (B,), generator=g)
    return emb, weight, labels


def grads(fn, emb, weight, labels, **kw):
    e = emb.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = fn(e, w, labels, **kw)
    ge, gw = torch.autograd.grad(loss.sum(), (e, w))
    return loss.detach(), ge, gw


def pml_run(loss_mod, emb, weight, labels):
    """Run a pml loss with W set from our (rows = classes) weight; returns loss, dE, dW (ours)."""
    loss_mod = loss_mod.to(F64)
    with torch.no_grad():
        loss_mod.W.copy_(weight.t())
    e = emb.clone().requires_grad_(True)
    out = loss_mod(e, labels)
    if isinstance(out, dict):           # DoNothingReducer: the per-row losses
        out = out["loss"]["losses"]
    ge, gw = torch.autograd.grad(out.sum(), (e, loss_mod.W))
    return out.detach(), ge, gw.t()


def assert_same(ours, theirs, msg):
    for name, a, b in zip(("loss", "d/demb", "d/dweight"), ours, theirs):
        close(a, b, msg=f"{msg} {name}")


# ------------------------------------------------------------------ vs pytorch-metric-learning

@pytest.mark.parametrize("margin", [0.5, 2.0])   # 2.0 rad sends many targets to the fallback branch
@pytest.mark.parametrize("reducer,reduction", [(MeanReducer, "mean"), (DoNothingReducer, "none")])
def test_arcface_matches_pml(margin, reducer, reduction):
    emb, weight, labels = make_data(1)
    s = 30.0
    pml = pml_losses.ArcFaceLoss(num_classes=C, embedding_size=D, margin=math.degrees(margin),
                                 scale=s, reducer=reducer())
    theirs = pml_run(pml, emb, weight, labels)
    ours = grads(ref.arcface_loss, emb, weight, labels, scale=s, margin=margin,
                 angle_policy="fallback", reduction=reduction)
    assert_same(ours, theirs, "arcface fallback")
    if margin == 2.0:
        # The fallback branch really is exercised, and pml is NOT the "none" policy.
        c_y = ref._cosines(emb, weight).gather(1, labels[:, None]).squeeze(1)
        assert (c_y <= math.cos(math.pi - margin)).sum() >= 3
        none = grads(ref.arcface_loss, emb, weight, labels, scale=s, margin=margin,
                     angle_policy="none", reduction=reduction)
        assert not torch.allclose(none[0], theirs[0], rtol=1e-6)


@pytest.mark.parametrize("reducer,reduction", [(MeanReducer, "mean"), (DoNothingReducer, "none")])
def test_cosface_matches_pml(reducer, reduction):
    emb, weight, labels = make_data(2)
    pml = pml_losses.CosFaceLoss(num_classes=C, embedding_size=D, margin=0.35, scale=64.0,
                                 reducer=reducer())
    theirs = pml_run(pml, emb, weight, labels)
    ours = grads(ref.cosface_loss, emb, weight, labels, scale=64.0, margin=0.35,
                 reduction=reduction)
    assert_same(ours, theirs, "cosface")


@pytest.mark.parametrize("margin", [0.5, 2.0])
def test_subcenter_arcface_matches_pml(margin):
    K = 3
    emb, weight, labels = make_data(3, rows_per_class=K)
    pml = pml_losses.SubCenterArcFaceLoss(num_classes=C, embedding_size=D,
                                          margin=math.degrees(margin), scale=32.0, sub_centers=K,
                                          reducer=MeanReducer())
    assert pml.W.shape == (D, C * K)
    theirs = pml_run(pml, emb, weight, labels)
    ours = grads(ref.subcenter_arcface_loss, emb, weight, labels, subcenters=K, scale=32.0,
                 margin=margin)
    assert_same(ours, theirs, "subcenter arcface")
    # The layout matters: a k·C + class reading of the same weight gives another loss.
    wrong = weight.view(C, K, D).transpose(0, 1).reshape(C * K, D)
    other = ref.subcenter_arcface_loss(emb, wrong, labels, subcenters=K, scale=32.0, margin=margin)
    assert not torch.allclose(other, theirs[0], rtol=1e-6)


# --------------------------------------------------------------------------- formula sanity checks

def test_arcface_zero_margin_is_normface():
    emb, weight, labels = make_data(4)
    a = grads(ref.arcface_loss, emb, weight, labels, scale=20.0, margin=0.0)
    n = grads(ref.normface_loss, emb, weight, labels, scale=20.0)
    assert_same(a, n, "arcface m=0 vs normface")


def test_cosface_zero_margin_is_normface():
    emb, weight, labels = make_data(5)
    a = grads(ref.cosface_loss, emb, weight, labels, scale=20.0, margin=0.0)
    n = grads(ref.normface_loss, emb, weight, labels, scale=20.0)
    assert_same(a, n, "cosface m=0 vs normface")


def test_normface_learnable_scale_gets_gradient():
    emb, weight, labels = make_data(6)
    s = torch.tensor(10.0, dtype=F64, requires_grad=True)
    loss = ref.normface_loss(emb, weight, labels, scale=s)
    (gs,) = torch.autograd.grad(loss, s)
    h = 1e-6
    fd = (ref.normface_loss(emb, weight, labels, scale=10.0 + h)
          - ref.normface_loss(emb, weight, labels, scale=10.0 - h)) / (2 * h)
    close(gs, fd, rtol=1e-6, atol=1e-8, msg="d loss / d scale")


@pytest.mark.parametrize("policy", ["fallback", "none", "easy", "clip"])
@pytest.mark.parametrize("grad_mode", ["exact", "straight_through"])
def test_combined_1_m_0_is_arcface(policy, grad_mode):
    emb, weight, labels = make_data(7)
    for m in (0.5, 2.0):
        c = grads(ref.combined_margin_loss, emb, weight, labels, scale=16.0, m1=1.0, m2=m, m3=0.0,
                  angle_policy=policy, grad_mode=grad_mode)
        a = grads(ref.arcface_loss, emb, weight, labels, scale=16.0, margin=m,
                  angle_policy=policy, grad_mode=grad_mode)
        assert_same(c, a, f"combined(1,{m},0) vs arcface {policy} {grad_mode}")


def test_combined_1_0_m_is_cosface():
    emb, weight, labels = make_data(8)
    c = grads(ref.combined_margin_loss, emb, weight, labels, scale=16.0, m1=1.0, m2=0.0, m3=0.35)
    a = grads(ref.cosface_loss, emb, weight, labels, scale=16.0, margin=0.35)
    assert_same(c, a, "combined(1,0,m) vs cosface")


def test_sphereface_psi_continuous_and_decreasing():
    m = 4
    theta = torch.linspace(0.0, math.pi, 200_001, dtype=F64)
    psi = ref.sphereface_psi(torch.cos(theta), m)
    step = theta[1] - theta[0]
    d = psi.diff()
    assert (d <= 1e-12).all(), "ψ must be non-increasing"
    assert (d < 0).float().mean() > 0.999, "ψ must be strictly decreasing almost everywhere"
    # |ψ'| = m·|sin(mθ)| + 0 ≤ m: any jump would show up as a step far larger than m·Δθ.
    assert d.abs().max() <= m * step * 1.01 + 1e-9, "ψ must be continuous"
    close(psi[0], torch.tensor(1.0, dtype=F64), msg="ψ(0)")
    close(psi[-1], torch.tensor(-(2.0 * m - 1.0), dtype=F64), msg="ψ(π)")
    # and it is cos(mθ) on the first piece
    first = theta < math.pi / m - 1e-6
    close(psi[first], torch.cos(m * theta[first]), msg="ψ = cos(mθ) on [0, π/m)")


def test_sphereface_lambda_schedule():
    assert ref.sphereface_lambda(0) == 1000.0
    assert ref.sphereface_lambda(10**7) == 5.0
    assert abs(ref.sphereface_lambda(100) - 1000.0 / 13.0) < 1e-9


def test_crystal_alpha_low():
    assert abs(ref.crystal_alpha_low(10000, 0.9) - 11.4) < 0.01


@pytest.mark.parametrize("margin", [0.5, 1.4])   # 1.4: cos(π − m) ≈ −0.17, both branches occur
def test_straight_through_loss_and_cosine_gradient(margin):
    emb, weight, labels = make_data(9)
    s = 16.0
    cos0 = ref._cosines(emb, weight)
    onehot = torch.nn.functional.one_hot(labels, C).to(F64)
    out = {}
    for mode in ("exact", "straight_through"):
        cos = cos0.clone().requires_grad_(True)
        logits = ref.arcface_logits(cos, labels, scale=s, margin=margin, grad_mode=mode)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        (g,) = torch.autograd.grad(loss, cos)
        out[mode] = (loss.detach(), g, torch.softmax(logits.detach(), dim=1))
    close(out["exact"][0], out["straight_through"][0], msg="same loss value")
    loss_st, g_st, p = out["straight_through"]
    close(g_st, s * (p - onehot) / B, msg="straight-through dL/dc = s·(softmax − onehot)/B")
    # exact: the target column carries dψ/dc = cos m + sin m·c/√(1−c²) (where ψ = cos(θ+m))
    _, g_ex, p = out["exact"]
    c_y = cos0.gather(1, labels[:, None]).squeeze(1)
    in_formula = c_y > math.cos(math.pi - margin)
    dpsi = torch.where(in_formula,
                       math.cos(margin) + math.sin(margin) * c_y / torch.sqrt(1 - c_y**2),
                       torch.ones_like(c_y))
    expected = s * (p - onehot) / B
    expected = torch.where(onehot.bool(), expected * dpsi[:, None], expected)
    close(g_ex, expected, msg="exact dL/dc")
    assert in_formula.any()
    assert not torch.allclose(g_ex, g_st)


def _family_calls():
    """(name, fn, kwargs) covering every family, for the ignore-label test."""
    K = 3
    g = torch.Generator().manual_seed(123)
    margins = 0.5 + 0.05 * torch.randn(B, generator=g, dtype=F64)
    return [
        ("normface", ref.normface_loss, dict(scale=16.0), 1),
        ("crystal", ref.crystal_loss,
         dict(alpha=5.0, bias=torch.linspace(-1, 1, C, dtype=F64)), 1),
        ("cosface", ref.cosface_loss, dict(scale=16.0), 1),
        ("arcface", ref.arcface_loss, dict(scale=16.0), 1),
        ("arcface_st", ref.arcface_loss, dict(scale=16.0, grad_mode="straight_through"), 1),
        ("combined", ref.combined_margin_loss, dict(scale=16.0, m1=0.9, m2=0.4, m3=0.15), 1),
        ("sphereface", ref.sphereface_loss, dict(margin=4, lambda_=5.0), 1),
        ("curricularface", ref.curricularface_loss, dict(scale=16.0, t=0.3), 1),
        ("adaface", ref.adaface_loss, dict(scale=16.0, batch_mean=5.0, batch_std=1.0), 1),
        ("magface", ref.magface_loss, dict(scale=16.0), 1),
        ("elastic_arc", ref.elastic_arcface_loss, dict(scale=16.0, margins=margins), 1),
        ("elastic_cos", ref.elastic_cosface_loss, dict(scale=16.0, margins=margins), 1),
        ("subcenter", ref.subcenter_arcface_loss, dict(scale=16.0, subcenters=K), K),
        ("npt", ref.npt_loss, dict(k=2, delta=0.5), 1),
        ("uncertainty", ref.uncertainty_margin_loss, dict(norm_mean=15.0), 1),
    ]


@pytest.mark.parametrize("name,fn,kw,rows", _family_calls(),
                         ids=[c[0] for c in _family_calls()])
def test_ignored_rows_contribute_nothing(name, fn, kw, rows):
    emb, weight, labels = make_data(10, rows_per_class=rows)
    labels = labels.clone()
    ignored = torch.tensor([1, 4, 5, 11])
    labels[ignored] = -1
    keep = labels >= 0
    emb_in, w_in = emb.clone(), weight.clone()

    loss, ge, gw = grads(fn, emb, weight, labels, **kw)
    assert torch.equal(emb, emb_in) and torch.equal(weight, w_in), "inputs mutated"
    assert torch.isfinite(loss) and torch.isfinite(ge).all() and torch.isfinite(gw).all()
    assert (ge[ignored] == 0).all(), f"{name}: ignored rows got a gradient"

    sub_kw = {k: (v[keep] if k == "margins" else v) for k, v in kw.items()}
    sub = grads(fn, emb[keep], weight, labels[keep], **sub_kw)
    close(loss, sub[0], msg=f"{name} mean loss vs the valid rows alone")
    close(ge[keep], sub[1], msg=f"{name} d/demb vs the valid rows alone")
    close(gw, sub[2], msg=f"{name} d/dweight vs the valid rows alone")

    per_row = fn(emb, weight, labels, reduction="none", **kw)
    assert per_row.shape == (B,) and (per_row[ignored] == 0).all()
    close(per_row.sum(), fn(emb, weight, labels, reduction="sum", **kw), msg=f"{name} sum")
    close(per_row.sum() / keep.sum(), loss, msg=f"{name} none vs mean")


def test_npt_masks_target_with_minus_inf():
    weight = torch.eye(4, dtype=F64)
    emb = torch.tensor([[-0.1, -1.0, -2.0, -3.0]], dtype=F64)   # every cosine negative
    labels = torch.tensor([0])
    e = emb.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = ref.npt_loss(e, w, labels, k=1, delta=1.0, r=1.0)
    c = emb[0] / emb[0].norm()
    expected = 2.0 * (c[1] - c[0] + 1.0)       # hardest negative is class 1, not the target
    close(loss, expected, msg="npt picks a negative")
    masked_with_zero = 2.0 * (0.0 - c[0] + 1.0)  # what 0-masking (the authors' code) would give
    assert abs(loss.item() - masked_with_zero.item()) > 0.1
    loss.backward()
    touched = (w.grad.abs().sum(dim=1) > 0).nonzero().flatten().tolist()
    assert touched == [0, 1], "gradient must reach only the target and the selected negative"


def test_elastic_plus_gives_smallest_margin_to_easiest_row():
    cos = torch.rand(B, generator=torch.Generator().manual_seed(6), dtype=F64)
    plain = ref.elastic_margins(cos, 0.5, 0.05, seed=5, step=0)
    plus = ref.elastic_margins(cos, 0.5, 0.05, seed=5, step=0, plus=True)
    close(plus.sort().values, plain.sort().values, msg="same draws")
    order = cos.argsort(descending=True)
    assert (plus[order].diff() >= 0).all(), "higher cosine → smaller margin"


def test_curricularface_matches_hand_built_logits():
    emb, weight, labels = make_data(11)
    s, m, t = 16.0, 0.5, 0.2
    loss = ref.curricularface_loss(emb, weight, labels, scale=s, margin=m, t=t)
    cos = ref._cosines(emb, weight)
    c_y = cos.gather(1, labels[:, None])
    thr = torch.cos(torch.acos(c_y) + m)
    hot = torch.nn.functional.one_hot(labels, C).bool()
    nt = torch.where((cos > thr) & ~hot, cos * (t + cos), cos)
    tgt = torch.where(c_y > math.cos(math.pi - m), torch.cos(torch.acos(c_y) + m),
                      c_y - m * math.sin(m))
    logits = s * torch.where(hot, tgt, nt)
    close(loss, torch.nn.functional.cross_entropy(logits, labels), msg="curricularface by hand")
    assert ((cos > thr) & ~hot).any(), "test data must contain hard negatives"


@pytest.mark.parametrize("dtype", [F64, torch.bfloat16])
def test_target_cosine_at_plus_minus_one_stays_finite(dtype):
    emb, weight, labels = make_data(12)
    emb = emb.clone()
    emb[0] = 5.0 * weight[labels[0]]        # c_y = +1
    emb[1] = -2.0 * weight[labels[1]]       # c_y = −1
    calls = [(ref.arcface_loss, {}), (ref.arcface_loss, dict(angle_policy="none")),
             (ref.arcface_loss, dict(angle_policy="clip")),
             (ref.combined_margin_loss, dict(m1=0.9, m2=0.4, m3=0.15)),
             (ref.sphereface_loss, {}), (ref.curricularface_loss, dict(t=0.2)),
             (ref.adaface_loss, dict(batch_mean=20.0, batch_std=100.0)), (ref.magface_loss, {})]
    for fn, kw in calls:
        e = emb.to(dtype).requires_grad_(True)
        w = weight.to(dtype).requires_grad_(True)
        loss = fn(e, w, labels, **kw)
        loss.backward()
        finite = torch.isfinite(e.grad).all() and torch.isfinite(w.grad).all()
        assert torch.isfinite(loss) and finite, fn


def test_adaface_matches_authors_head_transcription():
    """Transcription of the authors' head.py forward (every cosine clamped) on data where no
    non-target |c| exceeds 1 − 1e-3, so our documented deviation does not show."""
    emb, weight, labels = make_data(13)
    s, m, h, eps, mu, sigma = 64.0, 0.4, 0.333, 1e-3, 5.0, 2.0
    cos = torch.nn.functional.normalize(emb) @ torch.nn.functional.normalize(weight).t()
    assert cos.abs().max() < 1 - eps
    cos = cos.clamp(-1 + eps, 1 - eps)
    safe = emb.norm(dim=1, keepdim=True).clamp(0.001, 100).detach()
    scaler = ((safe - mu) / (sigma + eps) * h).clamp(-1, 1)
    hot = torch.nn.functional.one_hot(labels, C).to(F64)
    theta = cos.acos() + hot * (-m * scaler)
    cosine = theta.clamp(eps, math.pi - eps).cos() - hot * (m + m * scaler)
    expected = torch.nn.functional.cross_entropy(s * cosine, labels)
    got = ref.adaface_loss(emb, weight, labels, scale=s, margin=m, h=h, eps=eps, batch_mean=mu,
                           batch_std=sigma)
    close(got, expected, msg="adaface vs authors' head.py")


def test_buffer_updates():
    labels = torch.tensor([0, -1, 2, 3])
    c = torch.tensor([0.2, 0.9, 0.4, 0.6], dtype=F64)
    close(ref.curricularface_update_t(0.5, c, labels=labels),
          torch.tensor(0.01 * 0.4 + 0.99 * 0.5, dtype=F64), msg="curricular t")
    n = torch.tensor([10.0, 1e6, 20.0, 30.0], dtype=F64)
    mean, std = ref.adaface_update_stats(20.0, 100.0, n, t_alpha=0.01, labels=labels)
    close(mean, torch.tensor(0.01 * 20.0 + 0.99 * 20.0, dtype=F64), msg="adaface mean")
    close(std, torch.tensor(0.01 * 10.0 + 0.99 * 100.0, dtype=F64), msg="adaface std (unbiased)")
    close(ref.uncertainty_update_norm_mean(15.0, n, momentum=0.1, labels=labels),
          torch.tensor(0.1 * 20.0 + 0.9 * 15.0, dtype=F64), msg="norm mean")
