"""``python -m marginops.info``: versions, devices, the extension cache, and which backends can run.

Asking whether ``cpp`` can run loads the compiled extension, compiling it first if this torch has
no cached build (a one-line message says so)."""

from __future__ import annotations

import platform
import sys

import torch

from . import build
from .core import backend_status


def report() -> str:
    import marginops

    lines = [f"marginops {marginops.__version__}",
             f"python    {sys.version.split()[0]} ({platform.machine()}, {platform.system()})",
             f"torch     {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"]
    try:
        import triton
        lines.append(f"triton    {triton.__version__}")
    except ImportError:
        lines.append("triton    not installed")
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        lines += [f"cuda:{i}    {torch.cuda.get_device_name(i)}"
                  for i in range(torch.cuda.device_count())]
    else:
        lines.append("GPU       none visible")
    statuses = {device: backend_status(device) for device in devices}  # compiles cpp if needed
    lines.append(f"cache     {build.cache_root()} (compiled extensions; $MARGINOPS_CACHE moves it)")
    ext = build.loaded()
    if ext:
        kernels = "CPU + CUDA" if ext["config"]["cuda_kernels"] else "CPU"
        lines.append(f"extension {ext['path']} ({kernels} kernels, built for this torch)")
    else:
        lines.append(f"extension not loaded: {statuses['cpu']['cpp']}")
    for device, status in statuses.items():
        lines.append(f"backends on {device}:")
        for name, reason in status.items():
            lines.append(f"  {name:7s} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
