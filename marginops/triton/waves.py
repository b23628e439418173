"""Grids in whole waves: how many class splits a row-tile × split launch gets (pure Python).

A launch of G programs, each resident on an SM with P programs per SM (its *occupancy*, from its
registers and shared memory), runs on S SMs in ``ceil(G / (S·P))`` waves. When the last wave is
partial, its empty slots idle while the longest programs finish. The launchers of fwd / bwd_df /
topk choose the number of class splits s (grid = row tiles × s) so that

    efficiency(s) = useful tile steps / (waves · slots · tile steps of the longest program)
                  = rt·ct / (ceil(rt·s' / slots) · slots · t),   t = ceil(ct / s), s' = ceil(ct / t)

(rt row tiles, ct column tiles, slots = S·P; the last split may hold fewer than t column tiles,
which counts as idle time too) is at least ``TARGET`` with the fewest splits (every split adds
per-split partials: 3·B fp32 for the forward, B·D fp32 for the feature gradient), and at least
``MIN_TILES_PER_SPLIT`` column tiles per split. The previous rule (grid ≈ 2·S programs) gave
69 % (B = 1024) to 81 % (B = 4096) on 132 SMs: e.g. B = 4096, 64-row tiles, 1 program per SM:
64 × 5 = 320 programs = 2.42 waves of 132. Now: 64 × 2 = 128 programs, 97 %.

Occupancy comes from the ahead-of-time figures below (``triton.compile`` for sm_80 / sm_90, the
heaviest specialisation, Triton 3.9: the recipe of tests/test_triton_aot.py) and the SM's limits,
read once per device from ``torch.cuda.get_device_properties`` by the launcher, which passes the
kernel and variant of each launch. A configuration missing from the table is assumed to use all
255 registers (conservative: fewer programs per SM). ``tests/test_triton_launch.py`` checks the
table's occupancy against a fresh AOT compile of every GPU configuration (default and autotune)
of these kernels, and that the plan is ≥ 90 % efficient for B ≥ 1024 on 132 and 108 SMs.

Nothing here imports torch or Triton: benchmarks/model.py plans its grids with the same code.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

TARGET = 0.95             # wave efficiency a plan stops at (the fewest splits reaching it)
MIN_TILES_PER_SPLIT = 4   # column tiles per split at least: partials stay small beside the work
MAX_WAVES = 8             # splits searched up to this many waves (efficiency ≥ 7/8 is then easy)


@dataclass(frozen=True)
class SMLimits:
    """Per-SM resources a CTA's occupancy is bounded by (CUDA occupancy calculator rules)."""
    regs: int = 65536          # 32-bit registers per SM
    threads: int = 2048        # resident threads per SM
    smem: int = 228 * 1024     # shared memory per SM usable by CTAs (bytes)
    ctas: int = 32             # resident CTAs per SM
    reg_unit: int = 256        # registers are allocated per warp in units of 256
    smem_reserved: int = 1024  # shared memory the driver reserves per CTA (sm_80 and later)


# sm_80 (A100: 164 KB shared per SM) and sm_90 (H100/H200: 228 KB); other archs use the nearest.
ARCH_LIMITS = {80: SMLimits(smem=164 * 1024), 90: SMLimits(smem=228 * 1024)}

# (kernel, variant, arch, BLOCK_B, BLOCK_N, BLOCK_D, num_warps, num_stages) ->
# (registers per thread, shared bytes per CTA) of every GPU configuration (configs.gpu_configs) of
# the row-tile × split kernels and the weight-gradient kernel, as tests/test_triton_aot.py compiles
# them (heaviest specialisation; bf16 or fp32 inputs), Triton 3.9.
AOT_FIGURES: dict[tuple, tuple[int, int]] = {
    ("fwd", "half", 80, 64, 64, 64, 4, 3): (248, 32768),
    ("fwd", "half", 90, 64, 64, 64, 4, 3): (187, 40960),
    ("fwd", "half", 80, 64, 128, 64, 8, 3): (242, 49152),
    ("fwd", "half", 90, 64, 128, 64, 8, 3): (194, 57344),
    ("fwd", "half", 80, 128, 64, 64, 8, 3): (239, 49152),
    ("fwd", "half", 90, 128, 64, 64, 8, 3): (187, 65536),
    ("fwd", "half_sub", 80, 64, 128, 64, 8, 3): (255, 49152),
    ("fwd", "half_sub", 90, 64, 128, 64, 8, 3): (224, 57344),
    ("fwd", "half_unaligned", 80, 32, 32, 32, 4, 1): (168, 4096),
    ("fwd", "half_unaligned", 90, 32, 32, 32, 4, 1): (168, 4096),
    ("fwd", "fp32", 80, 32, 64, 32, 4, 2): (234, 12288),
    ("fwd", "fp32", 90, 32, 64, 32, 4, 2): (234, 12288),
    ("fwd", "fp32_sub", 80, 32, 64, 32, 4, 2): (255, 12288),
    ("fwd", "fp32_sub", 90, 32, 64, 32, 4, 2): (255, 12288),
    ("fwd", "fp32_unaligned", 80, 16, 32, 32, 4, 1): (184, 4096),
    ("fwd", "fp32_unaligned", 90, 16, 32, 32, 4, 1): (157, 4096),
    ("bwd_df", "half", 80, 64, 64, 32, 4, 2): (251, 16384),
    ("bwd_df", "half", 90, 64, 64, 32, 4, 2): (202, 16384),
    ("bwd_df", "half", 80, 64, 128, 32, 8, 2): (234, 24576),
    ("bwd_df", "half", 90, 64, 128, 32, 8, 2): (194, 28672),
    ("bwd_df", "half_sub", 80, 64, 32, 32, 4, 2): (247, 12288),
    ("bwd_df", "half_sub", 90, 64, 32, 32, 4, 2): (208, 12288),
    ("bwd_df", "half_unaligned", 80, 32, 32, 32, 4, 1): (240, 6144),
    ("bwd_df", "half_unaligned", 90, 32, 32, 32, 4, 1): (246, 6144),
    ("bwd_df", "fp32", 80, 32, 32, 32, 4, 2): (233, 8192),
    ("bwd_df", "fp32", 90, 32, 32, 32, 4, 2): (229, 8192),
    ("bwd_df", "fp32", 80, 32, 32, 32, 8, 2): (212, 8192),
    ("bwd_df", "fp32", 90, 32, 32, 32, 8, 2): (249, 8192),
    ("bwd_df", "fp32_sub", 80, 16, 64, 32, 4, 2): (229, 16384),
    ("bwd_df", "fp32_sub", 90, 16, 64, 32, 4, 2): (230, 16384),
    ("bwd_df", "fp32_unaligned", 80, 16, 32, 32, 4, 1): (210, 8192),
    ("bwd_df", "fp32_unaligned", 90, 16, 32, 32, 4, 1): (203, 8192),
    ("bwd_dw", "half", 80, 64, 128, 32, 8, 2): (255, 32768),
    ("bwd_dw", "half", 90, 64, 128, 32, 8, 2): (254, 32768),
    ("bwd_dw", "half_sub", 80, 32, 64, 32, 4, 2): (210, 12288),
    ("bwd_dw", "half_sub", 90, 32, 64, 32, 4, 2): (203, 12288),
    ("bwd_dw", "half_unaligned", 80, 32, 32, 16, 4, 1): (163, 5120),
    ("bwd_dw", "half_unaligned", 90, 32, 32, 16, 4, 1): (164, 5120),
    ("bwd_dw", "fp32", 80, 32, 64, 32, 8, 2): (181, 24576),
    ("bwd_dw", "fp32", 90, 32, 64, 32, 8, 2): (199, 24576),
    ("bwd_dw", "fp32_sub", 80, 32, 64, 32, 8, 2): (219, 24576),
    ("bwd_dw", "fp32_sub", 90, 32, 64, 32, 8, 2): (217, 24576),
    ("bwd_dw", "fp32_unaligned", 80, 16, 32, 16, 4, 1): (128, 6144),
    ("bwd_dw", "fp32_unaligned", 90, 16, 32, 16, 4, 1): (126, 6144),
    ("topk", "half", 80, 64, 32, 64, 4, 2): (128, 12288),
    ("topk", "half", 90, 64, 32, 64, 4, 2): (128, 20480),
    ("topk", "half_sub", 80, 64, 32, 64, 4, 2): (168, 12288),
    ("topk", "half_sub", 90, 64, 32, 64, 4, 2): (128, 20480),
    ("topk", "half_unaligned", 80, 32, 32, 32, 4, 1): (168, 4096),
    ("topk", "half_unaligned", 90, 32, 32, 32, 4, 1): (128, 4096),
    ("topk", "fp32", 80, 32, 64, 32, 4, 2): (224, 12288),
    ("topk", "fp32", 90, 32, 64, 32, 4, 2): (224, 12288),
    ("topk", "fp32_sub", 80, 32, 64, 32, 4, 2): (248, 12288),
    ("topk", "fp32_sub", 90, 32, 64, 32, 4, 2): (250, 12288),
    ("topk", "fp32_unaligned", 80, 32, 32, 32, 4, 1): (255, 4096),
    ("topk", "fp32_unaligned", 90, 32, 32, 32, 4, 1): (247, 4096),
}


@functools.lru_cache(maxsize=1024)
def figures(arch: int, cfg, kernel: str | None = None, variant: str | None = None
            ) -> tuple[int, int]:
    """(registers per thread, shared bytes per CTA) of ``cfg`` on ``arch`` (×10; sm_80 figures
    for < 90, sm_90 for ≥ 90). Without ``kernel`` / ``variant``: the largest figures of any entry
    with this configuration; for a configuration not in the table, 255 registers (conservative)."""
    arch = 90 if arch >= 90 else 80
    tiles = (cfg.block_b, cfg.block_n, cfg.block_d, cfg.num_warps, cfg.num_stages)
    hits = [fig for (k, v, a, *t), fig in AOT_FIGURES.items()
            if a == arch and tuple(t) == tiles and kernel in (None, k) and variant in (None, v)]
    if not hits:
        return 255, 0
    return max(r for r, _ in hits), max(sm for _, sm in hits)


def ctas_per_sm(regs: int, smem: int, threads: int, limits: SMLimits) -> int:
    """Resident CTAs per SM (≥ 1): the tightest of the thread, register, shared-memory and CTA
    limits. Registers: ceil(regs · 32 / 256) · 256 per warp."""
    warps = -(-threads // 32)
    by_threads = limits.threads // threads
    by_regs = by_threads
    if regs:
        per_warp = -(-regs * 32 // limits.reg_unit) * limits.reg_unit
        by_regs = (limits.regs // per_warp) // warps
    by_smem = limits.smem // (smem + limits.smem_reserved)
    return max(1, min(by_threads, by_regs, by_smem, limits.ctas))


def slots(cfg, n_sm: int, arch: int, limits: SMLimits | None = None, kernel: str | None = None,
          variant: str | None = None) -> int:
    """Programs of ``cfg`` resident on the whole GPU at once: SMs × CTAs per SM."""
    regs, smem = figures(arch, cfg, kernel, variant)
    limits = limits or ARCH_LIMITS[90 if arch >= 90 else 80]
    return n_sm * ctas_per_sm(regs, smem, 32 * cfg.num_warps, limits)


def efficiency(row_tiles: int, col_tiles: int, splits: int, n_slots: int) -> float:
    """Wave efficiency of a row_tiles × splits grid (module docstring), in (0, 1]."""
    per_split = -(-col_tiles // splits)
    used = -(-col_tiles // per_split)          # splits actually non-empty
    waves = -(-(row_tiles * used) // n_slots)
    return row_tiles * col_tiles / (waves * n_slots * per_split)


@functools.lru_cache(maxsize=4096)
def plan_splits(row_tiles: int, col_tiles: int, n_slots: int) -> int:
    """The fewest splits whose grid reaches ``TARGET`` wave efficiency (else the most efficient),
    each split keeping ≥ MIN_TILES_PER_SPLIT column tiles. Returns the non-empty split count."""
    row_tiles, col_tiles = max(row_tiles, 1), max(col_tiles, 1)
    most = max(1, min(col_tiles // MIN_TILES_PER_SPLIT, -(-MAX_WAVES * n_slots // row_tiles)))
    best, best_eff = 1, efficiency(row_tiles, col_tiles, 1, n_slots)
    for s in range(1, most + 1):
        eff = efficiency(row_tiles, col_tiles, s, n_slots)
        if eff > best_eff + 1e-12:
            best, best_eff = s, eff
        if eff >= TARGET:
            best = s
            break
    per_split = -(-col_tiles // best)
    return -(-col_tiles // per_split)
