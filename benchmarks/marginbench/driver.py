"""The driver: command line, the run of every task in a fresh process (with a progress bar from
tqdm when it is installed, plain lines otherwise), and the printed report.

How it measures (each point in the module named):

* Every case (family, B, C, D, dtype) runs in a FRESH process (forked from a forkserver that only
  imported the libraries, so no OpenMP/CUDA state is inherited). In it, all providers and the
  bare GEMMs are timed round-robin — rep r of every provider before rep r+1 of any — so the load of
  a shared machine drifts over all of them alike. One rep is a block of back-to-back training
  steps lasting ~20 ms (one step for longer steps; why, in ``worker``), each step forward (with
  autograd recording) then backward; the block's mean forward and backward times give the
  ``forward`` and ``backward`` rows, their sum the ``forward+backward`` row. Fixed reps after
  one-step warm-ups; median, p20 and p80 over the reps (``worker``).
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
* Ratios (``report``): ``speedup_vs_X`` = median(X) / median(provider) for the same case and mode
  (higher is better); ``gemm_ratio`` = median(provider) / median(bare GEMMs) for the same mode
  (lower is better; 1 GEMM forward, 2 backward, 3 forward+backward: the naive count; the streamed
  op recomputes the logits, so its floor is 4/3 of the GEMMs). ``tflops``: effective, counting the
  streaming floor 2·B·C·D (forward), 6·B·C·D (backward: recompute + two gradient GEMMs), 8·B·C·D
  (forward+backward) for every loss provider; for the ``gemm`` rows the GEMMs' own count (2, 4,
  6 · B·C·D).
* A naive provider whose estimated footprint (~6 fp32 B×C + 3 C×D buffers) exceeds ``--mem-cap``
  (0.6) of the machine's memory is ``skipped``; an allocation failure is ``oom``; CPU workers run
  under an address-space limit (85 % of the memory available at the start) so that a runaway case
  fails with ``oom`` instead of waking the kernel's OOM killer (``planning``, ``worker``).
* Cases with C >= ``--memory-only-from`` (CPU default 1 000 000) only run the memory processes, for
  ``--memory-only-providers`` (CPU default: the naive loss, its compiled form and the fused default
  backend); their times are those of the single measured step, ``reps`` = 1.
* torch.compile recompiles in every fresh process (~10 s here with the on-disk cache warm,
  20-35 s cold), so in the default sweep the compiled naive loss runs on the classes axis only
  (``--compile all`` everywhere; on every case when the cases are given explicitly), with
  ``dynamic=True``: one graph serves every C. ``compile_s`` = first step − median step.
* ``--time-budget`` (CPU default 255 s): tasks run in priority order (classes-axis timing, its
  memory, the memory-only sizes, then the other axes); a task that would not finish in time,
  judged from its FLOPs and the speed measured so far, is recorded as skipped.
* ``--train-step`` measures a whole training step of the head instead (``trainrun``); how, in
  ``trainstep``'s docstring.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict

import torch

import marginops

from .common import (
    FAMILIES,
    loadavg,
    machine_info,
    mem_available_bytes,
    mem_total_bytes,
    parse_counts,
    proc_status_kb,
    process_age_s,
    slug,
)
from .planning import PRESETS, Task, build_tasks, default_plan
from .providers import PROVIDERS
from .report import build_rows, markdown_table, plot, write_csv
from .worker import worker

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRELOAD = ["torch", "torch._dynamo", "marginops", "marginops.reference",
           "pytorch_metric_learning.losses", "marginbench.worker"]


class Progress:
    """Progress weighted by each task's estimated work: tqdm's bar when tqdm is installed, else
    one plain line per task (percent of the estimated work done, seconds elapsed, the task)."""

    def __init__(self, n_tasks: int):
        self.n, self.done, self.pct, self.t0 = n_tasks, 0, 0.0, time.monotonic()
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=100.0, desc="bench", dynamic_ncols=True, mininterval=1.0,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]"
                                       " {postfix}")

    def set_postfix_str(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        elif text != "done":
            print(f"bench [{self.done + 1}/{self.n}] {self.pct:3.0f}% "
                  f"{time.monotonic() - self.t0:5.0f} s  {text}", flush=True)

    def update(self, pct: float) -> None:
        self.done += 1
        self.pct = min(self.pct + pct, 100.0)
        if self.bar is not None:
            self.bar.update(pct)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(f"bench [{self.n}/{self.n}] 100% {time.monotonic() - self.t0:5.0f} s  done",
                  flush=True)


def run_fresh(tasks: list, spec_of, target, preload: list[str], task_timeout: float,
              log_path: str, deadline: float | None, budget_s: float) -> list[dict]:
    """Run each task (``.label``, ``.est_s``) as ``target(spec_of(task), conn)`` in a fresh
    process forked from a forkserver that imported ``preload``; the outcome of each, in order: the
    dict ``target`` sent, or ``{"fatal": reason}`` (skipped for the time budget, timeout, killed,
    crashed)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(preload)
    outcomes: list[dict] = []
    # progress is weighted by each task's estimated work (FLOPs), so the ETA means something
    weights = [t.est_s for t in tasks]
    scale = 100.0 / max(sum(weights), 1e-12)
    bar = Progress(len(tasks))
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
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=target, args=(spec_of(task), child), daemon=True)
        proc.start()
        child.close()
        timeout = task_timeout
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
    p = argparse.ArgumentParser(
        prog="bench_fused.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="marginops' main benchmark: the fused margin-softmax loss against what users "
                    "run today.",
        epilog="presets:\n" + "\n".join(f"  {k}: {v}" for k, v in PRESETS.items()))
    p.add_argument("--gpu", action="store_true", help="run the GPU sweep (default on CUDA)")
    p.add_argument("--cpu", action="store_true", help="run the CPU sweep even if CUDA is there")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named measurement (see below)")
    p.add_argument("--classes", help="comma list, e.g. 10k,100k,1m. Any case flag (--classes, "
                   "--batch, --dim, --dtypes, --families) makes the cases exactly the product of "
                   "the values given (the base value of the others)")
    p.add_argument("--batch", help="comma list of batch sizes")
    p.add_argument("--dim", help="comma list of embedding sizes")
    p.add_argument("--dtypes", "--dtype", dest="dtypes", help="float32,bfloat16,float16")
    p.add_argument("--families", "--family", dest="families", help=",".join(FAMILIES))
    p.add_argument("--providers", help=f"subset of {','.join(PROVIDERS)}")
    p.add_argument("--grid", action="store_true",
                   help="full cartesian product instead of one axis at a time")
    p.add_argument("--reps", type=int, help="timed reps per case (CPU 5, GPU 20)")
    p.add_argument("--warmup", type=int, help="warm-up reps per case (CPU 1, GPU 3)")
    p.add_argument("--memory-only-from", type=lambda s: parse_counts(s)[0], default=None,
                   help="cases with C >= this only run the memory processes (CPU default 1m; "
                        "0 = never)")
    p.add_argument("--memory-only-providers",
                   help="providers run at memory-only sizes (CPU default: reference,"
                        "reference_compiled,auto; auto = the fused default backend)")
    p.add_argument("--compile", choices=["auto", "base", "all", "none"], default="auto",
                   help="where naive + torch.compile (id reference_compiled) runs: base = the "
                        "classes axis of the default sweep, or every case given by the case "
                        "flags (default); all; none")
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
    p.add_argument("--train-step", action="store_true",
                   help="memory and time of a whole training step of the classifier head "
                        "(forward, backward, optimizer step, zero_grad): naive PyTorch + "
                        "torch.optim, marginops + torch.optim, marginops fused step "
                        "(marginbench/trainrun.py); files train-step[-adamw].*")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                   help="--train-step: SGD (lr 0.1, momentum 0.9, weight decay 5e-4; default) or "
                        "AdamW (lr 1e-3, weight decay 1e-2)")
    p.add_argument("--paths", help="--train-step: subset of naive,torch_optim,fused")
    p.add_argument("--chunk-bytes", type=int, default=None,
                   help="--train-step: marginops.optim's chunk_bytes, the weight-gradient bytes "
                        "of one chunk of classes (default: marginops.optim's, 16 MiB)")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="--train-step: fraction of a GPU's memory kept free in the capacity "
                        "table (CUDA context, allocator slack; default 0.1)")
    p.add_argument("--model", action="store_true",
                   help="print the roofline model (benchmarks/model.py) of every case: next to "
                        "the measured times on a GPU, alone otherwise")
    p.add_argument("--model-gpu", default=None,
                   help="GPU the model assumes (a100, h100, h200; default: the GPU present, "
                        "else h100)")
    return p.parse_args(argv)


def print_header(title: str, device: str, info: dict, mem_available: int, mem_total: int) -> str:
    """The lines every run starts with: machine, versions, load, memory, backends. Returns the
    load average at the start."""
    print(title)
    print(f"machine  {info['machine']}  (host {info['hostname']}, {info['cpu_model']}, "
          f"{info['cores']} cores, {info['threads']} torch threads"
          + (f", GPU {info['gpu']}" if info["gpu"] else "") + ")")
    print(f"versions python {info['python']}, torch {info['torch']}, triton {info['triton']}, "
          f"marginops {info['marginops']}, pytorch-metric-learning {info['pml']}")
    load_start = loadavg()
    print(f"load     {load_start} (1/5/15-min load average; timings on a shared machine are noisy)")
    print(f"memory   {mem_available / 2**30:.1f} of {mem_total / 2**30:.1f} GiB available; "
          f"this process "
          f"{(proc_status_kb('VmRSS') or 0) / 1024:.0f} MB resident")
    print("backends " + ", ".join(f"{k}: {'ok' if v is None else 'no'}" for k, v in
                                  marginops.backend_status(device).items()))
    return load_start


def command_line(argv) -> str:
    """The command as the reader would type it (argv = main's argument, None: sys.argv)."""
    args = sys.argv[1:] if argv is None else argv
    return "python benchmarks/bench_fused.py" + "".join(" " + a for a in args)


def memory_of(device: str) -> tuple[int, int]:
    """(available, total) bytes: the GPU's, or the machine's."""
    if device == "cuda":
        return torch.cuda.mem_get_info()
    return mem_available_bytes(), mem_total_bytes()


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic() - process_age_s()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if (args.gpu or (torch.cuda.is_available() and not args.cpu)) else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device visible to torch")
    info = machine_info(device)
    if args.machine:
        info["machine"] = slug(args.machine)
    if args.train_step:
        from .trainrun import run_train_step
        return run_train_step(args, device, info, t_start, command_line(argv))
    plan = default_plan(args, device)
    suffix = f"-{plan.name}" if plan.name else ""
    out_dir = args.out or os.path.join(BENCH_DIR, "results", info["machine"])
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.abspath(os.path.join(out_dir, f"bench{suffix}.log"))
    open(log_path, "w").close()
    mem_available, mem_total = memory_of(device)
    address_extra = None if device == "cuda" else int(0.85 * mem_available)
    budget = args.time_budget
    if budget is None:
        budget = 255.0 if (device == "cpu" and not plan.name) else 0.0
    deadline = t_start + budget if budget else None
    tasks, decided = build_tasks(plan, args.mem_cap, mem_total)

    what = {"": "", "quick": " --quick"}.get(plan.name, f" --preset {plan.name}")
    load_start = print_header(f"marginops bench_fused{what} on {device}", device, info,
                              mem_available, mem_total)
    print(f"plan     {len(plan.cases)} cases x {len(plan.providers)} providers, {plan.reps} reps "
          f"(+{plan.warmup} warm-up), {len(tasks)} fresh processes"
          + (f", time budget {budget:.0f} s" if budget else ""))
    for c in plan.cases:
        print(f"  - {c.label}" + ("  [memory only]" if c.memory_only else ""))
    sys.stdout.flush()

    timestamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    def spec_of(task: Task) -> dict:
        return {"case": asdict(task.case), "providers": task.providers,
                "memory_for": task.memory_for, "reps": task.reps, "warmup": plan.warmup,
                "compile_static": args.compile_static, "log": log_path,
                "address_space_extra": address_extra, "threads": args.threads}

    outcomes = run_fresh(tasks, spec_of, worker, PRELOAD, args.task_timeout, log_path, deadline,
                         budget)
    rows = build_rows(plan, tasks, outcomes, decided, info, timestamp)

    csv_path = os.path.join(out_dir, f"bench{suffix}.csv")
    write_csv(rows, csv_path)
    table = markdown_table(rows)
    elapsed = time.monotonic() - t_start
    cmd = command_line(argv)
    md = (f"`{cmd}` — {info['machine']} ({info['cpu_model']}, {info['cores']} cores"
          + (f", {info['gpu']}" if info["gpu"] else "") + f"), python {info['python']}, torch "
          f"{info['torch']}, triton {info['triton']}, marginops {info['marginops']}, "
          f"pytorch-metric-learning {info['pml']}, {info['threads']} torch threads; {timestamp}; "
          f"{elapsed:.0f} s; load average {load_start} at the start, {loadavg()} at the end.\n\n"
          "forward+backward; median over the reps with [p20, p80]; speedup = their median ÷ "
          "this provider's (higher is better); time ÷ bare GEMMs = this median ÷ the 3 bare "
          "GEMMs of the same shapes run in the same process (lower is better); peak = resident "
          "growth during the step in a fresh process, (extra) = beyond the inputs' gradients "
          "(lower is better).\n\n" + table + "\n")
    with open(os.path.join(out_dir, f"bench{suffix}.md"), "w") as fh:
        fh.write(md)
    plots = [] if args.no_plots else plot(rows, out_dir, suffix)
    if args.model:
        from .modelreport import model_report
        model_text = model_report(plan, rows, device, args.model_gpu)
        with open(os.path.join(out_dir, f"model{suffix}.md"), "w") as fh:
            fh.write(model_text + "\n")

    print()
    print(table)
    print()
    if args.model:
        print(model_text)
        print()
    statuses: dict[str, int] = {}
    for r in rows:
        if r["mode"] == "forward+backward":
            key = r["status"].split(":")[0]
            statuses[key] = statuses.get(key, 0) + 1
    print("status   " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
    print(f"memory   this process peak {(proc_status_kb('VmHWM') or 0) / 1024:.0f} MB resident; "
          f"{mem_available_bytes() / 2**30:.1f} GiB available now")
    print(f"wrote    {csv_path}")
    for path in plots:
        print(f"wrote    {path}")
    print(f"load     {loadavg()}")
    print(f"elapsed  {elapsed:.0f} s")
    return 0

