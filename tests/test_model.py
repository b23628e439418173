"""benchmarks/model.py, the GPU roofline model: FLOP and byte counts against hand computation for
two shapes, occupancy and wave arithmetic, the ``predicted:`` last line, fraction in [0, 1].

Fast and GPU-free: ``aot=False`` uses the model's constant register / shared-memory figures (the
AOT compilation path is exercised by ``python benchmarks/model.py``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("perfmodel", os.path.join(ROOT, "benchmarks",
                                                                         "model.py"))
pm = importlib.util.module_from_spec(_spec)
sys.modules["perfmodel"] = pm   # dataclasses look their module up while the class is built
_spec.loader.exec_module(pm)

LAST_LINE = re.compile(r"^predicted: (\d+\.\d{3}) ms, (\d\.\d{3}) of peak$")


def _by_name(launches):
    return {la.name: la for la in launches}


def test_triton_bf16_counts_by_hand():
    """B=128, C=1024, D=64 bf16 on H100: 2 row tiles × 8 column tiles of 64×128; pick_splits:
    want ceil(2·132/2) = 132 capped at 8 // 4 = 2 splits, so the forward grid is 2 × 2."""
    B, C, D, e = 128, 1024, 64, 2
    W, Fb = C * D * e, B * D * e                     # 131072, 16384 bytes
    la = _by_name(pm.triton_launches(B, C, D, "bfloat16", pm.GPUS["h100"], aot=False))
    fwd = la["_fwd_kernel"]
    assert fwd.grid == 4
    assert fwd.tc_flops == 2 * 128 * 1024 * 64 == 16_777_216
    # W once per row tile (2), F once per column tile (8), 3 fp32 partials per split and row
    assert fwd.l2 == 2 * W + 8 * Fb + 3 * 2 * 128 * 4 == 396_288
    assert fwd.hbm == W + Fb + 3 * 2 * 128 * 4 == 150_528
    assert fwd.exps == B * C
    df = la["_bwd_df_kernel"]
    assert df.tc_flops == 4 * 128 * 1024 * 64 == 33_554_432
    # W twice per row tile (recompute, dd·W), F per column tile, 1/‖W‖ twice per row tile, the
    # fp32 dF chunk read and written per column tile, grad_scale partials
    assert df.l2 == (2 * 2 * W + 8 * Fb + 2 * 2 * C * 4 + 8 * B * D * 4 * 2
                     + 2 * B * 4) == 1_197_056
    dw = la["_bwd_dw_kernel"]
    assert dw.grid == 8
    assert dw.tc_flops == 33_554_432
    # W and 1/‖W‖ per row tile (2), F twice per class tile (8), fp32 G read + written per row
    # tile; epilogue: W and G twice, grad_W once
    assert dw.l2 == (2 * W + 2 * C * 4 + 2 * 8 * Fb + 2 * C * D * 8
                     + (3 * W + 2 * C * D * 4)) == 2_498_560
    # compulsory: W, F, the fp32 accumulator read (zeros) and written back, grad_W in bf16
    assert dw.hbm == W + Fb + C * D * 8 + W == 802_816
    gemm_flops = sum(x.tc_flops for x in la.values())
    assert gemm_flops == 10 * B * C * D   # today's kernels: 10·B·C·D, not the 8·B·C·D floor


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
                    "--dtype", "bfloat16", "--backend", backend, "--no-aot"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    m = LAST_LINE.match(lines[-1])
    assert m, lines[-1]
    assert float(m.group(1)) > 0
    assert 0.0 <= float(m.group(2)) <= 1.0
    assert any(line.startswith("| _fwd_kernel") for line in lines) == (
        backend == "triton" or (backend == "auto" and pm.auto_backend("bfloat16") == "triton"))


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 1001, 500), (8192, 4_000_000, 512)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_fraction_in_unit_interval(shape, dtype):
    for backend in ("triton", "cuda", "naive"):
        _, launches, seconds, fraction = pm.model(*shape, dtype, "a100", backend, aot=False)
        assert seconds > 0 and 0.0 <= fraction <= 1.0
        assert all(la.out["seconds"] > 0 for la in launches)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="dtype"):
        pm.model(8, 8, 8, "float64", "h100", "triton", aot=False)
    with pytest.raises(ValueError, match="backend"):
        pm.model(8, 8, 8, "bfloat16", "h100", "torch", aot=False)
    with pytest.raises(ValueError, match="B, C, D"):
        pm.model(0, 8, 8, "bfloat16", "h100", "triton", aot=False)
