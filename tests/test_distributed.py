"""marginops.distributed on CPU/gloo: sharded families and Partial FC against the single-process
reference on the same global batch (fp64, tight), stateful families across ranks, DDP gradient
scaling, checkpoints across world sizes, and fail-fast on inconsistent inputs.

Each world size (2 and 3) is ONE spawn that runs every case below in sequence (tests/gloo.py);
each case does all of its collectives before it asserts anything (failures are collected, see
``Checks``), so one failing case cannot desynchronise the ranks for the next.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time

import gloo
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tolerance import MIN_GAP, assert_tight, assert_within_budget, cosines, routing_gap
from torch import nn

import marginops as mo
from marginops import reference as ref
from marginops.distributed import InconsistentInputsError, ShardedMarginLoss, shard_range

WORLD_SIZES = (2, 3)
PG_TIMEOUT_S = 30        # a collective that never completes raises after this
SPAWN_DEADLINE_S = 240   # the whole spawn (all cases) must finish by then
FAST_ERROR_S = 10        # inconsistent inputs must raise well before the collective timeout
F64 = torch.float64
B, D = 4, 8              # rows per rank, embedding size
# Gradients are compared at rtol 1e-9 with two absolute floors: TIGHT_ATOL against the
# single-process module on the same global batch (same math in one process: isolates what the
# sharding does), REF_ATOL against marginops.reference, whose F.cross_entropy gradient forms
# p_y − 1 with cancellation at s = 64 (entries of ~1e-9 absolute error even single-process).
TIGHT_ATOL, REF_ATOL = 1e-12, 1e-8


# ----------------------------------------------------------------------------- helpers (workers)

class Checks:
    """Collects failures so that a case finishes its collectives before it raises."""

    def __init__(self):
        self.failures: list[str] = []

    def close(self, name, actual, expected, rtol=1e-9, atol=1e-10):
        try:
            assert_tight(torch.as_tensor(actual), torch.as_tensor(expected), rtol=rtol, atol=atol,
                         name=name)
        except AssertionError as err:
            self.failures.append(str(err))

    def budget(self, name, actual, baseline, truth, factor=2.0):
        """fp32 ``actual`` within the budget of same-precision ``baseline`` against fp64 truth."""
        try:
            assert_within_budget(actual, baseline, truth, torch.float32, factor=factor, name=name)
        except AssertionError as err:
            self.failures.append(str(err))

    def true(self, name, condition, detail=""):
        if not condition:
            self.failures.append(f"{name} {detail}")

    def done(self):
        if self.failures:
            raise AssertionError("\n".join(self.failures))


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def gather_obj(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def labels_for(mode: str, world: int, C: int, g: torch.Generator) -> torch.Tensor:
    """Global labels: "first_shard" — only classes of rank 0 (the other ranks own no label of the
    batch) plus an ignored row; "random" — any class plus an ignored row."""
    if mode == "first_shard":
        y = torch.randint(0, shard_range(C, world, 0)[1], (world * B,), generator=g)
        y[1] = -1
    else:
        y = torch.randint(0, C, (world * B,), generator=g)
        y[2] = -1
    return y


def target_cos(X, W, y, K=1):
    cos = (F.normalize(X) @ F.normalize(W).t()).view(X.shape[0], -1, K).amax(dim=2)
    return cos.gather(1, y.clamp_min(0)[:, None]).squeeze(1)


def sharded_step(m: ShardedMarginLoss, X, y, rank):
    """Forward/backward of this rank's rows; returns global results gathered on every rank."""
    m.zero_grad(set_to_none=True)
    rows = slice(rank * B, (rank + 1) * B)
    x = X[rows].clone().requires_grad_()
    out = m(x, y[rows])
    (out if out.dim() == 0 else out.sum()).backward()
    res = {"loss": out.detach(), "losses": gather_rows(out.detach().reshape(1, -1)),
           "gx": gather_rows(x.grad), "gw": m.gather_full(m.weight.grad)}
    if m.bias is not None:
        res["gb"] = m.gather_full(m.bias.grad)
    if isinstance(m.family.scale, nn.Parameter):
        res["gscale"] = m.family.scale.grad.detach().clone()
    return res


def buffers(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_buffers()}


# ----------------------------------------------------------------------------- family specs

def _c_y(X, W, y):
    """Target cosines with 0 on ignored rows (the modules' convention; ElasticFace+ ranks them)."""
    c = target_cos(X.detach(), W.detach(), y)
    return torch.where(y >= 0, c, torch.zeros_like(c))


# name -> (class, kwargs, initial state, embedding scale, ref(x, w, y, leaves, before, after, ctx),
#          state check(X, W, y, before) -> expected buffers after the step, or None)
SPECS = {
    "arcface": (mo.ArcFaceLoss, {}, {}, 3.0,
                lambda x, w, y, p, b, a, c: ref.arcface_loss(x, w, y), None),
    "arcface_none_straight_through": (
        mo.ArcFaceLoss, {"angle_policy": "none", "grad_mode": "straight_through"}, {}, 3.0,
        lambda x, w, y, p, b, a, c: ref.arcface_loss(x, w, y, angle_policy="none",
                                                     grad_mode="straight_through"), None),
    "combined": (mo.CombinedMarginLoss, {"m1": 0.9, "m2": 0.4, "m3": 0.15}, {}, 3.0,
                 lambda x, w, y, p, b, a, c: ref.combined_margin_loss(x, w, y, m1=0.9, m2=0.4,
                                                                      m3=0.15), None),
    "cosface_reduction_none": (
        mo.CosFaceLoss, {"reduction": "none"}, {}, 3.0,
        lambda x, w, y, p, b, a, c: ref.cosface_loss(x, w, y, reduction="none"), None),
    "normface_learnable_scale": (
        mo.NormFaceLoss, {"learnable_scale": True}, {}, 3.0,
        lambda x, w, y, p, b, a, c: ref.normface_loss(x, w, y, scale=p["scale"]), None),
    "crystal_bias_learnable_alpha": (
        mo.CrystalLoss, {"learnable_alpha": True}, {}, 3.0,
        lambda x, w, y, p, b, a, c: ref.crystal_loss(x, w, y, alpha=p["scale"], bias=p["bias"]),
        None),
    "sphereface": (mo.SphereFaceLoss, {}, {}, 3.0,
                   lambda x, w, y, p, b, a, c: ref.sphereface_loss(
                       x, w, y, margin=4, lambda_=ref.sphereface_lambda(int(b["iteration"]))),
                   lambda X, W, y, b: {"iteration": b["iteration"] + 1}),
    "magface": (mo.MagFaceLoss, {}, {}, 10.0,  # norms inside [l_a, u_a]: the g(a) path is live
                lambda x, w, y, p, b, a, c: ref.magface_loss(x, w, y), None),
    "curricularface": (
        mo.CurricularFaceLoss, {}, {"t": 0.3}, 3.0,
        lambda x, w, y, p, b, a, c: ref.curricularface_loss(x, w, y, t=a["t"]),
        lambda X, W, y, b: {"t": ref.curricularface_update_t(b["t"], _c_y(X, W, y), 0.01, y)}),
    "adaface": (
        mo.AdaFaceLoss, {}, {"batch_mean": 8.0, "batch_std": 3.0}, 3.0,
        lambda x, w, y, p, b, a, c: ref.adaface_loss(x, w, y, batch_mean=a["batch_mean"],
                                                     batch_std=a["batch_std"]),
        lambda X, W, y, b: dict(zip(("batch_mean", "batch_std"), ref.adaface_update_stats(
            b["batch_mean"], b["batch_std"], X.norm(dim=1), 0.01, y)))),
    "elastic_arc_seeded": (
        mo.ElasticArcFaceLoss, {"seed": 123}, {}, 3.0,
        lambda x, w, y, p, b, a, c: ref.elastic_arcface_loss(x, w, y, margins=ref.elastic_margins(
            _c_y(x, w, y), 0.5, 0.05, *b["draw_state"].tolist())), None),
    "elastic_arc_unseeded": (  # seed=None: the ranks must agree on one
        mo.ElasticArcFaceLoss, {}, {}, 3.0,
        lambda x, w, y, p, b, a, c: ref.elastic_arcface_loss(x, w, y, margins=ref.elastic_margins(
            _c_y(x, w, y), 0.5, 0.05, *b["draw_state"].tolist())), None),
    "elastic_cos_plus": (
        mo.ElasticCosFaceLoss, {"plus": True, "seed": 7}, {}, 3.0,
        lambda x, w, y, p, b, a, c: ref.elastic_cosface_loss(x, w, y, margins=ref.elastic_margins(
            _c_y(x, w, y), 0.35, 0.02, *b["draw_state"].tolist(), plus=True)), None),
    "subcenter_arcface": (
        mo.SubCenterArcFaceLoss, {"subcenters": 3}, {}, 3.0,
        lambda x, w, y, p, b, a, c: ref.subcenter_arcface_loss(x, w, y, subcenters=3), None),
}


def family_case(name: str, C: int):
    def case(rank, world):
        cls, kw, state0, emb_scale, ref_fn, state_fn = SPECS[name]
        K = kw.get("subcenters", 1)
        chk = Checks()
        m = ShardedMarginLoss(cls, D, C, backend="torch", embedding_grad_scale=1.0, init_seed=1,
                              **kw).to(F64).train()
        g = torch.Generator().manual_seed(C)
        W = torch.randn(C * K, D, generator=g, dtype=F64)
        sd = {"weight": W, **{k: torch.full_like(getattr(m.family, k), v)
                              for k, v in state0.items()}}
        if m.bias is not None:
            sd["bias"] = torch.randn(C, generator=g, dtype=F64) * 0.5
        m.load_full_state_dict(sd, strict=False)
        oracle = cls(D, C, backend="torch", **kw).to(F64).train()  # single process, global batch
        oracle.load_state_dict({**oracle.state_dict(), **m.full_state_dict()})
        seed = getattr(m.family, "seed", None)
        chk.true("seed agrees on every rank", len(set(gather_obj(seed))) == 1)
        if seed is not None:  # the oracle loaded the same draw_state = [seed, step]
            chk.true("draw_state holds the seed", oracle.draw_state[0].item() == seed)
        ctx = {}
        for step, mode in enumerate(("first_shard", "random")):
            X = torch.randn(world * B, D, generator=g, dtype=F64) * emb_scale
            y = labels_for(mode, world, C, g)
            before = buffers(m.family)
            res = sharded_step(m, X, y, rank)
            after = buffers(m.family)
            tag = f"{name} step {step} ({mode})"
            # every rank returns the bit-identical loss and holds identical state
            chk.true(f"{tag}: losses identical on all ranks",
                     bool((res["losses"] == res["losses"][0]).all()), str(res["losses"]))
            for key, states in zip(after, zip(*[list(s.values()) for s in
                                                gather_obj({k: v.tolist()
                                                            for k, v in after.items()})])):
                chk.true(f"{tag}: buffer {key} identical on all ranks",
                         all(s == states[0] for s in states), str(states))
            # the single-process module on the global batch: same state, loss, every gradient
            oracle.zero_grad(set_to_none=True)
            xo = X.clone().requires_grad_()
            o_loss = oracle(xo, y)
            (o_loss if o_loss.dim() == 0 else o_loss.sum()).backward()
            for key, value in buffers(oracle).items():
                chk.close(f"{tag}: buffer {key} vs single-process module", after[key], value)
            chk.close(f"{tag}: loss vs single-process module", res["loss"], o_loss.detach())
            chk.close(f"{tag}: embedding grad vs single-process module", res["gx"], xo.grad,
                      atol=TIGHT_ATOL)
            chk.close(f"{tag}: weight grad vs single-process module", res["gw"],
                      oracle.weight.grad, atol=TIGHT_ATOL)
            if "gb" in res:
                chk.close(f"{tag}: bias grad vs single-process module", res["gb"],
                          oracle.bias.grad, atol=TIGHT_ATOL)
            if "gscale" in res:
                chk.close(f"{tag}: scale grad vs single-process module", res["gscale"],
                          oracle.scale.grad, atol=TIGHT_ATOL)
            if state_fn is not None:  # the state update against the independent reference
                for key, value in state_fn(X, W, y, before).items():
                    chk.close(f"{tag}: buffer {key} vs reference update", after[key], value)
            # loss and every gradient against marginops.reference
            xr, wr = X.clone().requires_grad_(), W.clone().requires_grad_()
            leaves = {}
            if "gscale" in res:
                leaves["scale"] = torch.tensor(float(m.family.scale), dtype=F64,
                                               requires_grad=True)
            if "gb" in res:
                leaves["bias"] = sd["bias"].clone().requires_grad_()
            want = ref_fn(xr, wr, y, leaves, before, after, ctx)
            (want if want.dim() == 0 else want.sum()).backward()
            chk.close(f"{tag}: loss vs reference", res["loss"], want.detach())
            chk.close(f"{tag}: embedding grad vs reference", res["gx"], xr.grad, atol=REF_ATOL)
            chk.close(f"{tag}: weight grad (shards reassembled) vs reference", res["gw"], wr.grad,
                      atol=REF_ATOL)
            chk.true(f"{tag}: ignored row has zero embedding grad",
                     bool((res["gx"][(y < 0)] == 0).all()))
            if "gb" in res:
                chk.close(f"{tag}: bias grad vs reference", res["gb"], leaves["bias"].grad,
                          atol=REF_ATOL)
            if "gscale" in res:
                chk.close(f"{tag}: scale grad vs reference", res["gscale"], leaves["scale"].grad,
                          atol=REF_ATOL)
            if name == "curricularface":  # make sure the hard-negative branch was exercised
                cos = F.normalize(X) @ F.normalize(W).t()
                tau = torch.cos(torch.acos(_c_y(X, W, y).clamp(-1 + 1e-7, 1 - 1e-7)) + 0.5)
                hard = (cos > tau[:, None]) & (torch.arange(C)[None] != y[:, None])
                chk.true(f"{tag}: data has hard negatives", bool(hard[y >= 0].any()))
        chk.done()
    return case


# ----------------------------------------------------------------------------- Partial FC

def partial_fc_case(cls, kw, ref_fn):
    def case(rank, world):
        K = kw.get("subcenters", 1)
        C, rate = 40, 0.5  # int(rate·n) covers the global batch at world 2, not at world 3
        chk = Checks()

        def build(seed):
            return ShardedMarginLoss(cls, D, C, backend="torch", sample_rate=rate,
                                     sample_seed=seed, embedding_grad_scale=1.0, **kw
                                     ).to(F64).train()

        m, twin = build(11), build(11)
        g = torch.Generator().manual_seed(5)
        W = torch.randn(C * K, D, generator=g, dtype=F64)
        m.load_full_weight(W)
        twin.load_full_weight(W)
        start, n = m.class_start, m.local_classes
        num_sample = min(n, max(int(rate * n), world * B))  # fixed on the host: no sync
        for step in range(2):
            X = torch.randn(world * B, D, generator=g, dtype=F64) * 3
            # rank 0's shard gets several positives, the last shard one (filled up), a middle
            # shard (world 3) none (all random)
            y = torch.tensor([0, 1, 2, 3, C - 1, -1] + [step % 2] * (world * B - 6))
            res = sharded_step(m, X, y, rank)
            idx = m.last_class_index
            with torch.no_grad():
                twin(X[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B])
            tag = f"step {step}"
            local = y - start
            positive = torch.unique(local[(y >= 0) & (local >= 0) & (local < n)])
            chk.true(f"{tag}: same sample_seed, same sample",
                     torch.equal(idx, twin.last_class_index))
            chk.true(f"{tag}: sorted distinct local ids",
                     idx.numel() == torch.unique(idx).numel() and torch.equal(idx, idx.sort()[0])
                     and (idx.numel() == 0 or (0 <= int(idx.min()) and int(idx.max()) < n)))
            chk.true(f"{tag}: positives kept", bool(torch.isin(positive, idx).all()),
                     f"{positive} not in {idx}")
            chk.true(f"{tag}: size min(n, max(int(rate·n), global batch))",
                     idx.numel() == num_sample, f"{idx.numel()} vs {num_sample}")
            sampled = sorted(c for part in gather_obj((idx + start).tolist()) for c in part)
            S = torch.tensor(sampled)
            position = torch.full((C,), -1, dtype=torch.long)
            position[S] = torch.arange(S.numel())
            y_sub = torch.where(y >= 0, position[y.clamp_min(0)], y)
            chk.true(f"{tag}: every label sampled", bool((y_sub[y >= 0] >= 0).all()))
            rows = (S[:, None] * K + torch.arange(K)).flatten()
            sub = cls(D, S.numel(), backend="torch", **kw).to(F64)  # single process, classes S
            sub.load_state_dict({"weight": W[rows]})
            xr = X.clone().requires_grad_()
            want = sub(xr, y_sub)
            want.backward()
            gw = torch.zeros_like(W)
            gw[rows] = sub.weight.grad
            chk.close(f"{tag}: loss vs single-process on the sampled classes", res["loss"], want)
            chk.close(f"{tag}: loss vs reference on the sampled classes", res["loss"],
                      ref_fn(X, W[rows], y_sub))
            chk.close(f"{tag}: embedding grad", res["gx"], xr.grad, atol=TIGHT_ATOL)
            chk.close(f"{tag}: weight grad", res["gw"], gw, atol=TIGHT_ATOL)
            unsampled = torch.ones(C * K, dtype=torch.bool)
            unsampled[rows] = False
            chk.true(f"{tag}: unsampled rows get exactly zero grad",
                     bool((res["gw"][unsampled] == 0).all()))
        # eval mode: every class
        m.eval()
        X = torch.randn(world * B, D, generator=g, dtype=F64) * 3
        y = torch.randint(0, C, (world * B,), generator=g)
        with torch.no_grad():
            loss = m(X[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B])
        chk.true("eval: no sampling", m.last_class_index is None)
        chk.close("eval: full-softmax loss", loss, ref_fn(X, W, y))
        chk.done()
    return case


# ----------------------------------------------------------------------------- DDP scaling

def case_ddp_grad_scaling(rank, world):
    """DDP-averaged backbone gradients: with the default world-size scaling they equal the
    single-process gradient of the global-batch loss; with 1.0 they are 1/world of it."""
    chk = Checks()
    C, in_dim = 11, 5
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(in_dim, 16), nn.Tanh(), nn.Linear(16, D)).double()
    single = copy.deepcopy(backbone)
    ddp = nn.parallel.DistributedDataParallel(backbone)
    g = torch.Generator().manual_seed(9)
    Z = torch.randn(world * B, in_dim, generator=g, dtype=F64)
    y = labels_for("random", world, C, g)
    W = torch.randn(C, D, generator=g, dtype=F64)
    head = mo.ArcFaceLoss(D, C, backend="torch").to(F64)
    head.load_state_dict({"weight": W})
    want = head(single(Z), y)
    want.backward()
    rows = slice(rank * B, (rank + 1) * B)
    for scale in ("world_size", 1.0):
        ddp.zero_grad(set_to_none=True)
        loss_fn = ShardedMarginLoss(mo.ArcFaceLoss, D, C, backend="torch",
                                    embedding_grad_scale=scale).to(F64)
        loss_fn.load_full_weight(W)
        loss = loss_fn(ddp(Z[rows]), y[rows])
        loss.backward()
        factor = 1.0 if scale == "world_size" else 1.0 / world
        chk.close(f"{scale}: loss", loss, want)
        for (name, p), q in zip(backbone.named_parameters(), single.parameters()):
            chk.close(f"{scale}: DDP backbone grad {name}", p.grad, q.grad * factor,
                      atol=TIGHT_ATOL)
        chk.close(f"{scale}: weight grad", loss_fn.gather_full(loss_fn.weight.grad),
                  head.weight.grad, atol=TIGHT_ATOL)
    chk.done()


# ----------------------------------------------------------------------------- checkpoints

def case_checkpoint_other_world_size(rank, world):
    chk = Checks()
    C = 11
    a = ShardedMarginLoss(mo.CrystalLoss, D, C, learnable_alpha=True, backend="torch",
                          init_seed=3).to(F64).train()
    with torch.no_grad():
        a.bias.normal_(generator=torch.Generator().manual_seed(100 + rank))
        a.family.scale.fill_(4.5)
    shards = gather_obj(a.weight.detach().clone())
    chk.true("init: shards differ between ranks", not torch.equal(shards[0][:3], shards[1][:3]))
    sd = a.full_state_dict()
    sd0 = a.full_state_dict(rank0_only=True)
    chk.true("full weight shape", tuple(sd["weight"].shape) == (C, D))
    chk.close("full weight = shards in rank order", sd["weight"], torch.cat(shards))
    chk.close("bias slice", sd["bias"][a.class_start:a.class_start + a.local_classes], a.bias)
    chk.true("rank0_only", (sd0.keys() == sd.keys()) if rank == 0 else sd0 == {})
    if rank == 0:
        chk.true("rank0_only equal", all(torch.equal(sd0[k], sd[k]) for k in sd))
    # file round trip, then load into a plain single-process module and a smaller world
    path = gather_obj(os.path.join(tempfile.mkdtemp(), "ckpt.pt") if rank == 0 else None)[0]
    if rank == 0:
        torch.save(sd, path)
    dist.barrier()
    loaded = torch.load(path)
    plain = mo.CrystalLoss(D, C, learnable_alpha=True, backend="torch").to(F64)
    plain.load_state_dict(loaded)  # strict: same keys as the single-process family
    g = torch.Generator().manual_seed(4)
    X = torch.randn(world * B, D, generator=g, dtype=F64) * 3
    y = labels_for("random", world, C, g)
    with torch.no_grad():
        loss_a = a(X[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B])
        chk.close("world R vs single process", loss_a, plain(X, y))
    sub = dist.new_group(list(range(world - 1)))  # collective: every rank calls it
    if rank < world - 1:
        b = ShardedMarginLoss(mo.CrystalLoss, D, C, learnable_alpha=True, backend="torch",
                              process_group=sub).to(F64).train()
        b.load_full_state_dict(loaded)
        start, n = shard_range(C, world - 1, rank)
        chk.true("smaller world shard", (b.class_start, b.local_classes) == (start, n))
        back = b.full_state_dict()
        for key in sd:
            chk.close(f"world {world - 1} round trip {key}", back[key], sd[key], rtol=0, atol=0)
        rows = (world - 1) * B
        with torch.no_grad():
            loss_b = b(X[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B])
            chk.close(f"world {world - 1} vs single process", loss_b, plain(X[:rows], y[:rows]))
    dist.barrier()
    # sub-center layout (K rows per class) through the same path
    s = ShardedMarginLoss(mo.SubCenterArcFaceLoss, D, C, subcenters=3, backend="torch").to(F64)
    full = s.full_state_dict()["weight"]
    chk.true("sub-center full weight shape", tuple(full.shape) == (C * 3, D))
    first, count = s.class_start * 3, s.local_classes * 3
    chk.close("sub-center shard rows", full[first:first + count], s.weight)
    chk.done()


# ----------------------------------------------------------------------------- predict

def case_predict(rank, world):
    chk = Checks()
    for C, k, cls, kw in ((11, 3, mo.ArcFaceLoss, {}), (7, 4, mo.CrystalLoss, {})):
        m = ShardedMarginLoss(cls, D, C, backend="torch", **kw).to(F64).eval()
        plain = cls(D, C, backend="torch", **kw).to(F64)
        sd = m.full_state_dict()
        if "bias" in sd:
            sd["bias"] = torch.randn(C, generator=torch.Generator().manual_seed(2), dtype=F64)
            m.load_full_state_dict(sd)
        plain.load_state_dict(sd)
        X = torch.randn(world * B, D, generator=torch.Generator().manual_seed(C), dtype=F64)
        got = m.predict(X[rank * B:(rank + 1) * B], k=k)
        chk.true(f"{cls.__name__} predict k={k}",
                 torch.equal(got, plain.predict(X, k=k)[rank * B:(rank + 1) * B]),
                 f"{got} vs {plain.predict(X, k=k)[rank * B:(rank + 1) * B]}")
    chk.done()


# ----------------------------------------------------------------------------- fp32, auto backend

def gapped_fp32_data(g, world, C, K, gap_kw):
    """Weight and the two steps' (X, y), redrawn from ``g`` until every routing decision (best
    sub-center, ψ's branch, hard negatives) is MIN_GAP from its switch: sharded and single-process
    fp32 sum in different orders and must not pick different winners (tests/tolerance.py)."""
    for _ in range(100):
        W = torch.randn(C * K, D, generator=g)
        steps = [(torch.randn(world * B, D, generator=g) * 3, labels_for(mode, world, C, g))
                 for mode in ("first_shard", "random")]
        if all(routing_gap(cosines(X, W, K), y, **gap_kw) >= MIN_GAP for X, y in steps):
            return W, steps
    raise AssertionError(f"no draw with a routing gap of {MIN_GAP} in 100 tries")


def case_fp32_auto_backend(rank, world, seed=3):
    """fp32 through backend="auto" (the C++ op when built): the sharded loss and gradients are
    within the same-precision budget of the single-process module in the same dtype and backend
    (both against an fp64 twin: tests/tolerance.py), and Partial FC runs on it."""
    chk = Checks()
    C = 11
    fallback = (-math.cos(0.5),)  # ArcFace's ψ switches branch at c_y = cos(π − m)
    for cls, kw, gap_kw in ((mo.ArcFaceLoss, {}, {"target_switches": fallback}),
                            (mo.CurricularFaceLoss, {}, {"target_switches": fallback,
                                                         "hard_margin": 0.5}),
                            (mo.SubCenterArcFaceLoss, {"subcenters": 2},
                             {"target_switches": fallback}),
                            (mo.CrystalLoss, {}, {})):
        g = torch.Generator().manual_seed(seed)
        W, steps = gapped_fp32_data(g, world, C, kw.get("subcenters", 1), gap_kw)
        m = ShardedMarginLoss(cls, D, C, embedding_grad_scale=1.0, **kw).train()
        m.load_full_weight(W)
        plain = cls(D, C, **kw).train()
        plain.load_state_dict(m.full_state_dict())
        truth = copy.deepcopy(plain).double()  # fp64 twin: what both fp32 results are held to
        for step, (X, y) in enumerate(steps):
            res = sharded_step(m, X, y, rank)
            got = {}
            for module, inputs in ((plain, X), (truth, X.double())):
                module.zero_grad(set_to_none=True)
                xp = inputs.clone().requires_grad_()
                loss = module(xp, y)
                loss.backward()
                got[module] = {"loss": loss.detach(), "gx": xp.grad, "gw": module.weight.grad,
                               "gb": None if module.bias is None else module.bias.grad}
            tag = f"{cls.__name__} fp32 step {step}"
            # Both fp32 results carry rounding noise of ~s·eps32 (s = 64) that does not shrink with
            # the data: over 200 seeds the sharded error reached 0.94 of the factor-2 budget, so 4
            # (a wrong merge or a flipped winner costs ~1e-3, far above either budget).
            for key in ("loss", "gx", "gw", "gb"):
                if key in res:
                    chk.budget(f"{tag}: {key}", res[key], got[plain][key], got[truth][key],
                               factor=4.0)
    pfc = ShardedMarginLoss(mo.ArcFaceLoss, D, 40, sample_rate=0.25, sample_seed=1).train()
    X = torch.randn(world * B, D, generator=torch.Generator().manual_seed(8))
    res = sharded_step(pfc, X, torch.arange(world * B) % 40, rank)
    chk.true("fp32 partial FC: finite", bool(torch.isfinite(res["loss"]) and
                                            torch.isfinite(res["gx"]).all()))
    sampled = torch.zeros(pfc.local_classes, dtype=torch.bool)
    sampled[pfc.last_class_index] = True
    chk.true("fp32 partial FC: unsampled rows zero grad",
             bool((pfc.weight.grad[~sampled] == 0).all()))
    chk.done()


# ----------------------------------------------------------------------------- NaN across ranks

def case_nan_survives_rank_merge(rank, world):
    """NaN in one rank's weight shard gives a NaN loss on every rank (issue 10 item 1): the
    log-sum-exp merge's max all-reduce may drop NaN, so its sum all-reduce must carry it."""
    chk = Checks()
    for backend in ("torch", "auto"):
        for owner in (0, world - 1):
            m = ShardedMarginLoss(mo.ArcFaceLoss, D, 11, backend=backend).train()
            if rank == owner:
                with torch.no_grad():
                    m.weight[0, 0] = float("nan")
            g = torch.Generator().manual_seed(5)
            X = torch.randn(world * B, D, generator=g)
            # no row's label is the NaN class: only the non-target logits (lse_neg) carry the NaN
            nan_class = shard_range(11, world, owner)[0]
            y = labels_for("random", world, 11, g)
            y = torch.where(y == nan_class, (nan_class + 1) % 11, y)
            res = sharded_step(m, X, y, rank)
            tag = f"{backend}, NaN on rank {owner}"
            chk.true(f"{tag}: loss is NaN", bool(torch.isnan(res["loss"])), str(res["loss"]))
            chk.true(f"{tag}: embedding grad not finite", not bool(torch.isfinite(res["gx"]).all()))
    chk.done()


# ----------------------------------------------------------------------------- failures

def expect_error(chk, name, fn, exc=InconsistentInputsError, contains=()):
    t0 = time.monotonic()
    try:
        fn()
    except exc as err:
        elapsed = time.monotonic() - t0
        chk.true(f"{name}: raised after {elapsed:.1f}s (no hang)", elapsed < FAST_ERROR_S)
        for text in contains:
            chk.true(f"{name}: message mentions {text!r}", text in str(err), str(err))
        return
    except Exception as err:  # noqa: BLE001 - record the wrong type
        chk.failures.append(f"{name}: raised {type(err).__name__}: {err}")
        return
    chk.failures.append(f"{name}: did not raise")


def case_inconsistent_inputs(rank, world):
    chk = Checks()
    C, last = 11, world - 1

    def make(**kw):
        return ShardedMarginLoss(mo.ArcFaceLoss, D, C, backend="torch", **kw).to(F64)

    # construction-time configuration
    expect_error(chk, "num_classes", lambda: ShardedMarginLoss(
        mo.ArcFaceLoss, D, C + (rank == last), backend="torch"), contains=("num_classes",))
    expect_error(chk, "margin", lambda: make(margin=0.5 if rank else 0.4), contains=("margin",))
    expect_error(chk, "family", lambda: ShardedMarginLoss(
        mo.CosFaceLoss if rank == last else mo.ArcFaceLoss, D, C), contains=("family",))
    m = make()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(world * B, D, generator=g, dtype=F64)
    y = torch.randint(0, C, (world * B,), generator=g)
    x, yy = X[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]
    # per-step inputs
    expect_error(chk, "batch size", lambda: m(x[:B - 1] if rank == last else x,
                                              yy[:B - 1] if rank == last else yy),
                 contains=("batch size differs", f"rank {last}: {B - 1}"))
    bad = yy.clone()
    bad[0] = C + 5
    expect_error(chk, "label out of range", lambda: m(x, bad if rank == 1 else yy),
                 contains=("rank 1 was given invalid inputs", "outside"))
    expect_error(chk, "width", lambda: m(torch.randn(B, D + (rank == 0), dtype=F64), yy),
                 contains=("rank 0 was given invalid inputs", "width"))
    expect_error(chk, "dtype", lambda: m(x.float() if rank == 0 else x, yy),
                 contains=("embedding dtype differs",))
    expect_error(chk, "requires_grad", lambda: m(x.clone().requires_grad_(rank == 0), yy),
                 contains=("embeddings require grad differs",))

    def mixed_mode():
        m.train(rank != last)
        try:
            m(x, yy)
        finally:
            m.train()
    expect_error(chk, "training mode", mixed_mode, contains=("training mode differs",))
    # after all that, the group is still in step: a valid call works and agrees
    xg = x.clone().requires_grad_()
    loss = m(xg, yy)
    loss.backward()
    losses = gather_obj(float(loss))
    chk.true("healthy afterwards", len(set(losses)) == 1, str(losses))
    chk.close("healthy afterwards: value", loss, ref.arcface_loss(X, m.full_state_dict()["weight"],
                                                                  y))
    chk.done()


def case_unequal_batch_without_check(rank, world):
    """check_consistency=False skips the full check, yet unequal shapes must still fail on every
    rank, fast (gloo used to terminate one rank and hang the others past the group timeout)."""
    chk = Checks()
    C, last = 11, world - 1
    m = ShardedMarginLoss(mo.ArcFaceLoss, D, C, backend="torch", check_consistency=False).to(F64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, D, generator=g, dtype=F64)
    y = torch.randint(0, C, (B,), generator=g)
    expect_error(chk, "batch size", lambda: m(x[:B - 1] if rank == last else x,
                                              y[:B - 1] if rank == last else y),
                 contains=("batch size differs", f"rank {last}: {B - 1}"))
    expect_error(chk, "width", lambda: m(torch.randn(B, D + (rank == 0), dtype=F64), y),
                 contains=("embedding width differs",))
    expect_error(chk, "predict batch size", lambda: m.predict(x[:B - 1] if rank == 0 else x),
                 contains=("batch size differs",))
    loss = m(x, y)  # the group is still in step
    losses = gather_obj(float(loss))
    chk.true("healthy afterwards", len(set(losses)) == 1, str(losses))
    chk.done()


def case_unsupported(rank, world):
    chk = Checks()
    for cls in (mo.NPTLoss, mo.UncertaintyMarginLoss):
        expect_error(chk, cls.__name__, lambda cls=cls: ShardedMarginLoss(cls, D, 11),
                     exc=NotImplementedError, contains=(cls.__name__,))
    s = ShardedMarginLoss(mo.SubCenterArcFaceLoss, D, 11, subcenters=2)
    x, y = torch.randn(3, D), torch.zeros(3, dtype=torch.long)
    expect_error(chk, "clean_mask", lambda: s.family.clean_mask(x, y), exc=NotImplementedError,
                 contains=("full_state_dict",))
    expect_error(chk, "logits", lambda: s.family.logits(x), exc=NotImplementedError)
    expect_error(chk, "not a family", lambda: ShardedMarginLoss(nn.Linear, D, 11), exc=TypeError)
    chk.done()


def case_inconsistent_inputs_device_path(rank, world):
    """The NCCL path of the consistency check (the gathered table compared by a device assert,
    no host read), forced on gloo: still raises on every rank, none hangs."""
    import marginops.distributed.sharded as md  # where ShardedMarginLoss looks it up

    chk = Checks()
    C, last = 11, world - 1
    saved, md._reads_on_host = md._reads_on_host, lambda device: False
    try:
        m = ShardedMarginLoss(mo.ArcFaceLoss, D, C, backend="torch").to(F64)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, D, generator=g, dtype=F64)
        y = torch.randint(0, C, (B,), generator=g)
        expect_error(chk, "batch size (device)", lambda: m(x[:B - 1] if rank == last else x,
                                                           y[:B - 1] if rank == last else y),
                     exc=RuntimeError, contains=("inputs are inconsistent",))
        expect_error(chk, "width (device)", lambda: m(torch.randn(B, D + (rank == 0), dtype=F64), y),
                     exc=(RuntimeError, ValueError),
                     contains=("width",) if rank == 0 else ("inputs are inconsistent",))
        m(x, y)  # consistent inputs still pass
    finally:
        md._reads_on_host = saved
    chk.done()


CASES = {
    **{f"family_{name}": family_case(name, 11) for name in SPECS},
    "family_arcface_C7": family_case("arcface", 7),
    "family_subcenter_arcface_C7": family_case("subcenter_arcface", 7),
    "partial_fc_arcface": partial_fc_case(mo.ArcFaceLoss, {},
                                          lambda x, w, y: ref.arcface_loss(x, w, y)),
    "partial_fc_subcenter": partial_fc_case(
        mo.SubCenterArcFaceLoss, {"subcenters": 2},
        lambda x, w, y: ref.subcenter_arcface_loss(x, w, y, subcenters=2)),
    "fp32_auto_backend": case_fp32_auto_backend,
    "ddp_grad_scaling": case_ddp_grad_scaling,
    "checkpoint_other_world_size": case_checkpoint_other_world_size,
    "predict": case_predict,
    "nan_survives_rank_merge": case_nan_survives_rank_merge,
    "inconsistent_inputs_fail_fast_on_every_rank": case_inconsistent_inputs,
    "unequal_batch_without_check_fails_on_every_rank": case_unequal_batch_without_check,
    "inconsistent_inputs_device_path": case_inconsistent_inputs_device_path,
    "unsupported_raise_clearly": case_unsupported,
}


# ----------------------------------------------------------------------------- pytest side

@pytest.fixture(scope="module")
def results():
    return gloo.run_cases("test_distributed", WORLD_SIZES, pg_timeout_s=PG_TIMEOUT_S,
                          deadline_s=SPAWN_DEADLINE_S)


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("case", list(CASES))
def test_distributed(results, world, case):
    gloo.check_case(results, world, case)


def test_shard_range_partitions_the_classes():
    for C in (1, 7, 11, 64, 1000):
        for R in range(1, 9):
            spans = [shard_range(C, R, r) for r in range(R)]
            assert spans[0][0] == 0
            assert all(s + n == spans[i + 1][0] for i, (s, n) in enumerate(spans[:-1]))
            assert sum(n for _, n in spans) == C
            assert max(n for _, n in spans) - min(n for _, n in spans) <= 1
            assert spans == [(C // R * r + min(r, C % R), C // R + (r < C % R)) for r in range(R)]


def test_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedMarginLoss(mo.ArcFaceLoss, D, 11)



def test_example_runs_under_torchrun():
    """examples/train_distributed.py, shortened, under torchrun (standalone: loopback, free port)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    if os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(root, "examples", "train_distributed.py"), "--steps", "25",
         "--num-classes", "101"],
        capture_output=True, text=True, timeout=120, env=env, cwd=root)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "step   25  loss" in out.stdout and "top-1" in out.stdout, out.stdout
