"""The ``triton`` backend's launches for benchmarks/model.py: marginops/triton/margin_lse.py's
kernels (``triton_launches``) and, where configs.resident_applies, resident.py's
(``resident_launches``), with their grids, occupancy and HBM passes planned as the launcher plans
them (waves.py). model.py's docstring states the assumptions the counts follow.
"""

from __future__ import annotations

from model_roofline import ELT, EPILOGUE_BWD, EPILOGUE_FWD, GPU, Launch, cdiv, limits

from marginops.triton import configs, waves

# ----------------------------------------------------------------------------- the Triton kernels
#
# marginops/triton/margin_lse.py as merged (its module docstring has the cost table these formulas
# follow): the default tiles of the launch's variant (configs.py), occupancy from waves.AOT_FIGURES
# (heaviest specialisation: the ArcFace kernel needs no more registers), the launcher's splits
# (waves.plan_splits, counting the dF grid's D chunks) and D chunks (waves.d_chunk). The step:
# weight normalisation on; no bias, class_index, hard negatives or filtering; K = 1; W in the
# features' dtype. Forward: torch fills, _fwd_kernel (rt × s; ‖W_r‖² summed from the W tiles it
# loads, once per row tile), _merge_kernel. Backward: torch zeros (grad_f is filled, then
# replaced), _inv_norm_kernel, _bwd_df_kernel (rt × s × q, q = ⌈D / BLOCK_DO⌉: each chunk program
# recomputes S over the whole D), _bwd_dw_kernel (nt × q, each looping over the batch), torch's
# sum of the dF partials over splits and cast. GEMM FLOPs (padded tiles): forward 2·B·C·D, each
# backward kernel (2q + 2)·B·C·D: 14·B·C·D in all at D = 512 in half precision (BLOCK_DO = 256).

ROW_BYTES_FWD = 12    # per batch row a forward program loads: scale (fp32), target column (int64)
ROW_BYTES_BWD = 24    # ... a backward program: scale, target column, lse, grad_lse, grad_dot
SCALE_OPS = 3         # CUDA-core ops per W element the dF kernel normalises in registers
                      # (convert, multiply by 1/‖W_r‖, convert back; estimate)
JACOBIAN_OPS = 4      # per grad_W element of the dW epilogue (estimate)
RESCALE_FP16_OPS = 3  # per dd element, fp16 only: the running operand scale (estimate)


def triton_variant(dtype: str, D: int, arch: int = 0) -> str:
    """configs.variant of the modelled step on ``arch`` (×10): "resident" where
    configs.resident_applies (bf16 on sm_90 at D ∈ {128, 256, 512}); else fp16/bf16 → "half",
    fp32 → "fp32"; D not a multiple of 16 → the "_unaligned" tables (the launcher's rules;
    16-byte aligned pointers assumed)."""
    if configs.resident_applies(dtype, dtype, 1, D, arch):
        return "resident"
    return ("fp32" if dtype == "float32" else "half") + ("" if D % 16 == 0 else "_unaligned")


def _triton_kernel(kernel: str, var: str, gpu: GPU, dim: int = 0
                   ) -> tuple[configs.KernelConfig, dict, int]:
    """(default configuration, Launch occupancy fields, programs resident on the GPU); resident.py's
    kernels at embedding width ``dim`` (configs.resident_config). The resident variant's norm and
    merge are margin_lse.py's kernels in the "half" configuration: its figures."""
    cfg = (configs.resident_config(kernel, dim) if var == "resident" and dim
           else configs.default(kernel, var))
    if var == "resident" and kernel in ("norm", "merge"):
        assert cfg == configs.default(kernel, "half"), kernel
        var = "half"
    regs, smem = waves.figures(gpu.arch, cfg, kernel, var)
    threads = 32 * cfg.num_warps
    slots = gpu.sms * waves.ctas_per_sm(regs, smem, threads, limits(gpu))
    return cfg, dict(threads=threads, regs=regs, smem=smem), slots


def _waves_touching(starts, length: int, slots: int) -> int:
    """Distinct waves (of ``slots`` programs, launched in program order) holding a program of
    [a, a + length) for some a in ``starts``: how often a region these programs read streams
    from HBM, if it does not stay in L2 between waves."""
    hit = set()
    for a in starts:
        hit.update(range(a // slots, (a + length - 1) // slots + 1))
    return len(hit)


def _w_from_hbm(region_passes: list[tuple[float, int]], W: float, gpu: GPU) -> float:
    """HBM bytes of W: every (bytes, passes) region once, and again in every later wave that reads
    it unless W stays in L2 meanwhile (hit share min(1, L2 size / W))."""
    again = sum(b * (p - 1) for b, p in region_passes)
    return W + again * (1.0 - min(1.0, gpu.l2_bytes / W))


def _split_grid_w(rt: int, s: int, q: int, t: int, BN: int, C: int, D: int, e: int, slots: int
                  ) -> list[tuple[float, int]]:
    """(W bytes, HBM passes) per class split of an rt × s (× q) grid (program rt·(σ + s·c) + r:
    row tile fastest, then split σ, then D chunk c): the row tiles of a split read its W rows
    together while they share a wave."""
    out = []
    for sigma in range(s):
        cols = max(0, min(t * BN, C - sigma * t * BN))
        starts = [rt * (sigma + s * c) for c in range(q)]
        out.append((cols * D * e, _waves_touching(starts, rt, slots)))
    return out


def triton_launches(B: int, C: int, D: int, dtype: str, gpu: GPU) -> list[Launch]:
    """The ``triton`` backend's launches of an ArcFace forward+backward (see above); the resident
    kernels (``resident_launches``) where configs.resident_applies says the launcher takes them."""
    var = triton_variant(dtype, D, gpu.arch)
    if var == "resident":
        return resident_launches(B, C, D, dtype, gpu)
    e = ELT[dtype]
    unit, mult = ("tf32", 3) if dtype == "float32" else ("bf16", 1)   # fp32: 3×TF32 products
    W, Fb = C * D * e, B * D * e
    fp16 = dtype == "float16"

    # forward: rt × s, S over D in BLOCK_D steps (a partial last step is a full tl.dot)
    fc, focc, fslots = _triton_kernel("fwd", var, gpu)
    rt, ct = cdiv(B, fc.block_b), cdiv(C, fc.block_n)
    s = waves.plan_splits(rt, ct, fslots)
    t = cdiv(ct, s)
    logits = rt * fc.block_b * ct * fc.block_n               # padded tiles
    d_pad = cdiv(D, fc.block_d) * fc.block_d
    fwd = Launch(
        "fwd (S = F·Wᵀ, ‖W‖² per row tile, online softmax)", grid=rt * s, **focc,
        tc_flops=2 * logits * d_pad * mult, unit=unit,
        alu_flops=EPILOGUE_FWD * logits + 2 * rt * ct * fc.block_n * d_pad, exps=logits,
        l2=ct * Fb + rt * W + s * B * ROW_BYTES_FWD + 3 * s * B * 4,
        hbm=_w_from_hbm(_split_grid_w(rt, s, 1, t, fc.block_n, C, D, e, fslots), W, gpu)
        + Fb + B * ROW_BYTES_FWD + 3 * s * B * 4,
        reuse_set=min(rt * fc.block_b, fslots * fc.block_b) * D * e + fslots * fc.block_n * D * e,
        note=f"{fc.block_b}×{fc.block_n}×{fc.block_d}, {s} split(s); F read per column tile "
             f"({ct}), W per row tile ({rt})")

    # backward: 1/‖W‖, then the two kernels, each recomputing S over the whole D per D chunk
    dc, docc, dslots = _triton_kernel("bwd_df", var, gpu)
    do = waves.d_chunk(dc.block_do, D)
    q = cdiv(D, do)
    rt, ct = cdiv(B, dc.block_b), cdiv(C, dc.block_n)
    sd = waves.plan_splits(rt, ct, dslots, q)
    t = cdiv(ct, sd)
    logits = rt * dc.block_b * ct * dc.block_n
    d_pad = cdiv(D, dc.block_d) * dc.block_d
    w_regions = _split_grid_w(rt, sd, q, t, dc.block_n, C, D, e, dslots)
    bwd_df = Launch(
        "bwd_df (S recomputed, dF[:, chunk] = dd·Ŵ in registers)", grid=rt * sd * q, **docc,
        tc_flops=2 * q * logits * (d_pad + do) * mult, unit=unit,
        alu_flops=(EPILOGUE_BWD + (RESCALE_FP16_OPS if fp16 else 0)) * q * logits
        + SCALE_OPS * rt * ct * dc.block_n * q * do, exps=q * logits,
        l2=q * ct * Fb + (q + 1) * rt * W + 2 * q * rt * C * 4 + sd * q * B * ROW_BYTES_BWD
        + sd * B * D * 4 + sd * B * 4,
        hbm=_w_from_hbm(w_regions, W, gpu) + Fb + C * 4 + B * ROW_BYTES_BWD
        + sd * B * D * 4 + sd * B * 4,
        reuse_set=min(rt * dc.block_b, dslots * dc.block_b) * D * e + dslots * dc.block_n * D * e,
        note=f"{dc.block_b}×{dc.block_n}×{dc.block_d}, BLOCK_DO {do}: {q} D chunk(s) × {sd} "
             f"split(s); F read per column tile and chunk, W (q + 1)× per row tile ({rt})")

    wc, wocc, wslots = _triton_kernel("bwd_dw", var, gpu)
    do = waves.d_chunk(wc.block_do, D)
    q = cdiv(D, do)
    nt, rt = cdiv(C, wc.block_n), cdiv(B, wc.block_b)
    logits = rt * wc.block_b * nt * wc.block_n
    d_pad = cdiv(D, wc.block_d) * wc.block_d
    bwd_dw = Launch(
        "bwd_dw (S recomputed, G[:, chunk] = ddᵀ·F in registers, Jacobian)", grid=nt * q, **wocc,
        tc_flops=2 * q * logits * (d_pad + do) * mult, unit=unit,
        alu_flops=(EPILOGUE_BWD + (RESCALE_FP16_OPS if fp16 else 0)) * q * logits
        + JACOBIAN_OPS * C * D, exps=q * logits,
        l2=(q + 1) * nt * Fb + (q * rt + 1) * W + (q * rt + q) * C * 4
        + nt * q * B * ROW_BYTES_BWD + W,
        hbm=_w_from_hbm(_class_tile_w(nt, q, wc.block_n, C, D, e, wslots), W, gpu)
        + Fb + C * 4 + B * ROW_BYTES_BWD + W,
        reuse_set=Fb + wslots * wc.block_n * D * e,
        note=f"{wc.block_n}×{wc.block_b}×{wc.block_d}, BLOCK_DO {do}: {nt} class tiles × {q} D "
             f"chunk(s); F read (q + 1)× per class tile, W q× per row tile ({rt}); grad_W "
             "stored once in W's dtype")
    return _step(B, C, D, dtype, gpu, var, [fwd], [bwd_df, bwd_dw], s, sd)


def _class_tile_w(nt: int, q: int, BN: int, C: int, D: int, e: int, slots: int
                  ) -> list[tuple[float, int]]:
    """(W bytes, HBM passes) of an nt × q weight-gradient grid (program n + nt·c): a class tile's
    q chunk programs are nt apart in launch order, so in q different waves once nt ≥ the resident
    programs, each streaming the tile's W rows from HBM again."""
    if nt >= slots:
        return [(C * D * e, q)]
    return [(min(BN, C - n * BN) * D * e, _waves_touching([n + nt * c for c in range(q)], 1, slots))
            for n in range(nt)]


def _step(B: int, C: int, D: int, dtype: str, gpu: GPU, var: str, fwd: list[Launch],
          bwd: list[Launch], s: int, sd: int) -> list[Launch]:
    """The launches of one step around the variant's forward (``fwd``) and backward (``bwd``)
    kernels: torch fills, [norm,] fwd, merge (``s`` splits); torch zeros, norm, bwd, the torch sums
    of the ``sd`` dF partials and dF's cast. The resident forward reads 1/‖W‖ too: a norm first."""
    e = ELT[dtype]
    W, Fb = C * D * e, B * D * e
    nc, nocc, _ = _triton_kernel("norm", var, gpu)

    def norm(name: str) -> Launch:
        return Launch(name, grid=cdiv(C, nc.block_n), **nocc, alu_flops=2 * C * D, l2=W + C * 4,
                      hbm=W + C * 4)

    mc, mocc, _ = _triton_kernel("merge", var, gpu)
    merge = Launch("merge (splits → lse_neg, dot_y)", grid=cdiv(B, mc.block_b), **mocc,
                   exps=s * B, alu_flops=6 * s * B, l2=3 * s * B * 4 + 2 * B * 4,
                   hbm=3 * s * B * 4 + 2 * B * 4)
    partials = sd * B * (D + 1) * 4 + B * (D + 1) * 4
    out = [Launch("forward: torch fills (lse_neg = −inf, dot_y = 0)", count=2, l2=2 * B * 4,
                  hbm=2 * B * 4)]
    out += ([norm("forward: norm (1/‖W_r‖, C fp32)")] if var == "resident" else []) + fwd
    out += [merge,
            Launch("backward: torch zeros (grad_f, grad_scale)", count=2, l2=Fb + B * 4,
                   hbm=Fb + B * 4),
            norm("norm (1/‖W_r‖, C fp32)"), *bwd,
            Launch("backward: torch sum of the dF / grad_scale partials over splits", count=2,
                   l2=partials, hbm=partials, alu_flops=sd * B * (D + 1))]
    if e != 4:
        out.append(Launch(f"backward: dF .to({dtype})", l2=B * D * 4 + Fb, hbm=B * D * 4 + Fb))
    return out


# ----------------------------------------------------------------------------- resident kernels
#
# marginops/triton/resident.py (FlashAttention-shaped; the launcher takes them where
# configs.resident_applies: sm_90, bf16 features and weight, K = 1, D ∈ {128, 256, 512},
# aligned). Each kernel's D chunk c and q = D / c ∈ {1, 2} chunks are configs.resident_meta's:
# c = min(D, configs.RESIDENT_CHUNK = 256), but bwd_df at D = 512 holds the whole D (c = 512,
# 64-row tiles, q = 1). A program keeps its own tile over the whole D and loads each streamed tile
# once for both its GEMMs:
#   fwd     rt × s     F 128 × D resident; per 32-class tile: W 32 × D, S = F·Wᵀ (2·128·32·D)
#   bwd_df  rt × s × q F BB × D resident (BB = 128, 64 at D = 512); per 32-class tile: W 32 × D,
#                      S (2·BB·32·D), dF[:, chunk] += dd·W_chunk (2·BB·32·c); BB × c fp32
#                      partial stored once
#   bwd_dw  nt × q     W 128 × D resident; per 16-row tile: F 16 × D, S (2·16·128·D),
#                      G[:, chunk] += ddᵀ·F_chunk (2·16·128·c); epilogue reloads W's 128 × c chunk
#                      (Jacobian), stores grad_W's chunk in W's dtype
# (chunked.py's backward replaces bwd_df / bwd_dw at D ≥ 256: chunked_launches below)
# (2q + 2)·B·C·D per backward kernel: 12·B·C·D in all at D = 512 (bwd_dw's second chunk program
# recomputes the whole S: Triton lays a dot feeding a dot out with all warps along M, and a
# 64-column dW tile spills — resident.py's module docstring), 10 at D ≤ 256. 1/‖W‖ comes from
# _inv_norm_kernel in both passes. Occupancy: waves.AOT_FIGURES at the largest D each
# configuration runs at (conservative below it, as the launcher plans).

DD_SCALE_OPS = 1   # per logit of the resident dF kernel: dd·(1/‖W_n‖) before the second GEMM


def wgmma_groups(M: int, warps: int, chained: bool) -> tuple[int, int]:
    """(warpgroups along M, along N) of a CTA's wgmma GEMM with an M-row tile, as Triton lays it
    out (AccelerateMatmul, warpsPerTileV3): a dot whose result reaches another dot gets every
    warp along M (TTGIR warpsPerCTA = [warps, 1]); a lone dot starts at [4, 1] and doubles M's
    count while M exceeds 16 rows per warp, else N's. tests/test_triton_aot.py checks these
    against the compiled kernels."""
    if chained:
        return warps // 4, 1
    wm, wn = 4, 1
    while wm * wn < warps:
        if M > 16 * wm:
            wm *= 2
        else:
            wn *= 2
    return wm // 4, wn


def gemm_smem(M: int, N: int, K: int, e: int, groups: tuple[int, int], a_smem: bool = True
              ) -> int:
    """Shared-memory bytes one CTA's warpgroups read for an (M × K)·(K × N) wgmma GEMM laid out
    as ``groups``: each reads its M/gm rows of A (unless A is a register operand) and its N/gn
    columns of B, K deep, once per 64-row wgmma it issues — (gn·M + gm·N·⌈M/(64·gm)⌉)·K·e."""
    gm, gn = groups
    per_wg_m64 = max(1, cdiv(M, 64 * gm))
    return ((gn * M if a_smem else 0) + gm * N * per_wg_m64) * K * e


def resident_gemms(kernel: str, cfg: configs.KernelConfig, D: int
                   ) -> tuple[tuple[int, int, tuple[int, int]], ...]:
    """(M, N, warpgroups) of resident.py's ``kernel``'s GEMMs per tile step at D: the logit GEMM
    (M = the resident tile's rows or classes, N = the streamed tile's) and, in the backward, the
    second GEMM (N = the D chunk it owns). The logit GEMM feeds the second (chained: every warp
    along M) but in the UNCHAINED feature gradient; the second GEMM is a lone dot."""
    meta = configs.resident_meta(kernel, D)
    w = cfg.num_warps
    M, N = (cfg.block_n, cfg.block_b) if kernel == "bwd_dw" else (cfg.block_b, cfg.block_n)
    chained = kernel != "fwd" and not meta.get("UNCHAINED", False)
    out = ((M, N, wgmma_groups(M, w, chained)),)
    if kernel != "fwd":
        out += ((M, meta["BLOCK_D"], wgmma_groups(M, w, False)),)
    return out


def resident_smem(kernel: str, cfg: configs.KernelConfig, D: int, e: int) -> int:
    """Shared-memory bytes per tile step of resident.py's ``kernel`` (one D chunk program): the
    logit GEMM over D with both operands in shared memory (A's first chunk from registers where
    configs.resident_meta says REG0), the streamed tile's cp.async write
    and, in the backward, the second GEMM (dd from registers, the streamed tile's chunk as B)
    plus, when the logit tile is split between warpgroups along N (UNCHAINED), dd's exchange:
    written once and read by each warpgroup of the second GEMM along N (each needs all K = N
    columns of its rows; a chained layout leaves every row's columns with one warp)."""
    gemms = resident_gemms(kernel, cfg, D)
    (M, N, logit_groups), rest = gemms[0], gemms[1:]
    meta = configs.resident_meta(kernel, D)
    reg = meta["BLOCK_D"] if meta.get("REG0") else 0   # A's first chunk read from registers
    out = (gemm_smem(M, N, D - reg, e, logit_groups) + gemm_smem(M, N, reg, e, logit_groups, False)
           + N * D * e)
    for M2, c, groups in rest:
        out += gemm_smem(M2, c, N, e, groups, a_smem=False)
        if logit_groups[1] > 1:
            out += (1 + groups[1]) * M * N * e
    return out


def resident_launches(B: int, C: int, D: int, dtype: str, gpu: GPU) -> list[Launch]:
    """The ``triton`` backend's launches of an ArcFace forward+backward on resident.py's kernels
    (see above): norm, fwd_res, merge; torch zeros, norm, bwd_df_res, bwd_dw_res, torch sums."""
    e = ELT[dtype]
    unit, mult = ("tf32", 3) if dtype == "float32" else ("bf16", 1)   # only forced off bf16
    rescale = RESCALE_FP16_OPS if dtype == "float16" else 0
    W, Fb = C * D * e, B * D * e

    def chunks(kernel: str) -> tuple[int, int]:
        """(D chunk, chunks) of ``kernel`` at D, as the launcher passes them (BLOCK_D, TWO)."""
        c = configs.resident_meta(kernel, D)["BLOCK_D"]
        return c, D // c   # D ∈ {128, 256, 512}: whole chunks

    c, q = chunks("fwd")
    fc, focc, fslots = _triton_kernel("fwd", "resident", gpu, D)
    rt, ct = cdiv(B, fc.block_b), cdiv(C, fc.block_n)
    s = waves.plan_splits(rt, ct, fslots)
    logits = rt * fc.block_b * ct * fc.block_n                 # padded tiles
    fwd = Launch(
        "fwd_res (F resident, S = F·Wᵀ, online softmax)", grid=rt * s, **focc,
        tc_flops=2 * logits * D * mult, unit=unit, alu_flops=EPILOGUE_FWD * logits, exps=logits,
        l2=s * Fb + rt * (W + C * 4) + s * B * ROW_BYTES_FWD + 3 * s * B * 4,
        hbm=_w_from_hbm(_split_grid_w(rt, s, 1, cdiv(ct, s), fc.block_n, C, D, e, fslots), W, gpu)
        + Fb + C * 4 + B * ROW_BYTES_FWD + 3 * s * B * 4,
        reuse_set=min(rt * fc.block_b, fslots * fc.block_b) * D * e + fslots * fc.block_n * D * e,
        smem_io=rt * ct * resident_smem("fwd", fc, D, e),
        note=f"{fc.block_b}×{fc.block_n}, D in {q} chunk(s) of {c}, {s} split(s); F read once "
             f"per split, W once per row tile ({rt})")

    c, q = chunks("bwd_df")
    dc, docc, dslots = _triton_kernel("bwd_df", "resident", gpu, D)
    rt, ct = cdiv(B, dc.block_b), cdiv(C, dc.block_n)
    sd = waves.plan_splits(rt, ct, dslots, q)
    logits = rt * dc.block_b * ct * dc.block_n
    bwd_df = Launch(
        "bwd_df_res (F resident, S + dF[:, chunk] = dd·Ŵ per W tile)", grid=rt * sd * q, **docc,
        tc_flops=2 * q * logits * (D + c) * mult, unit=unit,
        alu_flops=(EPILOGUE_BWD + DD_SCALE_OPS + rescale) * q * logits, exps=q * logits,
        l2=sd * q * Fb + q * rt * (W + C * 4) + sd * q * B * ROW_BYTES_BWD + sd * B * D * 4
        + sd * B * 4,
        hbm=_w_from_hbm(_split_grid_w(rt, sd, q, cdiv(ct, sd), dc.block_n, C, D, e, dslots), W,
                        gpu) + Fb + C * 4 + B * ROW_BYTES_BWD + sd * B * D * 4 + sd * B * 4,
        reuse_set=min(rt * dc.block_b, dslots * dc.block_b) * D * e + dslots * dc.block_n * D * e,
        smem_io=q * rt * ct * resident_smem("bwd_df", dc, D, e),
        note=f"{dc.block_b}×{dc.block_n}, {q} D chunk(s) of {c} × {sd} split(s); F read once "
             f"per program, W once per row tile and chunk ({rt} × {q})")

    c, q = chunks("bwd_dw")
    wc, wocc, wslots = _triton_kernel("bwd_dw", "resident", gpu, D)
    nt, rt = cdiv(C, wc.block_n), cdiv(B, wc.block_b)
    logits = rt * wc.block_b * nt * wc.block_n
    bwd_dw = Launch(
        "bwd_dw_res (W resident, S + G[:, chunk] = ddᵀ·F per F tile, Jacobian)", grid=nt * q,
        **wocc, tc_flops=2 * q * logits * (D + c) * mult, unit=unit,
        alu_flops=(EPILOGUE_BWD + rescale) * q * logits + JACOBIAN_OPS * C * D, exps=q * logits,
        l2=nt * q * Fb + (q + 1) * W + q * C * 4 + nt * q * B * ROW_BYTES_BWD + W,
        hbm=_w_from_hbm(_class_tile_w(nt, q, wc.block_n, C, D, e, wslots), W, gpu)
        + Fb + C * 4 + B * ROW_BYTES_BWD + W,
        reuse_set=Fb + wslots * wc.block_n * D * e,
        smem_io=q * nt * rt * resident_smem("bwd_dw", wc, D, e),
        note=f"{wc.block_n}×{wc.block_b} (classes × rows), {nt} class tiles × {q} D chunk(s) of "
             f"{c}; F read once per program, W q× resident + once in the Jacobian; grad_W "
             "stored once in W's dtype")
    if configs.chunked_applies(dtype, D, False):
        bwd, sd = chunked_launches(B, C, D, dtype, gpu)
    else:
        bwd = [bwd_df, bwd_dw]
    return _step(B, C, D, dtype, gpu, "resident", [fwd], bwd, s, sd)


# ----------------------------------------------------------------------------- chunked backward
#
# marginops/triton/chunked.py, where configs.chunked_applies (the resident launches at D ≥ 256,
# no bias; the modelled step has no class_index either). Classes in chunks of
# CC = waves.plan_chunk columns; per chunk three kernels (``count`` = chunks, the figures summed
# over all of them):
#   dd       rt × s_dd   resident.py's forward tiles (F 128 × D resident, its first 256 columns
#                        in registers; W 32 × D streamed) with the backward epilogue; stores dd'
#                        (B × CC, bf16), Σ_i dd'·d per row tile (rt × CC fp32), and adds to the
#                        grad_scale partials (s_dd × B fp32, read and written per chunk)
#   df_gemm  tiles × s   dF[split] (+)= dd'·W[chunk]: M = B, N = D, K = CC split s ways; the
#                        (s, B, D) fp32 partial read before and stored after each chunk's K loop
#   dw_gemm  CC/128 × ⌈D/256⌉ grad_W[chunk] = dd'ᵀ·F − ŵ Σ dd'·d: M = CC, N = D, K = B; the
#                        Jacobian's W rows, 1/‖W‖ and rt partials read in the epilogue
# GEMM FLOPs 2·B·C·D each (C padded to the chunks' K / class tiles): with the forward, 8·B·C·D.
# The GEMMs' operands stream through L2 once per output tile ((128 + 256) rows × K, 85 FLOPs per
# byte); their shared memory: the wgmma operand reads of 128 × 256 tiles (two warpgroups along M)
# plus the cp.async writes. dd' goes to HBM and back (B × CC bf16 outgrows L2 at B ≥ 512).

def _gemm(kernel: str, name: str, M: int, N: int, K: int, count: int, grid: int, e: int,
          unit: str, mult: int, gpu: GPU, l2_extra: float, hbm: float, alu: float = 0.0,
          note: str = "") -> Launch:
    """chunked.py's GEMM ``kernel`` (configs.CHUNKED: block_b, block_n = its M, N tile) over all
    its launches: (M × K)·(K × N), K the summed reduction length (padded per chunk); occupancy
    from its AOT figures."""
    cfg = configs.CHUNKED[kernel]
    bm, bn = cfg.block_b, cfg.block_n
    regs, smem = waves.figures(gpu.arch, cfg, kernel, "chunked")
    tiles = cdiv(M, bm) * cdiv(N, bn)
    return Launch(name, count=count, grid=grid, threads=32 * cfg.num_warps, regs=regs, smem=smem,
                  tc_flops=2 * tiles * bm * bn * K * mult, unit=unit, alu_flops=alu,
                  l2=tiles * (bm + bn) * K * e + l2_extra, hbm=hbm,
                  smem_io=tiles * (gemm_smem(bm, bn, K, e, wgmma_groups(bm, cfg.num_warps, False))
                                   + (bm + bn) * K * e), note=note)


def chunked_launches(B: int, C: int, D: int, dtype: str, gpu: GPU) -> tuple[list[Launch], int]:
    """chunked.py's backward launches (see above) and its dF split count."""
    e = ELT[dtype]
    unit, mult = ("tf32", 3) if dtype == "float32" else ("bf16", 1)
    W, Fb = C * D * e, B * D * e
    fc, dfc = configs.CHUNKED["dd"], configs.CHUNKED["df_gemm"]
    plan = waves.chunked_plan(B, C, D, gpu.sms, e, fc, dfc, configs.CHUNKED["dw_gemm"])
    cc, chunks = plan.cc, plan.chunks   # the launcher's plan
    kpad = (chunks - 1) * cc + cdiv(C - (chunks - 1) * cc, dfc.block_d) * dfc.block_d

    regs, smem = waves.figures(gpu.arch, fc, "dd", "chunked")
    occ = dict(threads=32 * fc.num_warps, regs=regs, smem=smem)
    slots = gpu.sms * waves.ctas_per_sm(regs, smem, occ["threads"], limits(gpu))
    rt, s_dd = plan.dd_grid
    logits = rt * fc.block_b * cdiv(C, fc.block_n) * fc.block_n     # padded tiles (≈ all chunks)
    dd = Launch(
        "dd (F resident, S = F·Wᵀ, dd' = ∂/∂d ÷ ‖W‖ stored per chunk)", count=chunks,
        grid=rt * s_dd, **occ, tc_flops=2 * logits * D * mult, unit=unit,
        alu_flops=(EPILOGUE_BWD + 2) * logits, exps=logits,
        l2=chunks * s_dd * Fb + rt * (W + C * 4) + B * C * e + rt * C * 4
        + chunks * s_dd * B * (ROW_BYTES_BWD + 8),
        hbm=W + Fb + C * 4 + B * ROW_BYTES_BWD + B * C * e + rt * C * 4 + s_dd * B * 4,
        reuse_set=min(rt * fc.block_b, slots * fc.block_b) * D * e + slots * fc.block_n * D * e,
        smem_io=rt * cdiv(C, fc.block_n) * resident_smem("fwd", fc, D, e) + 2 * B * C * e,
        note=f"{chunks} chunk(s) of {cc} classes, {rt} row tiles × {s_dd} split(s) each; dd' "
             f"{B}×{cc} {dtype} ({B * cc * e / 2**20:.0f} MiB), to HBM and back")

    m_tiles, n_tiles, s_f = plan.df_grid
    tiles_f = m_tiles * n_tiles
    partial = s_f * B * D * 4
    df = _gemm("df_gemm", "df_gemm (dF[split] += dd'·W[chunk], K = the chunk's classes)", B, D,
               kpad, chunks, tiles_f * s_f, e, unit, mult, gpu,
               l2_extra=(2 * chunks - 1) * partial, hbm=B * C * e + partial,
               note=f"{tiles_f} tiles × {s_f} K split(s); dd' read from HBM, W[chunk] from L2 "
                    f"(the dd kernel's)")
    dw = _gemm("dw_gemm", "dw_gemm (grad_W[chunk] = dd'ᵀ·F − ŵ Σ dd'·d, K = the batch)", C, D,
               B, chunks, plan.dw_grid[0] * plan.dw_grid[1], e, unit, mult, gpu,
               l2_extra=W + rt * C * 4 + C * 4 + W, hbm=B * C * e + W + C * 4 + W,
               alu=JACOBIAN_OPS * C * D,
               note="F per class tile; the Jacobian's W rows, 1/‖W‖, Σ dd'·d partials in the "
                    "epilogue; grad_W stored once in W's dtype")
    return [dd, df, dw], s_f
