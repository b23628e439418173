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


def test_triton_bf16_counts_by_hand():
    """B=128, C=1024, D=64 bf16 on H100, the design's 64×64 tiles (8 warps, 2 stages) for both
    kernels: accumulator 64·64/256 = 16 registers per thread, S tile 16, + 64 overhead = 96;
    staged operands (64 + 2·64)·64·2 = 24 KB: 2 CTAs per SM (registers), 264 slots. Forward:
    2 row tiles × 16 column tiles; whole waves are out of reach (32 tile steps for 264 slots), so
    the most efficient split count wins: 4 (at least 4 column tiles per split), grid 8."""
    B, C, D, e = 128, 1024, 64, 2
    W, Fb = C * D * e, B * D * e                     # 131072, 16384 bytes
    la = _by_name(pm.triton_launches(B, C, D, "bfloat16", pm.GPUS["h100"]))
    fwd = la["fwd (logits + online softmax + u = P·Ŵ)"]
    assert (fwd.grid, fwd.regs, fwd.smem) == (8, 96, 24576)
    assert pm.occupancy(fwd, pm.GPUS["h100"]) == 2
    assert fwd.tc_flops == 4 * 128 * 1024 * 64 == 33_554_432     # S = F·Ŵᵀ and u += P·Ŵ
    # W once per row tile (staged: feeds both GEMMs), F once per program (4 splits), 1/‖W‖ per
    # row tile, per split and row: m, s, dot_y, σ and u (D) in fp32
    partials = 4 * 128 * (4 * 4 + 64 * 4)
    assert fwd.l2 == 2 * W + 4 * Fb + 2 * C * 4 + partials == 475_136
    assert fwd.hbm == W + Fb + C * 4 + partials == 290_816
    assert fwd.exps == B * C
    dw = la["bwd_dw (recompute + G = ddᵀ·F + Jacobian)"]
    assert dw.grid == 16 and dw.tc_flops == 33_554_432
    # W once (staged, resident), F once per class tile (16), lse / grad_lse / scale per class
    # tile, 1/‖W‖ once, grad_W written once in bf16
    assert dw.l2 == W + 16 * Fb + 3 * B * 4 * 16 + C * 4 + W == 552_960
    assert dw.hbm == W + Fb + C * 4 + 3 * B * 4 + W == 284_160
    assert sum(x.tc_flops for x in la.values()) == 8 * B * C * D   # the 8·B·C·D design


def test_triton_operands_chunked_when_shared_memory_is_short():
    """D = 512 on the A100 (164 KB per SM): staging needs (64 + 2·64)·512·2 = 192 KB, so operands
    are loaded per GEMM in 64-wide chunks: W twice per row tile in the forward, F twice per class
    tile in the weight gradient. On the H100 (228 KB) they are staged."""
    B, C, D, e = 1024, 100_000, 512, 2
    W, Fb = C * D * e, B * D * e
    rt, ct, nt = 16, 1563, 1563
    for gpu, staged in (("a100", False), ("h100", True)):
        la = _by_name(pm.triton_launches(B, C, D, "bfloat16", pm.GPUS[gpu]))
        fwd, dw = la["fwd (logits + online softmax + u = P·Ŵ)"], la[
            "bwd_dw (recompute + G = ddᵀ·F + Jacobian)"]
        assert ("D staged" in fwd.note) == staged and ("D staged" in dw.note) == staged
        s = fwd.grid // rt
        partials = s * B * (4 * 4 + D * 4)
        w_reads = rt * W if staged else 2 * rt * W
        f_reads = s * Fb if staged else ct * Fb
        assert fwd.l2 == w_reads + f_reads + rt * C * 4 + partials
        w_reads = W if staged else rt * W + W
        f_reads = nt * Fb if staged else 2 * nt * Fb
        assert dw.l2 == w_reads + f_reads + 3 * B * 4 * nt + C * 4 * (1 if staged else rt) + W


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
    assert any(line.startswith("| fwd (logits") for line in lines) == (
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


@pytest.mark.parametrize("gpu", sorted(pm.GPUS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_static_auto_order_is_the_models_choice(gpu, dtype):
    """Without a gpu-check table, ``auto`` on CUDA picks triton before cuda (marginops.core): that
    must be what the model predicts faster over gpu-check's sweep (B 1024–8192, C 100K–4M,
    D = 512). When a model change makes cuda faster somewhere, this fails: the static order (or a
    shape rule in marginops/backend_table.py) must follow the model."""
    for B in (1024, 2048, 4096, 8192):
        for C in (100_000, 1_000_000, 4_000_000):
            t = pm.model(B, C, 512, dtype, gpu, "triton")[2]
            c = pm.model(B, C, 512, dtype, gpu, "cuda")[2]
            assert t < c, f"{gpu} {dtype} B={B} C={C}: cuda {c * 1e3:.3f} ms < triton {t * 1e3:.3f} ms"


@pytest.mark.parametrize("B", [1024, 4096, 8192])
def test_target_on_the_model(B):
    """Issue 12's target, on the model: forward+backward ≥ 50 % of H100 dense bf16 peak at
    C = 1M, D = 512 for the backend auto picks (without a gpu-check table)."""
    backend, _, _, fraction = pm.model(B, 1_000_000, 512, "bfloat16", "h100", "auto")
    assert fraction >= 0.5, (backend, fraction)
