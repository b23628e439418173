"""The Triton backend on a real GPU: larger shapes, bf16, autotuning, torch.compile, CUDA graphs,
memory and speed. Every test is skipped without a CUDA device (no machine of this project has one);
run them on a GPU machine with

    .venv/bin/python -m pytest tests/test_triton_gpu.py -m gpu
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from contract_oracle import margin_lse_dense, topk_dense  # noqa: E402
from tolerance import assert_within_budget  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1",
                       reason="GPU tests need compiled Triton kernels"),
]

DEV = "cuda"


def _binding():
    pytest.importorskip("triton")
    import marginops.ops.triton as binding

    reason = binding.availability("triton", torch.device(DEV))
    if reason:
        pytest.skip(reason)
    return binding


def _inputs(B, C, D, K=1, dtype=torch.bfloat16, wdtype=None, bias=True, index=False,
            hard=True, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    f = torch.nn.functional.normalize(torch.randn(B, D, device=DEV, generator=g), dim=1)
    w = torch.randn(C * K, D, device=DEV, generator=g)
    scale = torch.full((B,), 64.0, device=DEV)
    b = torch.randn(C, device=DEV, generator=g) * 0.1 if bias else None
    cidx = torch.randperm(C, device=DEV, generator=g)[: C // 10] if index else None
    N = cidx.numel() if index else C
    tcol = torch.randint(0, N, (B,), device=DEV, generator=g)
    tcol[::7] = -1
    tau = torch.rand(B, device=DEV, generator=g) * 0.5 if hard else None
    t = torch.tensor(0.1, device=DEV) if hard else None
    return (f.to(dtype), w.to(wdtype or dtype), scale, b, tcol, cidx, tau, t, True, K)


def _loss_grads(fn, args, gl, gd):
    f, w, s, b = (x.detach().requires_grad_() if x is not None else None for x in args[:4])
    lse, dot = fn(f, w, s, b, *args[4:])
    fin = torch.isfinite(lse)
    loss = (torch.where(fin, lse, 0.0) * gl).sum() + (dot * gd).sum()
    leaves = [x for x in (f, w, s, b) if x is not None]
    return [lse.detach(), dot.detach(), *torch.autograd.grad(loss, leaves)]


def _double(args):
    return tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                 for x in args)


@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, None), (torch.float16, None),
                                          (torch.bfloat16, None),
                                          (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("K,index", [(1, False), (3, True)])
def test_matches_oracle_medium(dtype, wdtype, K, index):
    binding = _binding()
    args = _inputs(256, 4099, 512, K, dtype, wdtype, index=index)
    gl = torch.randn(256, device=DEV)
    gd = torch.randn(256, device=DEV)
    ours = _loss_grads(binding.margin_lse, args, gl, gd)
    base = _loss_grads(margin_lse_dense, args, gl, gd)
    truth = _loss_grads(margin_lse_dense, _double(args), gl.double(), gd.double())
    for a, b, t in zip(ours, base, truth):
        assert_within_budget(a, b, t, dtype)


@pytest.mark.parametrize("D", [128, 256, 512])
@pytest.mark.parametrize("options", ["plain", "all"])
def test_resident_kernels_match_oracle(D, options):
    """resident.py's kernels (bf16, K = 1, D ∈ {128, 256, 512} on sm_90) against the oracle,
    and margin_lse.py's general kernels on the same inputs (forced) for comparison."""
    binding = _binding()
    from marginops.triton import configs
    from marginops.triton.launch import _Args

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("resident.py's kernels run on sm_90")
    every = options == "all"
    args = _inputs(300, 5003, D, 1, torch.bfloat16, bias=every, index=every, hard=every)
    assert _Args(*args).resident
    _within_budget_forced(binding, args, [configs.force(resident=r) for r in (True, False)])


@pytest.mark.parametrize("D", [256, 512])
@pytest.mark.parametrize("chunk", [None, 1024])
@pytest.mark.parametrize("hard", [False, True])
def test_chunked_backward_matches_oracle(D, chunk, hard):
    """chunked.py's backward (bf16, D = 256 / 512, no bias, sm_90) against the oracle, plain or
    with hard negatives and class_index (Partial FC, 2001 of the 20011 classes): the launcher's
    chunk plan and 1024-column chunks (the last partial); resident.py's backward
    (force(chunked=False)) on the same inputs."""
    binding = _binding()
    from marginops.triton import configs
    from marginops.triton.launch import _Args

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("chunked.py's backward runs on sm_90")
    args = _inputs(300, 20011, D, 1, torch.bfloat16, bias=False, index=hard, hard=hard)
    assert _Args(*args).chunked
    _within_budget_forced(binding, args, [configs.force(chunked=True, chunk=chunk),
                                          configs.force(chunked=False)])


def _within_budget_forced(binding, args, forces):
    """The op on bf16 ``args`` under each ``configs.force(...)`` of ``forces``: every output
    within the bf16 error budget of the dense oracle (tolerance.py)."""
    B = args[0].shape[0]
    gl = torch.randn(B, device=DEV)
    gd = torch.randn(B, device=DEV)
    base = _loss_grads(margin_lse_dense, args, gl, gd)
    truth = _loss_grads(margin_lse_dense, _double(args), gl.double(), gd.double())
    for force in forces:
        with force:
            ours = _loss_grads(binding.margin_lse, args, gl, gd)
        for a, b, t in zip(ours, base, truth):
            assert_within_budget(a, b, t, torch.bfloat16)


def test_topk_medium():
    binding = _binding()
    f, w, *_ = _inputs(128, 20011, 256, 1, torch.float32)
    excl = torch.randint(0, 20011, (128,), device=DEV)
    vals, cols = binding.topk(f, w, excl, 10, True, 1)
    tv, tc = topk_dense(f, w, excl, 10, True, 1)
    torch.testing.assert_close(vals, tv, rtol=1e-5, atol=1e-5)
    assert (cols == tc).float().mean() > 0.99


def test_autotune_agrees_with_default():
    binding = _binding()
    from marginops.triton import configs

    args = _inputs(128, 3001, 256)
    gl, gd = torch.randn(128, device=DEV), torch.randn(128, device=DEV)
    ref = _loss_grads(binding.margin_lse, args, gl, gd)
    configs.set_autotune(True)
    try:
        tuned = _loss_grads(binding.margin_lse, args, gl, gd)
    finally:
        configs.set_autotune(None)
    for a, b in zip(ref, tuned):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_torch_compile_traces_through():
    binding = _binding()
    args = _inputs(64, 1000, 128)

    def loss(f, w, s, b):
        lse, dot = binding.margin_lse(f, w, s, b, *args[4:])
        return torch.nn.functional.softplus(lse - s * dot).mean()

    f, w, s, b = (x.detach().requires_grad_() for x in args[:4])
    eager = loss(f, w, s, b)
    eager.backward()
    ge = [x.grad.clone() for x in (f, w, s, b)]
    for x in (f, w, s, b):
        x.grad = None
    compiled = torch.compile(loss, fullgraph=True)(f, w, s, b)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for a, b_ in zip([x.grad for x in (f, w, s, b)], ge):
        torch.testing.assert_close(a, b_)


def test_cuda_graph_capture():
    binding = _binding()
    args = _inputs(64, 1000, 128, hard=False)
    binding.margin_lse(*args)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lse, dot = binding.margin_lse(*args)
    graph.replay()
    torch.cuda.synchronize()
    ref = margin_lse_dense(*args)
    torch.testing.assert_close(lse, ref[0], rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_large_no_bc_buffer():
    """B=1024, C=1M, D=512 bf16: peak extra memory stays far below one B×C fp32 buffer (4 GB)."""
    binding = _binding()
    args = _inputs(1024, 1_000_000, 512, hard=False, bias=False)
    f, w = args[0].requires_grad_(), args[1].requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lse, dot = binding.margin_lse(f, w, *args[2:])
    (lse.sum() + dot.sum()).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # grad_W (bf16, 1 GB) + its fp32 accumulator (2 GB) + small partials; never B×C
    assert extra < 3.6e9, extra
    assert torch.isfinite(lse).all() and torch.isfinite(w.grad.float()).all()


# ---------------------------------------------------------------------------------------------
# both GPU backends (triton, cuda): families × dtypes, CUDA graphs, streams, a second device
# ---------------------------------------------------------------------------------------------


def _gpu_backend(name: str) -> str:
    from marginops.core import backend_status

    reason = backend_status(DEV).get(name)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    return name


GPU_BACKENDS = ["triton", "cuda"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_every_family_against_the_reference(backend, dtype):
    """Every family module, odd shape (B=37, C=1001, D=100 — the unaligned Triton path), loss and
    gradients within the same-precision budget of the naive reference vs fp64 truth."""
    from test_families import FAMILIES, compare, make

    _gpu_backend(backend)
    dt = DTYPES[dtype]
    B, D, C = 37, 100, 1001
    for name in FAMILIES:
        truth = make(name, D, C, "torch").to(DEV)
        g = torch.Generator().manual_seed(7)
        x = (torch.randn(B, D, generator=g, dtype=torch.float64) * 7).to(DEV)
        y = torch.randint(0, C, (B,), generator=g).to(DEV)
        y[1] = -1
        (lt, gt), _ = compare(name, truth, x, y)
        ours = make(name, D, C, backend, dtype=dt).to(DEV)
        (lo, go), (lb, gb) = compare(name, ours, x.to(dt), y)
        assert_within_budget(lo, lb, lt, dt, name=f"{backend} {name} loss")
        for i, (a, b, t) in enumerate(zip(go, gb, gt)):
            if t is not None:
                assert_within_budget(a, b, t, dt, name=f"{backend} {name} grad {i}")


def _step_inputs(seed=0, B=64, D=128, C=5000):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(B, D, device=DEV, generator=g)
    y = torch.randint(0, C, (B,), device=DEV, generator=g)
    # Partial FC: the batch's classes plus others (a duplicate-free sample, as partial_fc_v2)
    others = torch.randperm(C, device=DEV, generator=g)[:1000]
    keep = torch.ones(C, dtype=torch.bool, device=DEV)
    keep[y] = False
    cidx = torch.cat([torch.arange(C, device=DEV)[~keep], others[keep[others]]])[:1000]
    return x, y, cidx


def _step(w, x, y, cidx, backend):
    """A full training step's loss: ArcFace-style logits through the core op with class_index."""
    from marginops.core import margin_lse

    lse, dot = margin_lse(torch.nn.functional.normalize(x, dim=1), w, y, 64.0,
                          class_index=cidx, backend=backend)
    return torch.nn.functional.softplus(lse - 64.0 * torch.cos(torch.acos(dot.clamp(-1 + 1e-6,
                                        1 - 1e-6)) + 0.5)).mean()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_full_step_with_partial_fc(backend):
    """Capture forward + backward + SGD step (Partial FC) in a CUDA graph; a replay on new data
    must equal the same step run eagerly (no host sync may break the capture)."""
    _gpu_backend(backend)
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5000, 128, device=DEV))
    opt = torch.optim.SGD([w], lr=0.1)
    sx, sy, sidx = (t.clone() for t in _step_inputs(0))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles, cuBLAS handles) off the capture
        for _ in range(2):
            opt.zero_grad(set_to_none=False)
            _step(w, sx, sy, sidx, backend).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        loss = _step(w, sx, sy, sidx, backend)
        loss.backward()
        opt.step()
    x, y, cidx = _step_inputs(1)
    w0 = w.detach().clone()
    for dst, src in ((sx, x), (sy, y), (sidx, cidx)):
        dst.copy_(src)
    w.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    we = w0.clone().requires_grad_()
    le = _step(we, x, y, cidx, backend)
    le.backward()
    torch.testing.assert_close(loss, le.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.detach(), w0 - 0.1 * we.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_non_default_stream(backend):
    """Inputs made on a side stream and the op run under it give the default stream's results."""
    _gpu_backend(backend)
    x, y, cidx = _step_inputs(2)
    w = torch.randn(5000, 128, device=DEV, generator=torch.Generator(DEV).manual_seed(3))
    wr = w.clone().requires_grad_()
    ref = _step(wr, x, y, cidx, backend)
    ref.backward()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        xs, ys, cs = x.clone(), y.clone(), cidx.clone()
        ws = w.clone().requires_grad_()
        out = _step(ws, xs, ys, cs, backend)
        out.backward()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(ws.grad, wr.grad)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_tensors_on_a_second_device(backend):
    """Tensors on cuda:1 while cuda:0 is current: the launch must follow the tensors' device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    _gpu_backend(backend)
    x, y, cidx = _step_inputs(4)
    w = torch.randn(5000, 128, device=DEV, generator=torch.Generator(DEV).manual_seed(5))
    w0 = w.clone().requires_grad_()
    ref = _step(w0, x, y, cidx, backend)
    ref.backward()
    with torch.cuda.device(0):
        w1 = w.to("cuda:1").requires_grad_()
        out = _step(w1, x.to("cuda:1"), y.to("cuda:1"), cidx.to("cuda:1"), backend)
        out.backward()
    torch.cuda.synchronize("cuda:1")
    assert out.device == torch.device("cuda:1") and w1.grad.device == torch.device("cuda:1")
    torch.testing.assert_close(out.cpu(), ref.cpu(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w1.grad.cpu(), w0.grad.cpu(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile_fullgraph_full_step(backend):
    """The public op (validation included) traces into one graph with Partial FC; loss and
    weight gradient equal eager's."""
    _gpu_backend(backend)
    x, y, cidx = _step_inputs(6)
    w = torch.randn(5000, 128, device=DEV, generator=torch.Generator(DEV).manual_seed(7))
    we, wc = w.clone().requires_grad_(), w.clone().requires_grad_()
    eager = _step(we, x, y, cidx, backend)
    eager.backward()
    compiled = torch.compile(_step, fullgraph=True)(wc, x, y, cidx, backend)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(wc.grad, we.grad, rtol=1e-4, atol=1e-6)
