"""What every part of the benchmark shares: the case and plan records, the dimension names, parsing
of the command-line lists, order statistics, and the machine / process facts printed with results.
"""

from __future__ import annotations

import math
import os
import platform
import re
import socket
from dataclasses import dataclass, field

import torch

import marginops

FAMILIES = ("arcface", "cosface", "normface", "ce")
MODES = ("forward", "backward", "forward+backward")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCALE, ARC_MARGIN, COS_MARGIN = 64.0, 0.5, 0.35

CSV_FIELDS = [
    "timestamp", "machine", "hostname", "cpu_model", "cores", "threads", "gpu", "python", "torch",
    "triton", "marginops", "pml", "provider", "family", "mode", "B", "C", "D", "dtype", "device",
    "reps", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "extra_mem_mb", "speedup_vs_reference",
    "speedup_vs_compiled", "speedup_vs_pml", "speedup_vs_lce", "gemm_ratio", "tflops", "compile_s",
    "rel_loss_diff", "status", "note", "provider_name",
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
        return f"{self.family} {self.dtype} B={self.B} C={fmt_count(self.C)} D={self.D}"


@dataclass
class Plan:
    cases: list[Case]
    providers: list[str]
    reps: int
    warmup: int
    name: str                                   # "" (default), a preset, "quick" -> file names
    axis: dict[Case, str] = field(default_factory=dict)   # the sweep each case belongs to
    compile_for: set[Case] = field(default_factory=set)   # cases where reference_compiled runs
    memory_only_providers: list[str] | None = None        # None: every provider
    compile_mode: str = "base"
    memory_for_case: dict[Case, list[str]] | None = None  # preset: which providers get memory




def fmt_count(n: int) -> str:
    for unit, div in (("M", 1_000_000), ("K", 1_000)):
        if n >= div and n % (div // 10) == 0:
            v = n / div
            return f"{v:g}{unit}"
    return str(n)


def parse_counts(text: str) -> list[int]:
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


def parse_names(text: str, allowed) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise SystemExit(f"unknown {bad}; choose from {', '.join(allowed)}")
    return names


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default 'linear' method)."""
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def mem_total_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def process_age_s() -> float:
    """Seconds since this process started (so the reported runtime includes the imports)."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "n/a"


def slug(text: str) -> str:
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
    cpu = cpu_model()
    name = slug(gpu) if device == "cuda" else f"{slug(cpu)}-{cores}c"
    return {"machine": name, "hostname": socket.gethostname(), "cpu_model": cpu,
            "cores": str(cores), "threads": str(torch.get_num_threads()), "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton_version, "marginops": marginops.__version__, "pml": pml_version}


