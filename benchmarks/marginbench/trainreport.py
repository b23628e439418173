"""``--train-step`` report: tidy rows (one per case × path), the CSV, the Markdown tables, the plot,
and the capacity arithmetic — bytes per class fitted to the measured peaks, and the largest number
of classes each path fits in a GPU's memory (``capacity``, ``capacity_from_csv``).

MB = 2**20 bytes; a "12 GB" GPU is taken as 12 GiB (an RTX 3080 Ti has 12 288 MiB, an A100-80GB
81 920 MiB).
"""

from __future__ import annotations

import csv
import math
import os

from .common import fmt_count, quantile
from .trainstep import LABELS, PATHS, TrainCase

MB = 2**20
GPU_MEMORY_GIB = (12, 24, 80)
INFO_FIELDS = ["machine", "hostname", "cpu_model", "cores", "threads", "gpu", "python", "torch",
               "triton", "marginops", "pml"]
TRAIN_CSV_FIELDS = (["timestamp"] + INFO_FIELDS + [
    "path", "path_name", "optimizer", "backend", "family", "B", "C", "D", "dtype", "device",
    "reps", "median_ms", "p20_ms", "p80_ms", "forward_ms", "backward_ms", "optimizer_ms",
    "first_step_ms", "weight_mb", "state_mb", "built_mb", "persistent_mb", "peak_mb",
    "transient_mb", "peak_over_w_state", "speedup_vs_torch_optim", "loss", "rel_loss_diff",
    "loss_after_update", "rel_diff_after_update", "status", "note"])


def build_rows(cases: list[TrainCase], paths: list[str], results: dict, info: dict,
               timestamp: str) -> list[dict]:
    """One row per (case, path); ``results[(case, path)]`` is the worker's dict (status, bytes,
    per-phase seconds)."""
    rows = []
    for case in cases:
        medians, losses, after = {}, {}, {}
        for p in paths:
            r = results.get((case, p), {})
            if r.get("status") == "ok" and r.get("fwd"):
                medians[p] = quantile(_totals(r), 0.5)
                losses[p], after[p] = r.get("loss"), r.get("loss_after_update")
        # the loss of the second step (after one update) against torch.optim's (naive's if
        # absent): the same W, batches and update give the same loss up to rounding
        ref_after = next((after[p] for p in ("torch_optim", "naive") if after.get(p) is not None),
                         None)
        for p in paths:
            r = results.get((case, p), {"status": "skipped: not run"})
            row = dict(info)
            row.update(timestamp=timestamp, path=p, path_name=LABELS[p], optimizer=case.optimizer,
                       backend="" if p == "naive" else case.backend, family="arcface",
                       B=case.B, C=case.C, D=case.D, dtype=case.dtype, device=case.device,
                       weight_mb=case.weight_bytes / MB, state_mb=case.state_bytes / MB,
                       status=r.get("status", "ok"), note=r.get("note", ""))
            if row["status"] == "ok":
                t = _totals(r)
                row.update(reps=len(t), median_ms=quantile(t, 0.5) * 1e3,
                           p20_ms=quantile(t, 0.2) * 1e3, p80_ms=quantile(t, 0.8) * 1e3,
                           forward_ms=quantile(r["fwd"], 0.5) * 1e3,
                           backward_ms=quantile(r["bwd"], 0.5) * 1e3,
                           optimizer_ms=quantile(r["opt"], 0.5) * 1e3,
                           first_step_ms=r["first_step"] * 1e3, loss=r["loss"],
                           built_mb=r["built"] / MB, persistent_mb=r["persistent"] / MB,
                           peak_mb=r["peak"] / MB, transient_mb=(r["peak"] - r["persistent"]) / MB,
                           peak_over_w_state=r["peak"] / (case.weight_bytes + case.state_bytes))
                if "torch_optim" in medians and p != "torch_optim":
                    row["speedup_vs_torch_optim"] = medians["torch_optim"] / row["median_ms"] * 1e3
                ref = losses.get("naive")
                if ref is not None and p != "naive":
                    row["rel_loss_diff"] = abs(r["loss"] - ref) / max(abs(ref), 1e-12)
                if r.get("loss_after_update") is not None:
                    row["loss_after_update"] = r["loss_after_update"]
                    if ref_after is not None:
                        row["rel_diff_after_update"] = (abs(r["loss_after_update"] - ref_after)
                                                        / max(abs(ref_after), 1e-12))
                row["note"] = "; ".join(n for n in (row["note"], r.get("mem_note", "")) if n)
            rows.append(row)
    return rows


def _totals(r: dict) -> list[float]:
    return [f + b + o for f, b, o in zip(r["fwd"], r["bwd"], r["opt"])]


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=TRAIN_CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def read_csv(path: str) -> list[dict]:
    """The CSV's rows with the numbers back as numbers ("" stays "")."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in ("B", "C", "D", "reps"):
            if r.get(k):
                r[k] = int(r[k])
        for k in ("peak_mb", "persistent_mb", "median_ms", "weight_mb", "state_mb"):
            if r.get(k):
                r[k] = float(r[k])
    return rows


# ----------------------------------------------------------------------------- capacity

def bytes_per_class(rows: list[dict]) -> dict[str, tuple[float, float, int]]:
    """Least-squares fit peak = a + b·C per path over its measured (status ok) rows of one
    (B, D, dtype, optimizer): {path: (b bytes per class, a bytes, number of points)}; paths with
    fewer than two distinct C are left out."""
    out = {}
    for p in PATHS:
        pts = [(r["C"], r["peak_mb"] * MB) for r in rows
               if r["path"] == p and r["status"] == "ok" and r.get("peak_mb") not in (None, "")]
        if len({c for c, _ in pts}) < 2:
            continue
        n = len(pts)
        mc = sum(c for c, _ in pts) / n
        mv = sum(v for _, v in pts) / n
        b = sum((c - mc) * (v - mv) for c, v in pts) / sum((c - mc) ** 2 for c, _ in pts)
        out[p] = (b, mv - b * mc, n)
    return out


def capacity(per_class: float, intercept: float, memory_bytes: float, headroom: float) -> int:
    """The largest C whose fitted peak a + b·C fits in ``memory_bytes`` less ``headroom`` (a
    fraction kept free): floor((M·(1 − headroom) − max(a, 0)) / b), 0 if nothing fits. A negative
    intercept (a fit's artefact) is not counted as free memory."""
    usable = memory_bytes * (1.0 - headroom) - max(intercept, 0.0)
    return max(math.floor(usable / per_class), 0) if per_class > 0 else 0


def capacity_table(rows: list[dict], headroom: float,
                   memories_gib: tuple[int, ...] = GPU_MEMORY_GIB) -> list[dict]:
    """Per path: bytes per class, intercept, and the largest C fitting each GPU memory."""
    table = []
    for p, (b, a, n) in bytes_per_class(rows).items():
        entry = {"path": p, "bytes_per_class": b, "intercept_mb": a / MB, "points": n}
        for gib in memories_gib:
            entry[f"max_classes_{gib}gb"] = capacity(b, a, gib * 2**30, headroom)
        table.append(entry)
    return table


def capacity_from_csv(path: str, headroom: float = 0.1,
                      memories_gib: tuple[int, ...] = GPU_MEMORY_GIB) -> list[dict]:
    """``capacity_table`` of a ``train-step*.csv`` (one B, D, dtype and optimizer per file)."""
    return capacity_table(read_csv(path), headroom, memories_gib)


# ----------------------------------------------------------------------------- tables

def _num(v, fmt: str) -> str:
    return "" if v is None or v == "" else format(v, fmt)


def markdown_table(rows: list[dict]) -> str:
    head = ("| C | path | step ms, median [p20, p80] | forward / backward / optimizer ms | "
            "W + state MB | persistent MB | peak MB | transient MB | peak ÷ (W + state) | "
            "speed vs marginops + torch.optim (×, higher is better) | status |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        t = parts = ""
        if r.get("median_ms") not in (None, ""):
            t = f"{r['median_ms']:.4g} [{r['p20_ms']:.4g}, {r['p80_ms']:.4g}]"
            parts = f"{r['forward_ms']:.4g} / {r['backward_ms']:.4g} / {r['optimizer_ms']:.4g}"
        lines.append(
            f"| {fmt_count(r['C'])} | {LABELS[r['path']]} | {t} | {parts} "
            f"| {r['weight_mb'] + r['state_mb']:.0f} | {_num(r.get('persistent_mb'), '.0f')} "
            f"| {_num(r.get('peak_mb'), '.0f')} | {_num(r.get('transient_mb'), '.0f')} "
            f"| {_num(r.get('peak_over_w_state'), '.3f')} "
            f"| {_num(r.get('speedup_vs_torch_optim'), '.2f')} | {r['status']} |")
    return "\n".join(lines)


def capacity_markdown(table: list[dict], headroom: float,
                      memories_gib: tuple[int, ...] = GPU_MEMORY_GIB) -> str:
    cols = " | ".join(f"max classes in {g} GB" for g in memories_gib)
    lines = [f"| path | bytes per class (fit) | intercept MB | points | {cols} |",
             "|" + "---|" * (4 + len(memories_gib))]
    for e in table:
        caps = " | ".join(fmt_count_round(e[f"max_classes_{g}gb"]) for g in memories_gib)
        lines.append(f"| {LABELS[e['path']]} | {e['bytes_per_class']:.0f} "
                     f"| {round(e['intercept_mb']):d} | {e['points']} | {caps} |")
    lines.append(f"\nmax classes = floor((G GiB × {1 - headroom:g} − max(intercept, 0)) ÷ bytes "
                 f"per class), {headroom:.0%} kept free; the head alone, assuming GPU memory "
                 "grows with C as the measured bytes per class do.")
    return "\n".join(lines)


def fmt_count_round(n: int) -> str:
    """3 significant digits: 2 831 155 -> '2.83M'."""
    if n >= 1_000_000:
        return f"{n / 1e6:.3g}M"
    if n >= 1_000:
        return f"{n / 1e3:.3g}K"
    return str(n)


# ----------------------------------------------------------------------------- plot

def plot(rows: list[dict], path: str) -> str | None:
    """Head memory (peak solid, persistent dashed, W + optimizer state dotted) and step time
    against C, log-log, one colour per path. None when fewer than two C were measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    if len({r["C"] for r in ok}) < 2:
        return None
    r0 = ok[0]
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, p in enumerate(PATHS):
        pts = sorted((r["C"], r) for r in ok if r["path"] == p)
        if not pts:
            continue
        cs = [c for c, _ in pts]
        colour = f"C{i}"
        ax_m.plot(cs, [r["peak_mb"] for _, r in pts], marker="o", color=colour,
                  label=f"{LABELS[p]}: peak")
        ax_m.plot(cs, [r["persistent_mb"] for _, r in pts], ls="--", marker=".", color=colour,
                  alpha=0.7, label=f"{LABELS[p]}: persistent")
        med = [r["median_ms"] for _, r in pts]
        err = [[m - r["p20_ms"] for m, (_, r) in zip(med, pts)],
               [r["p80_ms"] - m for m, (_, r) in zip(med, pts)]]
        ax_t.errorbar(cs, med, yerr=err, marker="o", color=colour, capsize=3, label=LABELS[p])
    cs = sorted({r["C"] for r in ok})
    ws = {r["C"]: r["weight_mb"] + r["state_mb"] for r in ok}
    ax_m.plot(cs, [ws[c] for c in cs], ls=":", color="k",
              label=f"W + {r0['optimizer']} state (computed)")
    what = f"{r0['dtype']} B={r0['B']} D={r0['D']} {r0['optimizer']} ({r0['device']})"
    ax_m.set(xscale="log", yscale="log", xlabel="number of classes C",
             ylabel="head memory (MB)", title=f"train step memory, {what}")
    ax_t.set(xscale="log", yscale="log", xlabel="number of classes C",
             ylabel="step time (ms), median [p20, p80]", title=f"train step time, {what}")
    for ax in (ax_m, ax_t):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def train_files(out_dir: str, optimizer: str, quick: bool) -> dict[str, str]:
    """train-step[-adamw][-quick].{csv,md,png,log} in ``out_dir``."""
    stem = "train-step" + ("" if optimizer == "sgd" else f"-{optimizer}") + (
        "-quick" if quick else "")
    return {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("csv", "md", "png", "log")}
