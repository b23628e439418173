"""``bench_fused.py --train-step``: the cases, their fresh-process tasks and the run; what is measured
and how is in ``trainstep``'s docstring, the tables and the capacity arithmetic in ``trainreport``.

Defaults (ArcFace s=64 m=0.5, fp32, D=512, SGD momentum 0.9, weight decay 5e-4):
CPU  B=64, C = 10K, 100K, 300K, 1M, 3 timed steps after the warm-up step (a few minutes on 2 cores)
GPU  B=512, C = 100K, 1M, 3M, 10M, 10 timed steps
--quick  B=16, D=32, C = 1000, 4000, 2 timed steps (seconds; used by the tests)
``--classes``, ``--batch``, ``--dim``, ``--dtypes`` replace a default list (cases = their product);
``--paths`` picks paths, ``--optimizer adamw`` switches the optimizer, ``--reps`` the timed steps.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import os
import sys
import time
from dataclasses import asdict, dataclass

from .common import DTYPES, loadavg, mem_available_bytes, parse_counts, parse_names, proc_status_kb
from .driver import BENCH_DIR, memory_of, print_header, run_fresh
from .planning import STEP_FLOPS, fused_default_backend
from .trainreport import (
    build_rows,
    capacity_markdown,
    capacity_table,
    markdown_table,
    plot,
    train_files,
    write_csv,
)
from .trainstep import LABELS, PATHS, TrainCase, estimated_bytes, path_reason, train_worker

PRELOAD = ["torch", "marginops", "marginops.reference", "marginbench.trainstep"]
MEMORY_BANDWIDTH = {"cpu": 5e9, "cuda": 1e12}   # bytes/s assumed for the optimizer's passes


@dataclass
class TrainTask:
    case: TrainCase
    paths: list[str]   # one path: its memory process; several: their round-robin timing
    reps: int
    est_s: float

    @property
    def label(self) -> str:
        if len(self.paths) == 1:
            return f"{self.case.label}: {LABELS[self.paths[0]]}"
        return f"{self.case.label}: time round-robin"


def train_cases(args, device: str) -> tuple[list[TrainCase], list[str], int]:
    """(cases, paths, timed steps) of a ``--train-step`` command line."""
    if args.quick:
        classes, batches, dims, reps = [1_000, 4_000], [16], [32], 2
    elif device == "cuda":
        classes, batches, dims, reps = [100_000, 1_000_000, 3_000_000, 10_000_000], [512], [512], 10
    else:
        classes, batches, dims, reps = [10_000, 100_000, 300_000, 1_000_000], [64], [512], 3
    dtypes = ["float32"]
    classes = parse_counts(args.classes) if args.classes else classes
    batches = parse_counts(args.batch) if args.batch else batches
    dims = parse_counts(args.dim) if args.dim else dims
    dtypes = parse_names(args.dtypes, DTYPES) if args.dtypes else dtypes
    reps = args.reps if args.reps is not None else reps
    if reps < 1:
        raise SystemExit("--reps: --train-step times at least one step after the warm-up step")
    paths = parse_names(args.paths, PATHS) if args.paths else list(PATHS)
    backend = fused_default_backend(device)
    cases = [TrainCase(b, c, d, t, device, args.optimizer, backend, args.chunk_bytes)
             for t, b, d, c in itertools.product(dtypes, batches, dims, classes)]
    return cases, paths, reps


def round_robin_paths(case: TrainCase, paths: list[str], mem_cap: float,
                      mem_total: int) -> list[str]:
    """The paths timed together in one process: all of them while their persistent state (W +
    optimizer state each) plus the largest one's step transient (``estimated_bytes``) fits in
    ``mem_cap`` of the memory, else without the most memory-hungry, then the next; [] if fewer
    than two are left."""
    keep = case.weight_bytes + case.state_bytes

    def need(ps: list[str]) -> int:
        return len(ps) * keep + max(estimated_bytes(p, case) - keep for p in ps)

    rr = list(paths)
    while len(rr) > 1 and need(rr) > mem_cap * mem_total:
        rr.remove(max(rr, key=lambda p: estimated_bytes(p, case)))
    return rr if len(rr) >= 2 else []


def train_tasks(cases: list[TrainCase], paths: list[str], reps: int, mem_cap: float,
                mem_total: int) -> tuple[list[TrainTask], dict]:
    """Per case: one memory process per path (it also times the path, ``reps`` steps, when the
    path is not in the round-robin; else one step), then the round-robin timing process; and the
    statuses decided without running anything (a path that cannot run, or would need more than
    ``mem_cap`` of the memory)."""
    tasks, decided = [], {}
    for case in cases:
        runnable, step_s = [], {}
        for p in paths:
            reason = path_reason(p)
            need = estimated_bytes(p, case)
            if reason is None and need > mem_cap * mem_total:
                reason = (f"skipped: needs ~{need / 2**30:.1f} GiB > {mem_cap:.0%} of the "
                          f"{mem_total / 2**30:.1f} GiB of memory (--mem-cap)")
            if reason is not None:
                decided[(case, p)] = {"status": reason}
                continue
            runnable.append(p)
            flops = 8 * case.B * case.C * case.D * (3 if p == "naive" else 1)
            step_s[p] = flops / STEP_FLOPS[(case.device, case.dtype == "float32")] + (
                8 * case.weight_bytes / MEMORY_BANDWIDTH[case.device])
        rr = round_robin_paths(case, runnable, mem_cap, mem_total)
        for p in runnable:
            n = 1 if p in rr else reps
            tasks.append(TrainTask(case, [p], n, 2 + (3 + n) * step_s[p]))
        if rr:
            tasks.append(TrainTask(case, rr, reps, 2 + (1 + reps) * sum(step_s[p] for p in rr)))
    return tasks, decided


def merge_outcomes(tasks: list[TrainTask], outcomes: list[dict], decided: dict) -> dict:
    """{(case, path): result}: the memory process's result, its times replaced by the
    round-robin's where that process ran the path (a note says which timing a row has)."""
    results = dict(decided)
    for task, outcome in zip(tasks, outcomes):
        if len(task.paths) == 1:
            results[(task.case, task.paths[0])] = (
                {"status": outcome["fatal"]} if "fatal" in outcome else outcome)
    for task, outcome in zip(tasks, outcomes):
        if len(task.paths) == 1:
            continue
        others = ", ".join(task.paths)
        for p in task.paths:
            r = results.get((task.case, p))
            if r is None or r.get("status") != "ok":
                continue
            rr = outcome.get("round_robin", {}).get(p, {"status": outcome.get("fatal", "?")})
            if rr["status"] == "ok" and rr["fwd"]:
                r.update(fwd=rr["fwd"], bwd=rr["bwd"], opt=rr["opt"])
                note = f"timed round-robin ({others})"
            else:
                note = f"round-robin timing failed ({rr['status']}): one step timed alone"
            r["note"] = "; ".join(n for n in (r.get("note", ""), note) if n)
    for r in results.values():
        if r.get("status") == "ok" and r.get("fwd") and "round-robin" not in r.get("note", ""):
            r["note"] = "; ".join(n for n in (r.get("note", ""), "timed alone") if n)
    return results


def run_train_step(args, device: str, info: dict, t_start: float, cmd: str) -> int:
    cases, paths, reps = train_cases(args, device)
    out_dir = args.out or os.path.join(BENCH_DIR, "results", info["machine"])
    os.makedirs(out_dir, exist_ok=True)
    files = train_files(out_dir, args.optimizer, args.quick)
    log_path = os.path.abspath(files["log"])
    open(log_path, "w").close()
    mem_available, mem_total = memory_of(device)
    address_extra = None if device == "cuda" else int(0.85 * mem_available)
    tasks, decided = train_tasks(cases, paths, reps, args.mem_cap, mem_total)
    budget = args.time_budget or 0.0
    deadline = t_start + budget if budget else None

    load_start = print_header(f"marginops bench_fused --train-step ({args.optimizer}) on {device}",
                              device, info, mem_available, mem_total)
    print(f"plan     {len(cases)} cases x {len(paths)} paths, 1 warm-up + {reps} timed steps "
          f"each, {len(tasks)} fresh processes" + (f", time budget {budget:.0f} s" if budget
                                                  else ""))
    for c in cases:
        rr = next((t.paths for t in tasks if t.case == c and len(t.paths) > 1), [])
        print(f"  - {c.label} (marginops backend {c.backend}" + (
            f"; timed round-robin: {', '.join(rr)})" if rr else "; each path timed alone)"))
    sys.stdout.flush()

    timestamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    def spec_of(task: TrainTask) -> dict:
        which = {"path": task.paths[0]} if len(task.paths) == 1 else {"paths": task.paths}
        return {"case": asdict(task.case), **which, "reps": task.reps, "log": log_path,
                "address_space_extra": address_extra, "threads": args.threads}

    outcomes = run_fresh(tasks, spec_of, train_worker, PRELOAD, args.task_timeout, log_path,
                         deadline, budget)
    results = merge_outcomes(tasks, outcomes, decided)
    rows = build_rows(cases, paths, results, info, timestamp)
    write_csv(rows, files["csv"])
    table = markdown_table(rows)
    cap = capacity_table(rows, args.headroom)
    cap_text = capacity_markdown(cap, args.headroom) if cap else "(capacity: needs two C or more)"
    elapsed = time.monotonic() - t_start
    c0 = cases[0]
    md = (f"`{cmd}` — {info['machine']} ({info['cpu_model']}, {info['cores']} cores"
          + (f", {info['gpu']}" if info["gpu"] else "") + f"), python {info['python']}, torch "
          f"{info['torch']}, triton {info['triton']}, marginops {info['marginops']}, "
          f"{info['threads']} torch threads; {timestamp}; {elapsed:.0f} s; load average "
          f"{load_start} at the start, {loadavg()} at the end.\n\n"
          f"ArcFace (s=64, m=0.5), {c0.dtype}, B={c0.B}, D={c0.D}, {args.optimizer} "
          "(torch.optim's or marginops.optim's, same settings); memory: one fresh process per C and "
          "path; time: the paths whose heads fit in memory together round-robin in one more fresh "
          "process, the others alone (the CSV's note says which). "
          "A step = forward, backward, optimizer step, zero_grad; median of the timed steps "
          "[p20, p80] after one warm-up step. Memory relative to the process before the head was "
          "built: persistent = after the warm-up step (W + optimizer state), peak = high-water "
          "mark during a step (W, state, gradients, logits, temporaries), transient = peak − "
          "persistent; W + state = computed bytes. MB = 2^20 bytes.\n\n"
          + table + "\n\n" + cap_text + "\n")
    with open(files["md"], "w") as fh:
        fh.write(md)
    png = None if args.no_plots else plot(rows, files["png"])

    print()
    print(table)
    print()
    print(cap_text)
    print()
    statuses: dict[str, int] = {}
    for r in rows:
        key = r["status"].split(":")[0]
        statuses[key] = statuses.get(key, 0) + 1
    print("status   " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
    print(f"memory   this process peak {(proc_status_kb('VmHWM') or 0) / 1024:.0f} MB resident; "
          f"{mem_available_bytes() / 2**30:.1f} GiB available now")
    for key in ("csv", "md"):
        print(f"wrote    {files[key]}")
    if png:
        print(f"wrote    {png}")
    print(f"load     {loadavg()}")
    print(f"elapsed  {elapsed:.0f} s")
    return 0
