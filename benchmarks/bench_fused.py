"""marginops' main benchmark: the fused margin-softmax loss against what users run today.

    python benchmarks/bench_fused.py                  # CPU defaults, < 5 min on 2 cores
    python benchmarks/bench_fused.py --gpu            # the GPU sweep (automatic on a CUDA machine)
    python benchmarks/bench_fused.py --preset issue3  # the issue-3 acceptance figures
    python benchmarks/bench_fused.py --quick          # tiny smoke run (used by a test)

Providers (each skipped, with the reason in the CSV's ``status``, when it cannot run here):

    reference             marginops.reference: naive eager PyTorch, full B×C logits + F.cross_entropy
    reference_compiled    torch.compile of that same function (compile time reported apart)
    torch, cpp, cuda, triton   marginops' backends (``backend_status`` decides what runs)
    linear_cross_entropy  torch.nn.functional.linear_cross_entropy, chunked (plain-CE family only)
    pml                   pytorch_metric_learning.losses.{ArcFace,CosFace,NormalizedSoftmax}Loss
    gemm                  the bare GEMMs of the same shapes: X·Wᵀ (forward), dZ·W, dZᵀ·X (backward)

How it measures
---------------
* Every case (family, B, C, D, dtype) runs in a FRESH process (forked from a forkserver that only
  imported the libraries, so no OpenMP/CUDA state is inherited). In it, all providers and the
  bare GEMMs are timed round-robin — rep r of every provider before rep r+1 of any — so the load of
  a shared machine drifts over all of them alike. One rep is one training step: forward (with
  autograd recording), then backward; the forward and backward times of the same rep give the
  ``forward`` and ``backward`` rows, their sum the ``forward+backward`` row. Fixed reps after
  warm-up; median, p20 and p80 over the reps.
* Peak memory, CPU: each provider gets its own fresh process (the compiled one: the timing
  process, after the timing, since compiling again costs ~10 s). The provider first runs one
  warm-up step (on a C <= 4096 copy; the compiled provider at full size), which initialises
  thread pools, libraries and the autograd engine; then glibc hands every free heap page back
  (``malloc_trim``) and is set to mmap every block >= 256 KiB, the kernel's high-water mark is
  reset (``/proc/self/clear_refs``) and the resident size read. The growth of ``VmHWM`` over it
  during the forward, and during forward+backward, is ``peak_mem_mb`` (``backward`` rows repeat
  the forward+backward peak: a backward needs its forward). ``extra_mem_mb`` subtracts the
  gradients of the inputs (x.grad, W.grad): the memory "beyond inputs and their gradients".
  GPU: ``torch.cuda.max_memory_allocated`` minus the allocation before the step.
* Ratios: ``speedup_vs_X`` = median(X) / median(provider) for the same case and mode;
  ``gemm_ratio`` = median(provider) / median(bare GEMMs) for the same mode (1 GEMM forward, 2
  backward, 3 forward+backward: the naive count; the streamed op recomputes the logits, so its floor
  is 4/3 of the GEMMs). ``tflops``: effective, counting the streaming floor 2·B·C·D (forward),
  6·B·C·D (backward: recompute + two gradient GEMMs), 8·B·C·D (forward+backward) for every loss
  provider; for the ``gemm`` rows the GEMMs' own count (2, 4, 6 · B·C·D).
* A naive provider whose estimated footprint (~6 fp32 B×C + 3 C×D buffers) exceeds ``--mem-cap``
  (0.6) of the machine's memory is ``skipped``; an allocation failure is ``oom``; CPU workers run
  under an address-space limit (85 % of the memory available at the start) so that a runaway case
  fails with ``oom`` instead of waking the kernel's OOM killer.
* Cases with C >= ``--memory-only-from`` (CPU default 1 000 000) only run the memory processes, for
  ``--memory-only-providers`` (CPU default: reference, reference_compiled and the fused default
  backend); their times are those of the single measured step, ``reps`` = 1.
* torch.compile recompiles in every fresh process (~10 s here with the on-disk cache warm,
  20-35 s cold), so by default the compiled reference runs on the classes axis only
  (``--compile all`` everywhere), with ``dynamic=True``: one graph serves every C.
  ``compile_s`` = first step − median step.
* ``--time-budget`` (CPU default 255 s): tasks run in priority order (classes-axis timing, its
  memory, the memory-only sizes, then the other axes); a task that would not finish in time,
  judged from its FLOPs and the speed measured so far, is recorded as skipped.

Output, in ``benchmarks/results/<machine>/`` (``--out`` to change): ``bench.csv`` (one tidy row per
provider × case × mode, with machine, versions and timestamp), ``bench.md`` (the table printed at
the end), ``time_vs_classes.png`` and ``memory_vs_classes.png`` (log-log). Presets write
``bench-<preset>.*``.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import datetime as _dt
import gc
import itertools
import math
import multiprocessing as mp
import os
import platform
import re
import resource
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
try:
    import marginops  # noqa: F401  (installed with pip install -e .)
except ImportError:  # running from a checkout without PYTHONPATH=.
    sys.path.insert(0, ROOT)
    os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import marginops  # noqa: E402
from marginops import functional as mf  # noqa: E402
from marginops import reference as ref  # noqa: E402

PROVIDERS = ("reference", "reference_compiled", "torch", "cpp", "cuda", "triton",
             "linear_cross_entropy", "pml", "gemm")
FUSED = ("torch", "cpp", "cuda", "triton")
NAIVE = ("reference", "reference_compiled", "pml")   # materialise B×C: subject to --mem-cap
FAMILIES = ("arcface", "cosface", "normface", "ce")
MODES = ("forward", "backward", "forward+backward")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCALE, ARC_MARGIN, COS_MARGIN = 64.0, 0.5, 0.35

CSV_FIELDS = [
    "timestamp", "machine", "hostname", "cpu_model", "cores", "threads", "gpu", "python", "torch",
    "triton", "marginops", "pml", "provider", "family", "mode", "B", "C", "D", "dtype", "device",
    "reps", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "extra_mem_mb", "speedup_vs_reference",
    "speedup_vs_compiled", "speedup_vs_pml", "speedup_vs_lce", "gemm_ratio", "tflops", "compile_s",
    "rel_loss_diff", "status", "note",
]


@dataclass(frozen=True)
class Case:
    family: str
    B: int
    C: int
    D: int
    dtype: str
    device: str
    memory_only: bool = False

    @property
    def label(self) -> str:
        return f"{self.family} {self.dtype} B={self.B} C={_fmt_count(self.C)} D={self.D}"


@dataclass
class Plan:
    cases: list[Case]
    providers: list[str]
    reps: int
    warmup: int
    name: str                                   # "" (default), "issue3", "quick" -> file names
    axis: dict[Case, str] = field(default_factory=dict)   # the sweep each case belongs to
    compile_for: set[Case] = field(default_factory=set)   # cases where reference_compiled runs
    memory_only_providers: list[str] | None = None        # None: every provider
    compile_mode: str = "base"
    memory_for_case: dict[Case, list[str]] | None = None  # preset: which providers get memory


# ----------------------------------------------------------------------------- small helpers

def _fmt_count(n: int) -> str:
    for unit, div in (("M", 1_000_000), ("K", 1_000)):
        if n >= div and n % (div // 10) == 0:
            v = n / div
            return f"{v:g}{unit}"
    return str(n)


def _ints(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower().replace("_", "")
        mult = 1
        if part.endswith("k"):
            mult, part = 1_000, part[:-1]
        elif part.endswith("m"):
            mult, part = 1_000_000, part[:-1]
        out.append(int(float(part) * mult))
    return out


def _names(text: str, allowed) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise SystemExit(f"unknown {bad}; choose from {', '.join(allowed)}")
    return names


def _quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default 'linear' method)."""
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _mem_total_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _process_age_s() -> float:
    """Seconds since this process started (so the reported runtime includes the imports)."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "n/a"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_info(device: str) -> dict[str, str]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        import pytorch_metric_learning as pml
        pml_version = pml.__version__
    except ImportError:
        pml_version = "not installed"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    cores = os.cpu_count() or 1
    cpu = _cpu_model()
    slug = _slug(gpu) if device == "cuda" else f"{_slug(cpu)}-{cores}c"
    return {"machine": slug, "hostname": socket.gethostname(), "cpu_model": cpu,
            "cores": str(cores), "threads": str(torch.get_num_threads()), "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton_version, "marginops": marginops.__version__, "pml": pml_version}


# ----------------------------------------------------------------------------- providers

class Unavailable(Exception):
    """The provider cannot run for this case; the message goes to the status column."""

    def __init__(self, kind: str, reason: str):
        super().__init__(f"{kind}: {reason}")


def provider_reason(provider: str, case: Case) -> str | None:
    """None if ``provider`` applies to and can run for ``case``, else 'unavailable: ...' /
    'n/a: ...' (not applicable: no row is written) / 'skipped: ...'."""
    if provider in FUSED:
        reason = marginops.backend_status(case.device)[provider]
        if reason is not None:
            return f"unavailable: {reason}"
        if provider == "triton" and case.device == "cpu":
            return "skipped: Triton on CPU is the interpreter (a test tool, not a benchmark)"
        return None
    if provider == "linear_cross_entropy":
        if case.family != "ce":
            return "n/a: plain cross-entropy only (normalize_weight=False, no margin)"
        if not hasattr(F, "linear_cross_entropy"):
            return f"unavailable: torch {torch.__version__} has no F.linear_cross_entropy"
        return None
    if provider == "pml":
        if case.family == "ce":
            return "n/a: pytorch-metric-learning has no plain linear cross-entropy loss"
        try:
            import pytorch_metric_learning  # noqa: F401
        except ImportError as err:
            return f"unavailable: {err}"
        return None
    return None


def naive_bytes(case: Case) -> int:
    """Rough footprint of a naive provider: ~6 fp32-sized B×C buffers (cosines, scaled logits,
    mask, logits, log-softmax, their gradients) plus ~3 C×D buffers (Ŵ, its gradient, W.grad).
    (Measured at B=256, C=1M, D=512 fp32: 9.8 GB beyond the inputs and their gradients.)"""
    elt = torch.finfo(DTYPES[case.dtype]).bits // 8
    return 6 * case.B * case.C * 4 + 3 * case.C * case.D * elt


def reference_fn(family: str):
    if family == "arcface":
        return lambda x, w, y: ref.arcface_loss(x, w, y, scale=SCALE, margin=ARC_MARGIN)
    if family == "cosface":
        return lambda x, w, y: ref.cosface_loss(x, w, y, scale=SCALE, margin=COS_MARGIN)
    if family == "normface":
        return lambda x, w, y: ref.normface_loss(x, w, y, scale=SCALE)
    if family == "ce":
        return lambda x, w, y: F.cross_entropy(x @ w.t(), y)
    raise ValueError(family)


def fused_fn(family: str, backend: str):
    if family == "arcface":
        return lambda x, w, y: mf.arcface_loss(x, w, y, scale=SCALE, margin=ARC_MARGIN,
                                               backend=backend)
    if family == "cosface":
        return lambda x, w, y: mf.cosface_loss(x, w, y, scale=SCALE, margin=COS_MARGIN,
                                               backend=backend)
    if family == "normface":
        return lambda x, w, y: mf.normface_loss(x, w, y, scale=SCALE, backend=backend)
    if family == "ce":   # plain linear CE on raw features: lse over all classes − x·W_y
        def ce(x, w, y):
            lse_neg, dot_y = marginops.margin_lse(x, w, y, 1.0, normalize_weight=False,
                                                  backend=backend)
            return F.softplus(lse_neg - dot_y).mean()
        return ce
    raise ValueError(family)


@dataclass
class Step:
    """One provider ready to run: ``fn()`` returns the loss; ``leaves`` get their grads cleared."""
    fn: object
    leaves: list
    grad_bytes: int
    note: str = ""


def make_step(provider: str, case: Case, x, w, y, opts: dict) -> Step:
    elt = x.element_size()
    grad_bytes = (case.B * case.D + case.C * case.D) * elt
    if provider == "reference":
        f = reference_fn(case.family)
        return Step(lambda: f(x, w, y), [x, w], grad_bytes)
    if provider == "reference_compiled":
        import torch._inductor.config as inductor_config
        inductor_config.compile_threads = 1   # 2 shared cores: no compile-worker pool
        dynamic = not opts.get("compile_static", False)
        f = torch.compile(reference_fn(case.family), dynamic=dynamic)
        return Step(lambda: f(x, w, y), [x, w], grad_bytes,
                    note=f"torch.compile(dynamic={dynamic})")
    if provider in FUSED:
        f = fused_fn(case.family, provider)
        return Step(lambda: f(x, w, y), [x, w], grad_bytes)
    if provider == "linear_cross_entropy":
        options = torch.nn.LinearCrossEntropyOptions() if hasattr(
            torch.nn, "LinearCrossEntropyOptions") else None
        note = "chunked (LinearCrossEntropyOptions())" if options is not None else "reference path"
        return Step(lambda: F.linear_cross_entropy(x, w, y, options=options), [x, w], grad_bytes,
                    note=note)
    if provider == "pml":
        from pytorch_metric_learning import losses as pml_losses
        if case.family == "arcface":   # pml takes the margin in degrees, W as (D, C)
            mod = pml_losses.ArcFaceLoss(case.C, case.D, margin=math.degrees(ARC_MARGIN),
                                         scale=SCALE)
        elif case.family == "cosface":
            mod = pml_losses.CosFaceLoss(case.C, case.D, margin=COS_MARGIN, scale=SCALE)
        else:
            mod = pml_losses.NormalizedSoftmaxLoss(case.C, case.D, temperature=1.0 / SCALE)
        mod = mod.to(device=x.device, dtype=x.dtype)
        with torch.no_grad():
            mod.W.copy_(w.detach().t())
        return Step(lambda: mod(x, y), [x, mod.W], grad_bytes, note="W stored (D, C)")
    raise ValueError(provider)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _clear(step: Step) -> None:
    for leaf in step.leaves:
        leaf.grad = None


def run_step(step: Step, device: str) -> tuple[float, float, float]:
    """One training step; returns (forward s, backward s, loss value)."""
    _clear(step)
    _sync(device)
    t0 = time.perf_counter()
    loss = step.fn()
    _sync(device)
    t1 = time.perf_counter()
    loss.backward()
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, float(loss.detach())


def run_gemms(x, w, dz, device: str) -> tuple[float, float, float]:
    """The naive loss's GEMMs: X·Wᵀ forward; dZ·W (→ dX) and dZᵀ·X (→ dW) backward."""
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        z = x @ w.t()
        _sync(device)
        t1 = time.perf_counter()
        gx = dz @ w
        gw = dz.t() @ x
        _sync(device)
        t2 = time.perf_counter()
    del z, gx, gw
    return t1 - t0, t2 - t1, float("nan")


def _is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, MemoryError) or any(s in text for s in (
        "out of memory", "can't allocate memory", "cannot allocate memory",
        "not enough memory", "failed to allocate"))


def _failure(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    return ("oom: " if _is_oom(err) else "error: ") + f"{type(err).__name__}: {first}"


# ----------------------------------------------------------------------------- the worker process

def _limit_address_space(extra_bytes: int | None) -> None:
    """Make a runaway CPU case fail with an allocation error instead of the OOM killer."""
    if not extra_bytes:
        return
    vm = (_proc_status_kb("VmSize") or 0) * 1024
    limit = vm + extra_bytes
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError):
        pass


def _malloc_return_freed() -> None:
    """glibc: give free heap pages back (malloc_trim), then serve blocks >= 256 KiB with mmap and
    trim eagerly, so memory freed by earlier steps is neither resident nor silently reused."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        libc.mallopt(-3, 256 * 1024)   # M_MMAP_THRESHOLD (also stops its dynamic growth)
        libc.mallopt(-1, 256 * 1024)   # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _make_inputs(case: Case, seed: int = 0):
    """x (B, D) raw embeddings, W (C, D) ~ N(0, 0.01²) like insightface, labels (B,); made on the
    device in the case's dtype (no host copy of a 10M-row classifier)."""
    kw = {"device": case.device, "dtype": DTYPES[case.dtype]}
    g = torch.Generator(device=case.device).manual_seed(seed)
    x = torch.randn(case.B, case.D, generator=g, **kw).requires_grad_(True)
    w = torch.randn(case.C, case.D, generator=g, **kw).mul_(0.01).requires_grad_(True)
    y = torch.randint(0, case.C, (case.B,), generator=g, device=case.device)
    return x, w, y


def measure_memory(step: Step, case: Case) -> dict:
    """Peak growth during one forward and one forward+backward (bytes), and the step's times."""
    out: dict = {}
    _clear(step)
    gc.collect()
    if case.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        loss = step.fn()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        peak_f = torch.cuda.max_memory_allocated() - base
        loss.backward()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        peak_fb = torch.cuda.max_memory_allocated() - base
        out["mem_note"] = "torch.cuda.max_memory_allocated"
    else:
        reset = _reset_hwm()
        base = (_proc_status_kb("VmRSS") or 0) * 1024
        t0 = time.perf_counter()
        loss = step.fn()
        t1 = time.perf_counter()
        peak_f = (_proc_status_kb("VmHWM") or 0) * 1024 - base
        loss.backward()
        t2 = time.perf_counter()
        peak_fb = (_proc_status_kb("VmHWM") or 0) * 1024 - base
        out["mem_note"] = ("VmHWM growth" if reset else
                           "VmHWM growth (HWM not resettable here: includes input setup)")
    out.update(peak_fwd=max(peak_f, 0), peak_fb=max(peak_fb, 0), fwd=t1 - t0, bwd=t2 - t1,
               loss=float(loss.detach()))
    return out


def worker(spec: dict, conn) -> None:
    """Entry point of a fresh process: one case, some providers. Sends back a result dict."""
    try:
        log = spec.get("log")
        if log:   # keep the parent's progress bar clean: compiler chatter goes to the log
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        result = _work(spec)
    except BaseException as err:  # noqa: BLE001 - report anything, the parent records it
        result = {"fatal": _failure(err), "trace": traceback.format_exc()}
    conn.send(result)
    conn.close()


def _work(spec: dict) -> dict:
    case = Case(**spec["case"])
    providers: list[str] = spec["providers"]
    memory_for: str | None = spec.get("memory_for")
    reps, warmup = spec["reps"], spec["warmup"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if case.device == "cpu":
        _limit_address_space(spec.get("address_space_extra"))
    torch.manual_seed(0)
    x, w, y = _make_inputs(case)
    results = {p: {"status": "ok", "fwd": [], "bwd": [], "note": ""} for p in providers}
    steps: dict[str, Step] = {}
    dz = None
    for p in providers:
        try:
            if p == "gemm":
                dz = torch.randn(case.B, case.C, device=case.device, dtype=DTYPES[case.dtype])
                continue
            steps[p] = make_step(p, case, x, w, y, spec)
            results[p]["note"] = steps[p].note
        except Exception as err:  # noqa: BLE001
            results[p]["status"] = _failure(err)

    def memory(p: str, full_warmup: bool) -> None:
        """Peak memory of provider p, measured warm: one step first (at full size when
        ``full_warmup`` — the compiled provider must compile for the measured shapes — else on a
        small copy with C <= 4096, which initialises thread pools, libraries and the autograd
        engine at little cost); then every free heap page goes back to the OS and glibc mmaps
        every block >= 256 KiB, so the growth counts this step's own allocations and nothing
        left over from the warm-up."""
        print(f"[memory] {case.label} {p}", flush=True)
        r = results[p]
        try:
            if full_warmup and "first_fb" not in r:
                f, b, loss = run_step(steps[p], case.device)
                r["first_fb"], r["loss"] = f + b, loss
            elif not full_warmup:
                small = replace(case, C=min(case.C, 4096))
                xs, ws, ys = _make_inputs(small, seed=1)
                run_step(make_step(p, small, xs, ws, ys, spec), case.device)
                del xs, ws, ys
            _clear(steps[p])
            gc.collect()
            if case.device == "cpu":
                _malloc_return_freed()
            m = measure_memory(steps[p], case)
            r.update(peak_fwd=m["peak_fwd"], peak_fb=m["peak_fb"],
                     grad_bytes=steps[p].grad_bytes, mem_note=m["mem_note"] + (
                         " after a full-size warm-up" if full_warmup else
                         " after a small warm-up"))
            r.setdefault("loss", m["loss"])
            if reps == 0:   # memory-only case: the measured step is the timing
                r["fwd"], r["bwd"] = [m["fwd"]], [m["bwd"]]
        except Exception as err:  # noqa: BLE001
            r["mem_status"] = _failure(err)
            if reps == 0:
                r["status"] = r["mem_status"]

    if memory_for in steps and reps == 0:
        memory(memory_for, full_warmup=memory_for == "reference_compiled")

    active = [p for p in providers if results[p]["status"] == "ok" and (p in steps or p == "gemm")]
    if reps > 0:
        for rep in range(warmup + reps):
            for p in list(active):
                try:
                    if p == "gemm":
                        f, b, loss = run_gemms(x.detach(), w.detach(), dz, case.device)
                    else:
                        f, b, loss = run_step(steps[p], case.device)
                except Exception as err:  # noqa: BLE001
                    results[p]["status"] = _failure(err)
                    active.remove(p)
                    steps.pop(p, None)
                    gc.collect()
                    continue
                if "first_fb" not in results[p]:
                    results[p]["first_fb"], results[p]["loss"] = f + b, loss
                if rep >= warmup:
                    results[p]["fwd"].append(f)
                    results[p]["bwd"].append(b)
        # the compiled provider's memory: measured last, warm, so the timing above ran untouched
        if memory_for in steps and memory_for in active:
            dz = None
            for s in steps.values():
                _clear(s)
            memory(memory_for, full_warmup=True)
    return {"results": results}


# ----------------------------------------------------------------------------- planning

def default_plan(args, device: str) -> Plan:
    on_gpu = device == "cuda"
    if args.quick:
        name = "quick"
        classes, batches, dims = [1_000, 4_000], [16], [32]
        dtypes, families = ["float32"], ["arcface", "ce"]
        reps, warmup = args.reps or 3, args.warmup if args.warmup is not None else 1
    elif args.preset == "issue3":
        name = "issue3"
        classes, batches, dims = [100_000, 1_000_000], [256], [512]
        dtypes, families = ["float32"], ["arcface"]
        reps, warmup = args.reps or 5, args.warmup if args.warmup is not None else 1
    else:
        name = ""
        if on_gpu:
            classes, batches, dims = [100_000, 1_000_000, 10_000_000], [512, 128], [512, 128]
            dtypes, families = ["bfloat16", "float32"], ["arcface", "cosface", "ce"]
        else:
            classes, batches, dims = [10_000, 100_000, 1_000_000], [64, 256], [128, 512]
            dtypes, families = ["float32", "bfloat16"], ["arcface", "cosface", "ce"]
        reps = args.reps or (20 if on_gpu else 5)
        warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    classes = _ints(args.classes) if args.classes else classes
    batches = _ints(args.batch) if args.batch else batches
    dims = _ints(args.dim) if args.dim else dims
    dtypes = _names(args.dtypes, DTYPES) if args.dtypes else dtypes
    families = _names(args.families, FAMILIES) if args.families else families
    memory_only_from = args.memory_only_from
    if memory_only_from is None:
        memory_only_from = 0 if (on_gpu or name == "quick") else 1_000_000

    def case(family, B, C, D, dtype):
        return Case(family, B, C, D, dtype, device,
                    memory_only=bool(memory_only_from) and C >= memory_only_from)

    base_f, base_b, base_d, base_t = families[0], batches[0], dims[0], dtypes[0]
    sweep_c = classes[0]
    axis: dict[Case, str] = {}

    def add(c: Case, name_: str) -> None:
        axis.setdefault(c, name_)

    if args.grid:
        for f, t, b, d, c in itertools.product(families, dtypes, batches, dims, classes):
            add(case(f, b, c, d, t), "grid")
    else:   # the classes axis at the base point, then one axis at a time at the smallest C
        for c in classes:
            add(case(base_f, base_b, c, base_d, base_t), "classes")
        for b in batches[1:]:
            add(case(base_f, b, sweep_c, base_d, base_t), "batch")
        for d in dims[1:]:
            add(case(base_f, base_b, sweep_c, d, base_t), "embedding")
        for t in dtypes[1:]:
            add(case(base_f, base_b, sweep_c, base_d, t), "dtype")
        for f in families[1:]:
            add(case(f, base_b, sweep_c, base_d, base_t), "family")
    cases = list(axis)

    status = marginops.backend_status(device)
    fused_default = next((b for b in (("triton", "cuda", "torch") if on_gpu else ("cpp", "torch"))
                          if status[b] is None), "torch")
    if args.providers:
        providers = _names(args.providers, PROVIDERS)
    elif name == "issue3":   # cpp when built; else the torch backend stands in, and says so
        providers = ["gemm", "reference", "reference_compiled", "cpp"] + (
            [] if fused_default == "cpp" else ["torch"])
    else:
        providers = list(PROVIDERS)
    # torch.compile recompiles in every fresh process (~6 s from the on-disk cache, ~20-35 s cold
    # on 2 shared cores), so by default it runs on the classes axis only, with dynamic shapes
    # (one graph for every C).
    mode = args.compile
    if mode == "auto":
        mode = "none" if name == "quick" else "base"
    compile_for: set[Case] = set()
    if mode == "all":
        compile_for = set(cases)
    elif mode == "base":
        compile_for = {c for c in cases if axis[c] in ("classes", "grid")
                       and c.family == base_f and c.dtype == base_t}
    memory_only_providers = None
    if args.memory_only_providers:
        memory_only_providers = _names(args.memory_only_providers, PROVIDERS + ("auto",))
    elif not on_gpu:   # the memory figure: naive vs compiled vs the fused default backend
        memory_only_providers = ["reference", "reference_compiled", "auto"]
    if memory_only_providers is not None:
        memory_only_providers = [fused_default if p == "auto" else p
                                 for p in memory_only_providers]
    memory_for_case = None
    if name == "issue3":   # the acceptance figure: peak extra memory of cpp vs the naive loss
        compared = [p for p in dict.fromkeys(("reference", "cpp", fused_default)) if p in providers]
        memory_for_case = {c: compared if c.C >= 1_000_000 else [] for c in cases}
    return Plan(cases, providers, reps, warmup, name, axis=axis, compile_for=compile_for,
                memory_only_providers=memory_only_providers, compile_mode=mode,
                memory_for_case=memory_for_case)


@dataclass
class Task:
    case: Case
    providers: list[str]
    memory_for: str | None
    reps: int
    est_s: float = 1.0   # estimated seconds at 20 GFLOP/s: progress weight and budget check
    priority: int = 0    # run order: lower first (see build_tasks)

    @property
    def label(self) -> str:
        what = f"memory {self.memory_for}" if self.reps == 0 else f"time {len(self.providers)}"
        return f"{self.case.label}: {what}"


def build_tasks(plan: Plan, mem_cap: float, mem_total: int
                ) -> tuple[list[Task], dict[tuple[Case, str], str]]:
    """Fresh-process tasks, in run order, and the statuses decided without running anything.

    Order (so that a time budget cuts the least informative work): the classes axis' timing,
    then its memory, then the memory-only (largest C) cases, then the other axes."""
    tasks: list[Task] = []
    decided: dict[tuple[Case, str], str] = {}
    for case in plan.cases:
        on_classes = plan.axis.get(case) in ("classes", "grid", None)
        runnable = []
        for p in plan.providers:
            reason = provider_reason(p, case)
            if reason is None and p == "reference_compiled" and case not in plan.compile_for:
                reason = ("skipped: --compile none" if plan.compile_mode == "none" else
                          "skipped: torch.compile runs on the classes axis only by default (it "
                          "recompiles in every fresh process); --compile all")
            if reason is None and case.memory_only and plan.memory_only_providers is not None \
                    and p not in plan.memory_only_providers:
                reason = ("skipped: memory-only case (C >= --memory-only-from) runs "
                          + ", ".join(plan.memory_only_providers) + " (--memory-only-providers)")
            if reason is None and p == "gemm" and case.memory_only:
                reason = "skipped: memory-only case (C >= --memory-only-from)"
            if reason is None and p in NAIVE and naive_bytes(case) > mem_cap * mem_total:
                reason = (f"skipped: needs ~{naive_bytes(case) / 2**30:.1f} GiB > "
                          f"{mem_cap:.0%} of the {mem_total / 2**30:.1f} GiB of memory "
                          "(--mem-cap)")
            if reason is None:
                runnable.append(p)
            else:
                decided[(case, p)] = reason
        step_s = 8 * case.B * case.C * case.D / 20e9 * (2 if case.dtype != "float32" else 1)
        allowed_mem = None if plan.memory_for_case is None else plan.memory_for_case.get(case, [])
        if not case.memory_only and runnable:
            memory_for = "reference_compiled" if "reference_compiled" in runnable else None
            if allowed_mem is not None and memory_for not in allowed_mem:
                memory_for = None
            est = 1 + (8 if "reference_compiled" in runnable else 0) + (
                plan.reps + plan.warmup) * len(runnable) * step_s
            tasks.append(Task(case, runnable, memory_for, plan.reps, est,
                              priority=0 if on_classes else 3))
        # memory-only: the naive reference and the fused backend first, the compiled one last
        mem_order = sorted(runnable, key=lambda p: (p == "reference_compiled", p not in (
            "reference",) + FUSED))
        for p in mem_order:
            if p == "gemm" or (p == "reference_compiled" and not case.memory_only):
                continue   # gemm: no memory figure; compiled: measured inside the timing process
            if allowed_mem is not None and p not in allowed_mem:
                if case.memory_only:
                    decided[(case, p)] = "skipped: not part of this preset's memory comparison"
                continue
            est = 1 + step_s + (8 + step_s if p == "reference_compiled" else 0)
            priority = 3 if not on_classes else (2 if case.memory_only else 1)
            tasks.append(Task(case, [p], p, 0, est, priority=priority))
    tasks.sort(key=lambda t: t.priority)   # stable: case order within a priority
    return tasks, decided


# ----------------------------------------------------------------------------- rows

def build_rows(plan: Plan, tasks: list[Task], outcomes: list[dict], decided: dict, info: dict,
               timestamp: str) -> list[dict]:
    per: dict[tuple[Case, str], dict] = {}   # merged result per (case, provider)
    for task, outcome in zip(tasks, outcomes):
        timing = task.reps > 0 or task.case.memory_only   # this task decides the status
        for p in task.providers:
            slot = per.setdefault((task.case, p), {"status": "ok", "fwd": [], "bwd": [],
                                                   "note": ""})
            if "fatal" in outcome:
                if timing:
                    slot["status"] = outcome["fatal"]
                if task.memory_for == p:
                    slot["mem_status"] = outcome["fatal"]
                continue
            r = outcome["results"].get(p, {})
            if timing:
                slot["status"] = r.get("status", "ok")
                for key in ("fwd", "bwd", "first_fb", "loss", "note"):
                    if r.get(key):
                        slot[key] = r[key]
            if task.memory_for == p:
                for key in ("peak_fwd", "peak_fb", "grad_bytes", "mem_note", "mem_status"):
                    if key in r:
                        slot[key] = r[key]
                if r.get("status", "ok") != "ok" and not timing:
                    slot["mem_status"] = r["status"]

    def times(slot, mode):
        f, b = slot["fwd"], slot["bwd"]
        if mode == "forward":
            return f
        if mode == "backward":
            return b
        return [a + c for a, c in zip(f, b)]

    rows = []
    for case in plan.cases:
        medians: dict[tuple[str, str], float] = {}
        for p in plan.providers:
            slot = per.get((case, p))
            if slot and slot["status"] == "ok" and slot["fwd"]:
                for mode in MODES:
                    medians[(p, mode)] = _quantile(times(slot, mode), 0.5)
        ref_loss = per.get((case, "reference"), {}).get("loss")
        for p in plan.providers:
            reason = decided.get((case, p))
            if reason is not None and reason.startswith("n/a"):
                continue
            slot = per.get((case, p), {"status": reason or "skipped: not run", "fwd": [],
                                       "bwd": [], "note": ""})
            for mode in MODES:
                row = dict(info)
                row.update(timestamp=timestamp, provider=p, family=case.family, mode=mode,
                           B=case.B, C=case.C, D=case.D, dtype=case.dtype, device=case.device,
                           status=slot["status"], note=slot.get("note", ""))
                t = times(slot, mode) if slot["status"] == "ok" else []
                notes = [row["note"]] if row["note"] else []
                if t:
                    med = _quantile(t, 0.5)
                    row.update(reps=len(t), median_ms=med * 1e3, p20_ms=_quantile(t, 0.2) * 1e3,
                               p80_ms=_quantile(t, 0.8) * 1e3)
                    if len(t) == 1:
                        notes.append("time of the single measured step (memory process)")
                    for col, other in (("speedup_vs_reference", "reference"),
                                       ("speedup_vs_compiled", "reference_compiled"),
                                       ("speedup_vs_pml", "pml"),
                                       ("speedup_vs_lce", "linear_cross_entropy")):
                        if (other, mode) in medians and other != p:
                            row[col] = medians[(other, mode)] / med
                    if ("gemm", mode) in medians:
                        row["gemm_ratio"] = med / medians[("gemm", mode)]
                    k = {"forward": 2, "backward": 6, "forward+backward": 8}[mode]
                    if p == "gemm":
                        k = {"forward": 2, "backward": 4, "forward+backward": 6}[mode]
                    row["tflops"] = k * case.B * case.C * case.D / med / 1e12
                    if p == "reference_compiled" and "first_fb" in slot and mode != "forward":
                        fb = _quantile(times(slot, "forward+backward"), 0.5)
                        row["compile_s"] = max(slot["first_fb"] - fb, 0.0)
                if slot.get("mem_status") and slot["status"] == "ok":
                    notes.append("memory: " + slot["mem_status"])
                if "peak_fb" in slot and slot["status"] == "ok":
                    peak = slot["peak_fwd"] if mode == "forward" else slot["peak_fb"]
                    extra = peak if mode == "forward" else peak - slot.get("grad_bytes", 0)
                    row["peak_mem_mb"] = peak / 2**20
                    row["extra_mem_mb"] = extra / 2**20
                    if slot.get("mem_note"):
                        notes.append(slot["mem_note"])
                if ref_loss is not None and "loss" in slot and p not in ("gemm", "reference") \
                        and slot["status"] == "ok":
                    row["rel_loss_diff"] = abs(slot["loss"] - ref_loss) / max(abs(ref_loss), 1e-12)
                row["note"] = "; ".join(notes)
                rows.append(row)
    return rows


def _num(v, fmt: str) -> str:
    return "" if v is None or v == "" else format(v, fmt)


def markdown_table(rows: list[dict], mode: str = "forward+backward") -> str:
    head = ("| case | provider | median ms [p20, p80] | × eager | × compiled | × pml/lce "
            "| / GEMMs | TFLOP/s | peak MB (extra) | status |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if r["mode"] != mode:
            continue
        case = f"{r['family']} {r['dtype']} B={r['B']} C={_fmt_count(r['C'])} D={r['D']}"
        t = ""
        if r.get("median_ms") is not None:
            t = f"{r['median_ms']:.4g} [{r['p20_ms']:.4g}, {r['p80_ms']:.4g}]"
            if r.get("reps") == 1:
                t += " (1 step)"
        peer = r.get("speedup_vs_pml") or r.get("speedup_vs_lce")
        mem = ""
        if r.get("peak_mem_mb") is not None:
            mem = f"{r['peak_mem_mb']:.0f} ({r['extra_mem_mb']:.0f})"
        status = r["status"] if len(r["status"]) < 60 else r["status"][:57] + "..."
        lines.append(f"| {case} | {r['provider']} | {t}"
                     f" | {_num(r.get('speedup_vs_reference'), '.2f')}"
                     f" | {_num(r.get('speedup_vs_compiled'), '.2f')} | {_num(peer, '.2f')}"
                     f" | {_num(r.get('gemm_ratio'), '.2f')} | {_num(r.get('tflops'), '.3f')}"
                     f" | {mem} | {status} |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot(rows: list[dict], out_dir: str, suffix: str) -> list[str]:
    """time and peak memory against C (log-log), forward+backward, one line per provider, for
    every (family, dtype, B, D) that was run at two or more C."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fb = [r for r in rows if r["mode"] == "forward+backward" and r["status"] == "ok"]
    groups: dict[tuple, list[dict]] = {}
    for r in fb:
        groups.setdefault((r["family"], r["dtype"], r["B"], r["D"], r["device"]), []).append(r)
    groups = {k: v for k, v in groups.items() if len({r["C"] for r in v}) >= 2}
    written = []
    if not groups:
        return written
    figures = (("time_vs_classes", [("median_ms", "forward+backward time (ms)")]),
               ("memory_vs_classes", [("peak_mem_mb", "peak memory growth (MB)"),
                                      ("extra_mem_mb", "beyond the inputs' gradients (MB)")]))
    for fname, panels in figures:
        fig, axes = plt.subplots(len(panels), len(groups), squeeze=False,
                                 figsize=(6.4 * len(groups), 4.4 * len(panels)))
        for col, (key, group) in enumerate(groups.items()):
            family, dtype, B, D, device = key
            for row, (metric, ylabel) in enumerate(panels):
                ax = axes[row][col]
                for p in PROVIDERS:
                    if p == "gemm" and metric != "median_ms":
                        continue
                    pts = sorted((r["C"], r[metric]) for r in group
                                 if r["provider"] == p and r.get(metric) is not None
                                 and r[metric] > 0)
                    if pts:
                        ax.plot([c for c, _ in pts], [v for _, v in pts], marker="o", label=p)
                ax.set(xscale="log", yscale="log", xlabel="number of classes C", ylabel=ylabel,
                       title=f"{family} {dtype} B={B} D={D} ({device})")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{fname}{suffix}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------------- driver

def _run_tasks(tasks: list[Task], plan: Plan, args, log_path: str, address_extra: int | None,
               deadline: float | None, budget_s: float) -> list[dict]:
    from tqdm import tqdm

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "marginops", "marginops.reference",
                                "pytorch_metric_learning.losses"])
    outcomes: list[dict] = []
    # progress is weighted by each task's estimated work (FLOPs), so the ETA means something
    weights = [t.est_s for t in tasks]
    scale = 100.0 / max(sum(weights), 1e-12)
    bar = tqdm(total=100.0, desc="bench", dynamic_ncols=True, mininterval=1.0,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}")
    spent = estimated = 0.0   # actual vs estimated seconds of finished tasks: the load factor
    for task in tasks:
        bar.set_postfix_str(task.label)
        factor = max(spent / estimated, 0.5) if estimated > 5 else 2.0
        if deadline is not None and time.monotonic() + factor * task.est_s > deadline:
            outcomes.append({"fatal": f"skipped: would not finish within the time budget "
                                      f"({budget_s:.0f} s; --time-budget)"})
            bar.update(task.est_s * scale)
            continue
        t_task = time.monotonic()
        spec = {"case": asdict(task.case), "providers": task.providers,
                "memory_for": task.memory_for, "reps": task.reps, "warmup": plan.warmup,
                "compile_static": args.compile_static, "log": log_path,
                "address_space_extra": address_extra, "threads": args.threads}
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=worker, args=(spec, child), daemon=True)
        proc.start()
        child.close()
        timeout = args.task_timeout
        if deadline is not None:   # a task that overruns the budget is stopped soon after it
            timeout = min(timeout, max(deadline - time.monotonic(), 0) + 15)
        outcome = None
        if parent.poll(timeout):
            try:
                outcome = parent.recv()
            except EOFError:
                outcome = None
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        if outcome is None:
            code = proc.exitcode
            if code is not None and code < 0 and -code == 9:
                outcome = {"fatal": "oom: worker killed (SIGKILL, likely the OOM killer)"}
            elif code is None or code == -9:
                outcome = {"fatal": f"timeout: no result after {timeout:.0f} s"}
            else:
                outcome = {"fatal": f"error: worker exited with code {code} (see bench.log)"}
        if "trace" in outcome:
            with open(log_path, "a") as fh:
                fh.write(f"\n[{task.label}] {outcome['fatal']}\n{outcome['trace']}\n")
        outcomes.append(outcome)
        spent += time.monotonic() - t_task
        estimated += task.est_s
        bar.update(task.est_s * scale)
    bar.set_postfix_str("done")
    bar.close()
    try:   # stop the forkserver now rather than at interpreter exit
        from multiprocessing import forkserver
        forkserver._forkserver._stop()
    except Exception:  # noqa: BLE001 - private API; exit stops it anyway
        pass
    return outcomes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="run the GPU sweep (default on CUDA)")
    p.add_argument("--cpu", action="store_true", help="run the CPU sweep even if CUDA is there")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    p.add_argument("--preset", choices=["issue3"], help="issue3: fp32 ArcFace B=256 D=512, "
                   "C=100K timed (reference, compiled, cpp, bare GEMMs) + C=1M peak memory "
                   "(cpp vs the naive reference)")
    p.add_argument("--classes", help="comma list, e.g. 10k,100k,1m")
    p.add_argument("--batch", help="comma list; the first is the base point")
    p.add_argument("--dim", help="embedding sizes; the first is the base point")
    p.add_argument("--dtypes", help="float32,bfloat16,float16; the first is the base point")
    p.add_argument("--families", help=f"{','.join(FAMILIES)}; the first is the base point")
    p.add_argument("--providers", help=f"subset of {','.join(PROVIDERS)}")
    p.add_argument("--grid", action="store_true",
                   help="full cartesian product instead of one axis at a time")
    p.add_argument("--reps", type=int, help="timed reps per case (CPU 5, GPU 20)")
    p.add_argument("--warmup", type=int, help="warm-up reps per case (CPU 1, GPU 3)")
    p.add_argument("--memory-only-from", type=lambda s: _ints(s)[0], default=None,
                   help="cases with C >= this only run the memory processes (CPU default 1m; "
                        "0 = never)")
    p.add_argument("--memory-only-providers",
                   help="providers run at memory-only sizes (CPU default: reference,"
                        "reference_compiled,auto; auto = the fused default backend)")
    p.add_argument("--compile", choices=["auto", "base", "all", "none"], default="auto",
                   help="where reference_compiled runs: base = the classes axis (default), "
                        "all, none")
    p.add_argument("--compile-static", action="store_true",
                   help="torch.compile(dynamic=False) instead of one dynamic-shape graph")
    p.add_argument("--mem-cap", type=float, default=0.6,
                   help="skip a naive provider estimated to need more than this fraction of "
                        "the machine's memory (default 0.6)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; a task that would not finish in time is recorded as skipped, "
                        "one that overruns by 15 s is stopped (CPU default 255, 0 = none)")
    p.add_argument("--task-timeout", type=float, default=900.0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, = cores)")
    p.add_argument("--out", help="output folder (default benchmarks/results/<machine>)")
    p.add_argument("--machine", help="machine name for the output folder")
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic() - _process_age_s()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if (args.gpu or (torch.cuda.is_available() and not args.cpu)) else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device visible to torch")
    info = machine_info(device)
    if args.machine:
        info["machine"] = _slug(args.machine)
    plan = default_plan(args, device)
    suffix = f"-{plan.name}" if plan.name else ""
    out_dir = args.out or os.path.join(HERE, "results", info["machine"])
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.abspath(os.path.join(out_dir, f"bench{suffix}.log"))
    open(log_path, "w").close()
    if device == "cuda":
        mem_available, mem_total = torch.cuda.mem_get_info()
        address_extra = None
    else:
        mem_available, mem_total = _mem_available_bytes(), _mem_total_bytes()
        address_extra = int(0.85 * mem_available)
    budget = args.time_budget
    if budget is None:
        budget = 255.0 if (device == "cpu" and not plan.name) else 0.0
    deadline = t_start + budget if budget else None
    tasks, decided = build_tasks(plan, args.mem_cap, mem_total)

    print(f"marginops bench_fused{(' --preset ' + plan.name) if plan.name else ''} on {device}")
    print(f"machine  {info['machine']}  (host {info['hostname']}, {info['cpu_model']}, "
          f"{info['cores']} cores, {info['threads']} torch threads"
          + (f", GPU {info['gpu']}" if info["gpu"] else "") + ")")
    print(f"versions python {info['python']}, torch {info['torch']}, triton {info['triton']}, "
          f"marginops {info['marginops']}, pytorch-metric-learning {info['pml']}")
    load_start = _loadavg()
    print(f"load     {load_start} (1/5/15-min load average; timings on a shared machine are noisy)")
    print(f"memory   {mem_available / 2**30:.1f} of {mem_total / 2**30:.1f} GiB available; "
          f"this process "
          f"{(_proc_status_kb('VmRSS') or 0) / 1024:.0f} MB resident")
    print("backends " + ", ".join(f"{k}: {'ok' if v is None else 'no'}" for k, v in
                                  marginops.backend_status(device).items()))
    print(f"plan     {len(plan.cases)} cases x {len(plan.providers)} providers, {plan.reps} reps "
          f"(+{plan.warmup} warm-up), {len(tasks)} fresh processes"
          + (f", time budget {budget:.0f} s" if budget else ""))
    for c in plan.cases:
        print(f"  - {c.label}" + ("  [memory only]" if c.memory_only else ""))
    sys.stdout.flush()

    timestamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    outcomes = _run_tasks(tasks, plan, args, log_path, address_extra, deadline, budget)
    rows = build_rows(plan, tasks, outcomes, decided, info, timestamp)

    csv_path = os.path.join(out_dir, f"bench{suffix}.csv")
    write_csv(rows, csv_path)
    table = markdown_table(rows)
    elapsed = time.monotonic() - t_start
    cmd = "python benchmarks/bench_fused.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                 " " + " ".join(argv if argv else sys.argv[1:]))
    md = (f"`{cmd}` — {info['machine']} ({info['cpu_model']}, {info['cores']} cores"
          + (f", {info['gpu']}" if info["gpu"] else "") + f"), python {info['python']}, torch "
          f"{info['torch']}, triton {info['triton']}, marginops {info['marginops']}, "
          f"pytorch-metric-learning {info['pml']}, {info['threads']} torch threads; {timestamp}; "
          f"{elapsed:.0f} s; load average {load_start} at the start, {_loadavg()} at the end.\n\n"
          "forward+backward; median over the reps with [p20, p80]; × = speed-up (their median / "
          "ours); / GEMMs = time ÷ the 3 bare GEMMs of the same shapes run in the same process; "
          "peak = resident growth during the step in a fresh process, (extra) = beyond the "
          "inputs' gradients.\n\n" + table + "\n")
    with open(os.path.join(out_dir, f"bench{suffix}.md"), "w") as fh:
        fh.write(md)
    plots = [] if args.no_plots else plot(rows, out_dir, suffix)

    print()
    print(table)
    print()
    statuses: dict[str, int] = {}
    for r in rows:
        if r["mode"] == "forward+backward":
            key = r["status"].split(":")[0]
            statuses[key] = statuses.get(key, 0) + 1
    print("status   " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
    print(f"memory   this process peak {(_proc_status_kb('VmHWM') or 0) / 1024:.0f} MB resident; "
          f"{_mem_available_bytes() / 2**30:.1f} GiB available now")
    print(f"wrote    {csv_path}")
    for path in plots:
        print(f"wrote    {path}")
    print(f"load     {_loadavg()}")
    print(f"elapsed  {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
