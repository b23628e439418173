"""Small forward + backward cases of the core op, for compute-sanitizer (scripts/gpu_check.py).

    python scripts/gpu_small_case.py --device cuda     # backends cuda and triton (whichever run)
    python scripts/gpu_small_case.py --device cpu      # backend cpp: the CPU-side dry run

Odd shapes (B = 37, C = 1001, D = 500 — the unaligned Triton specialisation — and D = 512), every
option of the op (bias, class_index, hard negatives, sub-centers) and top-k, so
memcheck / racecheck / synccheck see every kernel. Exits non-zero if a result is not finite.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from marginops.core import backend_status, margin_lse, topk_dot  # noqa: E402


def run(backend: str, device: str, D: int, dtype: torch.dtype) -> None:
    g = torch.Generator(device=device).manual_seed(D)
    B, C, K = 37, 1001, 2
    f = torch.randn(B, D, device=device, generator=g).to(dtype).requires_grad_()
    w = torch.randn(C * K, D, device=device, generator=g).requires_grad_()
    bias = torch.zeros(C, device=device).requires_grad_()
    labels = torch.randint(0, C, (B,), device=device, generator=g)
    keep = torch.zeros(C, dtype=torch.bool, device=device)  # Partial FC: labels + every 3rd
    keep[::3] = True
    keep[labels] = True
    cidx = keep.nonzero().squeeze(1)
    tau = torch.full((B,), 0.3, device=device)
    lse, dot = margin_lse(f, w, labels, 30.0, bias, class_index=cidx, subcenters=K,
                          hard_negative=(tau, 0.2), backend=backend)
    (lse.nan_to_num(0.0).sum() - dot.sum()).backward()
    vals, _cols = topk_dot(f.detach(), w.detach(), 5, exclude=labels, subcenters=K,
                           backend=backend)
    if device == "cuda":
        torch.cuda.synchronize()
    for name, t in (("lse", lse), ("grad_f", f.grad), ("grad_w", w.grad), ("topk", vals)):
        assert torch.isfinite(t.float()).all(), f"{backend} D={D}: {name} not finite"
    print(f"{backend} {dtype} D={D}: ok")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = p.parse_args()
    status = backend_status(args.device)
    backends = ["cuda", "triton"] if args.device == "cuda" else ["cpp"]
    ran = 0
    for backend in backends:
        if status.get(backend) is not None:
            print(f"{backend}: skipped ({status[backend]})")
            continue
        dtypes = (torch.bfloat16, torch.float32) if args.device == "cuda" else (torch.float32,)
        for dtype in dtypes:
            for D in (500, 512):
                run(backend, args.device, D, dtype)
                ran += 1
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main())
