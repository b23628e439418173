"""The migration pages' claims, checked: the "after" code of docs/migration/pytorch.md and
docs/migration/adaface.md computes what the "before" code computed (fp64, same weights)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_tight
from torch import nn

import marginops

F64 = torch.float64
B, D, C = 12, 16, 9


class ArcFaceHead(nn.Module):
    """The "before" head of docs/migration/pytorch.md, verbatim."""

    def __init__(self, embedding_size, num_classes, s=64.0, m=0.5):
        super().__init__()
        self.weight = nn.Parameter(torch.normal(0, 0.01, (num_classes, embedding_size)))
        self.s, self.m = s, m

    def forward(self, x, labels):
        cos = F.normalize(x) @ F.normalize(self.weight).t()
        theta = cos.gather(1, labels[:, None]).clamp(-1 + 1e-7, 1 - 1e-7).acos()
        logits = cos.scatter(1, labels[:, None], torch.cos(theta + self.m))
        return F.cross_entropy(self.s * logits, labels)


def data(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g, dtype=F64) * 2, torch.randint(0, C, (B,), generator=g)


def loss_and_grads(module, params, x, labels, **kw):
    x = x.clone().requires_grad_(True)
    loss = module(x, labels, **kw)
    return (loss.detach(), *torch.autograd.grad(loss, (x, *params)))


def test_plain_pytorch_arcface_head():
    torch.manual_seed(0)
    before = ArcFaceHead(D, C).to(F64)
    with torch.no_grad():
        before.weight.normal_()   # spread the classes so that some targets pass θ + m > π
    after = marginops.ArcFaceLoss(D, C, scale=64.0, margin=0.5, angle_policy="none").to(F64)
    after.load_state_dict({"weight": before.state_dict()["weight"]})
    x, labels = data(1)
    x[0] = -before.weight[labels[0]].detach() + 0.3 * x[0]   # θ + m > π: no fallback either side
    expected = loss_and_grads(before, [before.weight], x, labels)
    actual = loss_and_grads(after, [after.weight], x, labels)
    for what, a, e in zip(("loss", "d/dx", "d/dweight"), actual, expected):
        assert_tight(a, e, rtol=1e-9, atol=1e-9, name=what)


def adaface_head_loss(embeddings, norms, labels, kernel, stats, m=0.4, h=0.333, s=64.0,
                      t_alpha=0.01, eps=1e-3):
    """AdaFace's head.py (head + CrossEntropyLoss) written from its semantics: normalised
    embeddings and (B, 1) norms in; kernel (D, C); stats = [batch_mean, batch_std], updated."""
    cosine = (embeddings @ F.normalize(kernel, dim=0)).clamp(-1 + eps, 1 - eps)
    safe = norms.clamp(0.001, 100).detach()
    with torch.no_grad():
        stats[0] = safe.mean() * t_alpha + (1 - t_alpha) * stats[0]
        stats[1] = safe.std() * t_alpha + (1 - t_alpha) * stats[1]
    scaler = ((safe - stats[0]) / (stats[1] + eps) * h).clamp(-1, 1)          # (B, 1)
    one_hot = F.one_hot(labels, kernel.shape[1]).to(cosine.dtype)
    theta = cosine.acos() + one_hot * (-m * scaler)
    cosine = theta.clamp(eps, math.pi - eps).cos() - one_hot * (m + m * scaler)
    return F.cross_entropy(s * cosine, labels)


def adaface_case():
    g = torch.Generator().manual_seed(2)
    raw = torch.randn(B, D, generator=g, dtype=F64) * (torch.rand(B, 1, generator=g) * 30 + 5)
    labels = torch.randint(0, C, (B,), generator=g)
    norms = raw.norm(dim=1, keepdim=True)              # AdaFace's backbone: (B, 1) norms
    kernel = torch.randn(D, C, generator=g, dtype=F64)
    emb = raw / norms
    assert (emb @ F.normalize(kernel, dim=0)).abs().max() < 0.999   # where both clamps agree
    after = marginops.AdaFaceLoss(D, C, margin=0.4, h=0.333, scale=64.0, t_alpha=0.01).to(F64)
    after.load_state_dict({"weight": kernel.t(), "batch_mean": after.batch_mean,
                           "batch_std": after.batch_std})
    return raw, emb, norms, labels, kernel, after


def check_adaface(call, emb, norms, labels, kernel, after):
    """Two training steps of ``call(x)`` (x: the unit embeddings, requiring grad) against the
    head; the EMA statistics must track too. The embedding gradients are compared tangentially:
    AdaFace's backbone normalises its output, which projects out the radial part anyway."""
    stats = [torch.tensor(20.0, dtype=F64), torch.tensor(100.0, dtype=F64)]
    for step in range(2):
        e = emb.clone().requires_grad_(True)
        k = kernel.clone().requires_grad_(True)
        expected = adaface_head_loss(e, norms, labels, k, stats)
        ge, gk = torch.autograd.grad(expected, (e, k))
        x = emb.clone().requires_grad_(True)
        loss = call(x)
        gx, gw = torch.autograd.grad(loss, (x, after.weight))
        assert_tight(loss.detach(), expected.detach(), rtol=1e-9, atol=1e-9, name=f"loss {step}")
        assert_tight(gw, gk.t(), rtol=1e-9, atol=1e-9, name=f"d/dweight {step}")
        tangent = [g - (g * emb).sum(1, keepdim=True) * emb for g in (gx, ge)]
        assert_tight(*tangent, rtol=1e-9, atol=1e-9, name=f"d/dx (tangential) {step}")
        assert_tight(after.batch_mean.squeeze(), stats[0], rtol=1e-12, atol=1e-12, name="mean")
        assert_tight(after.batch_std.squeeze(), stats[1], rtol=1e-12, atol=1e-12, name="std")


def test_adaface_head_with_raw_embeddings():
    """A backbone returning raw embeddings: head(raw, labels) is AdaFace's head on (x̂, ‖x‖)."""
    raw, emb, norms, labels, kernel, after = adaface_case()
    check_adaface(lambda x: after(x * norms, labels), emb, norms, labels, kernel, after)


@pytest.mark.skipif("norms" not in inspect.signature(marginops.AdaFaceLoss.forward).parameters,
                    reason="AdaFaceLoss.forward(..., norms=) is being added in another branch; "
                           "this checks docs/migration/adaface.md once it is merged")
def test_adaface_head_with_norms():
    """The diff of docs/migration/adaface.md: normalised embeddings and the backbone's norms."""
    raw, emb, norms, labels, kernel, after = adaface_case()
    check_adaface(lambda x: after(x, labels, norms=norms.squeeze(1)), emb, norms, labels, kernel,
                  after)
