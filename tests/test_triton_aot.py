"""Ahead-of-time compilation of every Triton kernel × configuration for sm_80 and sm_90 (no GPU).

For every kernel in marginops/triton and every configuration the launcher can pick on a GPU
(``configs.gpu_configs``: the default and the autotune space), for features/weight dtypes
fp32/fp32, fp16/fp16, bf16/bf16 and bf16/fp32 (autocast with fp32 master weights):

* ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80 | 90, 32))`` succeeds;
* the cubin spills nothing: ``cuobjdump -res-usage`` (bundled with triton's nvidia backend)
  reports STACK:0 and LOCAL:0;
* shared memory fits the target (sm_80: 163 KB, sm_90: 227 KB);
* sm_90 code for fp16 / bf16 uses wgmma;
* the static properties the speed depends on, read from the TTGIR (``_loops``): no global store or
  atomic inside any loop that runs a GEMM (no read-modify-write of accumulators in K loops: they
  live in registers); on sm_90 half precision, no ``warp_group_dot_wait {pendings = 0}`` inside
  a GEMM's loop over D (wgmma stays asynchronous there); with num_stages ≥ 2, that loop's loads
  are software-pipelined (``async_copy_global_to_local``).

The launcher picks configurations per *variant* (configs.py: half / fp32 features, with or without
sub-centers). Each configuration is compiled in the specialisation its variant launches with:
K = subcenters is the constant 1 (Triton specialises ints equal to 1) or a runtime int for the
sub-center variants; 16-byte aligned pointers / D / strides — except the ``*_unaligned``
variants, whose D and strides have no known divisibility (D = 500: what such launches get), with
K = 1 and K > 1; and every option flag on — bias, class_index, hard negatives, normalisation —
the heaviest epilogue. ``test_flags_off_variant`` adds the plain-ArcFace specialisation of the
default configurations. ``MARGINOPS_AOT_DEFAULTS_ONLY=1`` compiles only the default configuration
of each variant (resident.py's: each D's, configs.resident_config), one dtype pair each
(scripts/test_triton_oldest.sh, oldest supported Triton).

Run without TRITON_INTERPRET (kernels must be compiled-mode JITFunctions):
    .venv/bin/python -m pytest tests/test_triton_aot.py
``python tests/test_triton_aot.py`` prints the static-figures table of benchmarks/README.md.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import subprocess
import sys
import tempfile

import pytest

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("AOT compilation needs compiled-mode kernels; run without TRITON_INTERPRET",
                allow_module_level=True)
triton = pytest.importorskip("triton")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence the 3.9 deprecation warning

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from marginops.triton import chunked as ck  # noqa: E402
from marginops.triton import configs, waves  # noqa: E402
from marginops.triton import margin_lse as ml  # noqa: E402
from marginops.triton import resident as rs  # noqa: E402
from marginops.triton import topk as tk  # noqa: E402

ARCHS = (80, 90)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

KERNELS = {
    "fwd": ml._fwd_kernel,
    "bwd_df": ml._bwd_df_kernel,
    "bwd_dw": ml._bwd_dw_kernel,
    "topk": tk._topk_kernel,
    "merge": ml._merge_kernel,
    "norm": ml._inv_norm_kernel,
}

# the "resident" variant's kernels (resident.py: sm_90, bf16, K = 1, D in RESIDENT_DIMS),
# compiled at the largest D each configuration runs at (``_resident_dim``: D = 512, the heaviest,
# but for bwd_df's 128-row configuration) unless a test asks for another D
RESIDENT = {"fwd": rs._fwd_res_kernel, "bwd_df": rs._bwd_df_res_kernel,
            "bwd_dw": rs._bwd_dw_res_kernel}
RESIDENT_DIM = max(configs.RESIDENT_DIMS)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# pointer argument -> "f" (features dtype), "w" (weight dtype) or a fixed type
_PTR = {
    "f_ptr": "f", "w_ptr": "w", "wj_ptr": "w", "gw_ptr": "w",
    "tcol_ptr": "i64", "cidx_ptr": "i64", "excl_ptr": "i64", "col_ptr": "i32",
}
_ALIGNED_INTS = {"D", "stride_f", "stride_w"}


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _source(kernel: str, cfg: configs.KernelConfig, fdt: str, wdt: str, *, flags: bool,
            k_const: bool, aligned: bool = True, var: str = "", dim: int = RESIDENT_DIM
            ) -> ASTSource:
    fn = KERNELS[kernel]
    const = {}
    if var == "resident" and kernel in RESIDENT:
        fn = RESIDENT[kernel]
        const.update(BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, **configs.resident_meta(kernel, dim),
                     NORMALIZE=flags, DOT_PREC="tf32", HAS_BIAS=flags, HAS_INDEX=flags,
                     HARD=flags, FILTER=flags)
    elif kernel == "merge":
        const["BLOCK_B"] = cfg.block_b
    elif kernel == "norm":
        const.update(HAS_INDEX=flags, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d)
    else:
        const.update(cfg.meta())
        const["NORMALIZE"] = flags
        const["HAS_SUB"] = not k_const
        const["DOT_PREC"] = "tf32x3" if fdt == "fp32" else "tf32"  # see ml._dot_precision
        if kernel != "topk":
            const.update(HAS_BIAS=flags, HAS_INDEX=flags, HARD=flags, FILTER=flags)
        else:
            const["KP"] = 16
    if k_const and "K" in fn.arg_names:
        const["K"] = 1  # a launch with subcenters=1: Triton specialises ints equal to 1
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            kind = _PTR.get(name, "fp32")
            if name == "gw_ptr" and flags:
                kind = "fp32"  # with class_index the dW kernel writes per column in fp32
            sig[name] = "*" + {"f": fdt, "w": wdt}.get(kind, kind)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "thr":
            sig[name] = "fp32"  # the interclass filtering threshold
        else:
            sig[name] = "i32"
            if name in _ALIGNED_INTS and aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)


def compile_stats(kernel: str, cfg: configs.KernelConfig, fdt: str, wdt: str, arch: int,
                  flags: bool = True, k_const: bool = True, aligned: bool = True, var: str = "",
                  dim: int = RESIDENT_DIM) -> dict:
    """Compile one specialisation and return its static figures (``var`` = "resident" compiles
    resident.py's kernel for fwd / bwd_df / bwd_dw, at embedding width ``dim``; any other
    variant name compiles margin_lse.py's, the same for every name: one cached compile)."""
    if not (var == "resident" and kernel in RESIDENT):
        var, dim = "", RESIDENT_DIM
    return _compile_stats(kernel, cfg, fdt, wdt, arch, flags, k_const, aligned, var, dim)


@functools.cache
def _compile_stats(kernel, cfg, fdt, wdt, arch, flags, k_const, aligned, var, dim) -> dict:
    src = _source(kernel, cfg, fdt, wdt, flags=flags, k_const=k_const, aligned=aligned, var=var,
                  dim=dim)
    return _stats_of(src, cfg, arch)


def _stats_of(src: ASTSource, cfg: configs.KernelConfig, arch: int) -> dict:
    """Compile ``src`` with ``cfg``'s launch options for ``arch``; its static figures."""
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=cfg.launch())
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(ck.asm["cubin"])
        fh.flush()
        res = subprocess.run([_bin("cuobjdump"), "-res-usage", fh.name], capture_output=True,
                             text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    assert m, res
    reg, stack, _static_shared, local = map(int, m.groups())
    ttgir = ck.asm["ttgir"]
    return {"regs": reg, "stack": stack, "local": local, "shared": ck.metadata.shared,
            "wgmma": "wgmma" in ck.asm["ptx"], "res": res.strip(), "loops": _loops(ttgir),
            "mma_warps": re.findall(r"^#mma\w* = .*warpsPerCTA = \[(\d+), (\d+)\]", ttgir,
                                    re.MULTILINE)}


_DOT = ("ttng.warp_group_dot ", "tt.dot ", "ttng.tc_gen5_mma ")
_GLOBAL_WRITE = ("tt.store ", "tt.atomic_rmw ", "tt.atomic_cas ", "tt.descriptor_store ")


def _loops(ttgir: str) -> list[dict]:
    """Every ``scf.for`` of a TTGIR module with what it holds: ``dot`` / ``write`` (a GEMM / a
    global store or atomic anywhere inside, nested loops included), ``own_wait0`` (a
    ``warp_group_dot_wait {pendings = 0}`` in the loop's own body, outside nested loops),
    ``own_async_copy`` (a pipelined ``async_copy_global_to_local`` in its own body), ``reg_a`` /
    ``local_load`` (its own body has a wgmma with a register A operand / a shared-memory load
    into registers) and ``d_loop`` (it runs up to the kernel argument D: a GEMM's reduction over
    D). Regions open on a line ending in ``{`` and close on a line starting with ``}`` (attribute
    braces are balanced within a line)."""
    stack: list[dict | None] = []  # one entry per open region: a loop's record, or None
    out = []
    for line in ttgir.splitlines():
        text = line.strip()
        if text.startswith("}"):
            frame = stack.pop()
            if frame is not None:
                out.append(frame)
        if text.endswith("{"):
            stack.append(dict(dot=False, write=False, own_wait0=False, own_async_copy=False,
                              reg_a=False, local_load=False,
                              d_loop=" to %D step " in text) if "scf.for " in text else None)
            continue
        loops = [f for f in stack if f is not None]
        if not loops:
            continue
        if any(op in text for op in _DOT):
            for f in loops:
                f["dot"] = True
        if any(op in text for op in _GLOBAL_WRITE):
            for f in loops:
                f["write"] = True
        if "warp_group_dot_wait" in text and "pendings = 0 " in text:
            loops[-1]["own_wait0"] = True
        if "async_copy_global_to_local" in text:
            loops[-1]["own_async_copy"] = True
        if "ttng.warp_group_dot " in text and re.search(r": tensor<[^*]*#ttg\.dot_op", text):
            loops[-1]["reg_a"] = True  # a wgmma whose A operand is a register tensor
        if "ttg.local_load " in text:
            loops[-1]["local_load"] = True
    assert not stack, "unbalanced regions in the TTGIR"
    return out


VARIANT_DTYPES = {
    "half": (("fp16", "fp16"), ("bf16", "bf16"), ("bf16", "fp32")),
    "fp32": (("fp32", "fp32"),),
    "resident": (("bf16", "bf16"),),
}
VARIANT_ARCHS = {"resident": (90,)}  # resident.py runs on sm_90 and later only


DEFAULTS_ONLY = os.environ.get("MARGINOPS_AOT_DEFAULTS_ONLY", "0") not in ("", "0")


def _cases():
    """(kernel, variant, config, features dtype, weight dtype, arch, K specialised to 1, aligned),
    unique. Unaligned variants (D not a multiple of 16) are compiled with K = 1 and K > 1.
    MARGINOPS_AOT_DEFAULTS_ONLY=1 (the oldest-Triton CI step) keeps the default configurations
    (resident.py's: the one of each D) and one dtype pair per variant (fp32 master weights with
    bf16 features; fp32)."""
    seen = set()
    for var in configs.VARIANTS:
        aligned = not var.endswith("_unaligned")
        k_consts = (not var.endswith("_sub"),) if aligned else (True, False)
        base = var.split("_")[0]
        for kernel in configs.KERNELS:
            cfgs = configs.gpu_configs(kernel, var)
            for cfg in cfgs[:1] if DEFAULTS_ONLY and var != "resident" else cfgs:
                for fdt, wdt in VARIANT_DTYPES[base][-1:] if DEFAULTS_ONLY else VARIANT_DTYPES[base]:
                    for k_const in k_consts:
                        if kernel == "merge":
                            fdt, wdt, kc = "fp32", "fp32", True  # fp32 partials only, no K, no D
                        elif kernel == "norm":
                            fdt, kc = wdt, k_const  # reads only the weight
                        else:
                            kc = k_const
                        al = aligned or kernel == "merge"
                        for arch in VARIANT_ARCHS.get(var, ARCHS):
                            key = (kernel, var if var == "resident" else "", cfg, fdt, wdt,
                                   arch, kc, al)
                            if key in seen:
                                continue
                            seen.add(key)
                            yield pytest.param(
                                kernel, var, cfg, fdt, wdt, arch, kc, al,
                                id=f"{kernel}-{var}-{_cfg_id(cfg)}-{fdt}x{wdt}-sm{arch}"
                                   f"{'' if kc else '-K'}{'' if al else '-unaligned'}")


def _cfg_id(cfg: configs.KernelConfig) -> str:
    return f"b{cfg.block_b}n{cfg.block_n}d{cfg.block_d}w{cfg.num_warps}s{cfg.num_stages}"


# sm_90 wgmma needs a 64-row tile per warpgroup: configurations whose tl.dot M dimensions are
# below 64 (chosen to fit the register file) are listed here, with the reason, and checked not to
# grow: a new configuration must use wgmma or be added here deliberately.
# Unaligned launches (D % 16 != 0) use 32-row single-stage tiles: the aligned tiles spill there.
NO_WGMMA: set[tuple[str, str]] = {(k, "half_unaligned") for k in ("fwd", "bwd_df", "bwd_dw", "topk")}


def _check(stats: dict, kernel: str, var: str, fdt: str, arch: int):
    assert stats["stack"] == 0 and stats["local"] == 0, f"register spills: {stats['res']}"
    assert stats["shared"] <= SMEM_LIMIT[arch], f"shared memory {stats['shared']} B"
    if (arch == 90 and fdt in ("fp16", "bf16") and kernel not in ("merge", "norm")
            and (kernel, var) not in NO_WGMMA):
        assert stats["wgmma"], "sm_90 half-precision code does not use wgmma"


# kernels whose loops run GEMMs (the others reduce or copy without tl.dot)
GEMM_KERNELS = ("fwd", "bwd_df", "bwd_dw", "topk")


def _check_loops(stats: dict, kernel: str, cfg: configs.KernelConfig, fdt: str, wdt: str,
                 arch: int):
    """The static properties of issue 12 read from the TTGIR (see ``_loops``).

    Asynchronous wgmma is required where both operands are in shared memory as loaded: fp32
    master weights with half features (autocast) are converted in registers and written to one
    shared buffer per D step, which the wgmma must finish reading before the next step
    overwrites it — Triton 3.9 waits for it (pendings = 0) there. Known and accepted: the fix
    is fp16/bf16 weights (or a W-as-register-operand layout, not done)."""
    gemm_loops = [lp for lp in stats["loops"] if lp["dot"]]
    assert gemm_loops, f"{kernel}: no loop with a GEMM found in the TTGIR"
    for lp in gemm_loops:
        assert not lp["write"], (f"{kernel}: a global store/atomic inside a GEMM loop "
                                 "(read-modify-write of an accumulator in global memory)")
    d_loops = [lp for lp in gemm_loops if lp["d_loop"]]
    assert d_loops, f"{kernel}: no GEMM loop over D found in the TTGIR"
    if arch == 90 and fdt in ("fp16", "bf16") and wdt == fdt:
        for lp in d_loops:
            assert not lp["own_wait0"], (f"{kernel}: warp_group_dot_wait pendings=0 inside the D "
                                         "loop (wgmma not asynchronous)")
    if cfg.num_stages >= 2:
        for lp in d_loops:
            assert lp["own_async_copy"], f"{kernel}: the D loop's loads are not pipelined"


def _check_resident_loops(stats: dict, kernel: str):
    """resident.py's kernels have no loop over D (each tl.dot spans the whole chunk): their GEMM
    loop runs over tiles, must not write global memory, and its loads must be pipelined."""
    gemm_loops = [lp for lp in stats["loops"] if lp["dot"]]
    assert len(gemm_loops) == 1, f"{kernel}: {gemm_loops}"
    assert not gemm_loops[0]["write"], f"{kernel}: a global store/atomic inside the GEMM loop"
    assert gemm_loops[0]["own_async_copy"], f"{kernel}: the tile loop's loads are not pipelined"


def _resident_dim(kernel: str, cfg: configs.KernelConfig) -> int:
    """The largest D at which the launcher runs resident.py's ``kernel`` with ``cfg``."""
    return max(d for d in configs.RESIDENT_DIMS if configs.resident_config(kernel, d) == cfg)


def test_every_config_is_listed():
    """Every kernel has a configuration in every variant; the compile matrix covers them all."""
    assert set(configs.KERNELS) == set(KERNELS)
    cases = list(_cases())
    for var in configs.VARIANTS:
        for kernel in configs.KERNELS:
            assert kernel in configs.DEFAULT[var]
            cfgs = configs.gpu_configs(kernel, var)
            for cfg in cfgs[:1] if DEFAULTS_ONLY and var != "resident" else cfgs:
                assert any(p.values[0] == kernel and p.values[2] == cfg for p in cases)


@pytest.mark.parametrize("kernel,var,cfg,fdt,wdt,arch,k_const,aligned", list(_cases()))
def test_compiles_without_spills(kernel, var, cfg, fdt, wdt, arch, k_const, aligned):
    dim = _resident_dim(kernel, cfg) if var == "resident" else RESIDENT_DIM
    stats = compile_stats(kernel, cfg, fdt, wdt, arch, k_const=k_const, aligned=aligned, var=var,
                          dim=dim)
    _check(stats, kernel, var, fdt, arch)
    if var == "resident" and kernel in RESIDENT:
        _check_resident_loops(stats, kernel)
    elif kernel in GEMM_KERNELS:
        _check_loops(stats, kernel, cfg, fdt, wdt, arch)


@pytest.mark.skipif(DEFAULTS_ONLY, reason="the oldest-Triton step compiles the defaults only")
@pytest.mark.parametrize("kernel", list(RESIDENT))
@pytest.mark.parametrize("dim,flags", [(d, f) for d in configs.RESIDENT_DIMS for f in (True, False)
                                       if (d, f) != (RESIDENT_DIM, True)])
def test_resident_dims_and_flags_off(kernel, dim, flags):
    """resident.py's other specialisations: D = 128 and 256 (one chunk) and every option flag
    off (plain ArcFace), besides the D = 512, flags-on compile of the matrix above."""
    cfg = configs.resident_config(kernel, dim)
    stats = compile_stats(kernel, cfg, "bf16", "bf16", 90, flags=flags, var="resident", dim=dim)
    _check(stats, kernel, "resident", "bf16", 90)
    _check_resident_loops(stats, kernel)


@pytest.mark.skipif(DEFAULTS_ONLY, reason="the oldest-Triton step compiles the defaults only")
@pytest.mark.parametrize("kernel", list(RESIDENT))
@pytest.mark.parametrize("dim", configs.RESIDENT_DIMS)
def test_model_lays_out_the_resident_gemms_as_compiled(kernel, dim):
    """benchmarks/model.py counts shared-memory traffic from the warpgroup layout it assumes for
    each GEMM (model_triton.resident_gemms, after Triton's rule): the compiled TTGIR's
    warpsPerCTA must be those layouts."""
    import importlib.util

    bench = os.path.join(ROOT, "benchmarks")
    spec = importlib.util.spec_from_file_location("model_triton",
                                                  os.path.join(bench, "model_triton.py"))
    sys.path.insert(0, bench)
    try:
        mt = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mt)
    finally:
        sys.path.remove(bench)
    cfg = configs.resident_config(kernel, dim)
    stats = compile_stats(kernel, cfg, "bf16", "bf16", 90, var="resident", dim=dim)
    compiled = {(int(m), int(n)) for m, n in stats["mma_warps"]}
    modelled = {(4 * gm, gn) for _M, _N, (gm, gn) in mt.resident_gemms(kernel, cfg, dim)}
    assert compiled == modelled


@pytest.mark.skipif(DEFAULTS_ONLY, reason="the oldest-Triton step compiles the defaults only")
@pytest.mark.parametrize("flags", [True, False])
def test_resident_wide_feature_gradient_computes_each_logit_once(flags):
    """D = 512's feature-gradient kernel (64-row tiles, the whole D in one accumulator): both
    GEMMs laid out with the two warpgroups side by side (warpsPerCTA = [4, 2]), so neither
    computes the other's logits. Triton's chained-dot rule would give [8, 1] — each warpgroup
    the same 64 rows — without resident.py's ``_unchained``."""
    dim = max(configs.RESIDENT_DIMS)
    cfg = configs.resident_config("bwd_df", dim)
    assert cfg.block_b < 16 * cfg.num_warps  # fewer rows than [num_warps, 1] splits: 16 per warp
    stats = compile_stats("bwd_df", cfg, "bf16", "bf16", 90, flags=flags, var="resident", dim=dim)
    assert stats["mma_warps"] and set(stats["mma_warps"]) == {("4", "2")}, stats["mma_warps"]


@pytest.mark.parametrize("kernel,var,d_chunk", [
    (k, v, dc) for k in ("bwd_df", "bwd_dw") for v in ("half", "fp32") for dc in (64, 128)
    if dc < configs.default(k, v).block_do])
def test_backward_narrower_d_chunks(kernel, var, d_chunk):
    """The launcher narrows a backward kernel's D chunk to the next power of two ≥ D
    (margin_lse._d_chunk): D = 64 and D = 128 give these specialisations of the defaults."""
    cfg = configs.default(kernel, var)
    assert ml._d_chunk(cfg, d_chunk) == d_chunk
    narrow = dataclasses.replace(cfg, block_do=d_chunk)
    fdt, wdt = VARIANT_DTYPES[var][-1]
    for arch in ARCHS:
        stats = compile_stats(kernel, narrow, fdt, wdt, arch)
        _check(stats, kernel, var, fdt, arch)
        _check_loops(stats, kernel, narrow, fdt, wdt, arch)


def test_unaligned_launches_pick_the_unaligned_variant():
    """A D that is not a multiple of 16 (D = 500) launches the unaligned specialisation, which the
    matrix above compiles; D = 512 keeps the aligned tables."""
    import torch

    def var(D, dtype=torch.bfloat16, K=1):
        f, w = torch.zeros(4, D, dtype=dtype), torch.zeros(8 * K, D, dtype=dtype)
        return ml._Args(f, w, torch.ones(4), None, torch.zeros(4, dtype=torch.long), None, None,
                        None, True, K).variant

    assert var(512) == "half" and var(512, K=2) == "half_sub" and var(512, torch.float32) == "fp32"
    assert var(500) == "half_unaligned" and var(500, K=2) == "half_unaligned"
    assert var(500, torch.float32) == "fp32_unaligned"


@pytest.mark.parametrize("kernel", [k for k in configs.KERNELS if k not in ("merge", "norm")])
@pytest.mark.parametrize("arch", ARCHS)
def test_flags_off_variant(kernel, arch):
    """Default half configuration with every option flag off (plain ArcFace), fp16 features
    with fp32 master weights: the lighter specialisation must compile cleanly too."""
    cfg = configs.default(kernel, "half")
    stats = compile_stats(kernel, cfg, "fp16", "fp32", arch, flags=False)
    _check(stats, kernel, "half", "fp16", arch)
    _check_loops(stats, kernel, cfg, "fp16", "fp32", arch)


# chunked.py's kernels (sm_90, bf16, D = 256 / 512 without bias: configs.chunked_applies)
CHUNKED = {"dd": ck._dd_kernel, "df_gemm": ck._df_gemm_kernel, "dw_gemm": ck._dw_gemm_kernel}
_CHUNKED_INTS = {"D", "stride_f", "stride_w", "CC"}  # multiples of 16 where they run


def chunked_config(kernel: str) -> configs.KernelConfig:
    """The configuration chunked.backward launches ``kernel`` with on a GPU."""
    return configs.CHUNKED[kernel]


@functools.cache
def chunked_stats(kernel: str, flags: bool, dim: int = RESIDENT_DIM) -> dict:
    """Static figures of chunked.py's ``kernel``, bf16 on sm_90 at D = ``dim``; ``flags``:
    class_index, hard negatives, interclass filtering and normalisation on (the heaviest) or
    off (no bias: chunked.py does not serve it)."""
    fn, cfg = CHUNKED[kernel], chunked_config(kernel)
    if kernel == "dd":
        const = dict(HAS_BIAS=False, HAS_INDEX=flags, HARD=flags, FILTER=flags, NORMALIZE=flags,
                     BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, **configs.resident_meta("fwd", dim))
    else:
        const = dict(HAS_INDEX=flags, BLOCK_M=cfg.block_b, BLOCK_N=cfg.block_n,
                     BLOCK_K=cfg.block_d)
        if kernel == "dw_gemm":
            const["NORMALIZE"] = flags
    const["DOT_PREC"] = "tf32"
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            kind = {"dd_ptr": "f", "gw_ptr": "w"}.get(name, _PTR.get(name, "fp32"))
            sig[name] = "*" + {"f": "bf16", "w": "bf16"}.get(kind, kind)
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name == "thr" else "i32"
            if name in _CHUNKED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return _stats_of(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs), cfg, 90)


@pytest.mark.parametrize("kernel", list(CHUNKED))
@pytest.mark.parametrize("flags", [True, False])
def test_chunked_kernels_compile_clean(kernel, flags):
    """chunked.py's kernels: no spills, shared memory within sm_90's, wgmma; one GEMM loop with
    pipelined loads. The GEMMs' K loops keep wgmma asynchronous (no pendings = 0 wait in them)
    and write no global memory (their partial is read before and stored after); the dd kernel's
    tile loop stores dd' (each element once: an output, not an accumulator). Their
    waves.AOT_FIGURES entries give the compiled occupancy."""
    stats = chunked_stats(kernel, flags)
    _check(stats, kernel, "chunked", "bf16", 90)
    gemm_loops = [lp for lp in stats["loops"] if lp["dot"]]
    assert len(gemm_loops) == 1 and gemm_loops[0]["own_async_copy"], stats["loops"]
    if kernel != "dd":
        assert not gemm_loops[0]["write"] and not gemm_loops[0]["own_wait0"], gemm_loops
    cfg = chunked_config(kernel)
    threads, limits = 32 * cfg.num_warps, waves.ARCH_LIMITS[90]
    listed = waves.AOT_FIGURES[waves.figure_key(kernel, "chunked", 90, cfg)]
    assert (waves.ctas_per_sm(*listed, threads, limits)
            == waves.ctas_per_sm(stats["regs"], stats["shared"], threads, limits)), (
        f"waves.AOT_FIGURES: {waves.figure_key(kernel, 'chunked', 90, cfg)}: "
        f"({stats['regs']}, {stats['shared']})")


@pytest.mark.parametrize("kernel", ["fwd", "dd"])
@pytest.mark.parametrize("dim", [256, 512])
@pytest.mark.parametrize("flags", [True, False])
def test_wide_forward_tiles_read_f_from_registers(kernel, dim, flags):
    """From D = 256 resident.py's forward and chunked.py's dd kernel hold F's first 256 columns
    (at D = 256 all of F) in registers (REG0, resident.py's ``_in_registers``): their tile loop
    runs a wgmma whose A operand is a register tensor, and loads nothing from shared memory into
    registers (at D = 512 the second chunk's wgmma reads shared memory itself). Without it F is a
    shared-memory operand read on every tile step — what benchmarks/model.py's shared-memory
    bytes count. Both compile without spills there too."""
    if kernel == "fwd":
        cfg = configs.resident_config("fwd", dim)
        stats = compile_stats("fwd", cfg, "bf16", "bf16", 90, flags=flags, var="resident",
                              dim=dim)
    else:
        stats = chunked_stats("dd", flags, dim)
    _check(stats, kernel, "chunked" if kernel == "dd" else "resident", "bf16", 90)
    (loop,) = [lp for lp in stats["loops"] if lp["dot"]]
    assert loop["reg_a"] and not loop["local_load"], loop


def static_table() -> str:
    """Markdown table of the static figures (benchmarks/README.md, "Triton static figures")."""
    lines = ["| kernel | variant | config (B×N×D, warps, stages[, BLOCK_DO]) | dtype f/w | sm | regs "
             "| smem (KB) | spills (stack B) | wgmma |", "|---|---|---|---|---|---|---|---|---|"]
    for p in _cases():
        kernel, var, cfg, fdt, wdt, arch, kc, al = p.values
        dim = _resident_dim(kernel, cfg) if var == "resident" else RESIDENT_DIM
        s = compile_stats(kernel, cfg, fdt, wdt, arch, k_const=kc, aligned=al, var=var, dim=dim)
        do = f", {cfg.block_do}" if cfg.block_do else ""   # backward kernels: the D chunk
        lines.append(
            f"| {kernel} | {var} | {cfg.block_b}×{cfg.block_n}×{cfg.block_d}, {cfg.num_warps}, "
            f"{cfg.num_stages}{do} | {fdt}/{wdt} | {arch} | {s['regs']} | {s['shared'] / 1024:.1f} "
            f"| {s['stack']} | {'yes' if s['wgmma'] else 'no'} |")
    for kernel in CHUNKED:  # chunked.py (sm_90, bf16, D = 512; its options on)
        cfg, s = chunked_config(kernel), chunked_stats(kernel, True)
        lines.append(
            f"| {kernel} | chunked | {cfg.block_b}×{cfg.block_n}×{cfg.block_d}, {cfg.num_warps}, "
            f"{cfg.num_stages} | bf16/bf16 | 90 | {s['regs']} | {s['shared'] / 1024:.1f} "
            f"| {s['stack']} | {'yes' if s['wgmma'] else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(static_table())
