"""benchmarks/model.py, the GPU roofline model: FLOP and byte counts against hand computation for
two shapes, occupancy and wave arithmetic, the ``predicted:`` last line, fraction in [0, 1], and
what ``backend="auto"`` picks by the model. Fast and GPU-free.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

import pytest

from marginops.triton import configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("perfmodel", os.path.join(ROOT, "benchmarks",
                                                                         "model.py"))
pm = importlib.util.module_from_spec(_spec)
sys.modules["perfmodel"] = pm   # dataclasses look their module up while the class is built
_spec.loader.exec_module(pm)

@pytest.fixture(autouse=True)
def _no_backend_table(monkeypatch, tmp_path):
    """What ``auto`` picks must not depend on a gpu-check table in the user's cache."""
    from marginops import backend_table

    monkeypatch.setattr(backend_table, "table_path", lambda: str(tmp_path / "auto-backend.json"))


LAST_LINE = re.compile(r"^predicted: (\d+\.\d{3}) ms, (\d\.\d{3}) of peak$")


def _by_name(launches):
    return {la.name: la for la in launches}


FWD = "fwd (S = F·Wᵀ, ‖W‖² per row tile, online softmax)"
DF = "bwd_df (S recomputed, dF[:, chunk] = dd·Ŵ in registers)"
DW = "bwd_dw (S recomputed, G[:, chunk] = ddᵀ·F in registers, Jacobian)"
FWD_RES = "fwd_res (F resident, S = F·Wᵀ, online softmax)"
DF_RES = "bwd_df_res (F resident, S + dF[:, chunk] = dd·Ŵ per W tile)"
DW_RES = "bwd_dw_res (W resident, S + G[:, chunk] = ddᵀ·F per F tile, Jacobian)"


def test_triton_bf16_counts_by_hand():
    """B=128, C=1024, D=64 bf16 on H100, the kernels of margin_lse.py with configs.py's "half"
    defaults and their sm_90 AOT figures (waves.AOT_FIGURES): every kernel 1 CTA per SM (≥ 194
    registers × 8 warps), 132 slots. D = 64 fits one D chunk (BLOCK_DO narrowed to 64: q = 1)."""
    B, C, D, e = 128, 1024, 64, 2
    W, Fb = C * D * e, B * D * e                     # 131072, 16384 bytes
    la = _by_name(pm.triton_launches(B, C, D, "bfloat16", pm.GPUS["h100"]))
    # forward 64×128×64: 2 row tiles × 8 column tiles; whole waves out of reach, the most
    # efficient split count with ≥ 4 column tiles per split: 2 → grid 4
    fwd = la[FWD]
    assert (fwd.grid, fwd.regs, fwd.smem, fwd.threads) == (4, 194, 57344, 256)
    assert pm.occupancy(fwd, pm.GPUS["h100"]) == 1
    assert fwd.tc_flops == 2 * B * C * D == 16_777_216
    # F per column tile (8), W per row tile (2), scale + target column per split and row
    # (12 B), (m, s, dot_y) fp32 per split and row
    assert fwd.l2 == 8 * Fb + 2 * W + 2 * B * 12 + 3 * 2 * B * 4 == 399_360
    assert fwd.hbm == W + Fb + B * 12 + 3 * 2 * B * 4 == 152_064   # one wave: W once
    # epilogue 12 ops per logit + ‖W_r‖² (2 ops per W element per row tile)
    assert fwd.alu_flops == 12 * B * C + 2 * 2 * C * D and fwd.exps == B * C
    # dF 64×32×64, 2 row tiles × 32 column tiles × 1 chunk: 8 splits (the most efficient)
    df = la[DF]
    assert (df.grid, df.regs, df.smem) == (16, 204, 65536)
    assert df.tc_flops == (2 * 1 + 2) * B * C * D == 33_554_432
    # F per column tile and chunk (32), W twice per row tile (the S tile over D + the chunk),
    # 1/‖W‖ twice per row tile, 24 B of row vectors per program row, the (8, B, D) fp32 partial
    # dF and (8, B) grad_scale partials written once
    assert df.l2 == (32 * Fb + 2 * 2 * W + 2 * 2 * C * 4 + 8 * B * 24 + 8 * B * D * 4
                     + 8 * B * 4) == 1_355_776
    assert df.hbm == W + Fb + C * 4 + B * 24 + 8 * B * D * 4 + 8 * B * 4 == 420_864
    # dW 64×64×64 (N × B × D): 16 class tiles × 1 chunk, each looping over the 2 row tiles
    dw = la[DW]
    assert (dw.grid, dw.regs, dw.smem) == (16, 254, 65536)
    assert dw.tc_flops == 4 * B * C * D
    # F twice per class tile (S + G), W once per row tile + the epilogue's read, 1/‖W‖ likewise,
    # row vectors per class tile, grad_W written once in bf16
    assert dw.l2 == (2 * 16 * Fb + 3 * W + 3 * C * 4 + 16 * B * 24 + W) == 1_110_016
    assert dw.hbm == W + Fb + C * 4 + B * 24 + W == 285_696
    assert sum(x.tc_flops for x in la.values()) == 10 * B * C * D   # 2 + 4 + 4 at q = 1
    # the partials summed over the 8 splits (fp32), then cast to bf16; zeros of grad_f, grad_s
    assert la["backward: torch sum of the dF / grad_scale partials over splits"].hbm == (
        8 * B * (D + 1) * 4 + B * (D + 1) * 4)
    assert la["backward: torch zeros (grad_f, grad_scale)"].hbm == Fb + B * 4


def test_triton_target_shape_counts_by_hand():
    """B=4096, C=1M, D=512 bf16 on H100 (the issue's shape), margin_lse.py's kernels (the
    launcher takes resident.py's there unless ``configs.force(resident=False)``, as here):
    BLOCK_DO = 256 gives q = 2 D chunks in both backward kernels, each (2q + 2)·B·C·D = 6·B·C·D:
    14·B·C·D in all. fwd: 64 row tiles × 2 splits = 128 programs (one wave); dF: 64 row tiles ×
    1 split × 2 chunks = 128 (the chunks are counted: waves.plan_splits); dW: 15625 class tiles ×
    2 chunks."""
    B, C, D, e = 4096, 1_000_000, 512, 2
    W, Fb = C * D * e, B * D * e
    h100 = pm.GPUS["h100"]
    with configs.force(resident=False):
        la = _by_name(pm.triton_launches(B, C, D, "bfloat16", h100))
    fwd, df, dw = la[FWD], la[DF], la[DW]
    assert (fwd.grid, df.grid, dw.grid) == (128, 128, 31250)
    assert fwd.tc_flops == 2 * 64 * 64 * 7813 * 128 * D       # C padded to 7813 tiles of 128
    assert df.tc_flops == 6 * B * 31250 * 32 * D == 6 * B * C * D
    assert dw.tc_flops == 6 * B * 15625 * 64 * D == 6 * B * C * D
    assert fwd.l2 == 7813 * Fb + 64 * W + 2 * B * 12 + 3 * 2 * B * 4
    # tritonbwd's table: F q·⌈C/BN⌉·B·D·e, W (q + 1)·⌈B/BB⌉·C·D·e, 1/‖W‖ 2q·⌈B/BB⌉·C·4
    assert df.l2 == (2 * 31250 * Fb + 3 * 64 * W + 4 * 64 * C * 4 + 2 * B * 24 + B * D * 4
                     + B * 4)
    # F (q + 1)·⌈C/BN⌉·B·D·e, W (q·⌈B/BB⌉ + 1)·C·D·e, grad_W C·D·e
    assert dw.l2 == (3 * 15625 * Fb + (2 * 64 + 1) * W + (2 * 64 + 2) * C * 4
                     + 15625 * 2 * B * 24 + W)
    # a class tile's 2 chunk programs are 15625 apart: in different waves, so W streams from
    # HBM twice (50 MiB of L2 holds 5 % of the 1.02 GB of W); fwd and dF read it once
    hit = h100.l2_bytes / W
    assert dw.hbm == pytest.approx(W + W * (1 - hit) + Fb + C * 4 + B * 24 + W)
    assert fwd.hbm == W + Fb + B * 12 + 3 * 2 * B * 4
    assert sum(x.tc_flops for x in la.values()) == pytest.approx(14 * B * C * D, rel=1e-4)
    # fp32: dF BLOCK_DO 256 (q = 2), dW 128 (q = 4): 2 + 6 + 10 = 18·B·C·D, on 3×TF32
    la = _by_name(pm.triton_launches(B, C, D, "float32", h100))
    assert la[DW].tc_flops == 3 * 10 * B * C * D and la[DW].grid == 15625 * 4   # 64-class tiles
    assert la[DF].tc_flops == 3 * 6 * B * C * D and la[DF].unit == "tf32"


def test_triton_w_streams_again_in_a_later_wave():
    """bf16 on H100, C = 1M, D = 512: 256 row tiles of the forward fill two waves of 132 (97 %:
    one split), so the second wave streams W again from HBM (it does not fit in L2) — B = 16384
    for margin_lse.py's 64-row tiles, B = 32768 for resident.py's 128-row ones (which also read
    1/‖W‖, 4 bytes per class)."""
    C, D = 1_000_000, 512
    h100 = pm.GPUS["h100"]
    W = C * D * 2
    again = W - W * h100.l2_bytes / W
    B = 16384
    with configs.force(resident=False):
        fwd = _by_name(pm.triton_launches(B, C, D, "bfloat16", h100))[FWD]
    assert fwd.grid == 256
    assert fwd.hbm == pytest.approx(W + again + B * D * 2 + B * 12 + 3 * B * 4)
    B = 32768
    fwd = _by_name(pm.triton_launches(B, C, D, "bfloat16", h100))[FWD_RES]
    assert fwd.grid == 256
    assert fwd.hbm == pytest.approx(W + again + B * D * 2 + C * 4 + B * 12 + 3 * B * 4)


def test_triton_unaligned_d_uses_the_unaligned_tables():
    """D = 500 (not a multiple of 16): the launcher's _unaligned tables (32×32×32 forward, one
    stage; dF BLOCK_DO 128: 4 chunks), D padded to whole BLOCK_D steps in the S tile."""
    assert pm.triton_variant("bfloat16", 500) == "half_unaligned"
    assert pm.triton_variant("float32", 512) == "fp32"
    la = _by_name(pm.triton_launches(1024, 100_000, 500, "bfloat16", pm.GPUS["a100"]))
    assert la[FWD].tc_flops == 2 * 1024 * 100_000 * 512         # 500 → 16 steps of 32
    # dF: q = 4 chunks of 128: S over the padded D (512) per chunk + the chunk GEMMs
    assert la[DF].tc_flops == 2 * 4 * 1024 * 100_000 * (512 + 128)


RESIDENT_STEP = ["forward: torch fills (lse_neg = −inf, dot_y = 0)", "forward: norm (1/‖W_r‖, C fp32)",
                 FWD_RES, "merge (splits → lse_neg, dot_y)",
                 "backward: torch zeros (grad_f, grad_scale)", "norm (1/‖W_r‖, C fp32)", DF_RES,
                 DW_RES, "backward: torch sum of the dF / grad_scale partials over splits",
                 "backward: dF .to(bfloat16)"]


def test_resident_small_shape_counts_by_hand():
    """B=200, C=1000, D=256 bf16 on H100: resident.py's kernels (one D chunk: c = 256, q = 1),
    the backward forced to resident.py's (at D = 256 the launcher takes chunked.py's),
    configs.py's "resident" tiles and their sm_90 AOT figures (fwd and dW: D = 512's,
    conservative; dF 128×32 runs at D ≤ 256 only: D = 256's), one CTA per SM. fwd 128×64
    (configs.RESIDENT_WIDE_FWD, all of F a register operand at D = 256): 2 row tiles × 16 column
    tiles, 4 splits (≥ 4 column tiles each: 8 programs); dF 128×32: 2 × 32 column tiles, the most
    efficient plan with ≥ 4 column tiles per split is 8 splits (16 programs). dW 128 classes × 16
    rows: 8 class tiles, 13 row tiles each."""
    from marginops.triton import configs

    B, C, D, e = 200, 1000, 256, 2
    W, Fb = C * D * e, B * D * e                     # 512000, 102400 bytes
    h100 = pm.GPUS["h100"]
    with configs.force(chunked=False):
        launches = pm.triton_launches(B, C, D, "bfloat16", h100)
    assert [x.name for x in launches] == RESIDENT_STEP
    la = _by_name(launches)
    fwd, df, dw = la[FWD_RES], la[DF_RES], la[DW_RES]
    assert (fwd.grid, fwd.regs, fwd.smem, fwd.threads) == (8, 240, 196608, 256)
    assert (df.grid, df.regs, df.smem) == (16, 247, 131072)
    assert (dw.grid, dw.regs, dw.smem) == (8, 245, 164288)
    assert [pm.occupancy(x, h100) for x in (fwd, df, dw)] == [1, 1, 1]
    logits = 2 * 128 * 32 * 32                       # padded: 256 rows × 1024 columns
    assert fwd.tc_flops == 2 * logits * D == 134_217_728
    assert fwd.alu_flops == 12 * logits and fwd.exps == logits   # no ‖W‖² (norm kernel's 1/‖W‖)
    # F once per split (4), W and its 1/‖W‖ once per row tile (2), the row vectors and the
    # (m, s, dot_y) partials per split
    assert fwd.l2 == 4 * Fb + 2 * (W + C * 4) + 4 * B * 12 + 3 * 4 * B * 4 == 1_460_800
    assert fwd.hbm == W + Fb + C * 4 + B * 12 + 3 * 4 * B * 4 == 630_400
    # dF: S over D (2·128·32·256) and the chunk's dd·W (2·128·32·256) per tile: 4·B·C·D padded;
    # the (8, B, D) fp32 partial and (8, B) grad_scale written once
    assert df.tc_flops == 4 * logits * D == 268_435_456
    assert df.alu_flops == (20 + 1) * logits and df.exps == logits
    assert df.l2 == (8 * Fb + 2 * (W + C * 4) + 8 * B * 24 + 8 * B * D * 4
                     + 8 * B * 4) == 3_534_400
    assert df.hbm == W + Fb + C * 4 + B * 24 + 8 * B * D * 4 + 8 * B * 4 == 2_268_000
    # dW: 13 row tiles of 16 × 8 class tiles of 128, S and G per tile; F and the row vectors
    # once per program, W resident + the Jacobian's reload, 1/‖W‖ once, grad_W written in bf16
    assert dw.tc_flops == 4 * (13 * 16 * 8 * 128) * D == 218_103_808
    assert dw.alu_flops == 20 * 13 * 16 * 8 * 128 + 4 * C * D
    assert dw.l2 == 8 * Fb + 2 * W + C * 4 + 8 * B * 24 + W == 2_397_600
    assert dw.hbm == W + Fb + C * 4 + B * 24 + W == 1_135_200
    # both passes normalise W first (reads W, writes C fp32)
    assert la["forward: norm (1/‖W_r‖, C fp32)"].hbm == la["norm (1/‖W_r‖, C fp32)"].hbm == W + C * 4
    # shared memory per tile step (every GEMM chained or 128-row: two warpgroups along M, each
    # reading its 64 rows of A and all of B): fwd S = F·Wᵀ with F in registers, 2·64·D·e of
    # B + W's cp.async write 64·D·e; dF S = F·Wᵀ (128 + 2·32)·D·e + W's write 32·D·e + dd·W
    # with dd in registers, B = W's 32 × 256 chunk read by both warpgroups; dW S = W·Fᵀ
    # (128 + 2·16)·D·e + F's write 16·D·e + ddᵀ·F (2·16·256·e)
    assert fwd.smem_io == 32 * (128 * D * e + 64 * D * e) == 3_145_728
    assert df.smem_io == 64 * (192 * D * e + 32 * D * e + 2 * 256 * 32 * e) == 9_437_184
    assert dw.smem_io == 104 * (160 * D * e + 16 * D * e + 2 * 256 * 16 * e) == 11_075_584


def test_resident_target_shape_counts_by_hand():
    """B=4096, C=1M, D=512 bf16 on H100. fwd and dW hold D as two chunks of 256 (q = 2): dW
    (2q + 2)·B·C·D = 6·B·C·D (each chunk program recomputes the whole S); dF holds all of D in
    one 64-row tile (configs.RESIDENT_WIDE_DF, UNCHAINED): 4·B·C·D. 12·B·C·D in all; at
    D = 256 (q = 1) 4·B·C·D each, 10·B·C·D in all. fwd: 32 row tiles × 4 splits = 128 programs
    (one wave, 97 %); dF: 64 row tiles × 2 splits = 128; dW: 7813 class tiles × 2 chunks."""
    from marginops.triton import configs

    B, C, D, e = 4096, 1_000_000, 512, 2
    W, Fb = C * D * e, B * D * e
    h100 = pm.GPUS["h100"]
    with configs.force(chunked=False):  # at D = 512 the launcher takes chunked.py's backward
        la = _by_name(pm.triton_launches(B, C, D, "bfloat16", h100))
        _, launches, _, _ = pm.model(B, C, D, "bfloat16", h100, "triton")
    fwd, df, dw = la[FWD_RES], la[DF_RES], la[DW_RES]
    assert (fwd.grid, df.grid, dw.grid) == (128, 128, 15626)
    assert (df.regs, df.smem) == (255, 135424)
    assert fwd.tc_flops == 2 * B * C * D                       # 31250 tiles of 32: no padding
    assert df.tc_flops == 2 * B * C * (D + 512) == 4 * B * C * D
    assert dw.tc_flops == 6 * B * 7813 * 128 * D               # C padded to 7813 tiles of 128
    assert fwd.l2 == 4 * Fb + 32 * (W + C * 4) + 4 * B * 12 + 3 * 4 * B * 4
    assert fwd.hbm == W + Fb + C * 4 + B * 12 + 3 * 4 * B * 4   # one wave: W once
    # F once per program (64 row tiles × 2 splits), W and 1/‖W‖ once per row tile (the
    # resident.py docstring's ⌈B/BLOCK_B⌉·C·D·e)
    assert df.l2 == 2 * Fb + 64 * (W + C * 4) + 2 * B * 24 + 2 * B * D * 4 + 2 * B * 4
    assert df.hbm == W + Fb + C * 4 + B * 24 + 2 * B * D * 4 + 2 * B * 4
    # F once per program (7813 × 2), W resident in both chunk programs + the Jacobian's reload
    assert dw.l2 == 7813 * 2 * Fb + 3 * W + 2 * C * 4 + 7813 * 2 * B * 24 + W
    # a class tile's 2 chunk programs are 7813 apart: different waves, W streams twice (50 MiB
    # of L2 holds 5 % of the 1.02 GB of W)
    assert dw.hbm == pytest.approx(W + W * (1 - h100.l2_bytes / W) + Fb + C * 4 + B * 24 + W)
    # shared memory per tile step: fwd 128×32, two warpgroups along M; dF 64×32 UNCHAINED: the
    # warpgroups side by side along N, each reading all 64 rows of F and its 16 columns of W
    # (2·64 + 32)·D·e, W's write, dd·W with B = W's 32 × 512 split between them (32·D·e), dd
    # exchanged (written once, read by both: 3·64·32·e); dW per chunk as at D = 256
    # fwd 128×64 (configs.RESIDENT_WIDE_FWD): F's first 256 columns are a register operand
    # (REG0), so A is read from shared memory for the second chunk only: (128 + 2·64)·256·e for
    # it, 2·64·256·e for the first chunk's B, W's write 64·D·e
    assert fwd.smem_io == 32 * 15625 * (256 * 256 * e + 128 * 256 * e + 64 * D * e)
    assert df.smem_io == 64 * 31250 * ((2 * 64 + 32) * D * e + 32 * D * e + 32 * D * e
                                       + 3 * 64 * 32 * e)
    assert dw.smem_io == 2 * 7813 * 256 * (160 * D * e + 16 * D * e + 2 * 256 * 16 * e)
    assert sum(x.tc_flops for x in la.values()) == pytest.approx(12 * B * C * D, rel=1e-4)
    with configs.force(chunked=False):
        at_256 = pm.triton_launches(B, C, 256, "bfloat16", h100)
    assert sum(x.tc_flops for x in at_256) == pytest.approx(10 * B * C * 256, rel=1e-4)
    # one CTA per SM everywhere (the GEMM and epilogue times add up); at 32 or 16 columns per
    # warpgroup the backward's operand reads outlast the tensor cores (0.058-0.063 B per FLOP
    # against the H100's 128 B per 4096 FLOP per SM clock), the forward's do not (0.031)
    bounds = {x.name: x.out["bound"] for x in launches}
    assert bounds[DF_RES] == bounds[DW_RES] == "shared memory + epilogue (1 CTA/SM)"
    assert bounds[FWD_RES] == "tensor + epilogue (1 CTA/SM)"


DD = "dd (F resident, S = F·Wᵀ, dd' = ∂/∂d ÷ ‖W‖ stored per chunk)"
DF_GEMM = "df_gemm (dF[split] += dd'·W[chunk], K = the chunk's classes)"
DW_GEMM = "dw_gemm (grad_W[chunk] = dd'ᵀ·F − ŵ Σ dd'·d, K = the batch)"


def test_chunked_backward_target_shape_counts_by_hand():
    """B=4096, C=1M, D=512 bf16 on H100, chunked.py's backward: chunks of CC = 64·132 = 8448
    classes (66 tiles of 128; 4096 × 8448 bf16 = 66 MiB ≤ 128 MiB, two would not fit): 119
    chunks, the last of 3136 = 49·64. dd: 32 row tiles × 4 splits (264 column tiles of 32 per
    chunk); dF: 32 × 2 tiles of 128 × 256 × 2 K splits (132 K tiles of 64 per chunk); dW: 66 × 2
    tiles per chunk (one wave). 2·B·C·D each: with the forward, 8·B·C·D."""
    B, C, D, e = 4096, 1_000_000, 512, 2
    W, Fb = C * D * e, B * D * e
    h100 = pm.GPUS["h100"]
    la = _by_name(pm.triton_launches(B, C, D, "bfloat16", h100))
    assert [x.name for x in la.values()][-5:-2] == [DD, DF_GEMM, DW_GEMM]
    dd, df, dw = la[DD], la[DF_GEMM], la[DW_GEMM]
    assert (dd.count, df.count, dw.count) == (119, 119, 119)
    assert (dd.grid, df.grid, dw.grid) == (128, 128, 132)
    assert (dd.regs, dd.smem, df.regs, df.smem, dw.regs, dw.smem) == (
        248, 139264, 250, 147456, 248, 147456)
    assert dd.tc_flops == df.tc_flops == 2 * B * C * D            # 31250 tiles, 15625 K tiles
    assert dw.tc_flops == 2 * 7813 * 128 * D * B                  # classes padded to 128
    assert sum(x.tc_flops for x in la.values()) == pytest.approx(8 * B * C * D, rel=1e-4)
    assert dd.alu_flops == 22 * B * C and dd.exps == B * C
    # dd: F once per program and chunk, W + 1/‖W‖ once per row tile, dd' (bf16) and the row
    # tiles' Σ dd'·d stored, the row vectors read and grad_scale partials read and stored per
    # program (written to HBM once);
    # dd' to HBM; shared memory per 128×32 tile step: F's first chunk a register operand (REG0),
    # so A read for the second chunk only ((128 + 2·32)·256·e), B for the first (2·32·256·e),
    # W's write (32·D·e); and dd' through shared memory to the store layout
    assert dd.l2 == (119 * 4 * Fb + 32 * (W + C * 4) + B * C * e + 32 * C * 4
                     + 119 * 4 * B * (24 + 8))
    assert dd.hbm == W + Fb + C * 4 + B * 24 + B * C * e + 32 * C * 4 + 4 * B * 4
    assert dd.smem_io == (32 * 31250 * (192 * 256 * e + 64 * 256 * e + 32 * D * e)
                          + 2 * B * C * e)
    # the GEMMs: (128 + 256) rows of operands × K per output tile; dF's (2, B, D) fp32 partial
    # written on the first chunk, read and written on the others
    partial = 2 * B * D * 4
    assert df.l2 == 64 * 384 * C * e + (2 * 119 - 1) * partial
    assert df.hbm == B * C * e + partial
    assert dw.l2 == (7813 * 2) * 384 * B * e + 2 * W + 32 * C * 4 + C * 4
    assert dw.hbm == B * C * e + 2 * W + C * 4
    # per 128 × 256 tile and k: both warpgroups read their 64 rows of A and all 256 columns of B
    # (2·256 + 128)·e, plus the cp.async writes (128 + 256)·e
    assert df.smem_io == 64 * C * (640 + 384) * e
    assert dw.smem_io == 7813 * 2 * B * (640 + 384) * e
    _, launches, _, _ = pm.model(B, C, D, "bfloat16", h100, "triton")
    bounds = {x.name: x.out["bound"] for x in launches}
    assert bounds[DF_GEMM] == bounds[DW_GEMM] == "L2"
    assert bounds[DD] == "shared memory + epilogue (1 CTA/SM)"


def test_wgmma_layouts_follow_tritons_rule():
    """The warpgroup layouts the shared-memory counts assume (Triton's warpsPerTileV3, checked
    against compiled kernels in tests/test_triton_aot.py): a chained dot puts every warp along
    M; a lone dot splits M into 16-row warps first, then N."""
    assert pm.wgmma_groups(128, 8, chained=True) == (2, 1)
    assert pm.wgmma_groups(64, 8, chained=True) == (2, 1)      # both warpgroups on the same rows
    assert pm.wgmma_groups(128, 8, chained=False) == (2, 1)
    assert pm.wgmma_groups(64, 8, chained=False) == (1, 2)
    assert pm.wgmma_groups(64, 4, chained=False) == (1, 1)
    assert pm.gemm_smem(64, 32, 512, 2, (1, 2)) == (2 * 64 + 32) * 512 * 2
    assert pm.gemm_smem(128, 256, 32, 2, (2, 1), a_smem=False) == 2 * 256 * 32 * 2
    # one warpgroup over 128 rows issues two 64-row wgmmas, each reading B
    assert pm.gemm_smem(128, 32, 512, 2, (1, 1)) == (128 + 2 * 32) * 512 * 2


def test_shared_memory_roof_joins_the_gemm_side_of_the_one_cta_rule():
    """A GEMM slower in shared memory than on the tensor cores takes the shared-memory time;
    with one CTA per SM the epilogue adds to it."""
    h100 = pm.GPUS["h100"]
    kw = dict(tc_flops=989.4e12, exps=h100.exp_rate * 0.25, l2=1.0, hbm=1.0,
              smem_io=2 * h100.smem_bw)
    one = pm.predict(pm.Launch("k", grid=132, threads=256, regs=255, **kw), h100).out
    assert one["bound"] == "shared memory + epilogue (1 CTA/SM)"
    assert one["seconds"] == pytest.approx(2.25 + pm.LAUNCH_S)
    four = pm.predict(pm.Launch("k", grid=528, threads=128, regs=128, **kw), h100).out
    assert four["bound"] == "shared memory" and four["seconds"] == pytest.approx(2 + pm.LAUNCH_S)
    assert h100.smem_bw == 128 * 132 * 1.83e9


@pytest.mark.parametrize("gpu, dtype, K, D, resident", [
    ("h100", "bfloat16", 1, 512, True), ("h200", "bfloat16", 1, 256, True),
    ("h100", "bfloat16", 1, 128, True), ("a100", "bfloat16", 1, 512, False),
    ("h100", "float16", 1, 512, False), ("h100", "float32", 1, 512, False),
    ("h100", "bfloat16", 2, 512, False), ("h100", "bfloat16", 1, 1024, False),
    ("h100", "bfloat16", 1, 64, False), ("h100", "bfloat16", 1, 500, False)])
def test_resident_launches_where_the_launcher_takes_them(gpu, dtype, K, D, resident):
    """The model runs resident.py's kernels exactly where the launcher does (configs.variant:
    sm_90, bf16 features and weight, K = 1, D ∈ {128, 256, 512}, aligned). The model covers
    K = 1 only: for K = 2 the launcher's variant is checked, and the model's step is K = 1's."""
    import torch

    g = pm.GPUS[gpu]
    launcher = configs.variant(getattr(torch, dtype), K, D % 16 == 0,
                               weight_dtype=getattr(torch, dtype), dim=D, arch=g.arch)
    assert (launcher == "resident") == resident
    if K == 1:
        assert pm.triton_variant(dtype, D, g.arch) == launcher
        names = {x.name for x in pm.triton_launches(1024, 100_000, D, dtype, g)}
        # at D ≥ 256 the resident forward feeds chunked.py's backward (configs.chunked_applies)
        chunked = resident and D >= 256
        assert (FWD_RES in names) == resident
        assert ({DF_RES, DW_RES} <= names) == (resident and not chunked)
        assert ({DD, DF_GEMM, DW_GEMM} <= names) == chunked
        assert ({FWD, DF, DW} <= names) == (not resident)


def test_one_cta_per_sm_serialises_gemm_and_epilogue():
    """With one CTA per SM the epilogue (the larger of ALU and exp time) adds to the GEMM time;
    with two or more they overlap (the slowest roof)."""
    h100 = pm.GPUS["h100"]
    kw = dict(tc_flops=989.4e12, exps=h100.exp_rate * 0.25, alu_flops=66.9e12 * 0.5, l2=1.0,
              hbm=1.0)
    one = pm.predict(pm.Launch("k", grid=132, threads=256, regs=255, **kw), h100).out
    # 128 registers × 4 warps: 4 CTAs per SM, 528 slots: one whole wave
    two = pm.predict(pm.Launch("k", grid=528, threads=128, regs=128, **kw), h100).out
    assert one["ctas_per_sm"] == 1 and two["ctas_per_sm"] == 4
    assert one["seconds"] == pytest.approx(1.5 + pm.LAUNCH_S)
    assert two["seconds"] == pytest.approx(1.0 + pm.LAUNCH_S)


def test_cuda_fp32_counts_by_hand():
    """B=64, C=1000, D=32 fp32 on A100 (40 MiB L2): plan_chunks' budget is 20 MiB; 4 bytes per
    logit (DD is written over T) → 81920 columns, capped at C: one chunk; splits: ceil(4·108/64) =
    7 capped at 1000 // 256 = 3. fp32 GEMMs at torch's default: IEEE fp32 (CUDA cores)."""
    B, C, D = 64, 1000, 32
    a100 = pm.GPUS["a100"]
    assert pm.cuda_plan(B, C, D, "float32", a100) == (1000, 3)
    launches = pm.cuda_launches(B, C, D, "float32", a100)
    la = _by_name(launches)
    mm = la["forward: GEMM T = F·Wᵀ (cuBLAS, float32 in, fp32 out)"]
    assert mm.count == 1 and mm.unit == "fp32"
    assert mm.tc_flops == 2 * 64 * 1000 * 32 == 4_096_000
    # F re-read per 128-column tile (8), W per 128-row tile (1), T written once
    assert mm.l2 == 64 * 32 * 4 * 8 + 32 * 1000 * 4 * 1 + 64 * 1000 * 4 == 449_536
    # from HBM: W and F once; the tile stays in L2 (no spill)
    assert mm.hbm == 1000 * 32 * 4 + 64 * 32 * 4 == 136_192
    epi = la["backward: backward_epilogue_kernel (DD in float32) + sum_partials_kernel"]
    assert epi.count == 2 and epi.grid == 64 * 3
    # T read, DD written over it (fp32), 1/‖W‖ once per SM, (m, s, Σ) partials per split and row
    assert epi.l2 == 64 * 1000 * 4 * 2 + 108 * 1000 * 4 + 3 * 64 * 3 * 4 == 946_304
    assert sum(x.tc_flops for x in launches) == 8 * B * C * D   # 4 GEMMs, none on a copy
    assert all(x.unit == "fp32" for x in launches if x.tc_flops)
    assert not any("fp32 cop" in x.name or ".to(fp32)" in x.name for x in launches)


def test_cuda_bf16_counts_by_hand():
    """B=4096, C=10000, D=512 bf16 on H100 (50 MiB L2, budget 25 MiB): 6 bytes per logit (fp32 T +
    bf16 DD) → 26214400 // 24576 = 1066 → 1024 columns (whole 128-column tiles); 10 chunks, the
    last of 784; one split (4096 rows fill the SMs). GEMMs on the bf16 tensor cores, operands
    read straight from W and F: HBM sees W twice (forward, backward), F once, grad_W once."""
    B, C, D, e = 4096, 10000, 512, 2
    h100 = pm.GPUS["h100"]
    assert pm.cuda_plan(B, C, D, "bfloat16", h100) == (1024, 1)
    launches = pm.cuda_launches(B, C, D, "bfloat16", h100)
    la = _by_name(launches)
    W, Fb = C * D * e, B * D * e                                    # 10240000, 4194304
    tiles = 9 * 8 + 7                                              # 128-column tiles: 9 × 1024 + 784
    mm = la["forward: GEMM T = F·Wᵀ (cuBLAS, bfloat16 in, fp32 out)"]
    assert mm.count == 10 and mm.unit == "bf16"
    assert mm.l2 == Fb * tiles + W * (B // 128) + B * C * 4 == 822_870_016
    assert mm.hbm == W + Fb == 14_434_304
    df = la["backward: GEMM ∂F += DD·W_c (cuBLAS, fp32 accumulator)"]
    # DD (bf16) per 128-column tile of D (4), W per 128-row tile of B (32), ∂F read + written
    assert df.l2 == B * C * e * 4 + W * 32 + 10 * B * D * 4 * 2 == 823_132_160
    g = la["backward: GEMM G = DDᵀ·F (cuBLAS, fp32 out)"]
    assert g.l2 == B * C * e * 4 + Fb * tiles + C * D * 4 == 679_510_016
    wg = la["backward: weight_grad_kernel (Jacobian, grad_W in W's dtype)"]
    assert wg.grid == 1024 and wg.hbm == W
    assert sum(x.tc_flops for x in launches) == 8 * B * C * D
    assert all(x.unit == "bf16" for x in launches if x.tc_flops)
    # every HBM byte of the step: norms (W + 8 bytes per row) and T's GEMM per pass, F once,
    # grad_W, the zeroed fp32 ∂F and ∂scale, finalize, ∂F's cast to bf16 — no fp32 copy of W or F
    norms = W + 8 * C
    assert sum(x.hbm for x in launches) == (2 * norms + 2 * W + Fb + W + B * D * 4 + B * 4
                                           + 3 * B * 4 + B * D * 4 + Fb)


def test_cuda_fp16_normalises_a_chunk_for_the_feature_gradient():
    """fp16 (max 65504) cannot hold dd/‖W_r‖: the backward multiplies DD by a normalised fp16
    chunk instead, one extra launch per chunk (read W's chunk, write it: 2·C·D·2 bytes of L2);
    bf16 has fp32's range and reads W as it is."""
    h100 = pm.GPUS["h100"]
    half = _by_name(pm.cuda_launches(4096, 10000, 512, "float16", h100))
    extra = half["backward: load_chunk_kernel (normalised fp16 rows for ∂F)"]
    assert extra.count == 10 and extra.l2 == 2 * 10000 * 512 * 2 + 10000 * 4 and extra.hbm == 0
    assert not any("load_chunk" in x.name for x in pm.cuda_launches(4096, 10000, 512, "bfloat16",
                                                                    h100))


def test_cuda_tile_beyond_l2_spills_to_hbm():
    """B = 65536 bf16: 128 columns (the floor) × 6 bytes = 48 MiB > the 25 MiB budget; the
    excess share 1 − 25/48 of T goes to HBM and back."""
    B, C, D = 65536, 1000, 512
    h100 = pm.GPUS["h100"]
    assert pm.cuda_plan(B, C, D, "bfloat16", h100)[0] == 128
    mm = _by_name(pm.cuda_launches(B, C, D, "bfloat16", h100))[
        "forward: GEMM T = F·Wᵀ (cuBLAS, bfloat16 in, fp32 out)"]
    spill = 1 - (h100.l2_bytes / 2) / (B * 128 * 6)
    assert mm.hbm == pytest.approx(C * D * 2 + B * D * 2 + 2 * B * C * 4 * spill)


def test_naive_gemms_by_hand():
    B, C, D, e = 64, 1000, 32, 2
    la = _by_name(pm.naive_launches(B, C, D, "bfloat16", pm.GPUS["h200"]))
    cos = la["cos = x̂·Ŵᵀ (cuBLAS)"]
    assert cos.tc_flops == 2 * B * C * D and cos.unit == "bf16"
    assert cos.hbm == C * D * e + B * D * e + B * C * e == 196_096
    assert sum(x.tc_flops for x in la.values()) == 6 * B * C * D
    # fp32: torch's matmul default (allow_tf32 = False) runs cuBLAS on the CUDA cores, as the
    # cuda backend's model assumes (CUDA_FP32_TF32)
    fp32 = _by_name(pm.naive_launches(B, C, D, "float32", pm.GPUS["h200"]))
    assert {x.unit for x in fp32.values() if x.tc_flops} == {"fp32"}


def test_occupancy_and_waves_by_hand():
    h100 = pm.GPUS["h100"]
    # 194 registers × 8 warps: ceil(194·32/256)·256 = 6400 per warp, 65536 // 6400 = 10 warps,
    # one CTA of 8 warps per SM (shared memory would allow 228K // 57K = 3)
    big = pm.Launch("k", grid=320, threads=256, regs=194, smem=56 * 1024)
    assert pm.occupancy(big, h100) == 1
    out = pm.predict(big, h100).out
    assert out["waves"] == 3 and out["wave_eff"] == pytest.approx(320 / 396)
    small = pm.Launch("k", grid=1, threads=128, regs=128, smem=0)   # 4096 regs/warp: 16 warps
    assert pm.occupancy(small, h100) == 4
    by_smem = pm.Launch("k", grid=1, threads=128, regs=32, smem=100 * 1024)
    assert pm.occupancy(by_smem, h100) == 228 // 101


def test_roofline_picks_the_slowest_roof():
    h100 = pm.GPUS["h100"]
    la = pm.predict(pm.Launch("gemm", tc_flops=989.4e12, l2=1.0, hbm=1.0), h100)
    assert la.out["bound"] == "tensor"
    assert la.out["seconds"] == pytest.approx(1.0 + pm.LAUNCH_S)
    la = pm.predict(pm.Launch("copy", hbm=3.35e12, l2=3.35e12), h100)
    assert la.out["bound"] == "HBM" and la.out["seconds"] == pytest.approx(1.0 + pm.LAUNCH_S)
    # re-reads beyond the compulsory bytes miss L2 in proportion to the working set's excess
    la = pm.predict(pm.Launch("reuse", l2=1e9, hbm=0.0, reuse_set=2 * h100.l2_bytes), h100)
    assert la.out["hbm"] == pytest.approx(0.5e9)


@pytest.mark.parametrize("backend", ["auto", "triton", "cuda", "naive"])
@pytest.mark.parametrize("gpu", sorted(pm.GPUS))
def test_last_line_and_fraction(backend, gpu, capsys):
    assert pm.main(["--gpu", gpu, "--batch", "4096", "--classes", "1000000", "--dim", "512",
                    "--dtype", "bfloat16", "--backend", backend]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    m = LAST_LINE.match(lines[-1])
    assert m, lines[-1]
    assert float(m.group(1)) > 0
    assert 0.0 <= float(m.group(2)) <= 1.0
    auto = pm.auto_backend("bfloat16", pm.GPUS[gpu], (4096, 1_000_000, 512))[0]
    assert any(line.startswith("| fwd") for line in lines) == (
        backend == "triton" or (backend == "auto" and auto == "triton"))


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 1001, 500), (8192, 4_000_000, 512)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_fraction_in_unit_interval(shape, dtype):
    for backend in ("triton", "cuda", "naive"):
        _, launches, seconds, fraction = pm.model(*shape, dtype, "a100", backend)
        assert seconds > 0 and 0.0 <= fraction <= 1.0
        assert all(la.out["seconds"] > 0 for la in launches)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="dtype"):
        pm.model(8, 8, 8, "float64", "h100", "triton")
    with pytest.raises(ValueError, match="backend"):
        pm.model(8, 8, 8, "bfloat16", "h100", "torch")
    with pytest.raises(ValueError, match="B, C, D"):
        pm.model(0, 8, 8, "bfloat16", "h100", "triton")


def test_static_picks_are_the_models():
    """Without a gpu-check table, ``auto`` on CUDA picks marginops.backend_table.static_choice:
    MODEL_PICKS must be what this model predicts faster at every grid point. When a model change
    moves a pick, this fails: regenerate with ``python benchmarks/model.py --static-picks``."""
    from marginops import backend_table

    assert backend_table.MODEL_PICKS == pm.static_picks()
    assert backend_table.MODEL_SHAPE == (4096, 1 << 20, 512)


@pytest.mark.parametrize("gpu", sorted(pm.GPUS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_static_auto_order_is_the_models_choice(gpu, dtype):
    """At gpu-check's sweep points (B 1024–8192, C 100K–4M, D = 512; exact sizes, not buckets)
    and at D = 128, what ``auto`` picks without a table is what the model predicts faster on
    each modelled GPU (the H200 reads the H100's picks: same arch)."""
    for D in (128, 512):
        for B in (1024, 2048, 4096, 8192):
            for C in (100_000, 1_000_000, 4_000_000):
                t = pm.model(B, C, D, dtype, gpu, "triton")[2]
                c = pm.model(B, C, D, dtype, gpu, "cuda")[2]
                auto = pm.model(B, C, D, dtype, gpu, "auto")[0]
                assert auto == ("triton" if t < c else "cuda"), (
                    f"{gpu} {dtype} B={B} C={C} D={D}: triton {t * 1e3:.3f} ms, cuda "
                    f"{c * 1e3:.3f} ms, auto picks {auto}")


@pytest.mark.parametrize("B", [1024, 4096, 8192])
def test_target_line_says_whether_the_model_meets_it(B, capsys):
    """Issue 12's target (≥ 0.5 of H100 dense bf16 peak at C = 1M, D = 512 for auto's backend):
    the report states the fraction and whether it is met; it is not tuned to be."""
    backend, _, _, fraction = pm.model(B, 1_000_000, 512, "bfloat16", "h100", "auto")
    pm.main(["--gpu", "h100", "--batch", str(B), "--classes", "1000000", "--dim", "512"])
    lines = capsys.readouterr().out.splitlines()
    met = "met" if fraction >= 0.5 else "NOT met"
    assert f"target: ≥ 0.5 of peak (issue 12) — {met} on this model ({fraction:.3f})" in lines
    assert lines[0].startswith(f"model: H100 SXM5 80GB, B={B} C=1000000 D=512 bfloat16, backend "
                               f"{backend}")
    assert any(line.startswith("largest: ") for line in lines)
