"""Norm-aware families (AdaFace, MagFace, SphereFace, UncertaintyMargin): ``norms=`` and the
unit-norm warning.

A backbone that returns normalised features and their norms separately (AdaFace's convention)
passes ``loss_fn(features, labels, norms=norms)``; that must equal the loss of the raw embeddings
``features · norms``, with the same state updates and the same gradient reaching the norms. A
user who passes unit-norm embeddings without ``norms=`` is warned once per module, without a host
synchronisation (the check is sync-free by construction; counted here with a dispatch mode).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tolerance import assert_tight
from torch.utils._python_dispatch import TorchDispatchMode

import marginops as mo

D, C, B = 8, 7, 6
NORM_AWARE = {
    "adaface": (mo.AdaFaceLoss, {"t_alpha": 0.3}),
    "magface": (mo.MagFaceLoss, {}),
    "sphereface": (mo.SphereFaceLoss, {}),
    "uncertainty": (mo.UncertaintyMarginLoss, {"momentum": 0.3}),
}


def make(name, dtype=torch.float64):
    cls, kwargs = NORM_AWARE[name]
    torch.manual_seed(0)
    return cls(D, C, backend="torch", **kwargs).to(dtype).train()


def data(scale_lo=5.0, scale_hi=40.0):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    features = x / x.norm(dim=1, keepdim=True)
    norms = scale_lo + (scale_hi - scale_lo) * torch.rand(B, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (B,), generator=g)
    labels[1] = -1
    return features, norms, labels


class CountSyncs(TorchDispatchMode):
    """Counts aten._local_scalar_dense (.item(), bool(tensor), int(tensor), ...)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(NORM_AWARE))
def test_norms_argument_equals_raw_embeddings(name):
    features, norms, labels = data()
    raw_module, split_module = make(name), make(name)

    n1 = norms.clone().requires_grad_()
    raw = raw_module(features * n1[:, None], labels)
    raw.backward()
    n2 = norms.clone().requires_grad_()
    split = split_module(features, labels, norms=n2)
    split.backward()

    assert_tight(split, raw, name="loss")
    if name == "adaface":  # AdaFace detaches the norm (authors' head.py)
        assert n2.grad is None and n1.grad.abs().max() < 1e-12  # x̂ does not depend on ‖x‖
    else:
        assert_tight(n2.grad, n1.grad, name="grad norms")
    assert_tight(split_module.weight.grad, raw_module.weight.grad, name="grad weight")
    for (key, a), (_, b) in zip(split_module.named_buffers(), raw_module.named_buffers()):
        assert_tight(a, b, rtol=1e-12, atol=1e-12, name=f"buffer {key}")


def test_norms_argument_is_validated():
    features, norms, labels = data()
    with pytest.raises(TypeError, match="does not use embedding norms"):
        mo.ArcFaceLoss(D, C).double()(features, labels, norms=norms)
    m = make("adaface")
    with pytest.raises(TypeError, match=r"norms must be a float tensor of shape \(6,\)"):
        m(features, labels, norms=norms[:3])
    with pytest.raises(TypeError, match="norms must be a float tensor"):
        m(features, labels, norms=norms.long())
    assert m.batch_mean.item() == 20.0  # nothing moved before the error


@pytest.mark.parametrize("name", list(NORM_AWARE))
def test_unit_norm_embeddings_warn_once_without_a_sync(name):
    features, norms, labels = data()
    m = make(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counter = CountSyncs()
        with counter:
            m(features, labels).backward()
        quiet = CountSyncs()
        with quiet:
            m(features, labels, norms=norms).backward()  # the check does not run here
        m(features, labels)
    unit = [w for w in caught if "every embedding has norm 1" in str(w.message)]
    assert len(unit) == 1, [str(w.message) for w in caught]
    assert "norms=norms" in str(unit[0].message)
    assert counter.count == quiet.count, "the unit-norm check synchronised with the host"


def test_no_warning_for_raw_embeddings_given_norms_or_other_families():
    features, norms, labels = data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make("adaface")(features * norms[:, None], labels)              # raw embeddings
        make("magface")(features, labels, norms=norms)                 # norms given
        mo.ArcFaceLoss(D, C).double()(features, labels)                # not norm-aware
        near = features * (1 + 2e-3)                                   # outside 1 ± 1e-3
        make("adaface")(near, labels)
