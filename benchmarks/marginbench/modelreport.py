"""``bench_fused.py --model``: the roofline model (benchmarks/model.py) of every case of the plan,
beside the measured forward+backward medians when the case ran on a GPU.

The model is of the ArcFace step (weight normalisation on); CosFace and NormFace run the same
kernels, plain CE (``ce``) skips the O(C·D) normalisation, which the model then slightly overcounts.
"""

from __future__ import annotations

import torch

from .common import Plan, fmt_count
from .providers import LABELS

# provider id -> the model's backend
MODELLED = {"triton": "triton", "cuda": "cuda", "reference": "naive"}


def gpu_key(device: str, requested: str | None) -> tuple[str, str]:
    """(model GPU key, how it was chosen)."""
    import model as perfmodel

    if requested:
        key = requested.lower()
        if key not in perfmodel.GPUS:
            raise SystemExit(f"--model-gpu {requested!r}: choose one of "
                             f"{', '.join(sorted(perfmodel.GPUS))}")
        return key, "--model-gpu"
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        for key in ("h200", "h100", "a100"):
            if key in name.lower():
                return key, f"the GPU present ({name})"
        return "h100", f"h100 constants: no model of the GPU present ({name})"
    return "h100", "no GPU here: H100 assumed (--model-gpu to change)"


def model_report(plan: Plan, rows: list[dict], device: str, requested_gpu: str | None) -> str:
    import model as perfmodel

    gpu, why = gpu_key(device, requested_gpu)
    measured = {(r["family"], r["B"], r["C"], r["D"], r["dtype"], r["provider"]): r.get("median_ms")
                for r in rows if r["mode"] == "forward+backward" and r["status"] == "ok"}
    out = [f"## Roofline model ({perfmodel.GPUS[gpu].name}: {why}), forward+backward", "",
           "| case | provider | predicted ms | fraction of peak (model) | measured ms "
           "| measured ÷ predicted (1 = as modelled; higher = slower than modelled) |",
           "|---|---|---|---|---|---|"]
    details = []
    for case in plan.cases:
        if case.dtype not in perfmodel.ELT:
            continue
        label = f"{case.family} {case.dtype} B={case.B} C={fmt_count(case.C)} D={case.D}"
        for provider, backend in MODELLED.items():
            if provider not in plan.providers:
                continue
            _, launches, seconds, fraction = perfmodel.model(case.B, case.C, case.D, case.dtype,
                                                             gpu, backend)
            ms = measured.get((case.family, case.B, case.C, case.D, case.dtype, provider))
            ratio = f"{ms / (seconds * 1e3):.2f}" if ms and device == "cuda" else ""
            shown = f"{ms:.4g}" if ms and device == "cuda" else "not measured (no GPU)" \
                if device != "cuda" else "not measured"
            out.append(f"| {label} | {LABELS[provider]} | {seconds * 1e3:.4g} | {fraction:.3f} | {shown} "
                       f"| {ratio} |")
        details.append(f"### {label}\n\n" + perfmodel.report(case.B, case.C, case.D, case.dtype,
                                                              gpu))
    return "\n".join(out) + "\n\n" + "\n\n".join(details)


# --- make gpu-check: the model beside the sweep's measurements, and auto's table ------------

SIDE_BY_SIDE = {"triton": "triton", "cuda": "cuda", "reference": "naive"}   # provider -> model


def measured_ms(rows: list[dict], family: str = "arcface") -> dict[tuple, float]:
    """{(dtype, B, C, D, provider): forward+backward median ms} of the bench CSV rows (strings,
    as csv.DictReader gives them) that ran ok."""
    out = {}
    for r in rows:
        if (r.get("mode") == "forward+backward" and r.get("status") == "ok"
                and r.get("family") == family and r.get("median_ms")):
            key = (r["dtype"], int(r["B"]), int(r["C"]), int(r["D"]), r["provider"])
            out[key] = float(r["median_ms"])
    return out


def side_by_side(points: list[tuple[str, int, int, int]], rows: list[dict], gpu: str,
                 arch: str) -> tuple[str, list[dict]]:
    """(markdown table, backend-table entries) for the ArcFace step at ``points`` = (dtype, B, C,
    D): per backend the model's prediction on ``gpu`` (a benchmarks/model.py key) beside the
    measured median; per point the model's pick, the measured-fastest of triton / cuda and what
    ``auto`` will pick (the measured-fastest, else backend_table.static_choice: the model's pick
    at the shape's bucket). An entry (marginops/backend_table.py) is written for every point where
    one of them ran."""
    import model as perfmodel

    from marginops import backend_table

    ms = measured_ms(rows)
    lines = [f"## Model ({perfmodel.GPUS[gpu].name}) vs measurement, ArcFace forward+backward",
             "", "| case | backend | predicted ms | measured ms | measured ÷ predicted (1 = as "
             "modelled; higher = slower than modelled) |", "|---|---|---|---|---|"]
    picks = ["", "| case | model picks | measured fastest | auto will pick |", "|---|---|---|---|"]
    entries = []
    for dtype, B, C, D in points:
        label = f"{dtype} B={B} C={fmt_count(C)} D={D}"
        predicted = {}
        for provider, backend in SIDE_BY_SIDE.items():
            predicted[provider] = perfmodel.model(B, C, D, dtype, gpu, backend)[2] * 1e3
            got = ms.get((dtype, B, C, D, provider))
            shown = f"{got:.4g}" if got else "not measured"
            ratio = f"{got / predicted[provider]:.2f}" if got else ""
            lines.append(f"| {label} | {LABELS[provider]} | {predicted[provider]:.4g} | {shown} "
                         f"| {ratio} |")
        by_model = min(("triton", "cuda"), key=predicted.get)
        timed = {p: ms[(dtype, B, C, D, p)] for p in ("triton", "cuda")
                 if (dtype, B, C, D, p) in ms}
        fastest = min(timed, key=timed.get) if timed else None
        unmeasured = f"{backend_table.static_choice(arch, dtype, B, C, D) or 'triton'} (model)"
        picks.append(f"| {label} | {by_model} | {fastest or 'not measured'} "
                     f"| {fastest or unmeasured} |")
        if fastest:
            entries.append(dict(arch=arch, dtype=dtype, B=B, C=C, D=D, backend=fastest,
                                source="measured", ms=timed,
                                model_ms={p: round(predicted[p], 4) for p in ("triton", "cuda")}))
    return "\n".join(lines + picks) + "\n", entries
