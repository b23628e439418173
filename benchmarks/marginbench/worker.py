"""The measurement worker: one case in a fresh process (forked from a forkserver that only imported
the libraries), its providers timed round-robin, peak memory measured warm. ``worker`` is the
process entry point; it sends back a result dict and never raises.

One timed rep of a provider is a block of back-to-back steps (``run_block``: steps until the block
has lasted ``BLOCK_S``, at most ``MAX_BLOCK_CALLS``; one for steps that long), recorded as the
block's mean per step. Why: the step that follows another provider pays for the state that provider
left (caches, allocator, thread pool), and at millisecond steps that dominated the measurement:
at B=64, C=10K, D=128 bf16 the same marginops cpp step took 1.4 to 2.2 ms and the bare GEMMs
0.76 to 2.4 ms depending on which provider ran before them (one step per rep). A block amortises
that over its steps, as ``timeit`` and ``torch.utils.benchmark`` do.
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import time
import traceback
from dataclasses import replace

import torch

from .common import DTYPES, Case, proc_status_kb
from .providers import Step, make_step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def clear_grads(step: Step) -> None:
    for leaf in step.leaves:
        leaf.grad = None


def run_step(step: Step, device: str) -> tuple[float, float, float]:
    """One training step; returns (forward s, backward s, loss value)."""
    clear_grads(step)
    sync(device)
    t0 = time.perf_counter()
    loss = step.fn()
    sync(device)
    t1 = time.perf_counter()
    loss.backward()
    sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, float(loss.detach())


# A timed rep: back-to-back steps lasting about BLOCK_S, at most MAX_BLOCK_CALLS (module docstring).
BLOCK_S = 0.02
MAX_BLOCK_CALLS = 50


def run_block(one_step) -> tuple[float, float, float, int]:
    """Steps of ``one_step`` (returning (forward s, backward s, loss)) until they have lasted
    BLOCK_S or MAX_BLOCK_CALLS were run: (mean forward s, mean backward s, last loss, steps)."""
    f = b = 0.0
    n = 0
    t0 = time.perf_counter()
    while True:
        fi, bi, loss = one_step()
        f, b, n = f + fi, b + bi, n + 1
        if n >= MAX_BLOCK_CALLS or time.perf_counter() - t0 >= BLOCK_S:
            return f / n, b / n, loss, n


def run_gemms(x, w, dz, device: str) -> tuple[float, float, float]:
    """The naive loss's GEMMs: X·Wᵀ forward; dZ·W (→ dX) and dZᵀ·X (→ dW) backward."""
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        z = x @ w.t()
        sync(device)
        t1 = time.perf_counter()
        gx = dz @ w
        gw = dz.t() @ x
        sync(device)
        t2 = time.perf_counter()
    del z, gx, gw
    return t1 - t0, t2 - t1, float("nan")


def is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, MemoryError) or any(s in text for s in (
        "out of memory", "can't allocate memory", "cannot allocate memory",
        "not enough memory", "failed to allocate"))


def failure(err: BaseException) -> str:
    """'oom: ...' or 'error: ...' with the exception's whole first line (never truncated)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return ("oom: " if is_oom(err) else "error: ") + f"{type(err).__name__}: {first}"


# ----------------------------------------------------------------------------- the worker process

def _limit_address_space(extra_bytes: int | None) -> None:
    """Make a runaway CPU case fail with an allocation error instead of the OOM killer."""
    if not extra_bytes:
        return
    vm = (proc_status_kb("VmSize") or 0) * 1024
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
    clear_grads(step)
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
        base = (proc_status_kb("VmRSS") or 0) * 1024
        t0 = time.perf_counter()
        loss = step.fn()
        t1 = time.perf_counter()
        peak_f = (proc_status_kb("VmHWM") or 0) * 1024 - base
        loss.backward()
        t2 = time.perf_counter()
        peak_fb = (proc_status_kb("VmHWM") or 0) * 1024 - base
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
        result = {"fatal": failure(err), "trace": traceback.format_exc()}
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
            results[p]["status"] = failure(err)

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
            clear_grads(steps[p])
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
            r["mem_status"] = failure(err)
            if reps == 0:
                r["status"] = r["mem_status"]

    if memory_for in steps and reps == 0:
        memory(memory_for, full_warmup=memory_for == "reference_compiled")

    active = [p for p in providers if results[p]["status"] == "ok" and (p in steps or p == "gemm")]
    if reps > 0:
        for rep in range(warmup + reps):
            for p in list(active):
                def one_step(p=p):
                    if p == "gemm":
                        return run_gemms(x.detach(), w.detach(), dz, case.device)
                    return run_step(steps[p], case.device)
                try:
                    if rep < warmup:   # one step: the first one times the provider's start-up
                        f, b, loss = one_step()
                        n = 1
                    else:
                        f, b, loss, n = run_block(one_step)
                except Exception as err:  # noqa: BLE001
                    results[p]["status"] = failure(err)
                    active.remove(p)
                    steps.pop(p, None)
                    gc.collect()
                    continue
                if "first_fb" not in results[p]:
                    results[p]["first_fb"], results[p]["loss"] = f + b, loss
                if rep >= warmup:
                    results[p]["fwd"].append(f)
                    results[p]["bwd"].append(b)
                    results[p].setdefault("block", []).append(n)
        # the compiled provider's memory: measured last, warm, so the timing above ran untouched
        if memory_for in steps and memory_for in active:
            dz = None
            for s in steps.values():
                clear_grads(s)
            memory(memory_for, full_warmup=True)
    return {"results": results}


