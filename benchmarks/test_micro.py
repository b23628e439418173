"""Micro-benchmarks of the op's parts, per backend, at small sizes (pytest-benchmark).

They live outside ``tests/`` so CI's ``pytest tests`` never runs them. Run them with

    pytest benchmarks/test_micro.py --benchmark-only                   # all
    pytest benchmarks/test_micro.py --benchmark-only -k "cpp and backward"
    pytest benchmarks/test_micro.py --benchmark-only --benchmark-compare   # against a saved run

Parts: ``margin_lse`` forward only (no autograd), its backward only (the forward runs in the
un-timed setup), forward+backward of the ArcFace loss, ``topk_dot`` (the identification / NPT
top-k), each for every CPU backend that is available here, with the naive reference alongside.
Sizes: B=64, C=8192, D=128 fp32 (set MARGINOPS_MICRO_C / _B / _D to change).
"""

from __future__ import annotations

import os

import pytest
import torch

import marginops
from marginops import functional as mf
from marginops import reference as ref

B = int(os.environ.get("MARGINOPS_MICRO_B", 64))
C = int(os.environ.get("MARGINOPS_MICRO_C", 8192))
D = int(os.environ.get("MARGINOPS_MICRO_D", 128))
STATUS = marginops.backend_status("cpu")
BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(STATUS[b] is not None,
                                                      reason=str(STATUS[b])))
            for b in ("torch", "cpp")]


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g)
    w = torch.randn(C, D, generator=g) * 0.01
    y = torch.randint(0, C, (B,), generator=g)
    x_hat = torch.nn.functional.normalize(x, dim=1)
    return x, w, y, x_hat


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
def test_margin_lse_forward(benchmark, data, backend):
    _, w, y, x_hat = data
    benchmark.group = "margin_lse forward"

    def run():
        with torch.no_grad():
            return marginops.margin_lse(x_hat, w, y, 64.0, backend=backend)

    lse, dot = benchmark(run)
    assert torch.isfinite(lse).all() and torch.isfinite(dot).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_margin_lse_backward(benchmark, data, backend):
    _, w, y, x_hat = data
    benchmark.group = "margin_lse backward"

    def setup():
        f, ww = _leaves(x_hat, w)
        lse, dot = marginops.margin_lse(f, ww, y, 64.0, backend=backend)
        return ((lse.sum() - dot.sum()),), {}

    benchmark.pedantic(lambda loss: loss.backward(), setup=setup, rounds=10, iterations=1,
                       warmup_rounds=1)


@pytest.mark.parametrize("provider", ["reference"] + BACKENDS)
def test_arcface_forward_backward(benchmark, data, provider):
    x, w, y, _ = data
    benchmark.group = "ArcFace forward+backward"

    def step():
        xx, ww = _leaves(x, w)
        if provider == "reference":
            loss = ref.arcface_loss(xx, ww, y)
        else:
            loss = mf.arcface_loss(xx, ww, y, backend=provider)
        loss.backward()
        return loss

    assert torch.isfinite(benchmark(step))


@pytest.mark.parametrize("provider", ["naive"] + BACKENDS)
def test_topk(benchmark, data, provider):
    _, w, _, x_hat = data
    benchmark.group = "topk_dot k=5"

    def run():
        with torch.no_grad():
            if provider == "naive":
                cos = x_hat @ torch.nn.functional.normalize(w, dim=1).t()
                return cos.topk(5, dim=1)
            return marginops.topk_dot(x_hat, w, 5, backend=provider)

    values, classes = benchmark(run)
    assert classes.shape == (B, 5)
