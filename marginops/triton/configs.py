"""Every kernel configuration the Triton launcher can pick.

There are three sources of configurations, and this file is the only place they are listed:

* ``DEFAULT[variant][kernel]`` — the fixed configuration used on a GPU when autotuning is off.
* ``AUTOTUNE[variant][kernel]`` — extra candidates searched, with the default, when autotuning is on
  (``set_autotune(True)`` or ``MARGINOPS_TRITON_AUTOTUNE=1``, read at call time).
* ``INTERPRETER[kernel]`` — tiny tiles used under ``TRITON_INTERPRET=1`` (CPU tensors): the kernel code
  is identical, small tiles just make small test shapes cross many tiles and keep numpy fast.

``tests/test_triton_aot.py`` compiles ``gpu_configs(kernel, variant)`` (DEFAULT ∪ AUTOTUNE) for every
kernel and variant, for sm_80 and sm_90 and every input dtype of that variant, in the specialisation
the variant launches with, and checks spills / shared memory / wgmma, so a configuration added
here cannot skip those checks.

Kernels:
    fwd     margin_lse forward: row tile × class split, online logsumexp (BLOCK_B × BLOCK_N tiles)
    bwd_df  backward, feature gradient: row tile × class split, partial dF per split
    bwd_dw  backward, weight gradient: one program per class tile, loops over the batch
    topk    streaming per-row top-k: row tile × class split
    merge   merges the per-split (m, s, dot_y) partials of the forward (BLOCK_B only)
    norm    1/‖W_r‖ of the iterated rows, (N, K) fp32, for the backward (BLOCK_N × BLOCK_D)

Register budget notes (≤ 255 registers per thread): the kernels are register-bound, not
shared-memory-bound. Besides the BLOCK_B × BLOCK_N fp32 dot / epilogue tiles, the 64-bit pointer
tensors of the indirect (class_index) W loads cost a lot, and the backward kernels hold their
second GEMM's fp32 accumulator (BLOCK_B or BLOCK_N rows × ``block_do`` columns) in registers:
64 × 256 over 8 warps is 64 registers per thread. ``block_do`` = 512 (one D chunk at D = 512)
spilled 8–1048 B on sm_80 or sm_90 in every half configuration tried (bwd_df 64×{32,64,128}×
{32,64}, bwd_dw {32,64}×64×{32,64}; 8 and 16 warps), so the half tables use 256 (two chunks
at D = 512: see margin_lse.py for what that costs). The sizes below are the largest tried for
which ``cuobjdump -res-usage`` reports STACK:0 on both sm_80 and sm_90 under Triton 3.9 and 3.5
(``tests/test_triton_aot.py``). The half backward runs 3 stages: its TTGIR then issues the D
loop's loads two tiles ahead (``async_copy_global_to_local`` into 3-slot buffers); the speed
difference is not measured.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class KernelConfig:
    block_b: int  # batch rows per tile (tl.dot M for fwd/bwd_df/topk, K-dim of the dW dot)
    block_n: int  # columns (classes) per tile
    block_d: int  # embedding chunk per tl.dot step
    num_warps: int = 4
    num_stages: int = 2
    # backward kernels only: D columns of the register accumulator per program (BLOCK_DO); the
    # launcher clamps it to the next power of two ≥ D, and 0 means "that power of two"
    block_do: int = 0

    def meta(self) -> dict:
        m = {"BLOCK_B": self.block_b, "BLOCK_N": self.block_n, "BLOCK_D": self.block_d}
        if self.block_do:
            m["BLOCK_DO"] = self.block_do
        return m

    def launch(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    def as_dict(self) -> dict:
        return asdict(self)


KERNELS = ("fwd", "bwd_df", "bwd_dw", "topk", "merge", "norm")

# A launch's *variant* picks its table: the features dtype ("half" = fp16 / bf16 on tensor cores,
# "fp32" = fp32 via 3×TF32 products, which need more registers) and whether sub-centers are on
# (the argmax tile they add costs registers, so those launches get smaller tiles).
# "_unaligned": D (hence the row strides) not a multiple of 16, or a base pointer not 16-byte
# aligned. Triton then cannot prove vector alignment, loads element by element with a 64-bit
# address each, and the aligned tiles spill (48–1080 B on sm_80/sm_90, Triton 3.9): such launches
# get small single-stage tiles, K = 1 or not. They are below wgmma's 64-row tiles (NO_WGMMA in
# tests/test_triton_aot.py); pad D to a multiple of 16 for full speed.
# "resident": resident.py's kernels (FlashAttention-shaped: the program's own tile stays in shared
# memory over the whole D) for what they are compiled and checked for — sm_90, bf16 features and
# weight, one sub-center, D ∈ RESIDENT_DIMS; their ``block_d`` is the D chunk (min(D, 256)).
VARIANTS = ("half", "half_sub", "fp32", "fp32_sub", "half_unaligned", "fp32_unaligned", "resident")
RESIDENT_DIMS = (128, 256, 512)
RESIDENT_CHUNK = 256  # resident.py's D chunk: min(D, RESIDENT_CHUNK) columns, one or two per D
# (bwd_df at D = 512: one chunk of 512, resident_meta)


def resident_applies(features: str, weight: str, subcenters: int, dim: int, arch: int,
                     aligned: bool = True) -> bool:
    """Do resident.py's kernels serve this launch? dtypes by name ("bfloat16", "float16",
    "float32"); arch = compute capability × 10 (0: no GPU). Yes on sm_90 (H100 / H200) for bf16
    features and weight, one sub-center and D in RESIDENT_DIMS (aligned). Only sm_90: it is the
    target their compile checks cover (sm_100's tensor-core code is another, and consumer sm_120
    has less shared memory per block than their 192 KB). ``force(resident=True)`` (tests: the
    interpreter runs them on fp16 / fp32) needs only equal dtypes, ``resident=False`` turns them
    off. Pure Python: benchmarks/model.py asks it too."""
    if not aligned or subcenters != 1 or dim not in RESIDENT_DIMS:
        return False
    if _forced_resident is not None:
        return _forced_resident and features == weight
    return arch == 90 and features == weight == "bfloat16"


def variant(features_dtype, subcenters: int, aligned: bool = True, *, weight_dtype=None,
            dim: int = 0, arch: int = 0) -> str:
    """The table a launch takes its configurations from (see VARIANTS and resident_applies)."""
    import torch

    if weight_dtype is not None and resident_applies(
            str(features_dtype).removeprefix("torch."), str(weight_dtype).removeprefix("torch."),
            subcenters, dim, arch, aligned):
        return "resident"
    base = "fp32" if features_dtype == torch.float32 else "half"
    if not aligned:
        return base + "_unaligned"
    return base + ("_sub" if subcenters > 1 else "")


C = KernelConfig
_MERGE = C(128, 16, 16, num_warps=4, num_stages=1)
_NORM = C(16, 64, 64, num_warps=4, num_stages=2)
_NORM_UNALIGNED = C(64, 64, 32, num_warps=4, num_stages=1)

# DEFAULT[variant][kernel] — the fixed configuration when autotuning is off.
DEFAULT: dict[str, dict[str, KernelConfig]] = {
    "half": {
        "fwd": C(64, 128, 64, num_warps=8, num_stages=3),
        "bwd_df": C(64, 32, 64, num_warps=8, num_stages=3, block_do=256),  # 64×64×32 spills
        "bwd_dw": C(64, 64, 64, num_warps=8, num_stages=3, block_do=256),
        "topk": C(64, 32, 64, num_warps=4, num_stages=2),  # 64×64 spills 8–16 B (NaN policy)
        "merge": _MERGE, "norm": _NORM,
    },
    "half_sub": {
        "fwd": C(64, 128, 64, num_warps=8, num_stages=3),
        "bwd_df": C(64, 32, 64, num_warps=8, num_stages=3, block_do=256),
        "bwd_dw": C(64, 64, 32, num_warps=8, num_stages=3, block_do=128),  # 256 spills 8–16 B
        "topk": C(64, 32, 64, num_warps=4, num_stages=2),  # 64×64 spills 8–16 B (NaN policy)
        "merge": _MERGE, "norm": _NORM,
    },
    "fp32": {
        "fwd": C(32, 64, 32, num_warps=4, num_stages=2),
        "bwd_df": C(32, 32, 32, num_warps=8, num_stages=2, block_do=256),
        "bwd_dw": C(32, 64, 32, num_warps=8, num_stages=2, block_do=128),  # 256 spills
        "topk": C(32, 64, 32, num_warps=4, num_stages=2),
        "merge": _MERGE, "norm": _NORM,
    },
    # the largest single-stage tiles found with zero spills at sm_80 and sm_90, K = 1 and K > 1,
    # under Triton 3.5 and 3.9 (larger ones spill 8–1336 B)
    "half_unaligned": {
        "fwd": C(32, 32, 32, num_warps=4, num_stages=1),
        "bwd_df": C(32, 32, 32, num_warps=8, num_stages=1, block_do=128),  # 4 warps spill
        "bwd_dw": C(32, 32, 16, num_warps=4, num_stages=1, block_do=128),
        "topk": C(32, 32, 32, num_warps=4, num_stages=1),
        "merge": _MERGE, "norm": _NORM_UNALIGNED,
    },
    "fp32_unaligned": {
        "fwd": C(16, 32, 32, num_warps=4, num_stages=1),
        "bwd_df": C(16, 32, 32, num_warps=8, num_stages=1, block_do=128),  # 4 warps spill
        "bwd_dw": C(16, 32, 16, num_warps=4, num_stages=1, block_do=128),
        "topk": C(32, 32, 32, num_warps=4, num_stages=1),
        "merge": _MERGE, "norm": _NORM_UNALIGNED,
    },
    # resident.py (sm_90 only; compiled there with zero spills for D = 128, 256 and 512, every
    # option flag on and off): fwd 128×32 at D = 128 (D ≥ 256: RESIDENT_WIDE_FWD, 240 / 192 KB
    # at 512); bwd_df 128×32
    # 247 / 128 KB at D = 256 (D = 512: RESIDENT_WIDE_DF); bwd_dw 16 rows × 128 columns 245 /
    # 160 KB at D = 512 (32 rows spill 128-160 B). 128 rows (fwd, bwd_df) or columns (bwd_dw) per program:
    # Triton lays out a dot that feeds another dot with all warps along M, so 8 warps need 128
    # to split the tile, not duplicate it.
    "resident": {
        "fwd": C(128, 32, RESIDENT_CHUNK, num_warps=8, num_stages=2),
        "bwd_df": C(128, 32, RESIDENT_CHUNK, num_warps=8, num_stages=2, block_do=RESIDENT_CHUNK),
        "bwd_dw": C(16, 128, RESIDENT_CHUNK, num_warps=8, num_stages=2, block_do=RESIDENT_CHUNK),
        "topk": C(64, 32, 64, num_warps=4, num_stages=2),
        "merge": _MERGE, "norm": _NORM,
    },
    "fp32_sub": {
        "fwd": C(32, 64, 32, num_warps=4, num_stages=2),
        "bwd_df": C(16, 32, 32, num_warps=4, num_stages=2, block_do=128),  # 16×64 spills
        "bwd_dw": C(32, 64, 32, num_warps=8, num_stages=2, block_do=128),
        "topk": C(32, 64, 32, num_warps=4, num_stages=2),
        "merge": _MERGE, "norm": _NORM,
    },
}

# resident.py's feature gradient at D > RESIDENT_CHUNK: the whole D = 512 in one chunk, so the
# logit tile is computed once, not once per output chunk (4·B·C·D, not 6). Its fp32 accumulator,
# 64 × 512, is 128 registers per thread over 8 warps; the 64-row tile needs the logit GEMM
# unchained (resident.py's ``_unchained``). 255 registers, 135 KB shared, zero spills
# (tests/test_triton_aot.py, Triton 3.9 and 3.5); 64×64 spills 152 B.
RESIDENT_WIDE_DF = C(64, 32, 512, num_warps=8, num_stages=2, block_do=512)


# chunked.py's kernels: dd (rows × classes × D chunk) and the two GEMMs of the chunked-gradient
# backward (block_b = M, block_n = N, block_d = K): dF = dd'·W (M = rows, N = D, K = a chunk's
# classes) and dW = dd'ᵀ·F (M = classes, N = D, K = the batch). 128 × 256 tiles: 85 FLOPs per byte
# loaded (the widest whose 128 × 256 fp32 accumulator, 128 registers per thread over 8 warps,
# compiles without spills); tests/test_triton_aot.py checks them.
CHUNKED: dict[str, KernelConfig] = {
    # dd: resident.py's forward tiles with F's first chunk in registers (REG0); 64-column W
    # tiles spill 160-352 B beside the backward epilogue, 32 compile clean (248 registers)
    "dd": C(128, 32, RESIDENT_CHUNK, num_warps=8, num_stages=2),
    "df_gemm": C(128, 256, 64, num_warps=8, num_stages=3),
    "dw_gemm": C(128, 256, 64, num_warps=8, num_stages=3),
}
INTERPRETER_GEMM = C(16, 16, 16, num_warps=1, num_stages=1)


def chunked_applies(features: str, dim: int, has_bias: bool) -> bool:
    """Does chunked.py's backward serve a launch that resident.py's kernels serve? At
    D ≥ RESIDENT_CHUNK (256 and 512; at D = 128 its GEMMs' 256-wide tiles would be half empty),
    without bias (class_index is served), bf16 (fp32 when forced: the interpreter's tests;
    fp16's dd' could overflow its operand). ``force(chunked=False)`` turns it off."""
    if _forced_chunked is False or has_bias or dim < RESIDENT_CHUNK:
        return False
    return features in ("bfloat16", "float32")


# resident.py's forward at D ≥ RESIDENT_CHUNK: F's first 256-column chunk as a register operand
# (REG0, resident.py's ``_in_registers``: 64 registers per thread) — at D = 256 all of F — and
# at D = 512 the second resident in shared memory (64 KB), so two stages of 64-column W tiles
# fit (128 KB): per tile step at D = 512 the wgmma operand reads fall from 224 to 125 bytes per
# SM clock of tensor work, at D = 256 to 94. 240 registers (222 at D = 256), no spills.
RESIDENT_WIDE_FWD = C(128, 64, RESIDENT_CHUNK, num_warps=8, num_stages=2)


def resident_config(kernel: str, dim: int) -> KernelConfig:
    """resident.py's configuration of ``kernel`` at embedding width ``dim``."""
    if kernel == "bwd_df" and dim > RESIDENT_CHUNK:
        return RESIDENT_WIDE_DF
    if kernel == "fwd" and dim >= RESIDENT_CHUNK:
        return RESIDENT_WIDE_FWD
    return DEFAULT["resident"][kernel]


def resident_meta(kernel: str, dim: int) -> dict:
    """The constexprs resident.py's ``kernel`` takes at ``dim`` besides its tile sizes: the D
    chunk BLOCK_D, TWO (D in two chunks) and, for bwd_df, UNCHAINED (D in one wide chunk)."""
    wide = kernel == "bwd_df" and dim > RESIDENT_CHUNK
    chunk = dim if wide else min(dim, RESIDENT_CHUNK)
    meta = dict(BLOCK_D=chunk, TWO=dim > chunk)
    if kernel == "bwd_df":
        meta["UNCHAINED"] = wide
    if kernel == "fwd":
        meta["REG0"] = dim >= RESIDENT_CHUNK  # RESIDENT_WIDE_FWD
    return meta


# AUTOTUNE[variant][kernel] — extra candidates searched when autotuning is on (the default is
# always a candidate too). Small on purpose: every entry is compiled for sm_80 and sm_90 in CI.
AUTOTUNE: dict[str, dict[str, tuple[KernelConfig, ...]]] = {
    "half": {
        "fwd": (C(128, 64, 64, num_warps=8, num_stages=3), C(64, 64, 64, num_warps=4, num_stages=3)),
        # 2 stages: lets autotuning measure the 3-stage defaults' choice (made from the IR)
        "bwd_df": (C(64, 32, 64, num_warps=8, num_stages=2, block_do=256),),
        "bwd_dw": (C(64, 64, 64, num_warps=8, num_stages=2, block_do=256),),
    },
    "fp32": {
        "bwd_df": (C(32, 32, 32, num_warps=8, num_stages=2, block_do=128),),
    },
}

# block_do = 32 in the backward: D = 40 and 130 cross D-chunk boundaries too
INTERPRETER: dict[str, KernelConfig] = {
    k: C(16, 16, 16, num_warps=1, num_stages=1, block_do=32 if k.startswith("bwd") else 0)
    for k in KERNELS}


def default(kernel: str, var: str) -> KernelConfig:
    return DEFAULT[var][kernel]


def gpu_configs(kernel: str, var: str) -> tuple[KernelConfig, ...]:
    """Every configuration the launcher can pick for ``kernel`` in ``var`` (default first)."""
    out = [DEFAULT[var][kernel]]
    if var == "resident" and kernel == "bwd_df":
        out.append(RESIDENT_WIDE_DF)  # D = 512 (resident_config)
    if var == "resident" and kernel == "fwd":
        out.append(RESIDENT_WIDE_FWD)  # D = 256 and 512 (resident_config)
    for c in AUTOTUNE.get(var, {}).get(kernel, ()):
        if c not in out:
            out.append(c)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Runtime switches (read at call time, never at import time)
# ---------------------------------------------------------------------------------------------

_autotune: bool | None = None  # None: follow MARGINOPS_TRITON_AUTOTUNE
_forced: dict[str, KernelConfig] = {}
_forced_splits: int | None = None
_forced_resident: bool | None = None
_forced_chunked: bool | None = None
_forced_chunk: int | None = None


def set_autotune(on: bool | None) -> None:
    """Turn autotuning on/off for this process (None: follow ``MARGINOPS_TRITON_AUTOTUNE``)."""
    global _autotune
    _autotune = on


def autotune_enabled() -> bool:
    if _autotune is not None:
        return _autotune
    return os.environ.get("MARGINOPS_TRITON_AUTOTUNE", "0") not in ("", "0", "false", "False")


class force:
    """Context manager pinning configurations, the class-split count, the resident kernels
    and/or the chunked backward on or off, and its chunk width (tests, benchmarks).

        with configs.force(splits=3, resident=True, fwd=configs.DEFAULT["half"]["fwd"]): ...
    """

    def __init__(self, splits: int | None = None, resident: bool | None = None,
                 chunked: bool | None = None, chunk: int | None = None,
                 **per_kernel: KernelConfig):
        self.splits, self.resident, self.per_kernel = splits, resident, per_kernel
        self.chunked, self.chunk = chunked, chunk

    def __enter__(self):
        global _forced_splits, _forced_resident, _forced_chunked, _forced_chunk
        self._saved = (dict(_forced), _forced_splits, _forced_resident, _forced_chunked,
                       _forced_chunk)
        _forced.update(self.per_kernel)
        if self.splits is not None:
            _forced_splits = self.splits
        if self.resident is not None:
            _forced_resident = self.resident
        if self.chunked is not None:
            _forced_chunked = self.chunked
        if self.chunk is not None:
            _forced_chunk = self.chunk
        return self

    def __exit__(self, *exc):
        global _forced_splits, _forced_resident, _forced_chunked, _forced_chunk
        saved, _forced_splits, _forced_resident, _forced_chunked, _forced_chunk = self._saved
        _forced.clear()
        _forced.update(saved)


def forced(kernel: str) -> KernelConfig | None:
    return _forced.get(kernel)


def forced_splits() -> int | None:
    return _forced_splits


def forced_chunk() -> int | None:
    return _forced_chunk

