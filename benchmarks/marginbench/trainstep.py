"""``--train-step``: a whole training step of the classifier head — forward, backward, optimizer
step, zero_grad — for three paths, one (case, path) per fresh process (``train_worker``).

    naive PyTorch + torch.optim   a (C, D) nn.Parameter, marginops.reference's loss (full B×C
                                  logits), torch.optim.SGD / AdamW
    marginops + torch.optim       marginops.ArcFaceLoss (the fused loss; dense W.grad), torch.optim
    marginops fused step          marginops.ArcFaceLoss + marginops.optim: the update is applied
                                  inside the backward, W.grad is never made

All three hold the same W (``torch.manual_seed`` then ``nn.init.normal_(std=0.01)``, as
``MarginSoftmaxLoss.reset_parameters``) and see the same batches: a fresh (x, labels) per step, x a
leaf that requires grad like a backbone's output (a repeated batch is memorised within a step or
two, and the vanishing softmax then runs on denormals: not a training step's cost).

Memory of the step, measured in the worker process after a small warm-up (the same path at
C <= 4096: thread pools, libraries, the autograd engine, the optimizer's code) and after glibc has
returned its free pages and been set to mmap every block >= 256 KiB (freed tensors leave the
resident set at once). ``base`` = resident memory (CPU: ``VmRSS``; GPU:
``torch.cuda.memory_allocated``) just before the head is built. Then, all relative to ``base``:

* ``built``      after building the head, the optimizer and the batches: W (+ x, labels);
* ``persistent`` after the first full step and ``zero_grad(set_to_none=True)``: W + the optimizer
  state (momentum, or AdamW's two moments), which that first step allocates;
* ``peak``       the high-water mark (CPU: ``VmHWM`` reset through ``/proc/self/clear_refs``; GPU:
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``) during each later step,
  the largest over them: W, optimizer state, every gradient, the logits and every temporary;
* ``transient``  = peak − persistent: what the step adds on top of the state it keeps.

Time: the first full step is the warm-up (it also allocates the optimizer state); the next
``reps`` steps are timed by phase (forward, backward, optimizer step + zero_grad; synchronised on
a GPU) and reported as the median with p20 and p80 of the whole step. Where the heads fit in
memory together, the paths are timed round-robin in one more fresh process (``time_round_robin``:
every head built and warmed up, then step r of each path before step r+1 of any), so the load of a
shared machine drifts over them alike, as in the main benchmark; the memory processes then time a
single step. A path left out of the round-robin (the naive one at large C) is timed alone, in its
memory process.
"""

from __future__ import annotations

import gc
import os
import time
import traceback
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from .common import ARC_MARGIN, DTYPES, SCALE, proc_status_kb
from .worker import _limit_address_space, _malloc_return_freed, _reset_hwm, failure, sync

LABELS = {
    "naive": "naive PyTorch + torch.optim",
    "torch_optim": "marginops + torch.optim",
    "fused": "marginops fused step",
}
PATHS = tuple(LABELS)
OPTIMIZERS = ("sgd", "adamw")
# The optimizers' settings: insightface's SGD (momentum 0.9, weight decay 5e-4); AdamW as torch's
# defaults apart from the learning rate.
OPT_KWARGS = {"sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
              "adamw": {"lr": 1e-3, "weight_decay": 1e-2}}
STATE_TENSORS = {"sgd": 1, "adamw": 2}   # C×D state tensors per weight: momentum; exp_avg(_sq)


@dataclass(frozen=True)
class TrainCase:
    B: int
    C: int
    D: int
    dtype: str
    device: str
    optimizer: str
    backend: str   # marginops' backend for the two marginops paths
    chunk_bytes: int | None = None   # marginops.optim's chunk_bytes (None: its default)

    @property
    def label(self) -> str:
        from .common import fmt_count
        return (f"train step {self.optimizer} {self.dtype} B={self.B} C={fmt_count(self.C)} "
                f"D={self.D}")

    @property
    def elt(self) -> int:
        return torch.finfo(DTYPES[self.dtype]).bits // 8

    @property
    def weight_bytes(self) -> int:
        return self.C * self.D * self.elt

    @property
    def state_bytes(self) -> int:
        """The optimizer state a head must keep: momentum (SGD) or exp_avg + exp_avg_sq (AdamW)."""
        return STATE_TENSORS[self.optimizer] * self.weight_bytes


def estimated_bytes(path: str, case: TrainCase) -> int:
    """A rough upper estimate of a path's peak, to skip what cannot fit (``--mem-cap``): W and its
    state; W.grad and the optimizer's weight-decay / update temporaries (~2 W) unless fused; and
    for the naive loss ~6 fp32 B×C buffers plus the normalised Ŵ and its gradient."""
    w = case.weight_bytes
    total = w + case.state_bytes + (0 if path == "fused" else 2 * w)
    if path == "naive":
        total += 6 * case.B * case.C * 4 + 2 * w
    return total


def path_reason(path: str) -> str | None:
    """None if ``path`` can run with this marginops, else why not (the fused path needs
    marginops.optim, issue 15)."""
    if path == "fused":
        try:
            import marginops.optim  # noqa: F401
        except ImportError as err:
            return f"unavailable: marginops.optim does not import ({err})"
    return None


class NaiveHead(nn.Module):
    """What users write today: W (C, D) as a parameter, the loss in plain PyTorch with the full
    B×C logits (``marginops.reference.arcface_loss``, an independent naive implementation)."""

    def __init__(self, embedding_size: int, num_classes: int, **factory):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size, **factory))
        nn.init.normal_(self.weight, std=0.01)   # = MarginSoftmaxLoss.reset_parameters

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from marginops import reference as ref
        return ref.arcface_loss(x, self.weight, labels, scale=SCALE, margin=ARC_MARGIN)


@dataclass
class Head:
    loss_fn: nn.Module
    optimizer: object
    batches: list   # [(x, labels)], x a leaf requiring grad


def build_head(path: str, case: TrainCase, n_batches: int, seed: int = 0) -> Head:
    """The head of ``path`` for ``case`` (W initialised from ``seed``), its optimizer and
    ``n_batches`` fresh batches (drawn after W, from the same seed)."""
    import marginops
    factory = {"device": case.device, "dtype": DTYPES[case.dtype]}
    torch.manual_seed(seed)
    if path == "naive":
        loss_fn = NaiveHead(case.D, case.C, **factory)
    else:
        loss_fn = marginops.ArcFaceLoss(case.D, case.C, scale=SCALE, margin=ARC_MARGIN,
                                        backend=case.backend, **factory)
    kwargs = dict(OPT_KWARGS[case.optimizer])
    if path == "fused":
        import marginops.optim as mopt
        cls = mopt.SGD if case.optimizer == "sgd" else mopt.AdamW
        if case.chunk_bytes:
            kwargs["chunk_bytes"] = case.chunk_bytes
    else:
        cls = torch.optim.SGD if case.optimizer == "sgd" else torch.optim.AdamW
    optimizer = cls(loss_fn.parameters(), **kwargs)
    g = torch.Generator(device=case.device).manual_seed(seed + 1)
    batches = [(torch.randn(case.B, case.D, generator=g, **factory).requires_grad_(True),
                torch.randint(0, case.C, (case.B,), generator=g, device=case.device))
               for _ in range(n_batches)]
    return Head(loss_fn, optimizer, batches)


def train_step(head: Head, i: int, device: str) -> tuple[float, float, float, float]:
    """Step ``i`` on batch ``i``: forward, backward, optimizer step, zero_grad. Returns the
    (forward, backward, optimizer) seconds and the loss."""
    x, labels = head.batches[i % len(head.batches)]
    sync(device)
    t0 = time.perf_counter()
    loss = head.loss_fn(x, labels)
    sync(device)
    t1 = time.perf_counter()
    loss.backward()
    sync(device)
    t2 = time.perf_counter()
    head.optimizer.step()
    head.optimizer.zero_grad(set_to_none=True)
    sync(device)
    t3 = time.perf_counter()
    x.grad = None   # the backbone would consume it; the next step has its own batch
    return t1 - t0, t2 - t1, t3 - t2, float(loss.detach())


# ----------------------------------------------------------------------------- the worker process

def _resident(device: str) -> int:
    if device == "cuda":
        return torch.cuda.memory_allocated()
    return (proc_status_kb("VmRSS") or 0) * 1024


def _reset_peak(device: str) -> bool:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return True
    return _reset_hwm()


def _peak(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return (proc_status_kb("VmHWM") or 0) * 1024


def train_worker(spec: dict, conn) -> None:
    """Entry point of a fresh process: one case, one path. Sends back a result dict, never
    raises."""
    try:
        log = spec.get("log")
        if log:   # keep the parent's progress bar clean
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        case = TrainCase(**spec["case"])
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        if case.device == "cpu":
            _limit_address_space(spec.get("address_space_extra"))
        if "paths" in spec:
            result = time_round_robin(case, spec["paths"], spec["reps"])
        else:
            result = measure_train_step(case, spec["path"], spec["reps"])
    except BaseException as err:  # noqa: BLE001 - report anything, the parent records it
        result = {"fatal": failure(err), "trace": traceback.format_exc()}
    conn.send(result)
    conn.close()


def measure_train_step(case: TrainCase, path: str, reps: int) -> dict:
    """Memory and time of ``path``'s training step for ``case`` (see the module docstring), in
    this process. Returns bytes (built, persistent, peak) and per-step seconds."""
    reason = path_reason(path)
    if reason is not None:
        return {"status": reason}
    dev = case.device
    print(f"[train step] {case.label} {path}", flush=True)
    small = build_head(path, replace(case, C=min(case.C, 4096)), n_batches=2, seed=1)
    for i in range(2):   # twice: the first allocates the optimizer state, the second uses it
        train_step(small, i, dev)
    del small
    gc.collect()
    if dev == "cpu":
        _malloc_return_freed()
    sync(dev)
    base = _resident(dev)
    out: dict = {"status": "ok", "fwd": [], "bwd": [], "opt": []}
    try:
        head = build_head(path, case, n_batches=1 + reps)
        sync(dev)
        out["built"] = _resident(dev) - base
        f, b, o, loss = train_step(head, 0, dev)   # warm-up; allocates the optimizer state
        gc.collect()
        sync(dev)
        out.update(first_step=f + b + o, loss=loss, persistent=_resident(dev) - base)
        if head.loss_fn.weight.grad is not None:
            out["note"] = "W.grad is not None after zero_grad"
        peak, reset = 0, True
        for i in range(1, 1 + reps):
            reset = _reset_peak(dev) and reset
            f, b, o, loss = train_step(head, i, dev)
            peak = max(peak, _peak(dev) - base)
            if i == 1:   # W has been stepped once: equal losses say the updates are the same
                out["loss_after_update"] = loss
            out["fwd"].append(f)
            out["bwd"].append(b)
            out["opt"].append(o)
        out["peak"] = peak
        out["mem_note"] = ("torch.cuda.max_memory_allocated" if dev == "cuda" else
                           "VmHWM" if reset else "VmHWM (not resettable here: since the start)")
    except Exception as err:  # noqa: BLE001
        out["status"] = failure(err)
    return out


def time_round_robin(case: TrainCase, paths: list[str], reps: int) -> dict:
    """Every path's head built and given its warm-up step, then ``reps`` rounds of one step of
    each path in turn: {path: {"status", "fwd", "bwd", "opt", "loss"}}. A path that fails is
    dropped from the later rounds, the others go on."""
    print(f"[train step] {case.label} round-robin {', '.join(paths)}", flush=True)
    heads, out = {}, {}
    for p in paths:
        out[p] = {"status": "ok", "fwd": [], "bwd": [], "opt": []}
        try:
            heads[p] = build_head(p, case, n_batches=1 + reps)
            out[p]["loss"] = train_step(heads[p], 0, case.device)[3]
        except Exception as err:  # noqa: BLE001
            out[p]["status"] = failure(err)
            heads.pop(p, None)
            gc.collect()
    for i in range(1, 1 + reps):
        for p in list(heads):
            try:
                f, b, o, _ = train_step(heads[p], i, case.device)
            except Exception as err:  # noqa: BLE001
                out[p]["status"] = failure(err)
                del heads[p]
                gc.collect()
                continue
            out[p]["fwd"].append(f)
            out[p]["bwd"].append(b)
            out[p]["opt"].append(o)
    return {"round_robin": out}
