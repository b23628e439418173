"""The report: tidy rows (one per provider × case × mode) from the workers' outcomes, the Markdown
table, the CSV and the log-log plots. Tables and plots name providers by ``providers.LABELS``; the
CSV keeps the ids in ``provider`` and the label in ``provider_name``.
"""

from __future__ import annotations

import csv
import os

from .common import CSV_FIELDS, MODES, Case, Plan, fmt_count, quantile
from .planning import Task
from .providers import LABELS, PROVIDERS


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
                    medians[(p, mode)] = quantile(times(slot, mode), 0.5)
        ref_loss = per.get((case, "reference"), {}).get("loss")
        for p in plan.providers:
            reason = decided.get((case, p))
            if reason is not None and reason.startswith("n/a"):
                continue
            slot = per.get((case, p), {"status": reason or "skipped: not run", "fwd": [],
                                       "bwd": [], "note": ""})
            for mode in MODES:
                row = dict(info)
                row.update(timestamp=timestamp, provider=p, provider_name=LABELS[p],
                           family=case.family, mode=mode,
                           B=case.B, C=case.C, D=case.D, dtype=case.dtype, device=case.device,
                           status=slot["status"], note=slot.get("note", ""))
                t = times(slot, mode) if slot["status"] == "ok" else []
                notes = [row["note"]] if row["note"] else []
                if t:
                    med = quantile(t, 0.5)
                    row.update(reps=len(t), median_ms=med * 1e3, p20_ms=quantile(t, 0.2) * 1e3,
                               p80_ms=quantile(t, 0.8) * 1e3)
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
                        fb = quantile(times(slot, "forward+backward"), 0.5)
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


# Column headers of the table: each ratio says which direction is better.
TABLE_COLUMNS = (
    "case", "provider", "median ms [p20, p80]",
    "speedup vs naive PyTorch (×, higher is better)",
    "speedup vs naive + torch.compile (×, higher is better)",
    "speedup vs pytorch-metric-learning or F.linear_cross_entropy (×, higher is better)",
    "time ÷ bare GEMMs (lower is better)", "TFLOP/s (higher is better)",
    "peak MB (extra beyond input grads; lower is better)", "status",
)


def markdown_table(rows: list[dict], mode: str = "forward+backward") -> str:
    """One line per provider and case for ``mode``; statuses (skip reasons) are never cut."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        if r["mode"] != mode:
            continue
        case = f"{r['family']} {r['dtype']} B={r['B']} C={fmt_count(r['C'])} D={r['D']}"
        t = ""
        if r.get("median_ms") is not None:
            t = f"{r['median_ms']:.4g} [{r['p20_ms']:.4g}, {r['p80_ms']:.4g}]"
            if r.get("reps") == 1:
                t += " (1 step)"
        peer = r.get("speedup_vs_pml") or r.get("speedup_vs_lce")
        mem = ""
        if r.get("peak_mem_mb") is not None:
            mem = f"{r['peak_mem_mb']:.0f} ({r['extra_mem_mb']:.0f})"
        lines.append(f"| {case} | {LABELS.get(r['provider'], r['provider'])} | {t}"
                     f" | {_num(r.get('speedup_vs_reference'), '.2f')}"
                     f" | {_num(r.get('speedup_vs_compiled'), '.2f')} | {_num(peer, '.2f')}"
                     f" | {_num(r.get('gemm_ratio'), '.2f')} | {_num(r.get('tflops'), '.3f')}"
                     f" | {mem} | {r['status']} |")
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
                        ax.plot([c for c, _ in pts], [v for _, v in pts], marker="o", label=LABELS[p])
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


