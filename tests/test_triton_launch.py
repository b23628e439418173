"""Launch discipline of the Triton backend, checked without a GPU (shared/DESIGN.md §8).

The interpreter runs programs one after another on CPU tensors, so device and stream mistakes are
invisible to it. These checks hold the launchers to the rules by construction:

* every kernel launch (``kernel[grid](...)``) in marginops/triton sits lexically inside
  ``with device_guard(<device>):`` — Triton launches on the *current* device and stream;
* ``device_guard`` makes a CUDA tensor's device current (and so its current stream), and is a
  no-op for CPU tensors;
* the fp32 dot precision is read through an API that works whichever torch precision API the
  user set (the legacy ``allow_tf32`` raises once the new ``fp32_precision`` has been used).
"""

from __future__ import annotations

import ast
import contextlib
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from marginops.triton import margin_lse as ml  # noqa: E402

TRITON_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "marginops", "triton")


def _kernel_names(tree: ast.Module) -> set[str]:
    """Functions decorated with @triton.jit in a module."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                if ast.unparse(dec) in ("triton.jit", "jit"):
                    names.add(node.name)
    return names


def _launches(tree: ast.AST, kernels: set[str]):
    """(line, guarded) for every ``kernel[grid](...)`` call; guarded = inside ``with device_guard``."""
    out = []

    def visit(node, guarded):
        if isinstance(node, ast.With):
            guarded = guarded or any(
                isinstance(item.context_expr, ast.Call)
                and ast.unparse(item.context_expr.func).split(".")[-1] == "device_guard"
                for item in node.items)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                and ast.unparse(node.func.value).split(".")[-1] in kernels):
            out.append((node.lineno, guarded))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return out


def test_every_triton_launch_is_device_guarded():
    sources = {}
    for name in sorted(os.listdir(TRITON_DIR)):
        if name.endswith(".py"):
            with open(os.path.join(TRITON_DIR, name)) as fh:
                sources[name] = ast.parse(fh.read())
    kernels = set().union(*(_kernel_names(t) for t in sources.values()))
    assert {"_fwd_kernel", "_bwd_df_kernel", "_bwd_dw_kernel", "_topk_kernel"} <= kernels
    found, unguarded = 0, []
    for name, tree in sources.items():
        for line, guarded in _launches(tree, kernels):
            found += 1
            if not guarded:
                unguarded.append(f"marginops/triton/{name}:{line}")
    assert found >= 6, f"only {found} launch sites found: the check no longer sees them"
    assert not unguarded, f"Triton launches outside `with device_guard(...)`: {unguarded}"


def test_device_guard_selects_the_tensors_device():
    guard = ml.device_guard(torch.device("cuda", 1))  # constructing it touches no GPU
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(ml.device_guard(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.parametrize("setting,expected", [
    (("legacy", True), "tf32"), (("legacy", False), "tf32x3"),
    (("cuda.matmul", "tf32"), "tf32"), (("cuda.matmul", "ieee"), "tf32x3"),
    (("global", "tf32"), "tf32"), (("global", "ieee"), "tf32x3"),
])
def test_dot_precision_under_both_torch_apis(setting, expected):
    api, value = setting
    matmul = torch.backends.cuda.matmul
    if api != "legacy" and not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    saved = {}
    if hasattr(matmul, "fp32_precision"):
        saved = {"m": matmul.fp32_precision, "g": torch.backends.fp32_precision}
    try:
        if api == "legacy":
            matmul.allow_tf32 = value
        elif api == "cuda.matmul":
            matmul.fp32_precision = value
        else:
            torch.backends.fp32_precision = value
        assert ml._dot_precision(torch.empty(1, 4)) == expected
        assert ml._dot_precision(torch.empty(1, 4, dtype=torch.float16)) == "tf32"
    finally:
        if saved:
            torch.backends.fp32_precision = saved["g"]
            matmul.fp32_precision = saved["m"]
        else:
            matmul.allow_tf32 = False


def test_triton_older_than_supported_is_reported(monkeypatch):
    import importlib.metadata

    import marginops.ops.triton as binding

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.4.0")
    reason = binding.availability("triton", torch.device("cuda"))
    assert reason is not None and "3.4" in reason and "3.5" in reason


@pytest.mark.parametrize("name", ["weight", "scale", "bias", "target_col", "class_index",
                                  "hard_tau", "hard_t"])
def test_every_input_must_be_on_the_features_device(name):
    """Checked before any launch: a tensor on another device would be read through a foreign
    pointer (here: "meta", which any device mismatch stands for)."""
    args = dict(features=torch.zeros(4, 16), weight=torch.zeros(10, 16), scale=torch.ones(4),
                bias=torch.zeros(10), target_col=torch.zeros(4, dtype=torch.long),
                class_index=torch.arange(10), hard_tau=torch.ones(4), hard_t=torch.tensor(0.1))
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=f"{name} is on meta but features are on cpu"):
        ml._Args(**args, normalize_weight=True, subcenters=1)


# --- grids in whole waves (marginops/triton/waves.py, launch._split_columns) -----------------

SPLIT_KERNELS = ("fwd", "bwd_df", "topk")   # row tiles × class splits: the launcher plans these
GPUS = {"H100 (132 SMs, sm_90)": (132, 9, 0), "A100 (108 SMs, sm_80)": (108, 8, 0)}


def _fake_cuda(monkeypatch, n_sm: int, major: int, minor: int):
    """torch.cuda.get_device_properties as a GPU with ``n_sm`` SMs would answer (no GPU needed)."""
    from types import SimpleNamespace

    from marginops.triton import launch

    smem = (228 if major >= 9 else 164) * 1024
    props = SimpleNamespace(major=major, minor=minor, multi_processor_count=n_sm,
                            regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                            shared_memory_per_multiprocessor=smem)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: props)
    if hasattr(launch, "_device_slots_info"):
        launch._device_slots_info.cache_clear()
        monkeypatch.setattr(launch, "_device_slots_info", launch._device_slots_info.__wrapped__)


def _programs_per_sm(cfg, arch: int, kernel: str, variant: str) -> int:
    """Occupancy from the AOT figures, by the CUDA occupancy rules (written out independently of
    waves.ctas_per_sm): registers per warp rounded up to 256, 1 KB shared reserved per CTA."""
    from marginops.triton import waves

    regs, smem = waves.figures(arch, cfg, kernel, variant)
    warps = cfg.num_warps
    by_regs = 65536 // (-(-regs * 32 // 256) * 256) // warps
    by_smem = (228 if arch >= 90 else 164) * 1024 // (smem + 1024)
    return max(1, min(2048 // (32 * warps), by_regs, by_smem, 32))


# D of the feature-gradient grids checked: aligned D (tables "half", "fp32", "_sub") and D not a
# multiple of 16 ("_unaligned"): q = ceil(D / BLOCK_DO) D chunks per row tile and split
GRID_DIMS = {True: (64, 128, 256, 512, 1024), False: (100, 500, 1000)}


@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_split_grids_are_whole_waves(monkeypatch, gpu):
    """For every configuration the launcher can pick (every variant, default and autotune) of the
    row-tile × split kernels, B ≥ 1024 and C from 100K to 10M classes: the grid the launcher plans
    wastes < 10 % of the GPU's program slots. Efficiency = useful column-tile steps / (waves ×
    slots × the longest program's steps): a partial last wave and a short last split both count
    as idle. The feature-gradient grid is row tiles × splits × D chunks: every D chunk's program
    walks its split's columns, so the chunks count as programs (D from GRID_DIMS)."""
    from marginops.triton import configs

    n_sm, major, minor = GPUS[gpu]
    _fake_cuda(monkeypatch, n_sm, major, minor)
    device = torch.device("cuda", 0)
    worst = (1.0, None)
    for var in configs.VARIANTS:
        for kernel in SPLIT_KERNELS:
            dims = GRID_DIMS[not var.endswith("_unaligned")] if kernel == "bwd_df" else (None,)
            for cfg in configs.gpu_configs(kernel, var):
                slots = n_sm * _programs_per_sm(cfg, 10 * major + minor, kernel, var)
                for D in dims:
                    q = -(-D // ml._d_chunk(cfg, D)) if D else 1
                    for B in (1024, 1025, 1536, 2000, 3000, 4096, 5000, 8192, 12288, 16384,
                              65536):
                        for C in (100_000, 123_457, 1_000_000, 4_000_000, 10_000_000):
                            splits, cps = ml._split_columns(B, C, cfg, device, kernel, var, q)
                            rt, ct = -(-B // cfg.block_b), -(-C // cfg.block_n)
                            per_split = cps // cfg.block_n
                            assert cps % cfg.block_n == 0 and (splits - 1) * per_split < ct
                            waves = -(-(rt * q * splits) // slots)
                            eff = rt * q * ct / (waves * slots * per_split)
                            if eff < worst[0]:
                                worst = (eff, (kernel, var, cfg, D, B, C, splits))
    assert worst[0] >= 0.90, f"wave efficiency {worst[0]:.1%} at {worst[1]}"


def test_split_plan_examples():
    """Hand-checked plans on 132 slots (one program per SM), C = 1M, 128-column tiles (7813)."""
    from marginops.triton import waves

    # B = 4096, 64-row tiles: 64 × 2 = 128 programs, one wave (old rule: 5 splits, 2.42 waves)
    assert waves.plan_splits(64, 7813, 132) == 2
    assert waves.efficiency(64, 7813, 2, 132) == pytest.approx(64 * 7813 / (132 * 3907))
    # B = 1024: 16 × 8 = 128 programs (97 %); B = 1536: 24 × 11 = 264 = two whole waves
    assert waves.plan_splits(16, 7813, 132) == 8
    assert waves.plan_splits(24, 7813, 132) == 11
    # few column tiles: at least 4 per split, so at most 2 splits of 8 tiles
    assert waves.plan_splits(1, 8, 132) == 2


def test_feature_gradient_plan_counts_its_d_chunks(monkeypatch):
    """The dF grid is row tiles × splits × D chunks. H100, half precision, D = 512 (BLOCK_DO =
    256: 2 chunks), B = 1024 (16 row tiles of 64), C = 1M (31250 column tiles of 32), one program
    per SM (204 registers × 8 warps): 4 splits give 16·4·2 = 128 programs, one wave at
    16·2·31250 / (132·7813) = 97 %, and 1–3 splits do not reach 95 % (32, 64, 96 programs).
    Counting row tiles only planned 8 splits: 256 programs in two waves, twice the partials."""
    from marginops.triton import configs, waves

    _fake_cuda(monkeypatch, 132, 9, 0)
    cfg = configs.default("bwd_df", "half")
    assert ml._d_chunk(cfg, 512) == 256 and waves.slots(cfg, 132, 90, None, "bwd_df", "half") == 132
    splits, cps = ml._split_columns(1024, 1_000_000, cfg, torch.device("cuda", 0), "bwd_df",
                                    "half", 2)
    assert (splits, cps) == (4, 7813 * 32)
    assert waves.efficiency(16, 31250, 4, 132, 2) == pytest.approx(16 * 2 * 31250 / (132 * 7813))
    assert all(waves.efficiency(16, 31250, s, 132, 2) < waves.TARGET for s in (1, 2, 3))
    # one D chunk (D ≤ 256): the forward's rule, 8 splits of 16 row tiles
    assert ml._split_columns(1024, 1_000_000, cfg, torch.device("cuda", 0), "bwd_df", "half",
                             1)[0] == 8


def test_resident_kernels_only_where_their_compile_checks_hold():
    """configs.resident_applies: sm_90, bf16 features and weight, K = 1, D ∈ {128, 256, 512},
    aligned — not sm_80 (163 KB of shared memory), sm_100 (other tensor-core code), sm_120 (less
    shared memory per block than the kernels' 192 KB), nor any other dtype, K or D."""
    from marginops.triton import configs

    ok = dict(features="bfloat16", weight="bfloat16", subcenters=1, dim=512, arch=90)
    assert configs.resident_applies(**ok)
    for change in (dict(arch=80), dict(arch=100), dict(arch=120), dict(arch=0),
                   dict(features="float16", weight="float16"), dict(weight="float32"),
                   dict(subcenters=2), dict(dim=1024), dict(dim=64), dict(dim=500)):
        assert not configs.resident_applies(**{**ok, **change}), change
    assert not configs.resident_applies(**ok, aligned=False)
    for dim in configs.RESIDENT_DIMS:
        assert configs.resident_applies(**{**ok, "dim": dim})
    with configs.force(resident=False):
        assert not configs.resident_applies(**ok)
    with configs.force(resident=True):  # tests: equal dtypes anywhere, the interpreter included
        assert configs.resident_applies(**{**ok, "arch": 0, "features": "float32",
                                           "weight": "float32"})


def test_resident_tiles_and_chunks_per_d():
    """resident.py's configuration and constexprs by D: one chunk at D ≤ 256; at D = 512 fwd and
    bwd_dw in two 256-wide chunks with 128-row / 128-column tiles, and bwd_df in one 512-wide
    chunk with 64-row tiles and its logit GEMM unchained; from D = 256 the forward's first chunk
    in registers (REG0) with 64-column W tiles (the launcher, the AOT checks and the model all
    read these)."""
    from marginops.triton import configs

    for dim in (128, 256):
        assert configs.resident_meta("fwd", dim) == dict(BLOCK_D=dim, TWO=False, REG0=dim == 256)
        assert configs.resident_meta("bwd_df", dim) == dict(BLOCK_D=dim, TWO=False, UNCHAINED=False)
        assert configs.resident_meta("bwd_dw", dim) == dict(BLOCK_D=dim, TWO=False)
        for k in ("bwd_df", "bwd_dw"):
            assert configs.resident_config(k, dim) == configs.DEFAULT["resident"][k]
    assert configs.resident_config("fwd", 128) == configs.DEFAULT["resident"]["fwd"]
    assert configs.resident_config("fwd", 256) == configs.resident_config("fwd", 512)
    assert configs.resident_meta("fwd", 512) == dict(BLOCK_D=256, TWO=True, REG0=True)
    fwd = configs.resident_config("fwd", 512)
    assert (fwd.block_b, fwd.block_n) == (128, 64) and fwd in configs.gpu_configs("fwd", "resident")
    assert configs.resident_meta("bwd_dw", 512) == dict(BLOCK_D=256, TWO=True)
    assert configs.resident_meta("bwd_df", 512) == dict(BLOCK_D=512, TWO=False, UNCHAINED=True)
    wide = configs.resident_config("bwd_df", 512)
    assert (wide.block_b, wide.block_do) == (64, 512) and wide in configs.gpu_configs(
        "bwd_df", "resident")
    assert configs.resident_config("bwd_dw", 512) == configs.DEFAULT["resident"]["bwd_dw"]


def test_forced_splits_and_the_interpreter_rule(monkeypatch):
    from marginops.triton import configs

    _fake_cuda(monkeypatch, 132, 9, 0)
    cfg = configs.default("fwd", "half")
    with configs.force(splits=3):
        assert ml._split_columns(4096, 1_000_000, cfg, torch.device("cuda", 0))[0] == 3
    assert ml._split_columns(4096, 1_000_000, cfg, torch.device("cpu"))[0] == 2


FIGURE_KERNELS = (*SPLIT_KERNELS, "bwd_dw", "merge", "norm")   # the kernels of waves.AOT_FIGURES


def aot_figures(kernel: str, var: str, cfg, arch: int) -> dict:
    """A fresh AOT compile of ``cfg`` in the heaviest specialisation ``var`` launches with
    (tests/test_triton_aot.py's recipe: every option flag on; bf16 / fp32 inputs; K = 1 as a
    constant unless sub-centers; unaligned D and strides for the ``_unaligned`` variants)."""
    import test_triton_aot as aot

    base = var.split("_")[0]
    aligned = not var.endswith("_unaligned")
    k_const = aligned and not var.endswith("_sub")
    fdt, wdt = ("fp32", "fp32") if base == "fp32" else ("bf16", "bf16")
    if kernel == "merge":   # fp32 partials only, no K, no D
        fdt, wdt, k_const, aligned = "fp32", "fp32", True, True
    dim = aot._resident_dim(kernel, cfg) if var == "resident" else aot.RESIDENT_DIM
    return aot.compile_stats(kernel, cfg, fdt, wdt, arch, True, k_const, aligned, var=var,
                             dim=dim)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                    reason="AOT compilation needs compiled-mode kernels (run without "
                           "TRITON_INTERPRET)")
def test_aot_figures_give_the_compiled_occupancy():
    """Every GPU configuration of the split, weight-gradient, merge and norm kernels (default and
    autotune, every variant) has a waves.AOT_FIGURES entry, and the entry gives the programs per
    SM its fresh AOT compile gives (``aot_figures``). When a kernel or configuration changes, the
    failure lists the entries to write into AOT_FIGURES."""
    import test_triton_aot as aot

    from marginops.triton import configs, waves

    wrong = []
    for kernel in FIGURE_KERNELS:
        for var in configs.VARIANTS:
            for cfg in configs.gpu_configs(kernel, var):
                for arch in aot.VARIANT_ARCHS.get(var, aot.ARCHS):
                    st = aot_figures(kernel, var, cfg, arch)
                    key = waves.figure_key(kernel, var, arch, cfg)
                    limits = waves.ARCH_LIMITS[arch]
                    threads = 32 * cfg.num_warps
                    want = waves.ctas_per_sm(st["regs"], st["shared"], threads, limits)
                    have = waves.ctas_per_sm(*waves.AOT_FIGURES.get(key, (255, 0)), threads,
                                             limits)
                    if key not in waves.AOT_FIGURES or want != have:
                        wrong.append(f"{key}: ({st['regs']}, {st['shared']}),")
    assert not wrong, "missing or stale waves.AOT_FIGURES entries:\n" + "\n".join(wrong)
