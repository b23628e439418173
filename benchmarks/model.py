"""Roofline performance model of one forward+backward of the margin-softmax loss on a GPU.

    python benchmarks/model.py --gpu h100 --batch 4096 --classes 1000000 --dim 512 --dtype bfloat16
    python benchmarks/model.py --gpu a100 ... --backend cuda      # triton | cuda | naive | auto

For every kernel launch of the step (``Launch``: enumerated from marginops/triton/margin_lse.py and
configs.py for ``triton``, marginops/csrc/cuda/margin_lse.cu for ``cuda``, marginops.reference's
ArcFace for ``naive``) it counts the tensor-core FLOPs, the CUDA-core FLOPs, the exponentials, the
bytes between the SMs and L2, the bytes from HBM, the occupancy (CTAs per SM from the registers and
shared memory of the ahead-of-time compiled Triton kernel) and the wave efficiency of its grid, and
predicts its time. The last line printed is ``predicted: <ms> ms, <fraction> of peak``.

Assumptions (what the figures mean; change a constant to test another):

* Peaks are the public datasheet figures (``GPUS``: dense, no sparsity). A launch's time is the
  slowest of its five roofs — tensor cores, fp32 CUDA cores, MUFU exponentials (16 per SM per
  clock), L2 bandwidth, HBM bandwidth — i.e. perfect overlap inside a launch (optimistic), divided
  by the wave efficiency ``grid / (waves · slots)`` (slots = SMs × CTAs per SM: a CTA cannot use
  more than its SM's share), plus ``LAUNCH_S`` per launch. Launches do not overlap each other.
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
  at most 2048 threads and 32 CTAs per SM. The figures come from ``triton.compile(...,
  target=GPUTarget("cuda", arch, 32))`` of the launcher's default configuration in the
  specialisation of the ArcFace step (weight normalisation on; bias, class_index, hard negatives
  off; K = 1; 16-byte aligned), cached in ``~/.cache/marginops/aot-figures.json``; without Triton
  (or cuobjdump) the constants ``FALLBACK_FIGURES`` (Triton 3.9, heaviest specialisation,
  benchmarks/README.md) are used and a note says so.
* Not modelled: the O(B)-sized torch ops of the loss around the core op (µs), the host, the
  ``triton`` autotuner (off by default), clocks below boost (power limits), L2 partitioning.

The useful work of a forward+backward is 8·B·C·D FLOPs (the logits once, the two gradient GEMMs,
and the logits again in the backward, which every streaming kernel pays). ``fraction of peak`` =
8·B·C·D / (dense tensor-core peak of the input dtype: bf16/fp16, TF32 for fp32) / predicted time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:   # configs.py imports nothing from triton or torch at module level
    sys.path.insert(0, ROOT)

from marginops.triton import configs  # noqa: E402

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

# Triton 3.9 figures of the default configurations (benchmarks/README.md, heaviest
# specialisation): (registers per thread, shared memory bytes) per (kernel, variant, arch).
FALLBACK_FIGURES = {
    ("fwd", "half", 90): (194, 56 * 1024), ("fwd", "half", 80): (242, 48 * 1024),
    ("bwd_df", "half", 90): (196, 28 * 1024), ("bwd_df", "half", 80): (216, 28 * 1024),
    ("bwd_dw", "half", 90): (255, 32 * 1024), ("bwd_dw", "half", 80): (234, 32 * 1024),
    ("fwd", "fp32", 90): (234, 12 * 1024), ("fwd", "fp32", 80): (234, 12 * 1024),
    ("bwd_df", "fp32", 90): (234, 24 * 1024), ("bwd_df", "fp32", 80): (247, 24 * 1024),
    ("bwd_dw", "fp32", 90): (201, 24 * 1024), ("bwd_dw", "fp32", 80): (183, 24 * 1024),
    ("merge", "half", 90): (32, 0), ("merge", "half", 80): (32, 0),
    ("norm", "half", 90): (32, 256), ("norm", "half", 80): (39, 256),
}
for (_k, _v, _a), _fig in list(FALLBACK_FIGURES.items()):
    if _k in ("merge", "norm"):
        FALLBACK_FIGURES[(_k, "fp32", _a)] = _fig


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
    """CTAs per SM from registers, shared memory, threads (0 figures: limited by threads only)."""
    warps = -(-launch.threads // 32)
    by_threads = gpu.max_threads_per_sm // launch.threads
    by_regs = by_threads
    if launch.regs:
        regs_per_warp = -(-launch.regs * 32 // 256) * 256
        by_regs = (gpu.regs_per_sm // regs_per_warp) // warps
    by_smem = gpu.smem_per_sm // (launch.smem + 1024)
    return max(0, min(by_threads, by_regs, by_smem, gpu.max_ctas_per_sm))


def predict(launch: Launch, gpu: GPU) -> Launch:
    """Fill ``launch.out``: CTAs/SM, wave efficiency, HBM bytes after L2 misses, roof times, ms."""
    ctas = occupancy(launch, gpu) if launch.grid else 0
    if launch.grid:
        slots = gpu.sms * max(ctas, 1)
        waves = -(-launch.grid // slots)
        eff = launch.grid / (waves * slots)
    else:
        waves, eff = 0, 1.0
    hit = 1.0 if launch.reuse_set <= gpu.l2_bytes else gpu.l2_bytes / launch.reuse_set
    hbm = launch.hbm + (1.0 - hit) * max(launch.l2 - launch.hbm, 0.0)
    unit_peak = {"bf16": gpu.bf16, "tf32": gpu.tf32, "fp32": gpu.fp32}[launch.unit]
    roofs = {"tensor" if launch.unit != "fp32" else "fp32 GEMM": launch.tc_flops / unit_peak,
             "fp32 ALU": launch.alu_flops / gpu.fp32, "exp": launch.exps / gpu.exp_rate,
             "L2": launch.l2 / gpu.l2_bw, "HBM": hbm / gpu.hbm_bw}
    bound = max(roofs, key=roofs.get)
    seconds = roofs[bound] / eff + launch.count * LAUNCH_S
    launch.out = {"ctas_per_sm": ctas, "waves": waves, "wave_eff": eff, "hbm": hbm,
                  "l2_hit": hit, "roofs": roofs, "bound": bound, "seconds": seconds}
    return launch


# ----------------------------------------------------------------------------- AOT figures

def _cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "marginops", "aot-figures.json")


_NOTES: list[str] = []


def _compile_figures(kernel: str, cfg: configs.KernelConfig, fdt: str, arch: int) -> tuple:
    """(registers, shared bytes) of ``kernel`` compiled for sm_``arch`` in the ArcFace step's
    specialisation (see the module docstring); the same recipe as tests/test_triton_aot.py."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from marginops.triton import margin_lse as ml

    fn = {"fwd": ml._fwd_kernel, "bwd_df": ml._bwd_df_kernel, "bwd_dw": ml._bwd_dw_kernel,
          "merge": ml._merge_kernel, "norm": ml._inv_norm_kernel}[kernel]
    if kernel == "merge":
        const = {"BLOCK_B": cfg.block_b}
    elif kernel == "norm":
        const = {"HAS_INDEX": False, "BLOCK_N": cfg.block_n, "BLOCK_D": cfg.block_d}
    else:
        const = dict(cfg.meta(), NORMALIZE=True, HAS_SUB=False, HAS_BIAS=False, HAS_INDEX=False,
                     HARD=False, FILTER=False, DOT_PREC="tf32x3" if fdt == "fp32" else "tf32")
    if "K" in fn.arg_names:
        const["K"] = 1
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + {"f_ptr": fdt, "w_ptr": fdt, "gw_ptr": fdt, "tcol_ptr": "i64",
                               "cidx_ptr": "i64"}.get(name, "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "thr":
            sig[name] = "fp32"  # the interclass filtering threshold (unused with FILTER off)
        else:
            sig[name] = "i32"
            if name in ("D", "stride_f", "stride_w"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=cfg.launch())
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(ck.asm["cubin"])
        fh.flush()
        res = subprocess.run([cuobjdump, "-res-usage", fh.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+)", res)
    if not m:
        raise RuntimeError(f"no register count in cuobjdump output: {res!r}")
    return int(m.group(1)), int(ck.metadata.shared)


@functools.cache
def figures(kernel: str, var: str, dtype: str, arch: int, aot: bool = True) -> tuple[int, int]:
    """(registers per thread, shared bytes per CTA) of a Triton kernel's default configuration."""
    cfg = configs.default(kernel, var)
    fdt = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]
    fallback = FALLBACK_FIGURES[(kernel, var.replace("_sub", ""), arch)]
    if not aot:
        return fallback
    try:
        import triton
        key = f"{triton.__version__}|{kernel}|{cfg}|{fdt}|sm{arch}|arcface"
    except ImportError as err:
        _note(f"Triton unavailable ({err}): register/shared figures are the constants "
              "FALLBACK_FIGURES (Triton 3.9)")
        return fallback
    path = _cache_path()
    try:
        with open(path) as fh:
            cache = json.load(fh)
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        try:
            cache[key] = list(_compile_figures(kernel, cfg, fdt, arch))
        except Exception as err:  # noqa: BLE001 - any failure: fall back, and say so
            _note(f"AOT compilation of {kernel} failed ({type(err).__name__}: {err}); using "
                  "FALLBACK_FIGURES (Triton 3.9)")
            return fallback
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as fh:
                json.dump(cache, fh, indent=0, sort_keys=True)
        except OSError:
            pass
    regs, smem = cache[key]
    return int(regs), int(smem)


def _note(text: str) -> None:
    if text not in _NOTES:
        _NOTES.append(text)


# ----------------------------------------------------------------------------- the launches

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_launches(B: int, C: int, D: int, dtype: str, gpu: GPU, aot: bool = True
                    ) -> list[Launch]:
    """marginops/triton/margin_lse.py ``_forward`` + ``_backward`` of an ArcFace step (weight
    normalisation on, no bias / class_index / hard negatives, K = 1, W in the features' dtype)."""
    e = ELT[dtype]
    var = "fp32" if dtype == "float32" else "half"   # configs.variant(features dtype, K=1)
    unit, tc_mult = ("tf32", 3) if dtype == "float32" else ("bf16", 1)   # 3×TF32 for fp32
    W, Fb = C * D * e, B * D * e
    out: list[Launch] = []

    def kernel(name: str, kname: str, grid: int, cfg: configs.KernelConfig, **kw) -> Launch:
        regs, smem = figures(kname, var, dtype, gpu.arch, aot)
        return Launch(name, grid=grid, threads=32 * cfg.num_warps, regs=regs, smem=smem, **kw)

    def split(cfg: configs.KernelConfig) -> tuple[int, int, int, int]:
        """(row tiles, column tiles, splits, slots) as ``_split_columns`` computes them."""
        rt, ct = _cdiv(B, cfg.block_b), max(_cdiv(C, cfg.block_n), 1)
        s = configs.pick_splits(rt, ct, gpu.sms, False)
        s = _cdiv(ct, _cdiv(ct, s))
        return rt, ct, s, rt * s

    # forward: _fwd_kernel over (row tiles × splits), then _merge_kernel
    cfg = configs.default("fwd", var)
    rt, ct, s, grid = split(cfg)
    probe = kernel("", "fwd", grid, cfg)
    w_passes = _cdiv(rt, gpu.sms * max(occupancy(probe, gpu), 1))   # see the docstring
    pad = rt * cfg.block_b * ct * cfg.block_n * D
    out.append(kernel(
        "_fwd_kernel", "fwd", grid, cfg, tc_flops=2 * pad * tc_mult, unit=unit,
        alu_flops=EPILOGUE_FWD * B * C + 2 * rt * C * D, exps=B * C,
        l2=rt * W + ct * Fb + 3 * s * B * 4, hbm=w_passes * W + Fb + 3 * s * B * 4,
        note=f"{cfg.block_b}×{cfg.block_n}×{cfg.block_d}, {s} splits; W read once per row tile ({rt})"))
    mcfg = configs.default("merge", var)
    out.append(kernel("_merge_kernel", "merge", _cdiv(B, mcfg.block_b), mcfg, exps=s * B,
                      l2=3 * s * B * 4 + 2 * B * 4, hbm=3 * s * B * 4 + 2 * B * 4))

    # backward: zeroed outputs and buffers (torch), _inv_norm_kernel, _bwd_df_kernel, the sum of
    # the per-split partials (torch), _bwd_dw_kernel
    dcfg = configs.default("bwd_df", var)
    rt_f, ct_f, s_f, grid_f = split(dcfg)
    out.append(Launch("torch.zeros: grad_f, grad_w, grad_s", count=3, l2=Fb + W, hbm=Fb + W))
    out.append(Launch(f"torch.zeros: dF partials ({s_f}×B×D fp32)", l2=s_f * B * D * 4,
                      hbm=s_f * B * D * 4))
    if e != 4:
        out.append(Launch("torch.zeros: fp32 weight-gradient accumulator (C×D)", l2=C * D * 4,
                          hbm=C * D * 4, note="bf16/fp16 weights only"))
    ncfg = configs.default("norm", var)
    out.append(kernel("_inv_norm_kernel", "norm", _cdiv(C, ncfg.block_n), ncfg,
                      alu_flops=2 * C * D, l2=W + C * 4, hbm=W + C * 4))
    probe = kernel("", "bwd_df", grid_f, dcfg)
    slots = gpu.sms * max(occupancy(probe, gpu), 1)
    pad = rt_f * dcfg.block_b * ct_f * dcfg.block_n * D
    df_rmw = ct_f * B * D * 4 * 2   # every column tile: read + write the program's BLOCK_B×D chunk
    out.append(kernel(
        "_bwd_df_kernel", "bwd_df", grid_f, dcfg, tc_flops=4 * pad * tc_mult, unit=unit,
        alu_flops=EPILOGUE_BWD * B * C, exps=B * C,
        l2=2 * rt_f * W + ct_f * Fb + 2 * rt_f * C * 4 + df_rmw + s_f * B * 4,
        hbm=_cdiv(rt_f, slots) * W + Fb + C * 4 + 2 * s_f * B * D * 4 + s_f * B * 4,
        reuse_set=min(grid_f, slots) * dcfg.block_b * D * 4 + Fb,
        note=f"{dcfg.block_b}×{dcfg.block_n}×{dcfg.block_d}, {s_f} splits; recompute + dd·W, "
             "dF accumulated in global memory per D chunk"))
    out.append(Launch("torch: dF partials .sum(0).to(dtype), grad_scale .sum(0)", count=3,
                      l2=s_f * B * D * 4 + B * D * 4 + Fb, hbm=s_f * B * D * 4 + B * D * 4 + Fb))
    wcfg = configs.default("bwd_dw", var)
    nt, rt_w = _cdiv(C, wcfg.block_n), _cdiv(B, wcfg.block_b)
    probe = kernel("", "bwd_dw", nt, wcfg)
    slots = gpu.sms * max(occupancy(probe, gpu), 1)
    pad = rt_w * wcfg.block_b * nt * wcfg.block_n * D
    g_rmw = rt_w * C * D * 4 * 2    # every row tile: read + write the program's BLOCK_N×D G tile
    epilogue = 2 * W + 2 * C * D * 4 + W     # W and G twice (projection, gradient), grad_W once
    gacc_hbm = C * D * 4 * 2   # the fp32 accumulator: first read (zeros) + final write-back
    out.append(kernel(
        "_bwd_dw_kernel", "bwd_dw", nt, wcfg, tc_flops=4 * pad * tc_mult, unit=unit,
        alu_flops=EPILOGUE_BWD * B * C + 6 * C * D, exps=B * C,
        l2=rt_w * W + 2 * nt * Fb + rt_w * C * 4 + g_rmw + epilogue,
        hbm=W + Fb + gacc_hbm + (W if e != 4 else 0),
        reuse_set=min(nt, slots) * wcfg.block_n * D * (4 + e) + Fb,
        note=f"{wcfg.block_b}×{wcfg.block_n}×{wcfg.block_d}; recompute + ddᵀ·F, G accumulated "
             "in global memory per D chunk"))
    return out


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


def auto_backend(dtype: str) -> str:
    """What ``backend="auto"`` picks for CUDA tensors (marginops.core: triton, then cuda, then
    torch): triton, when Triton is installed; the cuda extension otherwise."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "cuda"
    return "triton"


def model(B: int, C: int, D: int, dtype: str, gpu: GPU | str, backend: str = "auto",
          aot: bool = True) -> tuple[str, list[Launch], float, float]:
    """(backend, launches with ``out`` filled, predicted seconds, fraction of peak)."""
    if isinstance(gpu, str):
        gpu = GPUS[gpu]
    if dtype not in ELT:
        raise ValueError(f"dtype={dtype!r}: the model covers {', '.join(ELT)}")
    if min(B, C, D) < 1:
        raise ValueError(f"B, C, D must be >= 1, got B={B}, C={C}, D={D}")
    if backend == "auto":
        backend = auto_backend(dtype)
    if backend == "triton":
        launches = triton_launches(B, C, D, dtype, gpu, aot)
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


def report(B: int, C: int, D: int, dtype: str, gpu: str, backend: str = "auto",
           aot: bool = True) -> str:
    """The printed model: header, per-kernel table, notes, and the ``predicted:`` last line."""
    g = GPUS[gpu]
    used, launches, seconds, fraction = model(B, C, D, dtype, g, backend, aot)
    picked = f"{used} (what backend='auto' picks)" if backend == "auto" else used
    lines = [f"model: {g.name}, B={B} C={C} D={D} {dtype}, backend {picked}",
             f"peaks: {g.peak(dtype) / 1e12:.1f} TFLOP/s dense tensor ({dtype}), "
             f"{g.fp32 / 1e12:.1f} fp32, HBM {g.hbm_bw / 1e12:.2f} TB/s, L2 "
             f"{g.l2_bw / 1e12:.1f} TB/s (assumed), L2 {g.l2_bytes / 2**20:.0f} MB, {g.sms} SMs "
             f"— {g.source}",
             "", table(launches), ""]
    if not aot and used == "triton":
        _note("--no-aot: register/shared figures are the constants FALLBACK_FIGURES (Triton 3.9)")
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
    p.add_argument("--no-aot", action="store_true",
                   help="skip AOT compilation: use the FALLBACK_FIGURES constants")
    args = p.parse_args(argv)
    print(report(args.batch, args.classes, args.dim, args.dtype, args.gpu, args.backend,
                 aot=not args.no_aot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
