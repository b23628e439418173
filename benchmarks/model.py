"""Roofline performance model of one forward+backward of the margin-softmax loss on a GPU.

    python benchmarks/model.py --gpu h100 --batch 4096 --classes 1000000 --dim 512 --dtype bfloat16
    python benchmarks/model.py --gpu a100 ... --backend cuda      # triton | cuda | naive | auto

For every kernel launch of the step (``Launch``, benchmarks/model_roofline.py: for ``triton``,
benchmarks/model_triton.py: marginops/triton/resident.py's kernels where
configs.resident_applies — sm_90, bf16, K = 1, D ∈ {128, 256, 512}, with chunked.py's backward
at D = 512 (configs.chunked_applies) — else margin_lse.py's;
marginops/csrc/cuda/margin_lse.cu for ``cuda``; marginops.reference's ArcFace for ``naive``) it
counts the tensor-core FLOPs, the CUDA-core FLOPs, the exponentials, the bytes between the SMs
and L2, the bytes from HBM, the occupancy (CTAs per SM from registers and shared memory) and the
wave efficiency of its grid, and predicts its time. The last line printed is
``predicted: <ms> ms, <fraction> of peak``. These are predictions, not measurements:
``make gpu-check`` prints them beside measured times.

Assumptions (what the figures mean; change a constant to test another):

* Peaks are the public datasheet figures (``GPUS``: dense, no sparsity). A launch's time is the
  slowest of its five roofs — tensor cores, fp32 CUDA cores, MUFU exponentials (16 per SM per
  clock), L2 bandwidth, HBM bandwidth — i.e. perfect overlap inside a launch (optimistic: loads
  software-pipelined), divided by the wave efficiency ``grid / (waves · slots)`` (slots = SMs ×
  CTAs per SM: a CTA cannot use more than its SM's share), plus ``LAUNCH_S`` per launch. Launches
  do not overlap each other. Exception: with one CTA per SM, a kernel's GEMM time (tensor or
  shared-memory roof, the slower) and its epilogue time (the larger of fp32 ALU and exp) add
  up — nothing fills the tensor cores while the only CTA runs its epilogue (Triton does not
  warp-specialise these kernels).
* Shared memory (resident.py's kernels): ``smem_io`` counts the bytes their GEMMs move through
  shared memory per tile step — each warpgroup's wgmma operand reads (its rows of A unless A is
  in registers, its columns of B, the whole K), the streamed tile's cp.async write, and dd's
  exchange between warpgroups where the logit tile is split along N — with the warpgroup
  layouts Triton gives (``wgmma_groups``, checked against the compiled TTGIR by
  tests/test_triton_aot.py). Its roof is 128 bytes per SM per clock (32 banks × 4 bytes, the
  CUDA C++ Programming Guide's shared-memory model), ASSUMED to bound wgmma's operand reads too
  (no datasheet gives a wgmma figure); it joins the tensor roof as the GEMM side of the one-CTA
  rule below. margin_lse.py's kernels and cuBLAS are not given one: their L2 traffic bounds
  them first (margin_lse.py at the target shape: about 30 ms of shared memory against 66 ms of
  L2 for bwd_df), and cuBLAS's 128-wide tiles keep the operand reads under the tensor time.
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
* CUDA-core work of the epilogues is ``EPILOGUE_FWD`` / ``EPILOGUE_BWD`` fp32 operations per logit
  (scale, mask, max, subtract, margin, compare, select...; an estimate, not a count of SASS).
* cuBLAS calls (``cuda`` backend, naive loss) run at the peak of their dtype with 128 × 128 output
  tiles (their L2 traffic) and whole waves. The ``cuda`` backend's GEMMs take the inputs' dtype
  (bf16/fp16 on the tensor cores, fp32 output); fp32 follows torch's default
  ``allow_tf32 = False`` (``CUDA_FP32_TF32``): the fp32 CUDA-core peak.
* Triton fp32 inputs run ``tl.dot`` as 3×TF32 (three TF32 products) at the TF32 peak.
* Occupancy: registers allocated per warp in units of 256, 1 KB of shared memory reserved per CTA,
  at most 2048 threads and 32 CTAs per SM (marginops/triton/waves.py, which the launcher uses
  too). Triton kernels: registers and shared memory from waves.AOT_FIGURES (``triton.compile``
  for sm_80 / sm_90, Triton 3.9, the heaviest specialisation of the default configuration;
  checked against a fresh compile by tests/test_triton_launch.py); A100 uses the sm_80 figures,
  H100 / H200 the sm_90 ones; resident.py's kernels the figures at the largest D each
  configuration runs at (one CTA per SM each; conservative below it, as the launcher plans).
* Triton grids: the launcher's (margin_lse.py): class splits planned in whole waves by
  waves.plan_splits (the dF grid's D chunks counted), D chunks by waves.d_chunk (resident.py:
  configs.resident_meta — min(D, 256), but the feature gradient's 512 at D = 512).
* W from HBM (Triton): the programs of one wave that read the same rows of W (the row tiles of a
  class split; a class tile's D-chunk programs) read them once from HBM; a later wave reading
  them again streams them again, unless W fits in L2 (hit share min(1, L2 size / W bytes)).
  Operand re-reads within a wave are L2 traffic (``l2``), missing only as ``reuse_set`` says.
* Not modelled: the O(B)-sized torch ops of the loss around the core op (µs), the host, the
  ``triton`` autotuner (off by default), clocks below boost (power limits), L2 partitioning.

Figures (H100, B = 4096, C = 1M, D = 512, bf16; this model, not measured): ``triton`` 29.8 ms,
0.569 of peak, which ``auto`` picks (backend_table.MODEL_PICKS) — resident.py's forward (F's
first 256 columns a register operand: 5.5 ms, tensor-bound plus epilogue) and chunked.py's
backward (dd 7.8 ms, bound by shared memory plus epilogue; the dF GEMM 8.2 and the dW GEMM 7.7,
L2-bound: 8·B·C·D GEMM FLOPs in all); B = 1024 0.528, B = 8192 0.595: the issue's target
(≥ 0.5 for auto's backend at B ≥ 1024) is met on the model. resident.py's own backward
(``configs.force(chunked=False)``: 12·B·C·D) 51.7 ms, 0.328; ``cuda`` 73.2 ms, 0.232;
margin_lse.py's kernels (``configs.force(resident=False)``) 130.3 ms, 0.130. At D = 256 (the
same kernels, all of F in registers) 0.546 (15.5 ms), at D = 128 (resident.py's backward) 0.398.
benchmarks/README.md ("The GPU performance model") says where the time goes.

The useful work of a forward+backward is 8·B·C·D FLOPs (the logits once, the two gradient GEMMs,
and the logits again in the backward, which every streaming kernel pays). ``fraction of peak`` =
8·B·C·D / (dense tensor-core peak of the input dtype: bf16/fp16, TF32 for fp32) / predicted time.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (ROOT, HERE):   # configs.py imports nothing from triton or torch at module level
    if _path not in sys.path:
        sys.path.insert(0, _path)

from model_roofline import (  # noqa: E402, F401 - re-exported: the model API
    ELT,
    EPILOGUE_BWD,
    EPILOGUE_FWD,
    GPU,
    GPUS,
    LAUNCH_S,
    Launch,
    cdiv,
    limits,
    occupancy,
    predict,
)
from model_triton import (  # noqa: E402, F401 - re-exported
    gemm_smem,
    resident_launches,
    triton_launches,
    triton_variant,
    wgmma_groups,
)

TARGET = 0.5   # issue 12: forward+backward ≥ 50 % of dense tensor-core peak (auto's backend)




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
    splits = min(max(cdiv(4 * gpu.sms, B), 1), min(max(nc // 256, 1), 64))
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
    n = cdiv(C, nc)
    widths = ((nc, n - 1), (C - (n - 1) * nc, 1))   # (chunk width, chunks of that width)
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
        l2 = sum(count * (m(w) * k(w) * ea * cdiv(cols(w), 128)
                          + k(w) * cols(w) * eb * cdiv(m(w), 128)
                          + m(w) * cols(w) * 4 * (2 if accumulate else 1)) for w, count in widths)
        return Launch(name, count=n, tc_flops=2 * B * C * D, unit=unit, l2=l2, hbm=hbm)

    def norms(phase: str) -> Launch:
        return Launch(f"{phase}: row_norms_kernel (1/‖W_r‖, ‖W_r‖² of every row)",
                      grid=cdiv(C, 8), alu_flops=2 * C * D, l2=W + 8 * C, hbm=W + 8 * C)

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
                          grid=cdiv(nc * D, 256), alu_flops=C * D, l2=2 * W + C * 4, hbm=0.0))
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
    unit = "bf16" if e == 2 else ("tf32" if CUDA_FP32_TF32 else "fp32")   # torch's matmul default
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
    shape when the marginops cache has one, else this model's pick at the shape's power-of-two
    bucket (backend_table.MODEL_PICKS, from ``static_picks``), else triton, then cuda; triton only
    when Triton is installed."""
    from marginops import backend_table

    picked, why = None, "static order (no measurement, no model for this arch and dtype)"
    if gpu is not None and shape is not None:
        arch = f"{gpu.arch // 10}.{gpu.arch % 10}"
        picked = backend_table.choose(arch, dtype, *shape)
        why = f"measured fastest ({backend_table.table_path()})"
        if picked is None:
            picked = backend_table.static_choice(arch, dtype, *shape)
            gpu_name = backend_table.MODEL_GPUS.get(gpu.arch // 10, "?")
            why = (f"the model's faster on {gpu_name} at the power-of-two bucket of this shape, "
                   "no gpu-check table")
    picked = picked or "triton"
    if picked == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "cuda", "Triton not installed"
    return picked, why


def static_picks() -> dict[tuple[str, str], dict[int, str]]:
    """backend_table.MODEL_PICKS as this model computes it: per modelled GPU, dtype and D, one
    character per (B, C) of its grid (B-major), "t" where triton is predicted faster, else "c"."""
    from marginops import backend_table as bt

    out = {}
    for gpu in bt.MODEL_GPUS.values():
        for dtype in ELT:
            out[gpu, dtype] = {
                D: "".join("t" if model(B, C, D, dtype, gpu, "triton")[2]
                           < model(B, C, D, dtype, gpu, "cuda")[2] else "c"
                           for B in bt.MODEL_B for C in bt.MODEL_C)
                for D in bt.MODEL_D}
    return out


def static_picks_source() -> str:
    """``static_picks()`` as the Python source of backend_table.MODEL_PICKS."""
    from marginops import backend_table as bt

    n = len(bt.MODEL_C)
    lines = ["MODEL_PICKS: dict[tuple[str, str], dict[int, str]] = {"]
    for (gpu, dtype), by_d in static_picks().items():
        lines.append(f'    ("{gpu}", "{dtype}"): {{')
        for D, row in by_d.items():
            groups = [f'"{row[i:i + n]}"' for i in range(0, len(row), n)]
            head = f"        {D}: ("
            lines.append(head + " ".join(groups[:5]))
            lines.append(" " * len(head) + " ".join(groups[5:]) + "),")
        lines.append("    },")
    lines.append("}")
    return "\n".join(lines)


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
            "| shared-memory GB | L2 GB | HBM GB (L2 hit) | bound by | ms | note |")
    lines = [head, "|" + "---|" * 12]
    for la in launches:
        o = la.out
        occ = (f"{o['ctas_per_sm']} ({la.regs}, {la.smem / 1024:.1f})" if la.regs else
               (str(o["ctas_per_sm"]) if la.grid else "library"))
        lines.append(
            f"| {la.name} | {la.count} | {la.grid or ''} | {occ} | {o['wave_eff']:.0%} "
            f"| {la.tc_flops / 1e12:.2f} | {f'{la.smem_io / 1e9:.1f}' if la.smem_io else ''} "
            f"| {la.l2 / 1e9:.2f} | {o['hbm'] / 1e9:.2f} "
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
        kernels = ("resident.py's kernels (configs.resident_applies)"
                   if triton_variant(dtype, D, g.arch) == "resident" else "margin_lse.py's kernels")
        lines.append(f"note: triton: marginops/triton/{kernels}, default tiles; registers and "
                     "shared memory from waves.AOT_FIGURES (heaviest specialisation)")
    top = sorted(launches, key=lambda la: -la.out["seconds"])[:3]
    lines.append("largest: " + "; ".join(
        f"{la.name.split(' (')[0]} {la.out['seconds'] * 1e3:.1f} ms ({la.out['bound']}-bound)"
        for la in top))
    met = "met" if fraction >= TARGET else "NOT met"
    lines.append(f"target: ≥ {TARGET} of peak (issue 12) — {met} on this model ({fraction:.3f})")
    lines.append(f"useful work 8·B·C·D = {8 * B * C * D / 1e12:.2f} TFLOP")
    lines.append(f"predicted: {seconds * 1e3:.3f} ms, {fraction:.3f} of peak")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--batch", type=int)
    p.add_argument("--classes", type=int)
    p.add_argument("--dim", type=int)
    p.add_argument("--dtype", choices=sorted(ELT), default="bfloat16")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--static-picks", action="store_true",
                   help="print marginops/backend_table.py's MODEL_PICKS as this model computes it")
    args = p.parse_args(argv)
    if args.static_picks:
        print(static_picks_source())
        return 0
    missing = [f"--{n}" for n in ("batch", "classes", "dim") if getattr(args, n) is None]
    if missing:
        p.error(f"{', '.join(missing)} required (or --static-picks)")
    print(report(args.batch, args.classes, args.dim, args.dtype, args.gpu, args.backend))
    return 0


if __name__ == "__main__":
    sys.exit(main())
