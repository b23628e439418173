"""Roofline performance model of one forward+backward of the margin-softmax loss on a GPU.

    python benchmarks/model.py --gpu h100 --batch 4096 --classes 1000000 --dim 512 --dtype bfloat16
    python benchmarks/model.py --gpu a100 ... --backend cuda      # triton | cuda | naive | auto

For every kernel launch of the step (``Launch``: for ``triton`` the kernels of issue 12's design,
``TRITON_DESIGN`` and the functions under "the Triton kernels"; marginops/csrc/cuda/margin_lse.cu
for ``cuda``; marginops.reference's ArcFace for ``naive``) it counts the tensor-core FLOPs, the
CUDA-core FLOPs, the exponentials, the bytes between the SMs and L2, the bytes from HBM, the
occupancy (CTAs per SM from registers and shared memory) and the wave efficiency of its grid, and
predicts its time. The last line printed is ``predicted: <ms> ms, <fraction> of peak``. These are
predictions, not measurements: ``make gpu-check`` prints them beside measured times.

Assumptions (what the figures mean; change a constant to test another):

* Peaks are the public datasheet figures (``GPUS``: dense, no sparsity). A launch's time is the
  slowest of its five roofs — tensor cores, fp32 CUDA cores, MUFU exponentials (16 per SM per
  clock), L2 bandwidth, HBM bandwidth — i.e. perfect overlap inside a launch (optimistic: loads
  software-pipelined), divided by the wave efficiency ``grid / (waves · slots)`` (slots = SMs ×
  CTAs per SM: a CTA cannot use more than its SM's share), plus ``LAUNCH_S`` per launch. Launches
  do not overlap each other. Exception: with one CTA per SM, a kernel's tensor-core time and its
  epilogue time (the larger of fp32 ALU and exp) add up — nothing fills the tensor cores while
  the only CTA runs its epilogue (Triton does not warp-specialise these kernels).
* L2 bandwidth is not on any datasheet: ``l2_bw`` is an assumed round figure (third-party
  microbenchmarks of the H100 report roughly 5.5-12 TB/s depending on the access pattern, e.g.
  chipsandcheese.com, "Nvidia's H100: Funny L2, and Tons of Bandwidth", 2023).
* Bytes: ``l2`` counts every tile a kernel loads or stores (masked-out elements excluded); operand
  loads go through L2 (Triton's cp.async with ``.cg`` bypasses L1), so re-reads of a tile by
  another program, or by the same program in a later iteration, are L2 traffic. ``hbm`` is the
  compulsory traffic (each input read once, each output written once) plus the share of the
  re-reads that misses L2: the re-reads hit in proportion ``min(1, L2 size / working set)``, where
  the working set is what the resident programs touch between two reuses (e.g. for the weight
  gradient the fp32 accumulator tiles of all resident programs).
* Rows of W are read once from HBM by all row tiles of a class split when those row tiles are
  resident together (programs launch row tile fastest); otherwise once per wave of row tiles.
* CUDA-core work of the epilogues is ``EPILOGUE_FWD`` / ``EPILOGUE_BWD`` fp32 operations per logit
  (scale, mask, max, subtract, margin, compare, select...; an estimate, not a count of SASS).
* cuBLAS calls (``cuda`` backend, naive loss) run at the peak of their dtype with 128 × 128 output
  tiles (their L2 traffic) and whole waves. The ``cuda`` backend's GEMMs take the inputs' dtype
  (bf16/fp16 on the tensor cores, fp32 output); fp32 follows torch's default
  ``allow_tf32 = False`` (``CUDA_FP32_TF32``): the fp32 CUDA-core peak.
* Triton fp32 inputs run ``tl.dot`` as 3×TF32 (three TF32 products) at the TF32 peak.
* Occupancy: registers allocated per warp in units of 256, 1 KB of shared memory reserved per CTA,
  at most 2048 threads and 32 CTAs per SM (marginops/triton/waves.py, which the launcher uses
  too). The redesigned Triton kernels are not in this checkout, so their registers are the
  design's estimate (fp32 accumulator + S tile per thread + ``REG_OVERHEAD``) and their shared
  memory the staged operand tiles; when they land, their AOT figures (waves.AOT_FIGURES, checked
  against a fresh ``triton.compile`` by tests/test_triton_launch.py) replace the estimates.
* Triton grids: class splits planned in whole waves by waves.plan_splits, as the launcher does.
* Not modelled: the O(B)-sized torch ops of the loss around the core op (µs), the host, the
  ``triton`` autotuner (off by default), clocks below boost (power limits), L2 partitioning.

The review findings of issue 12, in figures (H100, B = 4096, C = 1M, D = 512, bf16; this model):
today's kernels (commit d28c1d1: 10·B·C·D, dF / G accumulated in global memory per 32-wide D
chunk, grids of 2.42 waves) predict 128.9 ms, 0.132 of peak — fwd 17.4 ms (L2: 98 GB),
bwd_df 52.2 ms (295 GB), bwd_dw 58.0 ms (401 GB), zeroing an fp32 grad_W copy 0.6 ms. The
design below: 20.1 ms, 0.846 — fwd 9.8 ms (GEMMs 8.5 + exp epilogue 1.1, serial at 1 CTA/SM;
66 GB of L2), bwd_dw 9.8 ms (L2-bound: 68 GB), norm 0.3 ms. One CTA per SM is kept on purpose:
the 64 × 512 fp32 accumulator is 128 registers per thread at 8 warps and the staged tiles take
192 KB of 228 KB; two CTAs per SM need 32-row tiles, which double the L2 traffic (39.1 ms, 0.433).

The useful work of a forward+backward is 8·B·C·D FLOPs (the logits once, the two gradient GEMMs,
and the logits again in the backward, which every streaming kernel pays). ``fraction of peak`` =
8·B·C·D / (dense tensor-core peak of the input dtype: bf16/fp16, TF32 for fp32) / predicted time.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:   # configs.py imports nothing from triton or torch at module level
    sys.path.insert(0, ROOT)

from marginops.triton import configs, waves  # noqa: E402

# ----------------------------------------------------------------------------- the machines

@dataclass(frozen=True)
class GPU:
    name: str
    arch: int              # compute capability ×10 (the AOT target)
    sms: int
    clock_hz: float        # boost clock the tensor peak is quoted at
    bf16: float            # dense bf16/fp16 tensor-core FLOP/s
    tf32: float            # dense TF32 tensor-core FLOP/s
    fp32: float            # fp32 CUDA-core FLOP/s (FMA = 2)
    hbm_bw: float          # bytes/s
    l2_bw: float           # bytes/s, ASSUMED (see the module docstring)
    l2_bytes: int
    smem_per_sm: int       # bytes of shared memory per SM available to CTAs
    source: str
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_ctas_per_sm: int = 32

    @property
    def exp_rate(self) -> float:
        """MUFU ex2 per second: 16 per SM per clock (4 per SM sub-partition)."""
        return 16 * self.sms * self.clock_hz

    def peak(self, dtype: str) -> float:
        """Dense tensor-core peak of the input dtype: the denominator of 'fraction of peak'."""
        return self.tf32 if dtype == "float32" else self.bf16


GPUS = {
    "a100": GPU("A100 SXM4 80GB", 80, 108, 1.41e9, 312e12, 156e12, 19.5e12, 2.039e12, 5.0e12,
                40 * 2**20, 164 * 1024,
                "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): BF16 312, TF32 156, FP32 "
                "19.5 TFLOP/s dense, HBM2e 2,039 GB/s; A100 whitepaper: 108 SMs, 40 MB L2, "
                "164 KB shared memory per SM, 1410 MHz boost"),
    "h100": GPU("H100 SXM5 80GB", 90, 132, 1.83e9, 989.4e12, 494.7e12, 66.9e12, 3.35e12, 7.0e12,
                50 * 2**20, 228 * 1024,
                "NVIDIA H100 Tensor Core GPU datasheet (SXM): BF16 1,979 / TF32 989 TFLOP/s with "
                "sparsity (halved: dense), FP32 67 TFLOP/s, HBM3 3.35 TB/s; Hopper whitepaper: "
                "132 SMs, 50 MB L2, 228 KB shared memory per SM"),
    "h200": GPU("H200 SXM 141GB", 90, 132, 1.83e9, 989.4e12, 494.7e12, 66.9e12, 4.8e12, 7.0e12,
                50 * 2**20, 228 * 1024,
                "NVIDIA H200 Tensor Core GPU datasheet (SXM): same compute as the H100 SXM "
                "(BF16 989 TFLOP/s dense), HBM3e 4.8 TB/s, 141 GB; GH100: 132 SMs, 50 MB L2"),
}

LAUNCH_S = 3e-6          # seconds of launch latency per kernel (assumed)
EPILOGUE_FWD = 12        # fp32 CUDA-core ops per logit in a forward epilogue (estimate)
EPILOGUE_BWD = 20        # ... in a backward epilogue (recomputed logit + softmax gradient)
ELT = {"float32": 4, "bfloat16": 2, "float16": 2}

# ----------------------------------------------------------------------------- one launch

@dataclass
class Launch:
    """One kernel (``count`` identical launches: the ``cuda`` backend's per-chunk kernels).
    Every figure is the total over the ``count`` launches."""
    name: str
    count: int = 1
    grid: int = 0            # CTAs per launch; 0 = a library call (cuBLAS, torch): whole waves
    threads: int = 256
    regs: int = 0            # per thread (0: unknown / not a Triton kernel)
    smem: int = 0            # bytes per CTA
    tc_flops: float = 0.0    # tensor-core FLOPs (or GEMM FLOPs on the unit of ``unit``)
    unit: str = "bf16"       # peak the GEMM FLOPs run at: bf16 | tf32 | fp32
    alu_flops: float = 0.0   # fp32 CUDA-core FLOPs besides the GEMMs
    exps: float = 0.0        # exponentials (MUFU)
    l2: float = 0.0          # bytes between SMs and L2 (every tile loaded or stored)
    hbm: float = 0.0         # compulsory HBM bytes (inputs once, outputs once)
    reuse_set: float = 0.0   # bytes the resident programs touch between two reuses of a tile
    note: str = ""
    out: dict = field(default_factory=dict)   # filled by ``predict``


def occupancy(launch: Launch, gpu: GPU) -> int:
    """CTAs per SM from registers, shared memory, threads (marginops/triton/waves.py's rules: the
    launcher plans its grids with the same ones); 0 figures: limited by threads only."""
    limits = waves.SMLimits(regs=gpu.regs_per_sm, threads=gpu.max_threads_per_sm,
                            smem=gpu.smem_per_sm, ctas=gpu.max_ctas_per_sm)
    return waves.ctas_per_sm(launch.regs, launch.smem, launch.threads, limits)


def predict(launch: Launch, gpu: GPU) -> Launch:
    """Fill ``launch.out``: CTAs/SM, wave efficiency, HBM bytes after L2 misses, roof times, ms."""
    ctas = occupancy(launch, gpu) if launch.grid else 0
    if launch.grid:
        slots = gpu.sms * max(ctas, 1)
        n_waves = -(-launch.grid // slots)
        eff = launch.grid / (n_waves * slots)
    else:
        n_waves, eff = 0, 1.0
    hit = 1.0 if launch.reuse_set <= gpu.l2_bytes else gpu.l2_bytes / launch.reuse_set
    hbm = launch.hbm + (1.0 - hit) * max(launch.l2 - launch.hbm, 0.0)
    unit_peak = {"bf16": gpu.bf16, "tf32": gpu.tf32, "fp32": gpu.fp32}[launch.unit]
    roofs = {"tensor" if launch.unit != "fp32" else "fp32 GEMM": launch.tc_flops / unit_peak,
             "fp32 ALU": launch.alu_flops / gpu.fp32, "exp": launch.exps / gpu.exp_rate,
             "L2": launch.l2 / gpu.l2_bw, "HBM": hbm / gpu.hbm_bw}
    if ctas == 1 and launch.tc_flops and (launch.alu_flops or launch.exps):
        # one CTA per SM: a tile's epilogue waits for its GEMM and the next GEMM for the
        # epilogue (no second CTA to fill the gap): tensor and CUDA-core/MUFU time add up
        first = next(iter(roofs))
        roofs[first + " + epilogue (1 CTA/SM)"] = roofs.pop(first) + max(
            roofs.pop("fp32 ALU"), roofs.pop("exp"))
    bound = max(roofs, key=roofs.get)
    seconds = roofs[bound] / eff + launch.count * LAUNCH_S
    launch.out = {"ctas_per_sm": ctas, "waves": n_waves, "wave_eff": eff, "hbm": hbm,
                  "l2_hit": hit, "roofs": roofs, "bound": bound, "seconds": seconds}
    return launch


def _note(text: str) -> None:
    if text not in _NOTES:
        _NOTES.append(text)


_NOTES: list[str] = []


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- the Triton kernels
#
# The design the model predicts (issue 12; DESIGN.md §3). Every FLOP and byte formula of a Triton
# kernel is in its function below; the tiles are TRITON_DESIGN's. The redesigned kernels are not
# in this checkout: when they land, set TRITON_DESIGN to configs.py's defaults, put their AOT
# figures in marginops/triton/waves.py (tests/test_triton_launch.py lists them) and adjust the
# formulas a kernel changed.
#
#   norm    see below (launched first)
#   fwd     FlashAttention-shaped forward, grid row tiles × class splits (whole waves:
#           waves.plan_splits). Per column tile: S = F·Ŵᵀ (2·bB·bN·D), the epilogue (online max /
#           sum-exp, target capture), then u += P·Ŵ (2·bB·bN·D), P = exp(z − m)·∂z/∂c: the
#           feature-gradient direction, a bB × D fp32 accumulator in registers rescaled like
#           FlashAttention's output. Per split: m, s, dot_y, σ = Σ_n p·d' (grad_scale) and u.
#   merge   the splits' (m, s, dot_y, σ) and rescaled u → lse_neg, dot_y, u, σ.
#   dF      (backward, torch, B-sized) grad_f = grad_lse·u + grad_dot·ŵ_y, grad_scale = grad_lse·σ.
#   norm    1/‖W_r‖ before the forward (C × D read once), kept for the backward: the forward reads
#           C fp32 per row tile instead of summing W's squares per row tile (2·rt·C·D CUDA-core
#           FLOPs, 1 ms at the target shape).
#   bwd_dw  one program per class tile, looping over row tiles: S recomputed (2·bN·bB·D), dd,
#           G += ddᵀ·F (2·bN·bB·D), a bN × D fp32 accumulator in registers; epilogue: the
#           normalisation Jacobian, grad_W written once in W's dtype (no fp32 copy, no zeroing).
#
# GEMM FLOPs: 8·B·C·D (padded to whole tiles). No global read-modify-write inside a loop.
# Operand staging: when (accumulator-side tile + stages × streamed tile) × D × elt fits the SM's
# shared memory, both operand tiles are staged full-D, so a W tile feeds both forward GEMMs and an
# F tile both dW GEMMs (each read from L2 once per use); otherwise they are loaded in BLOCK_D
# chunks per GEMM (read twice). An accumulator above ACC_REGS registers per thread splits D over
# d_split programs, each recomputing S (more FLOPs, fewer registers).

TRITON_DESIGN: dict[str, dict[str, configs.KernelConfig]] = {
    # BLOCK_B (rows), BLOCK_N (classes), BLOCK_D (chunk when not staged), warps, stages
    "half": {"fwd": configs.KernelConfig(64, 64, 64, 8, 2),
             "bwd_dw": configs.KernelConfig(64, 64, 64, 8, 2)},
    "fp32": {"fwd": configs.KernelConfig(32, 32, 32, 4, 2),
             "bwd_dw": configs.KernelConfig(32, 32, 32, 4, 2)},
}
ACC_REGS = 128       # fp32 accumulator registers per thread at most (the rest: S tile, addresses)
REG_OVERHEAD = 64    # registers besides the accumulator and the S tile (estimate: pointers,
                     # loop state, operand fragments; today's kernels use 40–90)
# merge / norm exist and stay: their registers / shared bytes (Triton 3.9, sm_90; tiny kernels)
SMALL_FIGURES = {"merge": (32, 0), "norm": (40, 256)}


def _design_figures(cfg: configs.KernelConfig, acc_rows: int, D: int, e: int, gpu: GPU
                    ) -> tuple[int, int, int, bool]:
    """(registers per thread, shared bytes, d_split, staged) of a design kernel whose program
    holds an acc_rows × D fp32 accumulator, with ``cfg``'s tiles."""
    threads = 32 * cfg.num_warps
    d_split = max(1, _cdiv(acc_rows * D, threads * ACC_REGS))
    d_part = _cdiv(D, d_split)
    regs = min(255, _cdiv(acc_rows * d_part, threads) + _cdiv(cfg.block_b * cfg.block_n, threads)
               + REG_OVERHEAD)
    streamed = cfg.block_n if acc_rows == cfg.block_b else cfg.block_b
    staged_bytes = (acc_rows + cfg.num_stages * streamed) * D * e
    staged = staged_bytes + 1024 <= gpu.smem_per_sm
    smem = staged_bytes if staged else cfg.num_stages * (cfg.block_b + cfg.block_n) * cfg.block_d * e
    return regs, smem, d_split, staged


def _fwd(B: int, C: int, D: int, e: int, unit: str, mult: int, cfg, gpu: GPU
         ) -> tuple[Launch, int]:
    """The forward launch and its split count."""
    regs, smem, d_split, staged = _design_figures(cfg, cfg.block_b, D, e, gpu)
    threads = 32 * cfg.num_warps
    occ = waves.ctas_per_sm(regs, smem, threads, _limits(gpu))
    rt, ct = _cdiv(B, cfg.block_b), _cdiv(C, cfg.block_n)
    s = waves.plan_splits(rt * d_split, ct, gpu.sms * occ)
    pad = rt * cfg.block_b * ct * cfg.block_n * D
    W, Fb = C * D * e, B * D * e
    partials = s * B * (4 * 4 + D * 4)            # m, s, dot_y, σ and u, fp32
    w_reads = (1 if staged else 2) * rt * W * d_split     # W tile: both GEMMs (or per GEMM)
    f_reads = (s * Fb if staged else ct * Fb) * d_split   # F tile: once per program / column tile
    w_passes = _cdiv(rt * d_split, gpu.sms * occ)  # row tiles of a split resident together
    return Launch(
        "fwd (logits + online softmax + u = P·Ŵ)", grid=rt * s * d_split, threads=threads,
        regs=regs, smem=smem, tc_flops=(2 * d_split + 2) * pad * mult, unit=unit,
        alu_flops=EPILOGUE_FWD * B * C * d_split, exps=B * C * d_split,
        l2=w_reads + f_reads + rt * C * 4 * d_split + partials,
        hbm=w_passes * W + Fb + C * 4 + partials,
        note=f"{cfg.block_b}×{cfg.block_n}, {s} splits, D {'staged' if staged else 'chunked'}"
             f"{f', D split {d_split}×' if d_split > 1 else ''}; W read once per row tile ({rt})"), s


def _bwd_dw(B: int, C: int, D: int, e: int, unit: str, mult: int, cfg, gpu: GPU) -> Launch:
    regs, smem, d_split, staged = _design_figures(cfg, cfg.block_n, D, e, gpu)
    threads = 32 * cfg.num_warps
    nt, rt = _cdiv(C, cfg.block_n), _cdiv(B, cfg.block_b)
    pad = rt * cfg.block_b * nt * cfg.block_n * D
    W, Fb = C * D * e, B * D * e
    rows = 3 * B * 4 * nt * d_split                # lse, grad_lse, scale per class tile
    w_reads = (W if staged else rt * W + W) * d_split     # + the epilogue's re-read when chunked
    f_reads = (1 if staged else 2) * nt * Fb * d_split
    return Launch(
        "bwd_dw (recompute + G = ddᵀ·F + Jacobian)", grid=nt * d_split, threads=threads,
        regs=regs, smem=smem, tc_flops=(2 * d_split + 2) * pad * mult, unit=unit,
        alu_flops=EPILOGUE_BWD * B * C * d_split + 6 * C * D, exps=B * C * d_split,
        l2=w_reads + f_reads + rows + C * 4 * (1 if staged else rt) + W,
        hbm=W + Fb + C * 4 + 3 * B * 4 + W,
        note=f"{cfg.block_n} classes × {cfg.block_b} rows, D {'staged' if staged else 'chunked'}"
             f"{f', D split {d_split}×' if d_split > 1 else ''}; F read once per class tile "
             f"({nt}); grad_W written once in W's dtype")


def _limits(gpu: GPU) -> waves.SMLimits:
    return waves.SMLimits(regs=gpu.regs_per_sm, threads=gpu.max_threads_per_sm,
                          smem=gpu.smem_per_sm, ctas=gpu.max_ctas_per_sm)


def triton_launches(B: int, C: int, D: int, dtype: str, gpu: GPU) -> list[Launch]:
    """The Triton design's launches of an ArcFace step (weight normalisation on; no bias,
    class_index or hard negatives; K = 1; W in the features' dtype, 16-byte aligned)."""
    e = ELT[dtype]
    var = "fp32" if dtype == "float32" else "half"
    unit, mult = ("tf32", 3) if dtype == "float32" else ("bf16", 1)   # fp32: 3×TF32 products
    design = TRITON_DESIGN[var]
    fwd, s = _fwd(B, C, D, e, unit, mult, design["fwd"], gpu)
    mcfg = configs.default("merge", var)
    small = lambda name: dict(zip(("regs", "smem"), SMALL_FIGURES[name]))  # noqa: E731
    part = s * B * (4 * 4 + D * 4)
    merged = B * (4 * 4 + D * 4)
    ncfg = configs.default("norm", var)
    return [
        Launch("norm (1/‖W_r‖, kept for the backward)", grid=_cdiv(C, ncfg.block_n),
               threads=32 * ncfg.num_warps, alu_flops=2 * C * D, l2=C * D * e + C * 4,
               hbm=C * D * e + C * 4, **small("norm")),
        fwd,
        Launch("merge (splits → lse_neg, dot_y, u, σ)", grid=_cdiv(B, mcfg.block_b) * _cdiv(D, 64),
               threads=32 * mcfg.num_warps, exps=s * B, alu_flops=3 * s * B * D,
               l2=part + merged, hbm=part + merged, note="row blocks × 64-wide D chunks",
               **small("merge")),
        Launch("torch: grad_f = grad_lse·u + grad_dot·ŵ_y, grad_scale", count=3,
               alu_flops=4 * B * D, l2=B * D * (4 + 2 * e) + B * 12, hbm=B * D * (4 + 2 * e) + B * 12),
        _bwd_dw(B, C, D, e, unit, mult, design["bwd_dw"], gpu),
    ]


# torch's default for fp32 matmuls (torch.backends.cuda.matmul.allow_tf32 = False): the ``cuda``
# backend follows it (csrc/cuda/tc_gemm.h), so fp32 GEMMs run at the fp32 CUDA-core peak.
CUDA_FP32_TF32 = False


def cuda_plan(B: int, C: int, D: int, dtype: str, gpu: GPU) -> tuple[int, int]:
    """(classes per chunk, epilogue splits) as csrc/cuda/tc_gemm.h ``plan_chunks`` picks them for
    the ArcFace step (K = 1, no bias): the backward's tile — fp32 T plus the 16-bit DD (none for
    fp32: DD is written over T) — within half the L2, the fp32 G tile (nc × D) too, at least 128
    columns, whole 128-column cuBLAS tiles from 256 up; rows split while B < 4 blocks per SM."""
    e = ELT[dtype]
    per_logit = 4 + (0 if e == 4 else e)
    budget = gpu.l2_bytes // 2
    nc = max(128, min(budget // max(1, B * per_logit), budget // max(1, D * 4)))
    if nc >= 256:
        nc = nc // 128 * 128
    nc = max(1, min(nc, max(C, 1)))
    splits = min(max(_cdiv(4 * gpu.sms, B), 1), min(max(nc // 256, 1), 64))
    return nc, splits


def cuda_launches(B: int, C: int, D: int, dtype: str, gpu: GPU) -> list[Launch]:
    """marginops/csrc/cuda/margin_lse.cu ``margin_lse_cuda`` + ``margin_lse_backward_cuda`` of an
    ArcFace step: 1/‖W_r‖ of every row once per pass, then per chunk of ``nc`` classes
    (``cuda_plan``) a cuBLAS GEMM in the inputs' dtype straight from W (no copy) into the fp32
    tile T (B × nc), the epilogue kernels (one read of T, 1/‖W‖ applied there); backward: the same,
    the softmax gradient DD in the GEMM dtype, ∂F += DD·W_c and G = DDᵀ·F (fp32 out), the
    Jacobian kernel writing grad_W in W's dtype. fp16 adds a normalised fp16 chunk for ∂F.

    Bytes: cuBLAS GEMMs with 128 × 128 output tiles re-read an operand once per tile of the other
    dimension (L2); from HBM they read W once per pass and F once in all (resident across chunks).
    The chunk's tile set (T, DD: B × nc × 6 bytes for 16-bit inputs) is sized to half the L2, so it
    and the chunk's G tile and weight rows are served by L2; if a tile set exceeds that half (B so
    large that even 128 columns do not fit), its excess fraction is written to and read from HBM.
    Each epilogue block reads the chunk's 1/‖W‖ vector (nc floats) through its SM's L1: counted
    once per SM and chunk."""
    e = ELT[dtype]
    nc, S = cuda_plan(B, C, D, dtype, gpu)
    n = _cdiv(C, nc)
    widths = [nc] * (n - 1) + [C - (n - 1) * nc]
    unit = "bf16" if e == 2 else ("tf32" if CUDA_FP32_TF32 else "fp32")
    dd_e = 4 if e == 4 else e                 # DD: fp32 (over T) or the 16-bit dtype
    W, Fb, T = C * D * e, B * D * e, B * C * 4
    DD = B * C * dd_e
    tile_set = B * nc * (4 + (0 if e == 4 else e))
    spill = max(0.0, 1.0 - (gpu.l2_bytes / 2) / tile_set)   # share of the tile set missing L2
    inv_l1 = gpu.sms * C * 4                   # 1/‖W‖ per chunk, once per SM
    partials = n * 3 * B * S * 4 if S > 1 else 0
    kernels = 2 if S > 1 else 1

    def gemm(name: str, m, k, cols, ea: int, eb: int, accumulate: bool, hbm: float) -> Launch:
        """Σ over chunks of (m × cols) = (m × k)(k × cols); m, k, cols map a chunk width to a size."""
        l2 = sum(m(w) * k(w) * ea * _cdiv(cols(w), 128) + k(w) * cols(w) * eb * _cdiv(m(w), 128)
                 + m(w) * cols(w) * 4 * (2 if accumulate else 1) for w in widths)
        return Launch(name, count=n, tc_flops=2 * B * C * D, unit=unit, l2=l2, hbm=hbm)

    def norms(phase: str) -> Launch:
        return Launch(f"{phase}: row_norms_kernel (1/‖W_r‖, ‖W_r‖² of every row)",
                      grid=_cdiv(C, 8), alu_flops=2 * C * D, l2=W + 8 * C, hbm=W + 8 * C)

    def dots(phase: str) -> Launch:
        return gemm(f"{phase}: GEMM T = F·Wᵀ (cuBLAS, {dtype} in, fp32 out)", lambda w: B,
                    lambda w: D, lambda w: w, e, e, False,
                    hbm=W + (Fb if phase == "forward" else 0) + T * spill * 2)

    out = [norms("forward"), dots("forward"),
           Launch("forward: forward_epilogue_kernel" + (" + merge_partials_kernel" if S > 1 else ""),
                  count=kernels * n, grid=B * S, alu_flops=EPILOGUE_FWD * B * C, exps=B * C,
                  l2=T + inv_l1 + partials, hbm=partials),
           Launch("forward: finalize_kernel", l2=3 * B * 4, hbm=3 * B * 4),
           Launch("backward: zeros ∂F (fp32), ∂scale (grad_W: no fill)", count=2,
                  l2=B * D * 4 + B * 4, hbm=B * D * 4 + B * 4),
           norms("backward"), dots("backward"),
           Launch(f"backward: backward_epilogue_kernel (DD in {dtype})"
                  + (" + sum_partials_kernel" if S > 1 else ""), count=kernels * n, grid=B * S,
                  alu_flops=EPILOGUE_BWD * B * C, exps=B * C, l2=T + DD + inv_l1 + partials,
                  hbm=DD * spill + partials)]
    if dtype == "float16":
        out.append(Launch("backward: load_chunk_kernel (normalised fp16 rows for ∂F)", count=n,
                          grid=_cdiv(nc * D, 256), alu_flops=C * D, l2=2 * W + C * 4, hbm=0.0))
    out += [gemm("backward: GEMM ∂F += DD·W_c (cuBLAS, fp32 accumulator)", lambda w: B,
                 lambda w: w, lambda w: D, dd_e, e, True, hbm=DD * spill),
            gemm("backward: GEMM G = DDᵀ·F (cuBLAS, fp32 out)", lambda w: w, lambda w: B,
                 lambda w: D, dd_e, e, False, hbm=DD * spill),
            Launch("backward: weight_grad_kernel (Jacobian, grad_W in W's dtype)", count=n,
                   grid=nc, alu_flops=6 * C * D, l2=2 * C * D * 4 + 2 * W + W + 8 * C,
                   hbm=W)]
    if e != 4:
        out.append(Launch(f"backward: ∂F .to({dtype})", l2=B * D * 4 + Fb, hbm=B * D * 4 + Fb))
    for launch in out:   # the per-chunk launches
        if launch.count >= n:
            launch.note = f"{n} chunks of {nc} classes, {S} split(s)"
    return out


def naive_launches(B: int, C: int, D: int, dtype: str, gpu: GPU) -> list[Launch]:
    """marginops.reference.arcface_loss with autograd: F.normalize, the cosine GEMM, the margin on
    the target column, F.cross_entropy; every B×C tensor goes through HBM (B·C·e ≫ L2)."""
    e = ELT[dtype]
    BC, W, Fb = B * C, C * D * e, B * D * e
    unit = "tf32" if dtype == "float32" else "bf16"
    cols = lambda n: BC * n   # noqa: E731 - bytes of n B×C passes

    def ew(name, reads, writes, exps=0.0, count=1):
        return Launch(name, count=count, alu_flops=cols(1), exps=exps,
                      l2=cols(reads) + cols(writes), hbm=cols(reads) + cols(writes))

    return [
        Launch("F.normalize(x), F.normalize(W)", count=6, alu_flops=3 * C * D,
               l2=3 * W + 3 * Fb, hbm=3 * W + 3 * Fb),
        Launch("cos = x̂·Ŵᵀ (cuBLAS)", tc_flops=2 * BC * D, unit=unit, l2=W + Fb + BC * e,
               hbm=W + Fb + BC * e),
        ew("scale·cos", e, e),
        ew("one-hot mask (bool) + where(mask, s·ψ, s·cos)", 2 * e + 1, e + 1, count=2),
        ew("log_softmax (forward)", e, e, exps=BC),
        ew("nll_loss backward (zeros + scatter)", 0, e),
        ew("log_softmax backward", 2 * e, e, exps=BC),
        ew("where backward (two branches) + target gather backward", 3 * e + 2, 3 * e, count=4),
        ew("scale·cos backward + gradient accumulation", 3 * e, 2 * e, count=2),
        Launch("dx̂ = dcos·Ŵ (cuBLAS)", tc_flops=2 * BC * D, unit=unit, l2=BC * e + W + Fb,
               hbm=BC * e + W + Fb),
        Launch("dŴ = dcosᵀ·x̂ (cuBLAS)", tc_flops=2 * BC * D, unit=unit, l2=BC * e + W + Fb,
               hbm=BC * e + W + Fb),
        Launch("F.normalize backward (x, W)", count=6, alu_flops=6 * C * D, l2=5 * W + 5 * Fb,
               hbm=5 * W + 5 * Fb),
    ]


# ----------------------------------------------------------------------------- the model

BACKENDS = ("auto", "triton", "cuda", "naive")


def auto_backend(dtype: str, gpu: GPU | None = None, shape: tuple[int, int, int] | None = None
                 ) -> tuple[str, str]:
    """(backend, why) ``backend="auto"`` picks on CUDA tensors of ``gpu`` (marginops.core
    ``_resolve``): the measured-fastest from ``make gpu-check``'s table for this arch / dtype /
    shape when the marginops cache has one (marginops/backend_table.py), else the static order:
    triton when Triton is installed, else the cuda extension."""
    if gpu is not None and shape is not None:
        from marginops import backend_table

        picked = backend_table.choose(f"{gpu.arch // 10}.{gpu.arch % 10}", dtype, *shape)
        if picked in ("triton", "cuda"):
            return picked, f"measured fastest ({backend_table.table_path()})"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "cuda", "static order: Triton not installed"
    return "triton", "static order (no gpu-check table for this arch and dtype)"


def model(B: int, C: int, D: int, dtype: str, gpu: GPU | str, backend: str = "auto"
          ) -> tuple[str, list[Launch], float, float]:
    """(backend, launches with ``out`` filled, predicted seconds, fraction of peak)."""
    if isinstance(gpu, str):
        gpu = GPUS[gpu]
    if dtype not in ELT:
        raise ValueError(f"dtype={dtype!r}: the model covers {', '.join(ELT)}")
    if min(B, C, D) < 1:
        raise ValueError(f"B, C, D must be >= 1, got B={B}, C={C}, D={D}")
    if backend == "auto":
        backend = auto_backend(dtype, gpu, (B, C, D))[0]
    if backend == "triton":
        launches = triton_launches(B, C, D, dtype, gpu)
    elif backend == "cuda":
        launches = cuda_launches(B, C, D, dtype, gpu)
    elif backend == "naive":
        launches = naive_launches(B, C, D, dtype, gpu)
    else:
        raise ValueError(f"backend={backend!r}; choose one of {', '.join(BACKENDS)}")
    seconds = sum(predict(launch, gpu).out["seconds"] for launch in launches)
    fraction = min(1.0, 8 * B * C * D / gpu.peak(dtype) / seconds)
    return backend, launches, seconds, fraction


def table(launches: list[Launch]) -> str:
    head = ("| kernel | launches | grid (CTAs) | CTAs/SM (regs, smem KB) | wave eff. | GEMM TFLOP "
            "| L2 GB | HBM GB (L2 hit) | bound by | ms | note |")
    lines = [head, "|" + "---|" * 11]
    for la in launches:
        o = la.out
        occ = (f"{o['ctas_per_sm']} ({la.regs}, {la.smem / 1024:.1f})" if la.regs else
               (str(o["ctas_per_sm"]) if la.grid else "library"))
        lines.append(
            f"| {la.name} | {la.count} | {la.grid or ''} | {occ} | {o['wave_eff']:.0%} "
            f"| {la.tc_flops / 1e12:.2f} | {la.l2 / 1e9:.2f} | {o['hbm'] / 1e9:.2f} "
            f"({o['l2_hit']:.0%}) | {o['bound']} | {o['seconds'] * 1e3:.3f} | {la.note} |")
    return "\n".join(lines)


def report(B: int, C: int, D: int, dtype: str, gpu: str, backend: str = "auto") -> str:
    """The printed model: header, per-kernel table, notes, and the ``predicted:`` last line."""
    g = GPUS[gpu]
    used, launches, seconds, fraction = model(B, C, D, dtype, g, backend)
    picked = used
    if backend == "auto":
        picked = f"{used} (what backend='auto' picks: {auto_backend(dtype, g, (B, C, D))[1]})"
    lines = [f"model: {g.name}, B={B} C={C} D={D} {dtype}, backend {picked}",
             f"peaks: {g.peak(dtype) / 1e12:.1f} TFLOP/s dense tensor ({dtype}), "
             f"{g.fp32 / 1e12:.1f} fp32, HBM {g.hbm_bw / 1e12:.2f} TB/s, L2 "
             f"{g.l2_bw / 1e12:.1f} TB/s (assumed), L2 {g.l2_bytes / 2**20:.0f} MB, {g.sms} SMs "
             f"— {g.source}",
             "", table(launches), ""]
    if used == "triton":
        _note("triton: the kernels of issue 12's design (TRITON_DESIGN); their registers and "
              "shared memory are the design's estimates, not AOT figures: the kernels are not in "
              "this checkout")
    lines += [f"note: {n}" for n in _NOTES]
    lines.append(f"useful work 8·B·C·D = {8 * B * C * D / 1e12:.2f} TFLOP")
    lines.append(f"predicted: {seconds * 1e3:.3f} ms, {fraction:.3f} of peak")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--classes", type=int, required=True)
    p.add_argument("--dim", type=int, required=True)
    p.add_argument("--dtype", choices=sorted(ELT), default="bfloat16")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    args = p.parse_args(argv)
    print(report(args.batch, args.classes, args.dim, args.dtype, args.gpu, args.backend))
    return 0


if __name__ == "__main__":
    sys.exit(main())
