"""``python -m marginops.info``: versions, devices, and which backends can run here."""

from __future__ import annotations

import platform
import sys

import torch

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
    for device in devices:
        lines.append(f"backends on {device}:")
        for name, reason in backend_status(device).items():
            lines.append(f"  {name:7s} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
