"""marginops.eval: verification metrics against scikit-learn and hand-made cases, identification
through the fused top-k against a naive logits.topk, quality pooling against a naive loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_curve
from tolerance import MIN_GAP, cosines

from marginops import backend_status
from marginops import eval as mev

CPU_BACKENDS = [b for b in ("torch", "cpp") if backend_status("cpu")[b] is None]


# ----------------------------------------------------------------------------- ROC

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rounded", [False, True])
def test_roc_matches_sklearn(seed, rounded):
    rng = np.random.default_rng(seed)
    gen = rng.normal(1.0, 1.0, 300)
    imp = rng.normal(-0.5, 1.0, 700)
    if rounded:   # many ties, within and across the two sets
        gen, imp = np.round(gen, 1), np.round(imp, 1)
    far, tar, thr = mev.roc(gen, imp)
    y = np.r_[np.ones(gen.size), np.zeros(imp.size)]
    s = np.r_[gen, imp]
    sk_far, sk_tar, sk_thr = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(far, sk_far)
    np.testing.assert_allclose(tar, sk_tar)
    assert np.isinf(thr[0]) and np.isinf(sk_thr[0])
    np.testing.assert_allclose(thr[1:], sk_thr[1:])


def test_roc_accepts_tensors_and_lists():
    far, tar, thr = mev.roc(torch.tensor([0.9, 0.8]), [0.1, 0.85])
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.85, 0.8, 0.1])
    np.testing.assert_allclose(tar, [0, 0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(far, [0, 0, 0.5, 0.5, 1.0])


# ----------------------------------------------------------------------------- TAR@FAR

def test_tar_at_far_hand_made():
    gen = [0.9, 0.8, 0.7, 0.6, 0.3]
    imp = [0.85, 0.65, 0.5, 0.4, 0.2, 0.1, 0.05, 0.0, -0.1, -0.2]
    # FAR <= 0.1: one impostor may pass (0.85); threshold just above 0.65 -> genuine 0.9, 0.8, 0.7
    r = mev.tar_at_far(gen, imp, 0.1)
    assert r.tar == pytest.approx(0.6) and r.far == pytest.approx(0.1)
    assert 0.65 < r.threshold < 0.651
    # FAR <= 0.05 (< 1/10): nobody may pass: threshold just above 0.85 -> genuine 0.9 only
    r = mev.tar_at_far(gen, imp, 0.05)
    assert (r.tar, r.far) == (pytest.approx(0.2), 0.0)
    # FAR <= 0.3: three may pass (0.85, 0.65, 0.5): threshold just above 0.4
    r = mev.tar_at_far(gen, imp, 0.3)
    assert r.tar == pytest.approx(0.8) and r.far == pytest.approx(0.3)
    # FAR = 1: accept everything
    r = mev.tar_at_far(gen, imp, 1.0)
    assert (r.tar, r.far, r.threshold) == (1.0, 1.0, -0.2)


def test_tar_at_far_ties_never_exceed_the_budget():
    # impostors tied at the boundary: accepting 0.5 would let 3 of 4 pass (FAR 0.75 > 0.5)
    gen = [0.5, 0.6, 0.4]
    imp = [0.5, 0.5, 0.5, 0.1]
    r = mev.tar_at_far(gen, imp, 0.5)
    assert r.far == 0.0                     # all three tied impostors are rejected
    assert r.tar == pytest.approx(1 / 3)    # the genuine 0.5, tied with them, is rejected too
    assert r.threshold > 0.5


def test_tar_at_far_is_the_best_point_of_the_roc():
    rng = np.random.default_rng(7)
    gen, imp = np.round(rng.normal(1, 1, 500), 2), np.round(rng.normal(0, 1, 2000), 2)
    far_curve, tar_curve, _ = mev.roc(gen, imp)
    for budget in (1e-3, 1e-2, 0.05, 0.29, 0.5):
        r = mev.tar_at_far(gen, imp, budget)
        assert r.far <= budget + 1e-12
        assert r.tar == pytest.approx(tar_curve[far_curve <= budget + 1e-12].max())
        # the threshold reproduces the rates
        assert np.mean(gen >= r.threshold) == pytest.approx(r.tar)
        assert np.mean(imp >= r.threshold) == pytest.approx(r.far)


def test_tar_at_far_floating_budget_rounding():
    imp = np.arange(100, dtype=float)[::-1]          # 99 .. 0
    r = mev.tar_at_far([50.5], imp, 0.29)             # 0.29 * 100 = 28.999... must allow 29
    assert r.far == pytest.approx(0.29)


# ----------------------------------------------------------------------------- k-fold

def test_kfold_separable_is_perfect():
    rng = np.random.default_rng(0)
    same = rng.random(600) < 0.5
    scores = np.where(same, rng.uniform(0.6, 1.0, 600), rng.uniform(-1.0, 0.4, 600))
    res = mev.kfold_accuracy(scores, same, folds=10)
    assert res.mean == 1.0 and res.std == 0.0
    assert res.thresholds.shape == (10,) and res.accuracies.shape == (10,)
    assert np.all((res.thresholds > 0.4) & (res.thresholds < 0.6))


def test_kfold_hand_made_threshold_and_folds():
    # 2 folds: fold 0 = first 4 pairs, fold 1 = last 4
    scores = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.35, 0.6]
    same = [1, 0, 1, 0, 1, 0, 1, 0]
    res = mev.kfold_accuracy(scores, same, folds=2)
    # fold 0, trained on fold 1 (0.3 d, 0.35 s, 0.6 d, 0.7 s): the cuts 0.325 and 0.65 both get
    # 3/4 right; the lower median of the optimal cuts, 0.325, is applied to fold 0: all right
    assert res.thresholds[0] == pytest.approx(0.325)
    assert res.accuracies[0] == 1.0
    # fold 1: trained on fold 0 (perfectly separable at 0.2..0.8, midpoint 0.5): 0.35 is missed,
    # 0.6 is a false accept
    assert res.thresholds[1] == pytest.approx(0.5)
    assert res.accuracies[1] == pytest.approx(0.5)
    assert res.mean == pytest.approx(0.75)


def test_kfold_matches_naive_threshold_search():
    rng = np.random.default_rng(3)
    n = 240
    same = rng.random(n) < 0.5
    scores = np.round(np.where(same, rng.normal(0.5, 0.3, n), rng.normal(0.0, 0.3, n)), 2)
    res = mev.kfold_accuracy(scores, same, folds=6)
    parts = np.array_split(np.arange(n), 6)
    for f, test in enumerate(parts):
        train = np.setdiff1d(np.arange(n), test)
        u = np.unique(scores[train])
        cands = np.r_[u[0] - 1, (u[:-1] + u[1:]) / 2, u[-1] + 1]
        accs = [np.mean((scores[train] > c) == same[train]) for c in cands]
        best = max(accs)
        # our threshold is one of the optimal candidates
        ours = np.mean((scores[train] > res.thresholds[f]) == same[train])
        assert ours == pytest.approx(best)
        assert res.accuracies[f] == pytest.approx(np.mean((scores[test] > res.thresholds[f])
                                                          == same[test]))


def test_verification_input_errors():
    with pytest.raises(ValueError, match="empty"):
        mev.roc([], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        mev.tar_at_far([0.1, float("nan")], [0.2], 0.1)
    with pytest.raises(ValueError, match="far="):
        mev.tar_at_far([0.1], [0.2], 0.0)
    with pytest.raises(ValueError, match="1-D"):
        mev.roc(np.zeros((2, 2)), [0.1])
    with pytest.raises(ValueError, match="shape"):
        mev.kfold_accuracy([0.1, 0.2, 0.3], [True, False])
    with pytest.raises(ValueError, match="folds"):
        mev.kfold_accuracy([0.1, 0.2, 0.3], [True, False, True], folds=4)
    with pytest.raises(ValueError, match="booleans"):
        mev.kfold_accuracy([0.1, 0.2], [2, 0], folds=2)


# ----------------------------------------------------------------------------- identification

def _naive_identification(x, labels, gallery, ks, subcenters=1):
    cos = F.normalize(x.double(), dim=1) @ F.normalize(gallery.double(), dim=1).t()
    cos = cos.view(x.shape[0], -1, subcenters).amax(dim=2)
    top = cos.topk(max(ks), dim=1).indices
    return {k: (top[:, :k] == labels[:, None]).any(1).double().mean().item() for k in ks}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("subcenters", [1, 3])
def test_identification_matches_naive_topk(backend, subcenters):
    g = torch.Generator().manual_seed(0)
    C, D, N = 57, 16, 300
    gallery = torch.randn(C * subcenters, D, generator=g)
    labels = torch.randint(0, C, (N,), generator=g)
    # probes near their class row (sub-center 0), noisy enough that ranks 1..5 differ
    x = gallery.view(C, subcenters, D)[labels, 0] + 0.9 * torch.randn(N, D, generator=g)
    # fp32 fused top-k vs fp64 naive rank classes in different orders: redraw the noise of any
    # probe whose label's cosine is within MIN_GAP of another class's, so its rank is unambiguous
    for _ in range(100):
        cos = cosines(x, gallery, subcenters).amax(dim=2)
        c_y = cos.gather(1, labels[:, None])
        near = ((cos - c_y).abs() < MIN_GAP).sum(dim=1) > 1  # the label itself is at distance 0
        if not near.any():
            break
        x[near] = gallery.view(C, subcenters, D)[labels[near], 0] + 0.9 * torch.randn(
            int(near.sum()), D, generator=g)
    assert not near.any()
    x = x * torch.rand(N, 1, generator=g).add(0.5)      # the norm must not matter
    ks = (1, 2, 5, 10)
    ours = mev.identification_accuracy(x, labels, gallery, ks, subcenters=subcenters,
                                       backend=backend, batch_size=64)
    naive = _naive_identification(x, labels, gallery, ks, subcenters)
    assert ours.keys() == naive.keys()
    for k in ks:
        assert ours[k] == pytest.approx(naive[k])
    assert 0.0 < ours[1] < ours[10] <= 1.0


def test_identification_with_class_centres_and_errors():
    g = torch.Generator().manual_seed(1)
    centres_true = F.normalize(torch.randn(10, 8, generator=g), dim=1)
    labels = torch.arange(10).repeat_interleave(20)
    emb = centres_true[labels] * 3 + 0.05 * torch.randn(200, 8, generator=g)
    centres = mev.class_centres(emb, labels, 10)
    assert centres.shape == (10, 8)
    torch.testing.assert_close(centres.norm(dim=1), torch.ones(10))
    assert mev.identification_accuracy(emb, labels, centres, 1) == {1: 1.0}
    with pytest.raises(ValueError, match="rank"):
        mev.identification_accuracy(emb, labels, centres, (1, 11))
    with pytest.raises(ValueError, match="closed set"):
        mev.identification_accuracy(emb, labels + 1, centres, 1)
    with pytest.raises(ValueError, match="embedding size"):
        mev.identification_accuracy(emb, labels, centres[:, :4], 1)
    with pytest.raises(TypeError, match="integer"):
        mev.identification_accuracy(emb, labels.float(), centres, 1)


def test_class_centres_matches_naive_and_handles_empty_classes():
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(40, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (40,), generator=g)    # class 4 is empty
    ours = mev.class_centres(emb, labels, 5, normalize=False)
    x = F.normalize(emb, dim=1)
    for c in range(4):
        torch.testing.assert_close(ours[c], x[labels == c].mean(0))
    assert torch.all(ours[4] == 0)
    assert torch.all(mev.class_centres(emb, labels, 5)[4] == 0)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        mev.class_centres(emb, labels, 3)


# ----------------------------------------------------------------------------- quality pooling

def test_quality_pool_matches_naive_loop():
    g = torch.Generator().manual_seed(3)
    N, D = 50, 7
    feats = torch.randn(N, D, generator=g, dtype=torch.float64) * 5
    q = torch.rand(N, generator=g, dtype=torch.float64)
    tids = torch.tensor([17, 3, 3, 99, 17] * 10)[torch.randperm(N, generator=g)]
    lam = 4.0
    pooled, ids = mev.quality_pool(feats, q, tids, lam)
    assert ids.tolist() == [3, 17, 99]
    for row, t in enumerate(ids.tolist()):
        m = tids == t
        w = torch.softmax(lam * q[m], 0)
        expect = (w[:, None] * F.normalize(feats[m], dim=1)).sum(0)
        torch.testing.assert_close(pooled[row], expect)


def test_quality_pool_limits_and_errors():
    feats = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    q = torch.tensor([0.9, 0.1, 0.5])
    tids = torch.tensor([0, 0, 1])
    mean, _ = mev.quality_pool(feats, q, tids, 0.0)           # λ = 0: plain mean
    torch.testing.assert_close(mean[0], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(mean[1], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    best, _ = mev.quality_pool(feats, q, tids, 1e4)           # λ → ∞: the best image
    torch.testing.assert_close(best[0], torch.tensor([1.0, 0.0]))
    big, _ = mev.quality_pool(feats, q * 1e3, tids, 1e3)      # no overflow in exp
    assert torch.isfinite(big).all()
    with pytest.raises(ValueError, match="lam"):
        mev.quality_pool(feats, q, tids, -1.0)
    with pytest.raises(ValueError, match="qualities"):
        mev.quality_pool(feats, q[:2], tids, 1.0)
    with pytest.raises(TypeError, match="integer"):
        mev.quality_pool(feats, q, tids.float(), 1.0)


def test_cosine_scores():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, -1.0]])
    torch.testing.assert_close(mev.cosine_scores(a, b), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="same shape"):
        mev.cosine_scores(a, b[:1])
