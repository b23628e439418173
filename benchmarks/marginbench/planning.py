"""Planning: which cases run (``default_plan``), and how they are cut into fresh-process tasks, in
priority order, with the statuses decided without running anything (``build_tasks``).

Cases. Without case flags, the default sweep varies one axis at a time from a base point (the
first value of each list): the classes axis at the base point, then each other axis at the
smallest C. With any of ``--classes/--batch/--dim/--dtypes/--families`` (or ``--grid``), the
cases are exactly the cartesian product of the values given, each flag not given contributing
its base value only: ``--classes 1m --batch 4096 --dim 512 --dtype bfloat16`` is one case.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import marginops

from .common import DTYPES, FAMILIES, Case, Plan, parse_counts, parse_names
from .providers import FUSED, NAIVE, PROVIDERS, naive_bytes, provider_reason

# --preset NAME: a named, fixed measurement (its files are bench-NAME.*)
PRESETS = {
    "million-classes": "fp32 ArcFace, B=256, D=512: C=100K timed (naive, naive + torch.compile, "
                       "marginops cpp, bare GEMMs) and C=1M peak memory (marginops cpp vs the "
                       "naive loss)",
}


# Assumed speed of one step (FLOP/s counting 8·B·C·D) for the first estimates; the driver rescales
# them by the measured/estimated ratio of the finished tasks. Conservative: the CPU figures are
# this project's 2-core machine (bf16 half as fast as fp32 there), the GPU ones a few % of peak.
STEP_FLOPS = {("cpu", True): 20e9, ("cpu", False): 10e9,
              ("cuda", True): 5e12, ("cuda", False): 20e12}


def fused_default_backend(device: str) -> str:
    """The fused backend a user gets by default: triton, then cuda, on a GPU; cpp on CPU; torch
    where none of them is available."""
    status = marginops.backend_status(device)
    order = ("triton", "cuda", "torch") if device == "cuda" else ("cpp", "torch")
    return next((b for b in order if status[b] is None), "torch")


def _case_flags_given(args) -> bool:
    return any(getattr(args, k) for k in ("classes", "batch", "dim", "dtypes", "families"))


def default_plan(args, device: str) -> Plan:
    on_gpu = device == "cuda"
    if args.quick:
        name = "quick"
        classes, batches, dims = [1_000, 4_000], [16], [32]
        dtypes, families = ["float32"], ["arcface", "ce"]
        reps, warmup = args.reps or 3, args.warmup if args.warmup is not None else 1
    elif args.preset == "million-classes":
        name = args.preset
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
    exact = _case_flags_given(args)
    if exact:   # the values given, and only the base value of every other axis
        classes, batches, dims = classes[:1], batches[:1], dims[:1]
        dtypes, families = dtypes[:1], families[:1]
    classes = parse_counts(args.classes) if args.classes else classes
    batches = parse_counts(args.batch) if args.batch else batches
    dims = parse_counts(args.dim) if args.dim else dims
    dtypes = parse_names(args.dtypes, DTYPES) if args.dtypes else dtypes
    families = parse_names(args.families, FAMILIES) if args.families else families
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

    if args.grid or exact:
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

    fused_default = fused_default_backend(device)
    if args.providers:
        providers = parse_names(args.providers, PROVIDERS)
    elif name == "million-classes":   # cpp when built; else the torch backend stands in
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
    elif mode == "base" and exact:   # the cases asked for, every one of them
        compile_for = set(cases)
    elif mode == "base":
        compile_for = {c for c in cases if axis[c] in ("classes", "grid")
                       and c.family == base_f and c.dtype == base_t}
    memory_only_providers = None
    if args.memory_only_providers:
        memory_only_providers = parse_names(args.memory_only_providers, PROVIDERS + ("auto",))
    elif not on_gpu:   # the memory figure: naive vs compiled vs the fused default backend
        memory_only_providers = ["reference", "reference_compiled", "auto"]
    if memory_only_providers is not None:
        memory_only_providers = [fused_default if p == "auto" else p
                                 for p in memory_only_providers]
    memory_for_case = None
    if name == "million-classes":   # peak extra memory of cpp vs the naive loss at C = 1M
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
    est_s: float = 1.0   # estimated seconds (see STEP_FLOPS): progress weight and budget check
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
        step_s = 8 * case.B * case.C * case.D / STEP_FLOPS[(case.device, case.dtype == "float32")]
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


