"""marginops.compat.pml against pytorch-metric-learning 2.9's own classes, in fp64.

For each of the four losses, with PML's defaults and with a non-default configuration: the same
W (loaded from PML's state dict), the same embeddings and labels → the same loss, the same
gradients for the embeddings and for W, the same ``get_logits``. State dicts load both ways, the
seeded default initialisation is PML's, margins are degrees, and what cannot be supported raises
an error that names it.
"""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.reducers import DoNothingReducer, MeanReducer
from pytorch_metric_learning.regularizers import RegularFaceRegularizer
from tolerance import assert_tight

import marginops
from marginops.compat import pml

B, D, C = 16, 32, 10
F64 = torch.float64

# (class name, constructor kwargs): PML's defaults, then a non-default case (ArcFace at 114.6°
# sends targets through PML's θ + m > π fallback).
CASES = [
    ("ArcFaceLoss", {}),
    ("ArcFaceLoss", {"margin": math.degrees(2.0), "scale": 30}),
    ("CosFaceLoss", {}),
    ("CosFaceLoss", {"margin": 0.2, "scale": 30}),
    ("SubCenterArcFaceLoss", {}),
    ("SubCenterArcFaceLoss", {"margin": 40.0, "scale": 32, "sub_centers": 2}),
    ("NormalizedSoftmaxLoss", {}),
    ("NormalizedSoftmaxLoss", {"temperature": 0.1}),
]
IDS = [f"{name}-{'default' if not kw else 'custom'}" for name, kw in CASES]


def build_pair(name: str, kw: dict, seed: int = 0):
    """PML's module and ours, in fp64, ours loaded from PML's state dict."""
    torch.manual_seed(seed)
    theirs = getattr(pml_losses, name)(num_classes=C, embedding_size=D, **kw).to(F64)
    ours = getattr(pml, name)(num_classes=C, embedding_size=D, **kw).to(F64)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g, dtype=F64) * 3.0, torch.randint(0, C, (B,), generator=g)


def loss_and_grads(module, emb, labels):
    x = emb.clone().requires_grad_(True)
    loss = module(x, labels)
    gx, gw = torch.autograd.grad(loss, (x, module.W))
    return loss.detach(), gx, gw


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_matches_pml(name, kw):
    theirs, ours = build_pair(name, kw)
    emb, labels = data()
    expected = loss_and_grads(theirs, emb, labels)
    actual = loss_and_grads(ours, emb, labels)
    # PML forms p_y − 1 in F.cross_entropy (cancellation at s = 64): gradients agree to ~1e-10 of
    # their magnitude, the loss to rounding.
    for what, a, e in zip(("loss", "d/dembeddings", "d/dW"), actual, expected):
        assert_tight(a, e, rtol=1e-9, atol=1e-9, name=f"{name} {what}")
    assert_tight(ours.get_logits(emb), theirs.get_logits(emb), rtol=1e-12, atol=1e-12,
                 name=f"{name} get_logits")
    if name == "ArcFaceLoss" and kw:  # the fallback branch is really exercised
        cos = torch.nn.functional.normalize(emb) @ torch.nn.functional.normalize(ours.W, dim=0)
        assert (cos.gather(1, labels[:, None]) <= math.cos(math.pi - 2.0)).sum() >= 3


@pytest.mark.parametrize("name,kw", CASES[::2], ids=IDS[::2])
def test_state_dict_loads_both_ways(name, kw):
    theirs, ours = build_pair(name, kw, seed=3)
    assert list(ours.state_dict()) == ["W"] == list(theirs.state_dict())
    assert ours.state_dict()["W"].shape == theirs.W.shape
    assert isinstance(ours.W, torch.nn.Parameter) and [p is ours.W for p in ours.parameters()] == [True]
    # ours → a fresh PML module (different seed, so the load is what makes them equal)
    with torch.no_grad():
        ours.W.mul_(1.5).add_(0.25)
    torch.manual_seed(99)
    back = getattr(pml_losses, name)(num_classes=C, embedding_size=D, **kw).to(F64)
    back.load_state_dict(ours.state_dict())
    emb, labels = data(4)
    assert_tight(loss_and_grads(ours, emb, labels)[0], loss_and_grads(back, emb, labels)[0],
                 rtol=1e-9, atol=1e-9, name=name)


@pytest.mark.parametrize("name,kw", CASES[::2], ids=IDS[::2])
def test_seeded_default_init_is_pmls(name, kw):
    torch.manual_seed(7)
    theirs = getattr(pml_losses, name)(num_classes=C, embedding_size=D, **kw)
    torch.manual_seed(7)
    ours = getattr(pml, name)(num_classes=C, embedding_size=D, **kw)
    torch.testing.assert_close(ours.W, theirs.W, rtol=0, atol=0)


def test_margins_are_degrees_and_the_module_is_the_family():
    arc = pml.ArcFaceLoss(C, D)                       # PML's default 28.6°
    assert arc.margin == pytest.approx(math.radians(28.6))
    assert pml.ArcFaceLoss(C, D, margin=90).margin == pytest.approx(math.pi / 2)
    assert pml.SubCenterArcFaceLoss(num_classes=C, embedding_size=D).margin == pytest.approx(
        math.radians(28.6))
    assert isinstance(arc, marginops.ArcFaceLoss) and arc.angle_policy == "fallback"
    assert pml.CosFaceLoss(C, D).margin == 0.35      # a cosine offset, not an angle
    with pytest.raises(ValueError, match="degrees"):
        pml.ArcFaceLoss(C, D, margin=200)
    # The family reads W through a transposed view: no second copy of the classifier is kept.
    assert arc.weight.shape == (C, D) and arc.weight.data_ptr() == arc.W.data_ptr()


def test_the_family_reads_w_in_place():
    """W (D, C) is stored column-major, so the family's view W.T is the contiguous (C, D) matrix
    the op streams over: no per-step copy, also after .to(dtype); W.grad keeps W's layout."""
    loss = pml.SubCenterArcFaceLoss(num_classes=C, embedding_size=D, sub_centers=2).to(F64)
    assert loss.W.shape == (D, 2 * C) and loss.weight.is_contiguous()
    emb, labels = data()
    loss(emb, labels).backward()
    assert loss.W.grad.stride() == loss.W.stride() and loss.W.grad.t().is_contiguous()


def test_weight_init_func_is_applied():
    ours = pml.CosFaceLoss(C, D, weight_init_func=lambda w: torch.nn.init.constant_(w, 0.5))
    assert torch.all(ours.W == 0.5)


def test_unsupported_arguments_raise_naming_them():
    emb, labels = data()
    loss = pml.ArcFaceLoss(C, D).to(F64)
    anchors = torch.arange(4)
    with pytest.raises(NotImplementedError, match="indices_tuple"):
        loss(emb, labels, (anchors, anchors + 1, anchors + 2))
    with pytest.raises(NotImplementedError, match="ref_emb"):
        loss(emb, labels, ref_emb=emb)
    with pytest.raises(ValueError, match="needs labels"):
        loss(emb)
    with pytest.raises(NotImplementedError, match="DoNothingReducer"):
        pml.ArcFaceLoss(C, D, reducer=DoNothingReducer())
    pml.ArcFaceLoss(C, D, reducer=MeanReducer())      # PML's default reducer is accepted
    with pytest.raises(NotImplementedError, match="distance"):
        pml.CosFaceLoss(C, D, distance=LpDistance())
    with pytest.raises(NotImplementedError, match="weight_regularizer"):
        pml.ArcFaceLoss(C, D, weight_regularizer=RegularFaceRegularizer())
    with pytest.raises(NotImplementedError, match="collect_stats"):
        pml.NormalizedSoftmaxLoss(C, D, collect_stats=True)
    with pytest.raises(NotImplementedError, match="SubCenterArcFaceLoss"):
        pml.SubCenterArcFaceLoss(num_classes=C, embedding_size=D).dominant_subcenters(emb, labels)
