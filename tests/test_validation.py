"""Bad input raises an error that names the argument and the fix, before any state changes."""

from __future__ import annotations

import math

import pytest
import torch

import marginops as mo


def loss_and_batch(cls=mo.CurricularFaceLoss, **kwargs):
    m = cls(8, 5, backend="torch", **kwargs).train()
    x = torch.randn(4, 8)
    y = torch.tensor([0, 1, 2, -1])
    return m, x, y


# Value checks (labels, NaN) are host-side only with validate="full"; by default label values are
# device-side asserts (RuntimeError on CPU) and NaN/inf propagate (tests/test_validation_api.py).
@pytest.mark.parametrize("mutate, match, validate", [
    (lambda x, y: (x[0], y), "2-D", "device"),
    (lambda x, y: (x[:, :5], y), "embedding_size=8", "device"),
    (lambda x, y: (x.long(), y), "floating", "device"),
    (lambda x, y: (x[:0], y[:0]), "empty batch", "device"),
    (lambda x, y: (x.index_fill(0, torch.tensor([2]), float("nan")), y), "NaN or inf", "full"),
    (lambda x, y: (x.index_fill(0, torch.tensor([1]), float("inf")), y), "NaN or inf", "full"),
    (lambda x, y: (x, y.float()), "integer", "device"),
    (lambda x, y: (x, y[:3]), r"shape \(4,\)", "device"),
    (lambda x, y: (x, torch.tensor([0, 1, 5, -1])), r"outside \[0, 5\)", "device"),
    (lambda x, y: (x, torch.tensor([0, 1, -2, -1])), r"outside \[0, 5\)", "device"),
    (lambda x, y: (x, torch.tensor([0, 1, 5, -1])), r"outside \[0, 5\) .*: \[5\]", "full"),
    (lambda x, y: (x, torch.tensor([0, 1, -2, -1])), r"outside \[0, 5\) .*: \[-2\]", "full"),
    (lambda x, y: (x.to("meta"), y), "meta", "device"),
])
def test_bad_inputs_raise_and_leave_state_alone(mutate, match, validate):
    m, x, y = loss_and_batch(validate=validate)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    bx, by = mutate(x, y)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        m(bx, by)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_margin_in_degrees_is_rejected():
    with pytest.raises(ValueError, match="degrees"):
        mo.ArcFaceLoss(8, 5, margin=28.6)
    with pytest.raises(ValueError, match="radians"):
        mo.ArcFaceLoss(8, 5, margin=-0.1)
    with pytest.raises(ValueError, match=f"{math.radians(30.0):.4f}"):
        mo.CurricularFaceLoss(8, 5, margin=30.0)
    with pytest.raises(ValueError, match="degrees"):
        mo.functional.arcface_loss(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]),
                                   margin=30)


@pytest.mark.parametrize("kwargs, match", [
    ({"angle_policy": "strict"}, "angle_policy"),
    ({"grad_mode": "approx"}, "grad_mode"),
    ({"reduction": "avg"}, "reduction"),
    ({"backend": "cuDNN"}, "backend"),
])
def test_unknown_names(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mo.ArcFaceLoss(8, 5, **kwargs)


def test_backend_that_cannot_run_says_why():
    x, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run on cpu"):
        mo.margin_lse(x, w, y, backend="cuda")
    with pytest.raises(ValueError, match="unknown"):
        mo.margin_lse(x, w, y, backend="magic")


def test_device_and_dtype_mismatch():
    m = mo.ArcFaceLoss(8, 5, backend="torch").to("meta")
    with pytest.raises(ValueError, match="loss_fn.to"):
        m(torch.randn(2, 8), torch.tensor([0, 1]))
    x, w, y = torch.randn(3, 4).double(), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match="fp64"):
        mo.margin_lse(x, w, y, backend="torch")


def test_core_argument_errors():
    x, w, y = torch.randn(3, 4), torch.randn(6, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="subcenters"):
        mo.margin_lse(x, w, y, subcenters=4, backend="torch")
    with pytest.raises(ValueError, match="class_range"):
        mo.margin_lse(x, w, y, class_range=(0, 5), backend="torch")
    with pytest.raises(RuntimeError, match="distinct"):  # a device-side assert by default
        mo.margin_lse(x, w, y, class_index=torch.tensor([1, 1]), backend="torch")
    with pytest.raises(ValueError, match="bias"):
        mo.margin_lse(x, w, y, bias=torch.zeros(5), backend="torch")
    with pytest.raises(ValueError, match="scale"):
        mo.margin_lse(x, w, y, scale=torch.ones(2), backend="torch")
    with pytest.raises(ValueError, match="k=6"):
        mo.topk_dot(x, w, 6, exclude=y, backend="torch")


def test_mixed_precision_just_works():
    """bf16 embeddings against fp32 master weights: fp32 softmax, gradients in each dtype."""
    m = mo.ArcFaceLoss(16, 7, backend="torch")
    x = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, -1])
    loss = m(x, y)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == torch.bfloat16 and m.weight.grad.dtype == torch.float32
    assert torch.isfinite(x.grad.float()).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss2 = m(x, y)
    assert torch.isfinite(loss2)
