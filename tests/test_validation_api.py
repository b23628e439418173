"""One table of bad inputs → (exception type, message substring), for the modules, the functional
API and the public core ops (issue 10 items 4-7, issue 11 items 3-4); and, for every stateful
family, a failing call leaves every buffer and the generator bit-identical.

Value checks (label range, class_index) are device-side asserts by default: on CPU they raise
RuntimeError at once with the message; ``validate="full"`` raises ValueError listing the values.
Type, shape and device checks raise TypeError/ValueError before anything runs. Every entry of the
table failed on the code before these checks (checks that already held live in test_validation.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import marginops as mo
import marginops.functional as MF

B, D, C = 4, 8, 6
BAD_LABEL = RuntimeError  # a device-side assert, raised eagerly on CPU


def data(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, D, generator=g, dtype=dtype), torch.randn(C, D, generator=g, dtype=dtype),
            torch.tensor([0, 1, 2, 3]))


def core(labels=None, **kw):
    x, w, y = data()
    return mo.margin_lse(x, w, y if labels is None else labels, 2.0, backend="torch", **kw)


def core_on(features=None, weight=None, **kw):
    x, w, y = data()
    return mo.margin_lse(x if features is None else features, w if weight is None else weight, y,
                         backend="torch", **kw)


def topk(k=2, exclude=None, **kw):
    x, w, y = data()
    return mo.topk_dot(x, w, k, exclude=exclude, backend="torch", **kw)


def module(cls=mo.ArcFaceLoss, weight=None, labels=None, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    m = cls(D, C, backend="torch", **kw).train()
    if weight is not None:
        m.weight = nn.Parameter(weight, requires_grad=weight.is_floating_point())
    x, _, y = data(dtype)
    return m(x, y if labels is None else labels)


def _crystal_short_bias():
    torch.manual_seed(0)
    m = mo.CrystalLoss(D, C, backend="torch")
    m.bias = nn.Parameter(torch.zeros(3))
    x, _, y = data()
    return m(x, y)


def functional(fn=MF.arcface_loss, weight=None, **kw):
    x, w, y = data()
    return fn(x, w if weight is None else weight, y, backend="torch", **kw)


META = torch.device("meta")
CASES = {
    # ---- core op: labels (issue 10 item 6, issue 11 item 3)
    "core: label 9 of 6 classes": (lambda: core(torch.tensor([0, 9, 1, 2])), BAD_LABEL,
                                   r"outside \[0, 6\)"),
    "core: label 9, validate=full": (lambda: core(torch.tensor([0, 9, 1, 2]), validate="full"),
                                     ValueError, r"\[9\]"),
    "core: label -2": (lambda: core(torch.tensor([0, -2, 1, 2])), BAD_LABEL, "other than -1"),
    "core: float labels": (lambda: core(torch.tensor([0.0, 1.0, 2.0, 3.0])), TypeError,
                           "signed integer"),
    "core: bool labels": (lambda: core(torch.tensor([True, False, True, False])), TypeError,
                          "signed integer"),
    "core: uint8 labels": (lambda: core(torch.tensor([0, 1, 2, 3], dtype=torch.uint8)), TypeError,
                           r"torch.uint8; call .long\(\)"),
    "core: meta labels": (lambda: core(torch.tensor([0, 1, 2, 3], device=META)), ValueError,
                          "labels is on meta but embeddings are on cpu"),
    "core: class_index on meta": (lambda: core(class_index=torch.tensor([0, 1], device=META)),
                                  ValueError, "class_index is on meta"),
    "core: class_index out of range": (lambda: core(class_index=torch.tensor([0, 6])), BAD_LABEL,
                                       r"distinct local class ids in \[0, 6\)"),
    "core: class_index repeated": (lambda: core(class_index=torch.tensor([2, 1, 2])), BAD_LABEL,
                                   "distinct"),
    "core: class_index repeated, full": (
        lambda: core(class_index=torch.tensor([2, 1, 2]), validate="full"), ValueError,
        "distinct"),
    "core: tau on meta": (lambda: core(hard_negative=(torch.zeros(B, device=META), 0.5)),
                          ValueError, "hard_negative tau is on meta"),
    "core: t on meta": (lambda: core(hard_negative=(0.5, torch.zeros((), device=META))),
                        ValueError, "hard_negative t is on meta"),
    "core: vector t": (lambda: core(hard_negative=(0.5, torch.zeros(B))), ValueError,
                       "one-element"),
    "core: scale on meta": (lambda: core_on(scale=torch.ones(B, device=META)), ValueError,
                            "scale is on meta"),
    "core: scale='64'": (lambda: core_on(scale="64"), TypeError, "scale='64' must be a float"),
    "core: integer features": (lambda: core_on(features=torch.ones(B, D, dtype=torch.long)),
                               TypeError, "features must be a floating tensor"),
    "core: 1-D features": (lambda: core_on(features=torch.ones(D)), ValueError,
                           "features must be 2-D"),
    "core: negative class_range start": (lambda: core(class_range=(-1, C)), ValueError,
                                         "class_range start=-1 must be an int >= 0"),
    "core: subcenters=0": (lambda: core_on(subcenters=0), ValueError, "subcenters=0 must be an int"),
    "core: subcenters=2.0": (lambda: core_on(subcenters=2.0), TypeError, "subcenters=2.0"),
    "core: weight transposed": (lambda: core_on(weight=torch.randn(D, 5)), ValueError,
                                "looks transposed"),
    "core: validate='fast'": (lambda: core(validate="fast"), ValueError, "validate='fast'"),
    # ---- topk_dot
    "topk: k=2.0": (lambda: topk(k=2.0), TypeError, "k=2.0 must be an int"),
    "topk: k=True": (lambda: topk(k=True), TypeError, "k=True must be an int"),
    "topk: exclude out of range": (lambda: topk(exclude=torch.tensor([0, 1, 7, 2])), BAD_LABEL,
                                   r"exclude has values outside \[0, 6\)"),
    "topk: exclude out of range, full": (
        lambda: topk(exclude=torch.tensor([0, 1, 7, 2]), validate="full"), ValueError, r"\[7\]"),
    "topk: float exclude": (lambda: topk(exclude=torch.zeros(B)), TypeError, "exclude must be"),
    "topk: exclude on meta": (lambda: topk(exclude=torch.zeros(B, dtype=torch.long, device=META)),
                              ValueError, "exclude is on meta"),
    "topk: subcenters=0": (lambda: topk(subcenters=0), ValueError, "subcenters=0"),
    # ---- modules: weight of the wrong shape (issue 10 item 5)
    "ArcFace: weight with 3 rows": (lambda: module(weight=torch.randn(3, D)), ValueError,
                                    r"weight has 3 rows but must have 6 \(num_classes=6"),
    "ArcFace: weight with 9 rows": (lambda: module(weight=torch.randn(9, D)), ValueError,
                                    "weight has 9 rows but must have 6"),
    "Crystal: weight with 3 rows": (lambda: module(mo.CrystalLoss, weight=torch.randn(3, D)),
                                    ValueError, "weight has 3 rows but must have 6"),
    "NPT: weight with 3 rows": (lambda: module(mo.NPTLoss, weight=torch.randn(3, D)), ValueError,
                                "weight has 3 rows but must have 6"),
    "Crystal: bias with 3 entries": (
        _crystal_short_bias, ValueError,
        r"bias must be a floating \(6,\) tensor"),
    "core: bias on meta": (lambda: core(bias=torch.zeros(C, device=META)), ValueError,
                           "bias is on meta"),
    "Crystal alpha='11'": (lambda: mo.CrystalLoss(D, C, alpha="11"), TypeError, "alpha='11'"),
    "SubCenter: weight with 6 rows": (
        lambda: module(mo.SubCenterArcFaceLoss, weight=torch.randn(C, D)), ValueError,
        r"must have 18 \(num_classes=6 × subcenters=3\)"),
    # ---- modules: validation holes (issue 10 item 7)
    "CosFace margin=35": (lambda: mo.CosFaceLoss(D, C, margin=35), ValueError, "degrees"),
    "scale='64'": (lambda: mo.ArcFaceLoss(D, C, scale="64"), TypeError, "scale='64'"),
    "scale=True": (lambda: mo.ArcFaceLoss(D, C, scale=True), TypeError, "scale=True"),
    "num_classes=2.5": (lambda: mo.ArcFaceLoss(D, 2.5), TypeError, "num_classes=2.5"),
    "embedding_size='8'": (lambda: mo.ArcFaceLoss("8", C), TypeError, "embedding_size='8'"),
    "subcenters=1.5": (lambda: mo.SubCenterArcFaceLoss(D, C, subcenters=1.5), TypeError,
                       "subcenters=1.5"),
    "MagFace l_m > u_m": (lambda: mo.MagFaceLoss(D, C, l_m=0.8, u_m=0.45), ValueError,
                          "l_m <= u_m"),
    "CurricularFace momentum=5": (lambda: mo.CurricularFaceLoss(D, C, momentum=5), ValueError,
                                  "momentum=5.0"),
    "AdaFace t_alpha=-1": (lambda: mo.AdaFaceLoss(D, C, t_alpha=-1), ValueError, "t_alpha=-1.0"),
    "vMF init_norm_mean=0": (lambda: mo.UncertaintyMarginLoss(D, C, init_norm_mean=0), ValueError,
                             "init_norm_mean=0.0"),
    "vMF with one class": (lambda: mo.UncertaintyMarginLoss(D, 1), ValueError,
                           "num_classes >= 2"),
    "validate='fast'": (lambda: mo.ArcFaceLoss(D, C, validate="fast"), ValueError, "validate"),
    "uint8 labels": (lambda: module(labels=torch.tensor([0, 1, 2, 3], dtype=torch.uint8)),
                     TypeError, "torch.uint8"),
    "module: label 6 of 6": (lambda: module(labels=torch.tensor([0, 6, 1, 2])), BAD_LABEL,
                             r"outside \[0, 6\)"),
    "module: label 6, full": (lambda: module(labels=torch.tensor([0, 6, 1, 2]), validate="full"),
                              ValueError, r"\[6\]"),
    "Crystal.predict(k=C+1)": (lambda: mo.CrystalLoss(D, C).predict(torch.randn(2, D), k=C + 1),
                               ValueError, "k=7 must be between 1 and num_classes=6"),
    "ArcFace.predict(k=1.0)": (lambda: mo.ArcFaceLoss(D, C).predict(torch.randn(2, D), k=1.0),
                               TypeError, "k=1.0"),
    # ---- functional API
    "functional scale=0": (lambda: functional(scale=0.0), ValueError, "scale=0.0"),
    "functional scale=-1": (lambda: functional(scale=-1.0), ValueError, "scale=-1.0"),
    "functional scale=nan": (lambda: functional(scale=math.nan), ValueError, "scale=nan"),
    "functional scale='64'": (lambda: functional(scale="64"), TypeError, "scale='64'"),
    "functional (D, C) weight": (lambda: functional(weight=torch.randn(D, 5)), ValueError,
                                 "looks transposed"),
    "functional cosface margin=35": (lambda: functional(MF.cosface_loss, margin=35), ValueError,
                                     "degrees"),
    "functional label 6": (lambda: MF.normface_loss(*data()[:2], torch.tensor([0, 6, 1, 2]),
                                                    backend="torch"), BAD_LABEL, "outside"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_a_clear_error(name):
    call, exc, match = CASES[name]
    with pytest.raises(exc, match=match):
        call()


def test_nan_embeddings_propagate_by_default_and_raise_with_full():
    """NaN in, NaN out (no finiteness error, no sync); validate="full" names the row."""
    x, _, y = data()
    x[2, 0] = math.nan
    torch.manual_seed(0)
    m = mo.ArcFaceLoss(D, C, backend="torch", reduction="none")
    rows = m(x, y)
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3]]).all()
    m.validate = "full"
    with pytest.raises(ValueError, match=r"NaN or inf \(rows \[2\]"):
        m(x, y)


# ---------------------------------------------------------------- state never moves before an error

STATEFUL = {
    "CurricularFaceLoss": (mo.CurricularFaceLoss, {}),
    "AdaFaceLoss": (mo.AdaFaceLoss, {}),
    "SphereFaceLoss": (mo.SphereFaceLoss, {}),
    "ElasticArcFaceLoss": (mo.ElasticArcFaceLoss, {"seed": 3}),
    "ElasticCosFaceLoss": (mo.ElasticCosFaceLoss, {"seed": 3}),
    "UncertaintyMarginLoss": (mo.UncertaintyMarginLoss, {}),
    "MagFaceLoss": (mo.MagFaceLoss, {}),
}


def _bad_calls(m, x, y):
    """(what, call) pairs that must each fail without touching state."""
    w = m.weight
    yield "fp32 embeddings into an fp64 module", lambda: m.double()(x, y)
    yield "fp64 embeddings into an fp32 module", lambda: m.float()(x.double(), y)
    yield "integer weight", lambda: _with_weight(m, torch.ones_like(w, dtype=torch.long), x, y)
    yield "weight of the wrong shape", lambda: _with_weight(m, torch.randn(3, D), x, y)
    yield "backend that cannot run", lambda: _with_backend(m, "cuda", x, y)
    yield "label out of range", lambda: m(x, torch.tensor([0, 1, 2, C]))
    yield "label out of range, validate=full", lambda: _with_validate(m, x, torch.tensor([0, C, 1, 2]))


def _with_weight(m, weight, x, y):
    saved = m.weight
    m.weight = nn.Parameter(weight, requires_grad=weight.is_floating_point())
    try:
        m(x, y)
    finally:
        m.weight = saved


def _with_backend(m, backend, x, y):
    saved, m.backend = m.backend, backend
    try:
        m(x, y)
    finally:
        m.backend = saved


def _with_validate(m, x, y):
    saved, m.validate = m.validate, "full"
    try:
        m(x, y)
    finally:
        m.validate = saved


def _snapshot(m):
    state = {k: v.detach().clone() for k, v in m.state_dict().items()}
    gen = getattr(m, "_generator", None)
    return state, None if gen is None else gen.get_state()


@pytest.mark.parametrize("family", list(STATEFUL))
def test_failed_call_leaves_state_bit_identical(family):
    cls, kw = STATEFUL[family]
    torch.manual_seed(0)
    m = cls(D, C, backend="torch", **kw).train()
    x, _, y = data()
    m(x, y)  # a good step first: buffers moved once, the generator exists
    for what, call in _bad_calls(m, x, y):
        m.float()
        before_state, before_gen = _snapshot(m)
        with pytest.raises((TypeError, ValueError, RuntimeError)):
            call()
        m.float()
        after_state, after_gen = _snapshot(m)
        for k in before_state:
            assert torch.equal(before_state[k], after_state[k].to(before_state[k].dtype)), \
                f"{family}: {what} moved {k}"
        if before_gen is not None:
            assert torch.equal(before_gen, after_gen), f"{family}: {what} advanced the generator"
