"""Launch-side helpers of the Triton kernels: the op's inputs as the kernels want them (``_Args``),
device guard, dot precision, configurations, class splits in whole waves (planned by waves.py)
and autotuning (shared by margin_lse.py and topk.py)."""

from __future__ import annotations

import contextlib
import functools
import time

import torch
import triton
from torch import Tensor

from . import _compat, configs, waves
from .tiles import interpreting

if interpreting():
    _compat.patch_interpreter()  # Triton ≤ 3.6's interpreter with numpy ≥ 2.4 (see _compat.py)


def _tf32_allowed() -> bool:
    """Has the user allowed TF32 for fp32 matmuls in torch?

    Read through ``torch.backends.cuda.matmul.fp32_precision`` (torch ≥ 2.9), which answers
    whichever API set it: the legacy ``allow_tf32 = True`` reads back as "tf32", and so does
    ``torch.backends.fp32_precision = "tf32"`` (inherited). Reading the legacy ``allow_tf32``
    instead raises "mix of the legacy and new APIs" once the new API has been used.
    Older torch has only the legacy flag.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    return precision == "tf32"


def _dot_precision(features: Tensor) -> str:
    """fp32 dots: "tf32x3" (three TF32 tensor-core products, fp32-level accuracy; IEEE fp32 FMA
    tiles need far more registers and spill) or plain "tf32" when the user allowed TF32 matmuls
    in torch (``_tf32_allowed``). fp16 / bf16 operands ignore it."""
    if features.dtype == torch.float32 and not _tf32_allowed():
        return "tf32x3"
    return "tf32"


def device_guard(device: torch.device):
    """Context under which every kernel of this package is launched (DESIGN §8).

    Triton launches on the *current* CUDA device and that device's current stream, not on the
    tensors' device: tensors on cuda:1 while cuda:0 is current would be read by a kernel on the
    wrong device and raced against cuda:1's stream. ``torch.cuda.device(device)`` makes the
    tensors' device current, so the launch also goes to *its* current stream (the caller's
    ``torch.cuda.stream(...)`` context is per device and is honoured). CPU tensors (interpreter):
    nothing to guard. ``tests/test_triton_launch.py`` checks statically that every launch is
    inside this context.
    """
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@functools.cache
def _device_slots_info(index: int) -> tuple[int, int, waves.SMLimits]:
    """(SM count, arch ×10, per-SM limits) of CUDA device ``index``: read once per device (a
    host-side property query, no synchronisation)."""
    props = torch.cuda.get_device_properties(index)
    arch = 10 * props.major + props.minor
    base = waves.ARCH_LIMITS[90 if arch >= 90 else 80]
    limits = waves.SMLimits(
        regs=getattr(props, "regs_per_multiprocessor", base.regs),
        threads=getattr(props, "max_threads_per_multi_processor", base.threads),
        smem=getattr(props, "shared_memory_per_multiprocessor", base.smem),
    )
    return props.multi_processor_count, arch, limits


class _Args:
    """The op's inputs, checked once and laid out as the kernels want them."""

    def __init__(self, features, weight, scale, bias, target_col, class_index, hard_tau, hard_t,
                 normalize_weight, subcenters, filter_threshold=0.0):
        if features.dtype == torch.float64 or weight.dtype == torch.float64:
            raise TypeError("backend 'triton' does not support float64 inputs; "
                            "use backend='torch' or backend='cpp' for float64")
        if features.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"backend 'triton': unsupported features dtype {features.dtype}")
        # every pointer a kernel dereferences must be on the features' device (a CPU target_col
        # read by a GPU kernel is an illegal address and a dead CUDA context)
        inputs = dict(weight=weight, scale=scale, bias=bias, target_col=target_col,
                      class_index=class_index, hard_tau=hard_tau, hard_t=hard_t)
        for name, t in inputs.items():
            if t is not None and t.device != features.device:
                raise ValueError(f"backend 'triton': {name} is on {t.device} but features are on "
                                 f"{features.device}; move every input of the op to "
                                 f"{features.device}")
        if interpreting() and torch.bfloat16 in (features.dtype, weight.dtype):
            raise TypeError("backend 'triton' under TRITON_INTERPRET=1 cannot run bfloat16 "
                            "inputs (Triton's interpreter computes bf16 tl.dot wrongly); use "
                            "float16 or float32 there, or run bfloat16 on a GPU")
        self.f = features.contiguous()
        self.w = weight.contiguous()
        self.B, self.D = self.f.shape
        self.K = int(subcenters)
        self.R = self.w.shape[0]
        self.C_local = self.R // self.K
        self.N = class_index.numel() if class_index is not None else self.C_local
        self.scale = scale.contiguous()
        self.bias = bias.contiguous() if bias is not None else None
        self.tcol = target_col.contiguous()
        self.cidx = class_index.contiguous() if class_index is not None else None
        self.hard = hard_tau is not None
        self.tau = hard_tau.contiguous() if self.hard else None
        self.t = hard_t.reshape(1).contiguous() if self.hard else None
        self.normalize = bool(normalize_weight)
        # interclass filtering: a runtime fp32 scalar, compiled in only when on (FILTER)
        self.filter = float(filter_threshold) > 0
        self.thr = float(filter_threshold) if self.filter else 0.0
        self.acc = scale.dtype
        # Triton specialises D, the strides and the base pointers on divisibility by 16
        aligned = (self.D % 16 == 0 and all(t.data_ptr() % 16 == 0 for t in (self.f, self.w)))
        self.variant = configs.variant(self.f.dtype, self.K, aligned, weight_dtype=self.w.dtype,
                                       dim=self.D, arch=_arch(self.f.device))
        self.resident = self.variant == "resident"  # resident.py's kernels (configs.py)
        dummy = self.scale
        # kernel pointer arguments: optional inputs replaced by a dummy the kernel never reads
        self.ptrs = (self.f, self.w, self.scale,
                     self.bias if self.bias is not None else dummy,
                     self.tcol,
                     self.cidx if self.cidx is not None else self.tcol,
                     self.tau if self.hard else dummy,
                     self.t if self.hard else dummy)
        self.flags = dict(HAS_BIAS=self.bias is not None, HAS_INDEX=self.cidx is not None,
                          HARD=self.hard, FILTER=self.filter, NORMALIZE=self.normalize,
                          HAS_SUB=self.K > 1,
                          DOT_PREC=_dot_precision(self.f))
        if self.resident:  # one sub-center; D in one or two chunks per kernel (configs.py)
            del self.flags["HAS_SUB"]
            self.res_meta = {k: configs.resident_meta(k, self.D)
                             for k in ("fwd", "bwd_df", "bwd_dw")}
        # chunked.py's backward (configs.chunked_applies): a subset of the resident launches
        self.chunked = self.resident and configs.chunked_applies(
            str(self.f.dtype).removeprefix("torch."), self.D, self.bias is not None)


def _arch(device: torch.device) -> int:
    """Compute capability × 10 of a CUDA device (read once per device), 0 elsewhere."""
    if device.type != "cuda":
        return 0
    return _device_slots_info(device.index if device.index is not None
                              else torch.cuda.current_device())[1]


def _config(kernel: str, a: _Args) -> configs.KernelConfig:
    """The configuration a launch uses when autotuning does not choose (see configs.py)."""
    c = configs.forced(kernel)
    if c is not None:
        return c
    if interpreting():
        return configs.INTERPRETER[kernel]
    if a.resident:
        return configs.resident_config(kernel, a.D)
    return configs.default(kernel, a.variant)


def _split_columns(B: int, N: int, cfg: configs.KernelConfig, device, kernel: str | None = None,
                   variant: str | None = None, d_chunks: int = 1) -> tuple[int, int]:
    """(splits, cols_per_split) of a row-tile × class-split (× ``d_chunks`` D chunks: the
    feature-gradient kernel) grid: cols_per_split is a multiple of BLOCK_N, every split
    non-empty. On a GPU the grid is planned in whole waves of the device's SMs × the programs per
    SM of ``kernel`` in ``variant`` with ``cfg`` (waves.py, counting all row tiles × splits ×
    d_chunks programs; without kernel / variant, the most conservative figures of ``cfg``);
    ``configs.force(splits=...)`` pins the count; the interpreter uses 2 splits (so its tests
    cross a split boundary)."""
    row_tiles = triton.cdiv(B, cfg.block_b)
    col_tiles = max(triton.cdiv(N, cfg.block_n), 1)
    forced = configs.forced_splits()
    if forced is not None:
        splits = max(1, min(forced, col_tiles))
    elif interpreting() or device.type != "cuda":
        splits = max(1, min(2, col_tiles))
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        n_sm, arch, limits = _device_slots_info(index)
        slots = waves.slots(cfg, n_sm, arch, limits, kernel, variant)
        splits = waves.plan_splits(row_tiles, col_tiles, slots, d_chunks)
    tiles_per_split = triton.cdiv(col_tiles, splits)
    return triton.cdiv(col_tiles, tiles_per_split), tiles_per_split * cfg.block_n


# --- autotuning (off by default; see configs.py) ----------------------------------------------

_tuned: dict[tuple, tuple] = {}


def _bench(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def _tune_key(a: _Args, what: str) -> tuple:
    bucket = lambda x: 1 << max(int(x) - 1, 0).bit_length()  # noqa: E731  next power of two
    return (what, a.f.dtype, a.w.dtype, a.K, bucket(a.B), bucket(a.N), bucket(a.D),
            tuple(sorted(a.flags.items())), a.f.device.index)


def _pick(a: _Args, what: str, run) -> tuple:
    """Configurations for a pass: fixed default, or the fastest of configs.AUTOTUNE (cached)."""
    kernels = {"fwd": ("fwd",), "bwd": ("bwd_df", "bwd_dw")}[what]
    if (interpreting() or not configs.autotune_enabled() or a.resident  # one config each
            or any(configs.forced(k) for k in kernels)):
        return tuple(None for _ in kernels)
    key = _tune_key(a, what)
    if key not in _tuned:
        best, best_t = None, float("inf")
        for combo in _combos(kernels, a.variant):
            t = _bench(lambda combo=combo: run(*combo))
            if t < best_t:
                best, best_t = combo, t
        _tuned[key] = best
    return _tuned[key]


def _combos(kernels, var):
    if len(kernels) == 1:
        return [(c,) for c in configs.gpu_configs(kernels[0], var)]
    # the two backward kernels are independent: tune each against the other's default
    df, dw = kernels
    out = [(c, configs.default(dw, var)) for c in configs.gpu_configs(df, var)]
    out += [(configs.default(df, var), c) for c in configs.gpu_configs(dw, var)[1:]]
    return out
