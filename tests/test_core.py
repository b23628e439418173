"""The core op's contract through ``marginops.margin_lse``: the torch backend against the dense
oracle, the registered op under opcheck and gradcheck, shards and sampled classes against the
reference on the same subset, topk_dot, and torch.compile of a family module."""

from __future__ import annotations

import pytest
import torch
from contract_oracle import margin_lse_dense, topk_dense
from tolerance import assert_tight

import marginops as mo
import marginops.ops.torch_chunked as torch_chunked
from marginops import reference as ref
from marginops.core import target_columns


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of a few columns so that every test crosses several chunks and a ragged last one."""
    monkeypatch.setattr(torch_chunked, "TILE_ELEMENTS", 40)


def random_case(B, D, C, K=1, bias=False, sampled=False, hard=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, D, generator=g, dtype=dtype)
    w = torch.randn(C * K, D, generator=g, dtype=dtype)
    scale = (torch.rand(B, generator=g, dtype=dtype) * 20 + 1)
    b = torch.randn(C, generator=g, dtype=dtype) if bias else None
    labels = torch.randint(0, C, (B,), generator=g)
    labels[B // 2] = -1
    index = torch.randperm(C, generator=g)[: max(1, C // 2)] if sampled else None
    if sampled:
        labels[0] = index[0]
    tau = (torch.rand(B, generator=g, dtype=dtype) - 0.5) if hard else None
    t = torch.tensor(0.3, dtype=dtype) if hard else None
    return f, w, scale, b, labels, index, tau, t


CASES = [
    dict(B=7, D=13, C=23),
    dict(B=1, D=3, C=1),
    dict(B=5, D=4, C=9, K=3, bias=True),
    dict(B=6, D=5, C=17, sampled=True, bias=True),
    dict(B=6, D=5, C=17, hard=True, K=2),
    dict(B=4, D=7, C=11, sampled=True, hard=True),
]


@pytest.mark.parametrize("normalize_weight", [True, False])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_torch_backend_matches_dense_oracle(case, normalize_weight, small_tiles):
    K = case.get("K", 1)
    f, w, scale, b, labels, index, tau, t = random_case(**case)
    leaves = [f, w, scale] + ([b] if b is not None else [])
    for leaf in leaves:
        leaf.requires_grad_()
    hard = (tau, t) if tau is not None else None
    ours = mo.margin_lse(f, w, labels, scale, b, normalize_weight=normalize_weight,
                         class_index=index, hard_negative=hard, subcenters=K, backend="torch")
    cols = target_columns(labels, case["C"], None, index)
    truth = margin_lse_dense(f, w, scale, b, cols, index, tau, t, normalize_weight, K)
    g_lse, g_dot = torch.randn(f.shape[0], dtype=f.dtype), torch.randn(f.shape[0], dtype=f.dtype)
    grads = [torch.autograd.grad((o[0] * g_lse).sum() + (o[1] * g_dot).sum(), leaves)
             for o in (ours, truth)]
    assert_tight(ours.lse_neg, truth[0])
    assert_tight(ours.dot_y, truth[1])
    for a, e in zip(*grads):
        assert_tight(a, e)
    if index is not None:  # unsampled classes get exactly zero gradient
        unsampled = torch.ones(case["C"], dtype=torch.bool)
        unsampled[index] = False
        assert grads[0][1].view(case["C"], K, -1)[unsampled].abs().max() == 0


@pytest.mark.parametrize("case", CASES[:4], ids=str)
def test_registered_op_gradcheck_and_opcheck(case, small_tiles):
    K = case.get("K", 1)
    f, w, scale, b, labels, index, tau, t = random_case(**case)
    cols = target_columns(labels, case["C"], None, index)
    args = (f, w, scale, b, cols, index, tau, t, True, K)
    torch.library.opcheck(torch.ops.marginops.margin_lse_torch, args)
    leaves = (f.requires_grad_(), w.requires_grad_(), scale.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda f_, w_, s_: torch.ops.marginops.margin_lse_torch(f_, w_, s_, *args[3:]), leaves)
    torch.library.opcheck(torch.ops.marginops.margin_lse_torch, (*leaves, *args[3:]))
    grads = (torch.randn(case["B"], dtype=f.dtype), torch.randn(case["B"], dtype=f.dtype))
    lse = torch.ops.marginops.margin_lse_torch(*args)[0].detach()
    torch.library.opcheck(torch.ops.marginops.margin_lse_torch_backward,
                          (*grads, lse, f.detach(), w.detach(), scale.detach(), *args[3:8], True, K))


def test_extreme_cosines_and_large_scale():
    """cos = ±1 exactly at s = 64: finite lse, finite gradients."""
    w = torch.randn(4, 6, dtype=torch.float64)
    f = torch.nn.functional.normalize(torch.stack([w[0], -w[1], w[2]]), dim=1).requires_grad_()
    out = mo.margin_lse(f, w, torch.tensor([1, 0, 2]), 64.0, backend="torch")
    (out.lse_neg.sum() + out.dot_y.sum()).backward()
    assert torch.isfinite(out.lse_neg).all() and torch.isfinite(f.grad).all()
    assert out.lse_neg[0].item() == pytest.approx(64.0, abs=0.1)  # the row equal to class 0


def test_class_range_shards_merge_to_the_whole(small_tiles):
    """Sharded lse/dot merged with logsumexp/sum equals the single-shard op."""
    f, w, scale, _, labels, *_ = random_case(B=9, D=6, C=13)
    whole = mo.margin_lse(f, w, labels, scale, backend="torch")
    parts = [mo.margin_lse(f, w[s:e], labels, scale, class_range=(s, e - s), backend="torch")
             for s, e in ((0, 5), (5, 9), (9, 13))]
    assert_tight(torch.logsumexp(torch.stack([p.lse_neg for p in parts]), 0), whole.lse_neg)
    assert_tight(sum(p.dot_y for p in parts), whole.dot_y)


def test_class_index_equals_reference_on_the_subset(small_tiles):
    """Sampled classes = the naive loss on the classifier restricted to those classes."""
    f, w, _, _, labels, index, *_ = random_case(B=8, D=5, C=20, sampled=True)
    f = torch.nn.functional.normalize(f, dim=1)
    labels[labels >= 0] = index[torch.arange(int((labels >= 0).sum())) % index.numel()]
    lse, dot = mo.margin_lse(f, w, labels, 30.0, class_index=index, backend="torch")
    loss = torch.nn.functional.softplus(lse - 30.0 * dot)[labels >= 0].mean()
    remap = torch.full((20,), -1)
    remap[index] = torch.arange(index.numel())
    expected = ref.normface_loss(f, w[index], torch.where(labels >= 0, remap[labels.clamp_min(0)],
                                                          -1), scale=30.0)
    assert_tight(loss, expected)


@pytest.mark.parametrize("K", [1, 2])
def test_topk_dot_values_indices_and_sparse_gradient(K, small_tiles):
    f, w, _, _, labels, *_ = random_case(B=6, D=5, C=12, K=K)
    f.requires_grad_()
    w.requires_grad_()
    values, classes = mo.topk_dot(f, w, 3, exclude=labels.clamp_min(0), subcenters=K,
                                  backend="torch")
    dense = topk_dense(f, w, labels.clamp_min(0), 3, True, K)
    assert torch.equal(classes, dense.indices)
    assert_tight(values, dense.values)
    values.sum().backward()
    touched = torch.zeros(12, dtype=torch.bool)
    touched[classes.flatten()] = True
    assert w.grad.view(12, K, -1)[~touched].abs().max() == 0
    torch.library.opcheck(torch.ops.marginops.topk_torch,
                          (f.detach(), w.detach(), labels.clamp_min(0), 3, True, K))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_torch_compile_fullgraph(backend, tmp_path, monkeypatch):
    # A fresh inductor cache: torch 2.13 reuses a cached backward graph across a change of a
    # custom op's schema (seen here when the backward ops' argument order changed).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    m = mo.CurricularFaceLoss(16, 37, backend=backend).double().train()
    x = torch.randn(8, 16, dtype=torch.float64)
    y = torch.randint(0, 37, (8,))
    eager = m(x, y)
    t_after_eager = m.t.clone()
    m.t.zero_()
    compiled = torch.compile(m, fullgraph=True)
    out = compiled(x, y)
    assert_tight(out, eager)
    assert_tight(m.t, t_after_eager)
    xx = x.clone().requires_grad_()
    compiled(xx, y).backward()
    assert torch.isfinite(xx.grad).all()
