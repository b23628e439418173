"""Grids in whole waves: how many class splits a row-tile × split launch gets (pure Python).

A launch of G programs, each resident on an SM with P programs per SM (its *occupancy*, from its
registers and shared memory), runs on S SMs in ``ceil(G / (S·P))`` waves. When the last wave is
partial, its empty slots idle while the longest programs finish. The launchers of fwd / bwd_df /
topk choose the number of class splits s; the grid is rt × s programs (fwd, topk) or
rt × s × q (bwd_df: q = ⌈D / BLOCK_DO⌉ D chunks, each chunk's program walking the same columns),
so with r = rt·q "rows" of programs (q = 1 for fwd / topk)

    efficiency(s) = useful tile steps / (waves · slots · tile steps of the longest program)
                  = r·ct / (ceil(r·s' / slots) · slots · t),   t = ceil(ct / s), s' = ceil(ct / t)

(rt row tiles, ct column tiles, slots = S·P; the last split may hold fewer than t column tiles,
which counts as idle time too) is at least ``TARGET`` with the fewest splits (every split adds
per-split partials: 3·B fp32 for the forward, B·D fp32 for the feature gradient), and at least
``MIN_TILES_PER_SPLIT`` column tiles per split. The previous rule (grid ≈ 2·S programs) gave
69 % (B = 1024) to 81 % (B = 4096) on 132 SMs: e.g. B = 4096, 64-row tiles, 1 program per SM:
64 × 5 = 320 programs = 2.42 waves of 132. Now: 64 × 2 = 128 programs, 97 %. The feature-gradient
kernel at D = 512 in half precision (BLOCK_DO = 256: q = 2), B = 1024, C = 1M on 132 SMs: 16 row
tiles × 4 splits × 2 chunks = 128 programs, one wave at 97 %; planning from the row tiles alone
gave 8 splits — 256 programs, two waves at the same 97 %, and twice the fp32 partial feature
gradient (8 × B × D × 4 = 16 MiB written, read and summed instead of 8 MiB).

Occupancy comes from the ahead-of-time figures below (``triton.compile`` for sm_80 / sm_90, the
heaviest specialisation, Triton 3.9: the recipe of tests/test_triton_aot.py) and the SM's limits,
read once per device from ``torch.cuda.get_device_properties`` by the launcher, which passes the
kernel and variant of each launch. A configuration missing from the table is assumed to use all
255 registers (conservative: fewer programs per SM). ``tests/test_triton_launch.py`` checks that
every GPU configuration (default and autotune) of these kernels has an entry giving the occupancy
a fresh AOT compile gives, and that the plan is ≥ 90 % efficient for B ≥ 1024 on 132 and 108 SMs.

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

# waves.figure_key(kernel, variant, arch, cfg) = (kernel, variant, arch, BLOCK_B, BLOCK_N, BLOCK_D,
# num_warps, num_stages, BLOCK_DO) -> (registers per thread, shared bytes per CTA) of every GPU
# configuration (configs.gpu_configs) of the row-tile × split kernels, the weight-gradient kernel
# and the small merge / norm kernels, as tests/test_triton_launch.py compiles them (heaviest
# specialisation; bf16 or fp32 inputs), Triton 3.9. BLOCK_DO is the configuration's backward
# D chunk (0 for the other kernels): the launcher narrows it for D < BLOCK_DO, which needs fewer
# registers than listed (conservative). Regenerate: the test's failure lists every entry.
AOT_FIGURES: dict[tuple, tuple[int, int]] = {
    ('fwd', 'half', 80, 64, 128, 64, 8, 3, 0): (242, 49152),
    ('fwd', 'half', 90, 64, 128, 64, 8, 3, 0): (194, 57344),
    ('fwd', 'half', 80, 128, 64, 64, 8, 3, 0): (239, 49152),
    ('fwd', 'half', 90, 128, 64, 64, 8, 3, 0): (187, 65536),
    ('fwd', 'half', 80, 64, 64, 64, 4, 3, 0): (248, 32768),
    ('fwd', 'half', 90, 64, 64, 64, 4, 3, 0): (187, 40960),
    ('fwd', 'half_sub', 80, 64, 128, 64, 8, 3, 0): (255, 49152),
    ('fwd', 'half_sub', 90, 64, 128, 64, 8, 3, 0): (224, 57344),
    ('fwd', 'fp32', 80, 32, 64, 32, 4, 2, 0): (234, 12288),
    ('fwd', 'fp32', 90, 32, 64, 32, 4, 2, 0): (234, 12288),
    ('fwd', 'fp32_sub', 80, 32, 64, 32, 4, 2, 0): (255, 12288),
    ('fwd', 'fp32_sub', 90, 32, 64, 32, 4, 2, 0): (255, 12288),
    ('fwd', 'half_unaligned', 80, 32, 32, 32, 4, 1, 0): (168, 4096),
    ('fwd', 'half_unaligned', 90, 32, 32, 32, 4, 1, 0): (168, 4096),
    ('fwd', 'fp32_unaligned', 80, 16, 32, 32, 4, 1, 0): (184, 4096),
    ('fwd', 'fp32_unaligned', 90, 16, 32, 32, 4, 1, 0): (157, 4096),
    ('bwd_df', 'half', 80, 64, 32, 64, 8, 3, 256): (233, 24576),
    ('bwd_df', 'half', 90, 64, 32, 64, 8, 3, 256): (204, 65536),
    ('bwd_df', 'half', 80, 64, 32, 64, 8, 2, 256): (215, 16384),
    ('bwd_df', 'half', 90, 64, 32, 64, 8, 2, 256): (205, 65536),
    ('bwd_df', 'half_sub', 80, 64, 32, 64, 8, 3, 256): (255, 37120),
    ('bwd_df', 'half_sub', 90, 64, 32, 64, 8, 3, 256): (254, 65536),
    ('bwd_df', 'fp32', 80, 32, 32, 32, 8, 2, 256): (255, 32768),
    ('bwd_df', 'fp32', 90, 32, 32, 32, 8, 2, 256): (249, 32768),
    ('bwd_df', 'fp32', 80, 32, 32, 32, 8, 2, 128): (239, 16384),
    ('bwd_df', 'fp32', 90, 32, 32, 32, 8, 2, 128): (239, 16384),
    ('bwd_df', 'fp32_sub', 80, 16, 32, 32, 4, 2, 128): (227, 20608),
    ('bwd_df', 'fp32_sub', 90, 16, 32, 32, 4, 2, 128): (226, 20608),
    ('bwd_df', 'half_unaligned', 80, 32, 32, 32, 8, 1, 128): (255, 16384),
    ('bwd_df', 'half_unaligned', 90, 32, 32, 32, 8, 1, 128): (254, 16384),
    ('bwd_df', 'fp32_unaligned', 80, 16, 32, 32, 8, 1, 128): (249, 16384),
    ('bwd_df', 'fp32_unaligned', 90, 16, 32, 32, 8, 1, 128): (239, 16384),
    ('topk', 'half', 80, 64, 32, 64, 4, 2, 0): (128, 12288),
    ('topk', 'half', 90, 64, 32, 64, 4, 2, 0): (128, 20480),
    ('topk', 'half_sub', 80, 64, 32, 64, 4, 2, 0): (168, 12288),
    ('topk', 'half_sub', 90, 64, 32, 64, 4, 2, 0): (128, 20480),
    ('topk', 'fp32', 80, 32, 64, 32, 4, 2, 0): (224, 12288),
    ('topk', 'fp32', 90, 32, 64, 32, 4, 2, 0): (224, 12288),
    ('topk', 'fp32_sub', 80, 32, 64, 32, 4, 2, 0): (248, 12288),
    ('topk', 'fp32_sub', 90, 32, 64, 32, 4, 2, 0): (250, 12288),
    ('topk', 'half_unaligned', 80, 32, 32, 32, 4, 1, 0): (168, 4096),
    ('topk', 'half_unaligned', 90, 32, 32, 32, 4, 1, 0): (128, 4096),
    ('topk', 'fp32_unaligned', 80, 32, 32, 32, 4, 1, 0): (255, 4096),
    ('topk', 'fp32_unaligned', 90, 32, 32, 32, 4, 1, 0): (247, 4096),
    ('bwd_dw', 'half', 80, 64, 64, 64, 8, 3, 256): (255, 40960),
    ('bwd_dw', 'half', 90, 64, 64, 64, 8, 3, 256): (254, 65536),
    ('bwd_dw', 'half', 80, 64, 64, 64, 8, 2, 256): (255, 40960),
    ('bwd_dw', 'half', 90, 64, 64, 64, 8, 2, 256): (254, 65536),
    ('bwd_dw', 'half_sub', 80, 64, 64, 32, 8, 3, 128): (254, 24576),
    ('bwd_dw', 'half_sub', 90, 64, 64, 32, 8, 3, 128): (239, 32768),
    ('bwd_dw', 'fp32', 80, 32, 64, 32, 8, 2, 128): (248, 16384),
    ('bwd_dw', 'fp32', 90, 32, 64, 32, 8, 2, 128): (234, 49152),
    ('bwd_dw', 'fp32_sub', 80, 32, 64, 32, 8, 2, 128): (244, 16384),
    ('bwd_dw', 'fp32_sub', 90, 32, 64, 32, 8, 2, 128): (246, 49152),
    ('bwd_dw', 'half_unaligned', 80, 32, 32, 16, 4, 1, 128): (255, 16384),
    ('bwd_dw', 'half_unaligned', 90, 32, 32, 16, 4, 1, 128): (255, 16384),
    ('bwd_dw', 'fp32_unaligned', 80, 16, 32, 16, 4, 1, 128): (255, 16384),
    ('bwd_dw', 'fp32_unaligned', 90, 16, 32, 16, 4, 1, 128): (255, 16384),
    # resident.py's kernels (sm_90 only), every flag on, at the largest D each runs at: D = 512
    # (fwd 128×64 and bwd_dw in two 256-wide chunks, bwd_df 64×32 in one), 128×32 bwd_df at
    # D = 256, 128×32 fwd at D = 128
    ('fwd', 'resident', 90, 128, 32, 256, 8, 2, 0): (100, 49152),
    ('fwd', 'resident', 90, 128, 64, 256, 8, 2, 0): (240, 196608),
    ('bwd_df', 'resident', 90, 128, 32, 256, 8, 2, 256): (247, 131072),
    ('bwd_df', 'resident', 90, 64, 32, 512, 8, 2, 512): (255, 135424),
    ('bwd_dw', 'resident', 90, 16, 128, 256, 8, 2, 256): (245, 164288),
    ('topk', 'resident', 90, 64, 32, 64, 4, 2, 0): (128, 20480),
    # chunked.py's kernels (sm_90, bf16, D = 512; the heavier of every flag on or off): dd' in
    # resident.py's forward tiles, and the two GEMMs
    ('dd', 'chunked', 90, 128, 32, 256, 8, 2, 0): (248, 139264),
    ('df_gemm', 'chunked', 90, 128, 256, 64, 8, 3, 0): (250, 147456),
    ('dw_gemm', 'chunked', 90, 128, 256, 64, 8, 3, 0): (248, 147456),
    ('merge', 'resident', 90, 128, 16, 16, 4, 1, 0): (32, 0),
    ('norm', 'resident', 90, 16, 64, 64, 4, 2, 0): (32, 256),
    ('merge', 'half', 80, 128, 16, 16, 4, 1, 0): (32, 0),
    ('merge', 'half', 90, 128, 16, 16, 4, 1, 0): (32, 0),
    ('merge', 'half_sub', 80, 128, 16, 16, 4, 1, 0): (32, 0),
    ('merge', 'half_sub', 90, 128, 16, 16, 4, 1, 0): (32, 0),
    ('merge', 'fp32', 80, 128, 16, 16, 4, 1, 0): (32, 0),
    ('merge', 'fp32', 90, 128, 16, 16, 4, 1, 0): (32, 0),
    ('merge', 'fp32_sub', 80, 128, 16, 16, 4, 1, 0): (32, 0),
    ('merge', 'fp32_sub', 90, 128, 16, 16, 4, 1, 0): (32, 0),
    ('merge', 'half_unaligned', 80, 128, 16, 16, 4, 1, 0): (32, 0),
    ('merge', 'half_unaligned', 90, 128, 16, 16, 4, 1, 0): (32, 0),
    ('merge', 'fp32_unaligned', 80, 128, 16, 16, 4, 1, 0): (32, 0),
    ('merge', 'fp32_unaligned', 90, 128, 16, 16, 4, 1, 0): (32, 0),
    ('norm', 'half', 80, 16, 64, 64, 4, 2, 0): (39, 256),
    ('norm', 'half', 90, 16, 64, 64, 4, 2, 0): (32, 256),
    ('norm', 'half_sub', 80, 16, 64, 64, 4, 2, 0): (55, 256),
    ('norm', 'half_sub', 90, 16, 64, 64, 4, 2, 0): (56, 256),
    ('norm', 'fp32', 80, 16, 64, 64, 4, 2, 0): (56, 256),
    ('norm', 'fp32', 90, 16, 64, 64, 4, 2, 0): (48, 256),
    ('norm', 'fp32_sub', 80, 16, 64, 64, 4, 2, 0): (96, 256),
    ('norm', 'fp32_sub', 90, 16, 64, 64, 4, 2, 0): (96, 256),
    ('norm', 'half_unaligned', 80, 64, 64, 32, 4, 1, 0): (159, 256),
    ('norm', 'half_unaligned', 90, 64, 64, 32, 4, 1, 0): (148, 256),
    ('norm', 'fp32_unaligned', 80, 64, 64, 32, 4, 1, 0): (161, 256),
    ('norm', 'fp32_unaligned', 90, 64, 64, 32, 4, 1, 0): (149, 256),
}


def figure_key(kernel: str, variant: str, arch: int, cfg) -> tuple:
    """The AOT_FIGURES key of ``cfg`` (a configs.KernelConfig) for ``kernel`` in ``variant``."""
    return (kernel, variant, arch, cfg.block_b, cfg.block_n, cfg.block_d, cfg.num_warps,
            cfg.num_stages, cfg.block_do)


@functools.lru_cache(maxsize=1024)
def figures(arch: int, cfg, kernel: str | None = None, variant: str | None = None
            ) -> tuple[int, int]:
    """(registers per thread, shared bytes per CTA) of ``cfg`` on ``arch`` (×10; sm_80 figures
    for < 90, sm_90 for ≥ 90). Without ``kernel`` / ``variant``: the largest figures of any entry
    with this configuration; for a configuration not in the table, 255 registers (conservative)."""
    arch = 90 if arch >= 90 else 80
    tiles = figure_key("", "", arch, cfg)[2:]
    hits = [fig for (k, v, *t), fig in AOT_FIGURES.items()
            if tuple(t) == tiles and kernel in (None, k) and variant in (None, v)]
    if not hits:
        return 255, 0
    return max(r for r, _ in hits), max(sm for _, sm in hits)


def d_chunk(block_do: int, D: int) -> int:
    """D columns per program of a backward kernel (its register accumulator's width, BLOCK_DO):
    ``block_do``, or the next power of two ≥ D (≥ 16, tl.dot's minimum) when that is smaller or
    ``block_do`` is 0 — a padded accumulator wastes registers and tensor-core work. The grid has
    ceil(D / d_chunk) D chunks (margin_lse._backward)."""
    whole = max(16, 1 << max(D - 1, 0).bit_length())
    return min(block_do, whole) if block_do else whole


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


def efficiency(row_tiles: int, col_tiles: int, splits: int, n_slots: int, d_chunks: int = 1
               ) -> float:
    """Wave efficiency of a row_tiles × splits × d_chunks grid (module docstring), in (0, 1]."""
    rows = row_tiles * d_chunks
    per_split = -(-col_tiles // splits)
    used = -(-col_tiles // per_split)          # splits actually non-empty
    waves = -(-(rows * used) // n_slots)
    return rows * col_tiles / (waves * n_slots * per_split)


@functools.lru_cache(maxsize=4096)
def plan_splits(row_tiles: int, col_tiles: int, n_slots: int, d_chunks: int = 1) -> int:
    """The fewest splits whose row_tiles × splits × d_chunks grid reaches ``TARGET`` wave
    efficiency (else the most efficient), each split keeping ≥ MIN_TILES_PER_SPLIT column tiles.
    Returns the non-empty split count."""
    rows, col_tiles = max(row_tiles, 1) * max(d_chunks, 1), max(col_tiles, 1)
    most = max(1, min(col_tiles // MIN_TILES_PER_SPLIT, -(-MAX_WAVES * n_slots // rows)))
    best, best_eff = 1, efficiency(rows, col_tiles, 1, n_slots)
    for s in range(1, most + 1):
        eff = efficiency(rows, col_tiles, s, n_slots)
        if eff > best_eff + 1e-12:
            best, best_eff = s, eff
        if eff >= TARGET:
            best = s
            break
    per_split = -(-col_tiles // best)
    return -(-col_tiles // per_split)


CHUNK_BYTES = 128 * 2**20  # chunked.py's dd' buffer budget (one chunk of B × CC elements)


def plan_chunk(B: int, N: int, n_sm: int, e: int, d_tiles: int = 2, class_tile: int = 128
               ) -> int:
    """Columns per chunk: whole waves of the dW GEMM (``class_tile`` classes × ``d_tiles`` tiles
    along D per program: CC = k·⌈n_sm / d_tiles⌉·class_tile — at D = 512, 2 tiles of 256,
    k·66·128 on 132 SMs; at D = 256 k·132·128), the largest k whose B × CC buffer of
    ``e``-byte elements fits CHUNK_BYTES (at least k = 1), and no wider than N needs (rounded
    up to ``class_tile``, a multiple of every tile here)."""
    unit = -(-n_sm // d_tiles) * class_tile
    k = max(1, CHUNK_BYTES // (B * unit * e))
    need = -(-max(N, 1) // class_tile) * class_tile
    return min(k * unit, need)


@dataclass(frozen=True)
class ChunkPlan:
    """chunked.py's launch plan for a batch of B rows and N columns (see ``chunked_plan``)."""
    cc: int                  # columns per chunk (the dd' buffer's width)
    chunks: int
    dd_grid: tuple[int, int]          # row tiles × splits of a chunk's columns
    cols_per_split: int               # a multiple of the dd kernel's BLOCK_N
    df_grid: tuple[int, int, int]     # row tiles × D tiles × K splits
    k_tiles_per_split: int            # BLOCK_K steps of the chunk's columns per K split
    dw_grid: tuple[int, int]          # class tiles of a full chunk × D tiles


def chunked_plan(B: int, N: int, D: int, n_sm: int | None, e: int, dd, df, dw,
                 chunk: int | None = None, splits: int | None = None) -> ChunkPlan:
    """The grids of chunked.py's three kernels (configurations ``dd``, ``df``, ``dw``: block_b,
    block_n, block_d as M, N, K for the GEMMs): chunks of ``plan_chunk`` columns on a GPU of
    ``n_sm`` SMs (one program per SM: these kernels' occupancy), the dd and dF split counts in
    whole waves (``plan_splits``); ``chunk`` / ``splits`` pin them (tests; the interpreter, with
    ``n_sm`` None, uses 3 dd tiles and 2 splits so its tests cross both boundaries)."""
    cc = chunk or (plan_chunk(B, N, n_sm, e, -(-D // dw.block_n), dw.block_b) if n_sm
                   else 3 * dd.block_n)
    width = min(cc, N)

    def split_count(tiles: int, k_tiles: int) -> int:
        if splits is not None:
            return max(1, min(splits, k_tiles))
        if not n_sm:
            return max(1, min(2, k_tiles))
        return plan_splits(tiles, k_tiles, n_sm)

    rt, ct = -(-B // dd.block_b), max(-(-width // dd.block_n), 1)
    s_dd = split_count(rt, ct)
    df_tiles = (-(-B // df.block_b), -(-D // df.block_n))
    k_tiles = max(-(-width // df.block_d), 1)
    s_df = split_count(df_tiles[0] * df_tiles[1], k_tiles)
    return ChunkPlan(cc=cc, chunks=-(-N // cc), dd_grid=(rt, s_dd),
                     cols_per_split=-(-ct // s_dd) * dd.block_n,
                     df_grid=(*df_tiles, s_df), k_tiles_per_split=-(-k_tiles // s_df),
                     dw_grid=(-(-width // dw.block_b), -(-D // dw.block_n)))
