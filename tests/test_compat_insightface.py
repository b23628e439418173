"""marginops.compat.insightface against formulas written from arcface_torch's code semantics.

We cannot depend on arcface_torch, so the reference below is its math, written densely from its
``losses.py`` / ``partial_fc_v2.py``: cosines clamped to [−1, 1]; CombinedMarginLoss's m3 > 0
branch (CosFace, m1/m2 ignored) or ArcFace cos(arccos c + m2) with no fallback and a
straight-through gradient; cross-entropy over the gathered batch, each row's reported loss capped
at −log(1e-30), rows labelled −1 counting that cap in the mean (and, in marginops, getting no
gradient — the documented difference); embedding gradients times the world size; Partial-FC
sampling. The distributed cases run on 1 and 2 gloo ranks, one spawn per world size
(tests/gloo.py); each case finishes its collectives before it asserts (failures are collected), so
a failing case cannot hang the next.
"""

from __future__ import annotations

import gloo
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tolerance import assert_tight
from torch import nn

from marginops.compat.insightface import LOSS_CAP, CombinedMarginLoss, PartialFC_V2
from marginops.distributed import shard_range

F64 = torch.float64
B, D = 4, 8                      # rows per rank, embedding size
WORLD_SIZES = (1, 2)
PG_TIMEOUT_S, SPAWN_DEADLINE_S = 30, 240


# ----------------------------------------------------------------------------- the reference

def arcface_torch_loss(X, W, y, s, m2=0.5, m3=0.0, columns=None, thr=0.0):
    """(reported loss, differentiable loss) of arcface_torch on the gathered batch X (N, D),
    full weight W (C, D), labels y (N,) (−1 allowed). ``columns``: the sampled global classes
    (sorted), else all. ``thr``: interclass_filtering_threshold (> 0: every cosine above it but a
    labelled row's target is multiplied by 0 under no_grad). The differentiable loss is what
    marginops' gradient follows: the uncapped cross-entropy of the labelled rows, summed and
    divided by N (all rows)."""
    columns = torch.arange(W.shape[0]) if columns is None else columns
    cos = (F.normalize(X) @ F.normalize(W[columns]).t()).clamp(-1, 1)
    valid = y >= 0
    position = torch.full((W.shape[0],), -1, dtype=torch.long)
    position[columns] = torch.arange(columns.numel())
    col = position[y.clamp_min(0)].clamp_min(0)[:, None]
    if thr > 0:
        with torch.no_grad():
            keep = torch.zeros_like(cos, dtype=torch.bool).scatter(1, col, valid[:, None])
            dirty = (cos > thr) & ~keep
        cos = cos * (~dirty).to(cos.dtype)
    t = cos.gather(1, col).squeeze(1)
    if m3 > 0:
        psi = t - m3                                        # CosFace branch: m1, m2 ignored
    else:
        psi = t + (torch.cos(torch.acos(t) + m2) - t).detach()   # under no_grad in arcface_torch
    logits = s * cos.scatter(1, col, torch.where(valid, psi, t)[:, None])
    ce = -logits.log_softmax(1).gather(1, col).squeeze(1)
    reported = torch.where(valid, ce.clamp_max(LOSS_CAP), torch.full_like(ce, LOSS_CAP))
    return reported.mean(), torch.where(valid, ce, torch.zeros_like(ce)).sum() / ce.numel(), ce


def global_batch(world: int, C: int, seed: int, ignore_row: int | None = 1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(world * B, D, generator=g, dtype=F64) * 3
    W = torch.randn(C, D, generator=g, dtype=F64)
    y = torch.randint(0, C, (world * B,), generator=g)
    if ignore_row is not None:
        y[ignore_row] = -1
    return X, W, y


# ----------------------------------------------------------------------------- worker side

class Checks:
    def __init__(self):
        self.failures: list[str] = []

    def close(self, name, actual, expected, rtol=1e-9, atol=1e-9):
        try:
            assert_tight(torch.as_tensor(actual), torch.as_tensor(expected), rtol=rtol, atol=atol,
                         name=name)
        except AssertionError as err:
            self.failures.append(str(err))

    def true(self, name, condition):
        if not condition:
            self.failures.append(name)

    def done(self):
        assert not self.failures, "\n".join(self.failures)


def run_step(rank, world, margin_loss, C, X, W, y, sample_rate=1.0):
    """Build PartialFC_V2 as train_v2.py does, load this rank's slice of W under arcface_torch's
    key, run one forward/backward on this rank's rows."""
    pfc = PartialFC_V2(margin_loss, D, C, sample_rate, False).to(F64).train()
    start, n = shard_range(C, world, rank)
    pfc.load_state_dict({"weight": W[start:start + n]})
    rows = slice(rank * B, (rank + 1) * B)
    x = X[rows].clone().requires_grad_(True)
    loss = pfc(x, y[rows].clone())
    loss.backward()
    return pfc, loss.detach(), x.grad, pfc.weight.grad, start, n


def compare_with_reference(chk, rank, world, pfc_out, X, W, y, s, columns=None, **margins):
    pfc, loss, gx, gw, start, n = pfc_out
    Xr, Wr = X.clone().requires_grad_(True), W.clone().requires_grad_(True)
    reported, differentiable, ce = arcface_torch_loss(Xr, Wr, y, s, columns=columns, **margins)
    dX, dW = torch.autograd.grad(differentiable, (Xr, Wr))
    chk.close("reported loss", loss, reported.detach())
    chk.close("embedding gradient (x world size)", gx, world * dX[rank * B:(rank + 1) * B])
    chk.close("weight shard gradient", gw, dW[start:start + n])
    return ce.detach()


def case_arcface_straight_through(rank, world):
    chk, C, s = Checks(), 11, 64.0
    X, W, y = global_batch(world, C, seed=1)
    out = run_step(rank, world, CombinedMarginLoss(s, 1.0, 0.5, 0.0), C, X, W, y)
    compare_with_reference(chk, rank, world, out, X, W, y, s, m2=0.5)
    # The exact-gradient ArcFace differs (the straight-through gradient is really in use).
    Xr = X.clone().requires_grad_(True)
    exact = F.normalize(Xr) @ F.normalize(W).t()
    col = y.clamp_min(0)[:, None]
    t = exact.gather(1, col).squeeze(1)
    logits = s * exact.scatter(1, col, torch.cos(torch.acos(t) + 0.5)[:, None])
    ce = F.cross_entropy(logits, y, ignore_index=-1, reduction="sum") / y.numel()
    (dX_exact,) = torch.autograd.grad(ce, Xr)
    chk.true("straight-through gradient differs from the exact one",
             (out[2] - world * dX_exact[rank * B:(rank + 1) * B]).abs().max() > 1e-3)
    chk.done()


def case_m3_branch_and_cap(rank, world):
    chk, C, s = Checks(), 11, 64.0
    X, W, y = global_batch(world, C, seed=2)
    X[2] = -3 * F.normalize(W[y[2]], dim=0) + 0.01 * X[2]   # c_y ≈ −1: CE far above the cap
    # m1 = 0.9, m2 = 0.4 are ignored because m3 > 0 (arcface_torch's branch): CosFace, m = 0.35.
    out = run_step(rank, world, CombinedMarginLoss(s, 0.9, 0.4, 0.35), C, X, W, y)
    ce = compare_with_reference(chk, rank, world, out, X, W, y, s, m3=0.35)
    chk.true(f"row 2's cross-entropy {ce[2]:.1f} exceeds the cap", ce[2] > LOSS_CAP + 10)
    chk.done()


def case_sampling(rank, world):
    chk, C, s, rate = Checks(), 23, 64.0, 0.5
    X, W, y = global_batch(world, C, seed=3, ignore_row=None)
    y = y % 5                                   # few positive classes: random negatives are drawn
    out = run_step(rank, world, CombinedMarginLoss(s, 1.0, 0.5, 0.0), C, X, W, y, rate)
    pfc, start, n = out[0], out[4], out[5]
    index = pfc.weight_index
    local = y - start
    positives = torch.unique(local[(local >= 0) & (local < n)])
    everyone = [None] * world
    dist.all_gather_object(everyone, (index + start).tolist())
    columns = torch.tensor(sorted(c for part in everyone for c in part))
    compare_with_reference(chk, rank, world, out, X, W, y, s, columns=columns, m2=0.5)
    chk.true("sorted, distinct", bool((index[1:] > index[:-1]).all()))
    # Sync-free size (ShardedMarginLoss._sample_classes): min(n, max(int(rate·n), B_global)), where
    # arcface_torch takes max(int(rate·n), #positives), a size known only after a host sync.
    expected = min(n, max(int(rate * n), y.numel()))
    chk.true(f"{index.numel()} sampled, expected {expected}", index.numel() == expected)
    chk.true("every local positive is sampled", bool(torch.isin(positives, index).all()))
    unsampled = torch.ones(n, dtype=torch.bool)
    unsampled[index] = False
    chk.true("unsampled rows get exactly zero gradient", bool((out[3][unsampled] == 0).all()))
    chk.true("some rows are unsampled", bool(unsampled.any()))
    chk.done()


def case_interclass_filtering(rank, world):
    """interclass_filtering_threshold = 0.4 (the *_filter04 configs), both margin branches."""
    chk, C, s, thr = Checks(), 11, 64.0, 0.4
    X, W, y = global_batch(world, C, seed=5)
    cos = F.normalize(X) @ F.normalize(W).t()
    chk.true("no cosine within 1e-3 of the threshold", bool(((cos - thr).abs() > 1e-3).all()))
    target = torch.zeros_like(cos, dtype=torch.bool).scatter(1, y.clamp_min(0)[:, None], True)
    chk.true("some non-target cosines are filtered", bool(((cos > thr) & ~target).any()))
    for m2, m3 in ((0.5, 0.0), (0.0, 0.35)):
        out = run_step(rank, world, CombinedMarginLoss(s, 1.0, m2, m3, thr), C, X, W, y)
        compare_with_reference(chk, rank, world, out, X, W, y, s, m2=m2, m3=m3, thr=thr)
    chk.done()


def case_checkpoint_keys(rank, world):
    chk, C = Checks(), 11
    start, n = shard_range(C, world, rank)
    pfc = PartialFC_V2(CombinedMarginLoss(64, 1, 0.5, 0), D, C, 1.0, False)
    sd = pfc.state_dict()
    chk.true(f"keys {list(sd)}", list(sd) == ["weight"])
    chk.true(f"shape {tuple(sd['weight'].shape)}", sd["weight"].shape == (n, D))
    chk.true("N(0, 0.01) init", 0.005 < float(sd["weight"].std()) < 0.015)
    theirs = {"weight": torch.randn(n, D)}            # an arcface_torch softmax_fc_gpu_{rank}.pt
    pfc.load_state_dict(theirs)
    chk.true("their checkpoint loads", torch.equal(pfc.weight, theirs["weight"]))
    other = PartialFC_V2(CombinedMarginLoss(64, 1, 0.5, 0), D, C, 1.0, False)
    other.load_state_dict(pfc.state_dict())
    chk.true("ours round-trips", torch.equal(other.weight, theirs["weight"]))
    nested = nn.ModuleDict({"pfc": pfc}).state_dict()
    chk.true(f"nested keys {list(nested)}", list(nested) == ["pfc.weight"])
    chk.true("weight is the only parameter",
             [p is pfc.weight for p in pfc.parameters()] == [True])
    chk.done()


CASES = {
    "arcface_straight_through": case_arcface_straight_through,
    "m3_branch_and_loss_cap": case_m3_branch_and_cap,
    "partial_fc_sampling": case_sampling,
    "checkpoint_keys_and_shapes": case_checkpoint_keys,
    "interclass_filtering": case_interclass_filtering,
}


# ----------------------------------------------------------------------------- pytest side

@pytest.fixture(scope="module")
def results():
    return gloo.run_cases("test_compat_insightface", WORLD_SIZES, pg_timeout_s=PG_TIMEOUT_S,
                          deadline_s=SPAWN_DEADLINE_S)


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("case", list(CASES))
def test_partial_fc_v2(results, world, case):
    gloo.check_case(results, world, case)


# ----------------------------------------------------------------------------- single process

def test_combined_margin_loss_on_dense_logits():
    """Called on its own, as arcface_torch's: scaled logits with the margin on the targets."""
    g = torch.Generator().manual_seed(0)
    cos = torch.rand(6, 9, generator=g, dtype=F64) * 1.8 - 0.9
    y = torch.tensor([0, 3, -1, 8, 2, 2])
    rows = torch.arange(6)[y >= 0]
    # ArcFace branch: value cos(arccos t + m2), no fallback; gradient straight-through (= s).
    c = cos.clone().requires_grad_(True)
    out = CombinedMarginLoss(64, 1.0, 0.5, 0.0)(c, y)
    expected = 64 * cos.clone()
    expected[rows, y[rows]] = 64 * torch.cos(torch.acos(cos[rows, y[rows]]) + 0.5)
    assert_tight(out.detach(), expected, rtol=1e-9, atol=1e-9, name="arcface branch")
    (grad,) = torch.autograd.grad(out.sum(), c)
    assert torch.equal(grad, torch.full_like(grad, 64.0))
    # m3 > 0: CosFace with m3; m1 and m2 are ignored.
    out = CombinedMarginLoss(30, 0.9, 0.4, 0.2)(cos.clone(), y[:, None])   # (B, 1) labels too
    expected = 30 * cos.clone()
    expected[rows, y[rows]] = 30 * (cos[rows, y[rows]] - 0.2)
    assert_tight(out, expected, rtol=1e-12, atol=1e-12, name="m3 branch")


def test_combined_margin_loss_selects_the_family():
    family, kw = CombinedMarginLoss(64, 1.0, 0.5, 0.0).family()
    assert family.__name__ == "ArcFaceLoss"
    assert kw == {"scale": 64.0, "margin": 0.5, "angle_policy": "none",
                  "grad_mode": "straight_through"}
    family, kw = CombinedMarginLoss(64, 0.9, 0.4, 0.15).family()
    assert family.__name__ == "CosFaceLoss" and kw == {"scale": 64.0, "margin": 0.15}


def test_unsupported_margins_raise_and_filtering_is_passed_on():
    with pytest.raises(ValueError, match="marginops.CombinedMarginLoss"):
        CombinedMarginLoss(64, 0.9, 0.4, 0.0)   # arcface_torch raises on this too
    with pytest.raises(ValueError, match="interclass_filtering_threshold"):
        CombinedMarginLoss(64, 1.0, 0.5, 0.0, float("nan"))
    assert CombinedMarginLoss(64, 1.0, 0.5, 0.0, 0).interclass_filtering_threshold == 0
    # > 0 reaches the fused family; <= 0 is off, as in arcface_torch
    assert CombinedMarginLoss(64, 1.0, 0.5, 0.0, 0.4).family()[1][
        "interclass_filtering_threshold"] == 0.4
    assert CombinedMarginLoss(64, 0.9, 0.4, 0.2, 0.4).family()[1][
        "interclass_filtering_threshold"] == 0.4
    assert "interclass_filtering_threshold" not in CombinedMarginLoss(64, 1, 0.5, 0, -1).family()[1]


def test_partial_fc_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        PartialFC_V2(CombinedMarginLoss(64, 1, 0.5, 0), D, 11)
