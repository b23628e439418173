"""marginops.optim on 2 gloo ranks: ShardedMarginLoss (full softmax and Partial FC at
sample_rate 0.3) trained with the fused step equals the same module trained with torch.optim,
and a replicated (non-sharded) classifier refuses to fuse.

Reuses tests/test_distributed.py's spawn harness (its worker runs this file's cases).
"""

from __future__ import annotations

import os
import tempfile
import time

import pytest
import test_distributed as td
import torch
import torch.multiprocessing as mp

import marginops as mo
from marginops.distributed import ShardedMarginLoss

WORLD = 2
B, D, C = 4, 8, 60          # 30 classes per rank; at rate 0.3: int(0.3·30) = 9 >= 8 = global batch
CHUNK_CLASSES = 4           # several chunks per shard, the last one partial
RTOL = {torch.float32: 1e-6, torch.float64: 1e-12}
STATE_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}  # gradient-sized (tests/test_optim.py)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def sharded_case(family, kw, rate, opt_name, dtype, steps=12):
    def case(rank, world):
        chk = td.Checks()

        def build():
            m = ShardedMarginLoss(family, D, C, backend="cpp", sample_rate=rate, sample_seed=5,
                                  init_seed=9, embedding_grad_scale=1.0, scale=16.0, **kw)
            m = m.to(dtype).train()
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, dtype=dtype,
                                           generator=torch.Generator().manual_seed(rank)))
            return m

        m, twin = build(), build()
        K = m.family.subcenters
        if opt_name == "sgd":
            kwargs = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
            opt = mo.optim.SGD(m.parameters(), chunk_bytes=CHUNK_CLASSES * K * D * 8, **kwargs)
            ref = torch.optim.SGD(twin.parameters(), **kwargs)
        else:
            kwargs = dict(lr=1e-2, weight_decay=0.05)
            opt = mo.optim.AdamW(m.parameters(), chunk_bytes=CHUNK_CLASSES * K * D * 8, **kwargs)
            ref = torch.optim.AdamW(twin.parameters(), **kwargs)
        scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.5) for o in (opt, ref)]
        g = torch.Generator().manual_seed(11)  # the same global batch on every rank
        for step in range(steps):
            X = torch.randn(world * B, D, generator=g, dtype=dtype)
            y = torch.randint(0, C, (world * B,), generator=g)
            y[::5] = -1
            x_local, y_local = X[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]
            m(x_local, y_local).backward()
            chk.true(f"step {step}: weight.grad is None", m.weight.grad is None)
            opt.step()
            opt.zero_grad()
            twin(x_local, y_local).backward()
            ref.step()
            ref.zero_grad()
            for s in scheds:
                s.step()
            if rate < 1:
                chk.true(f"step {step}: same sample", torch.equal(m.last_class_index,
                                                                  twin.last_class_index))
            for (name, p), q in zip(m.named_parameters(), twin.parameters()):
                chk.true(f"step {step} {name}", rel(p, q) <= RTOL[dtype], f"{rel(p, q):.2e}")
                for key, value in ref.state[q].items():
                    err = rel(opt.state[p][key], value)
                    chk.true(f"step {step} {name} {key}", err <= STATE_RTOL[dtype], f"{err:.2e}")
        chk.done()
    return case


def case_replicated_classifier_refuses(rank, world):
    # a plain (non-sharded) module on 2 ranks would be stepped with each rank's local gradient
    chk = td.Checks()
    m = mo.ArcFaceLoss(D, C, backend="cpp")
    opt = mo.optim.SGD(m.parameters(), lr=0.1)
    before = m.weight.detach().clone()
    x, y = torch.randn(B, D), torch.randint(0, C, (B,))
    try:
        m(x, y).backward()
        chk.true("raised", False, "no error")
    except RuntimeError as err:
        chk.true("message names the alternatives",
                 "replicated" in str(err) and "ShardedMarginLoss" in str(err)
                 and "torch.optim" in str(err), str(err))
    chk.true("weight untouched", torch.equal(m.weight, before))
    chk.true("no state", len(opt.state) == 0)
    chk.done()


CASES = {
    "sharded_sgd_fp64": sharded_case(mo.ArcFaceLoss, {}, 1.0, "sgd", torch.float64),
    "sharded_adamw_fp32": sharded_case(mo.ArcFaceLoss, {}, 1.0, "adamw", torch.float32),
    "partial_fc_0.3_sgd_fp64": sharded_case(mo.SubCenterArcFaceLoss, dict(subcenters=2), 0.3,
                                            "sgd", torch.float64),
    "partial_fc_0.3_sgd_fp32_bias": sharded_case(mo.CosFaceLoss, dict(bias=True), 0.3, "sgd",
                                                 torch.float32),
    "partial_fc_0.3_adamw_fp64": sharded_case(mo.ArcFaceLoss, {}, 0.3, "adamw", torch.float64),
    "replicated_classifier_refuses": case_replicated_classifier_refuses,
}


def _worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    td.CASES = CASES  # test_distributed's worker, running this file's cases
    td._worker(rank, world, store_path, out_dir)


@pytest.fixture(scope="module")
def results():
    tmp = tempfile.mkdtemp(prefix="marginops_optim_dist_")
    ctx = mp.start_processes(_worker, args=(WORLD, os.path.join(tmp, "store"), tmp),
                             nprocs=WORLD, join=False, start_method="spawn")
    return td._collect(WORLD, ctx, tmp, time.monotonic() + td.SPAWN_DEADLINE_S)


@pytest.mark.parametrize("case", list(CASES))
def test_optim_distributed(results, case):
    per_rank, problem = results
    missing = [r for r in range(WORLD) if case not in per_rank[r]]
    assert not missing, f"ranks {missing} never finished {case!r}; {problem or ''}"
    failures = {r: per_rank[r][case] for r in range(WORLD) if per_rank[r][case] != "ok"}
    assert not failures, "\n".join(f"--- rank {r}:\n{tb}" for r, tb in failures.items())
