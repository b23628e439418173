"""Which backend ``backend="auto"`` picks on CUDA: the measured-fastest, where it was measured.

``make gpu-check`` (scripts/gpu_check.py) times the ``triton`` and ``cuda`` backends over its
sweep (forward+backward, ArcFace) and writes, beside the performance model's predictions, the
winner of every measured point into ``<cache>/auto-backend.json`` (``<cache>`` as for the compiled
extension: ``$MARGINOPS_CACHE`` or the user cache dir, see marginops/build.py)::

    {"format": 1, "written_by": "scripts/gpu_check.py", "torch": "...", "triton": "...",
     "entries": [{"arch": "9.0", "dtype": "bfloat16", "B": 4096, "C": 1048576, "D": 512,
                  "backend": "triton", "source": "measured",
                  "ms": {"triton": 21.3, "cuda": 30.2}, "model_ms": {...}}, ...]}

Shapes are bucketed to powers of two (B = 3000 → 4096). A call picks the entry of its GPU's
compute capability and dtype nearest to its shape bucket (log2 distance, D first); no entry for
the arch and dtype (no table, another GPU) → None, and ``marginops.core`` uses its static order
(triton, then cuda): what the model predicts faster (benchmarks/model.py; see the README).

Read once per process and path (a file read, no GPU work, no synchronisation); a table that
cannot be read is ignored with one warning. Delete the file to return to the static order.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings

FORMAT = 1
FILENAME = "auto-backend.json"
CHOICES = ("triton", "cuda")   # what the table may pick; anything else in a file is ignored


def bucket(n: int) -> int:
    """The power of two at or above ``n`` (≥ 1): the shape key of a table entry."""
    return 1 << max(int(n) - 1, 0).bit_length()


def table_path() -> str:
    """``<cache>/auto-backend.json`` (read at call time: the cache can move between calls)."""
    from .build import cache_root

    return os.path.join(str(cache_root()), FILENAME)


@functools.cache
def load(path: str) -> tuple[dict, ...]:
    """The valid entries of the table at ``path``; () when there is none."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return ()
    except (OSError, ValueError) as err:
        warnings.warn(f"marginops: ignoring the backend table {path} ({err}); delete it or rerun "
                      "`make gpu-check`", stacklevel=2)
        return ()
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        warnings.warn(f"marginops: ignoring the backend table {path}: not format {FORMAT}",
                      stacklevel=2)
        return ()
    keys = ("arch", "dtype", "B", "C", "D", "backend")
    return tuple(e for e in data.get("entries", ()) if isinstance(e, dict)
                 and all(k in e for k in keys) and e["backend"] in CHOICES)


def choose(arch: str, dtype: str, B: int | None, C: int | None, D: int | None,
           path: str | None = None) -> str | None:
    """The measured-fastest backend for this arch ("9.0"), dtype ("bfloat16") and shape, or None
    (no entry for the arch and dtype). Unknown sizes (None: e.g. symbolic under torch.compile's
    dynamic shapes) match any."""
    return _choose(arch, dtype, B, C, D, path or table_path())


@functools.cache
def _choose(arch, dtype, B, C, D, path) -> str | None:
    entries = [e for e in load(path) if e["arch"] == arch and e["dtype"] == dtype]
    if not entries:
        return None

    def distance(e: dict) -> tuple:
        def d(n, m):
            return 0.0 if n is None else abs(math.log2(bucket(n)) - math.log2(max(int(m), 1)))
        return (d(D, e["D"]), d(B, e["B"]) + d(C, e["C"]))

    return min(entries, key=distance)["backend"]


def write(path: str, entries: list[dict], **meta) -> None:
    """Write a table (atomically: a reader never sees half a file) and forget cached reads."""
    for e in entries:
        if e.get("backend") not in CHOICES:
            raise ValueError(f"entry {e}: backend must be one of {CHOICES}")
        e.update(B=bucket(e["B"]), C=bucket(e["C"]), D=bucket(e["D"]))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump({"format": FORMAT, **meta, "entries": entries}, fh, indent=1)
    os.replace(tmp, path)
    load.cache_clear()
    _choose.cache_clear()
