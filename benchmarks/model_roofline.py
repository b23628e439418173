"""The roofline of benchmarks/model.py: the modelled GPUs (datasheet peaks, named constants with
their source), one kernel launch (``Launch``: its FLOPs, exponentials, L2 and HBM bytes, grid and
AOT register / shared-memory figures) and its predicted time (``predict``). model.py's docstring
states the assumptions; model.py builds the launches of each backend from these.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:   # waves.py imports nothing from triton or torch
    sys.path.insert(0, ROOT)

from marginops.triton import waves  # noqa: E402

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
    smem_bytes_per_clk: int = 128   # per SM: 32 banks × 32 bits per clock (CUDA C++ Programming
                                    # Guide, "Shared Memory", compute capability 5.x and later)

    @property
    def exp_rate(self) -> float:
        """MUFU ex2 per second: 16 per SM per clock (4 per SM sub-partition)."""
        return 16 * self.sms * self.clock_hz

    @property
    def smem_bw(self) -> float:
        """Shared-memory bytes per second over all SMs (ASSUMED to bound wgmma's operand reads
        too: model.py's docstring)."""
        return self.smem_bytes_per_clk * self.sms * self.clock_hz

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
    smem_io: float = 0.0     # shared-memory bytes its GEMMs move (operand reads by the tensor
                             # cores, cp.async writes, layout exchanges); 0: not modelled
    note: str = ""
    out: dict = field(default_factory=dict)   # filled by ``predict``


def occupancy(launch: Launch, gpu: GPU) -> int:
    """CTAs per SM from registers, shared memory, threads (marginops/triton/waves.py's rules: the
    launcher plans its grids with the same ones); 0 figures: limited by threads only."""
    return waves.ctas_per_sm(launch.regs, launch.smem, launch.threads, limits(gpu))


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
    gemm = "tensor" if launch.unit != "fp32" else "fp32 GEMM"
    roofs = {gemm: launch.tc_flops / unit_peak,
             "fp32 ALU": launch.alu_flops / gpu.fp32, "exp": launch.exps / gpu.exp_rate,
             "L2": launch.l2 / gpu.l2_bw, "HBM": hbm / gpu.hbm_bw}
    if launch.smem_io:
        roofs["shared memory"] = launch.smem_io / gpu.smem_bw
    if ctas == 1 and launch.tc_flops and (launch.alu_flops or launch.exps):
        # one CTA per SM: a tile's epilogue waits for its GEMM and the next GEMM for the
        # epilogue (no second CTA to fill the gap): the GEMM's time — its tensor or its
        # shared-memory roof, whichever is slower — and the CUDA-core/MUFU time add up
        slow = max((k for k in (gemm, "shared memory") if k in roofs), key=roofs.get)
        t = roofs[slow]
        roofs.pop(gemm), roofs.pop("shared memory", None)
        roofs[slow + " + epilogue (1 CTA/SM)"] = t + max(roofs.pop("fp32 ALU"), roofs.pop("exp"))
    bound = max(roofs, key=roofs.get)
    seconds = roofs[bound] / eff + launch.count * LAUNCH_S
    launch.out = {"ctas_per_sm": ctas, "waves": n_waves, "wave_eff": eff, "hbm": hbm,
                  "l2_hit": hit, "roofs": roofs, "bound": bound, "seconds": seconds}
    return launch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def limits(gpu: GPU) -> waves.SMLimits:
    """The per-SM limits of ``gpu`` in waves.py's terms (occupancy, the launcher's wave plans)."""
    return waves.SMLimits(regs=gpu.regs_per_sm, threads=gpu.max_threads_per_sm,
                          smem=gpu.smem_per_sm, ctas=gpu.max_ctas_per_sm)

