"""Which backend ``backend="auto"`` picks on CUDA: the measured-fastest where it was measured, else
the performance model's pick for the shape.

``make gpu-check`` (scripts/gpu_check.py) times the ``triton`` and ``cuda`` backends over its
sweep (forward+backward, ArcFace) and writes, beside the performance model's predictions, the
winner of every measured point into ``<cache>/auto-backend.json`` (``<cache>`` as for the compiled
extension: ``$MARGINOPS_CACHE`` or the user cache dir, see marginops/build.py)::

    {"format": 1, "written_by": "scripts/gpu_check.py", "torch": "...", "triton": "...",
     "entries": [{"arch": "9.0", "dtype": "bfloat16", "B": 4096, "C": 1048576, "D": 512,
                  "backend": "triton", "source": "measured",
                  "ms": {"triton": 21.3, "cuda": 30.2}, "model_ms": {...}}, ...]}

Shapes are bucketed to powers of two (B = 3000 → 4096). A call picks the entry of its GPU's
compute capability and dtype nearest to its shape bucket (log2 distance, D first) (``choose``).
No entry for the arch and dtype (no table, another GPU) → ``static_choice``: the faster of the
two by benchmarks/model.py at the shape's bucket, from ``MODEL_PICKS`` (written by the model,
checked against it by tests/test_model.py), for the modelled GPU of the arch's major version; an
arch the model has no GPU for → None, and ``marginops.core`` falls back to triton, then cuda.

Read once per process and path (a file read, no GPU work, no synchronisation); a table that
cannot be read is ignored with one warning. Delete the file to return to the model's picks.
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


# --- no measurement: the performance model's pick (benchmarks/model.py) ---------------------------

MODEL_GPUS = {8: "a100", 9: "h100"}     # compute capability major → the modelled GPU
MODEL_B = tuple(1 << i for i in range(8, 17))    # 256 … 65536
MODEL_C = tuple(1 << i for i in range(13, 25))   # 8192 … 16777216
MODEL_D = tuple(1 << i for i in range(5, 11))    # 32 … 1024
MODEL_SHAPE = (4096, 1 << 20, 512)      # stands for an unknown size (symbolic under torch.compile)

# (model GPU, dtype) → {D: one character per (B, C) of MODEL_B × MODEL_C, B-major: "t" triton,
# "c" cuda}, the faster of the two for the ArcFace forward+backward at that power-of-two shape.
# Written by `python benchmarks/model.py --static-picks`; tests/test_model.py fails when stale.
MODEL_PICKS: dict[tuple[str, str], dict[int, str]] = {
    ("a100", "float32"): {
        32: ("cttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"
             "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"),
        64: ("cttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"
             "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"),
        128: ("tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"
              "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"),
        256: ("tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"
              "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"),
        512: ("cttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"
              "tttttttttttt" "tttttttttttt" "tttttttttttt" "cccccccccccc"),
        1024: ("cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc"
               "cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc"),
    },
    ("a100", "bfloat16"): {
        32: ("cttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"
             "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"),
        64: ("cttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"
             "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"),
        128: ("cttttttttttt" "cttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"
              "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"),
        256: ("cctttttttttt" "cctttttttttt" "cctttttttttt" "cttttttttttt" "cttttttttttt"
              "cttttttttttt" "tttttttttttt" "tttttttttttt" "cctttttttttt"),
        512: ("cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc"
              "cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc"),
        1024: ("cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc"
               "cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc"),
    },
    ("a100", "float16"): {
        32: ("cttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"
             "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"),
        64: ("cttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"
             "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"),
        128: ("cttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"
              "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"),
        256: ("cctttttttttt" "cttttttttttt" "cttttttttttt" "cttttttttttt" "cttttttttttt"
              "tttttttttttt" "tttttttttttt" "tttttttttttt" "cttttttttttt"),
        512: ("cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc"
              "cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc"),
        1024: ("cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc"
               "cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc"),
    },
    ("h100", "float32"): {
        32: ("cctttttttttt" "cttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"
             "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"),
        64: ("cctttttttttt" "cttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"
             "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"),
        128: ("cctttttttttt" "cttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"
              "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"),
        256: ("cccttttttttt" "cccctttttttt" "cccccccccccc" "cccccccccccc" "cccccccccccc"
              "cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc"),
        512: ("cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc"
              "cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc"),
        1024: ("cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc"
               "cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc"),
    },
    ("h100", "bfloat16"): {
        32: ("cctttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"
             "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"),
        64: ("cctttttttttt" "cttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"
             "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"),
        128: ("cccttttttttt" "cctttttttttt" "cttttttttttt" "tttttttttttt" "tttttttttttt"
              "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"),
        256: ("cccttttttttt" "cctttttttttt" "cttttttttttt" "tttttttttttt" "tttttttttttt"
              "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"),
        512: ("cctttttttttt" "cctttttttttt" "cttttttttttt" "tttttttttttt" "tttttttttttt"
              "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"),
        1024: ("cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc"
               "cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc"),
    },
    ("h100", "float16"): {
        32: ("cctttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"
             "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"),
        64: ("cctttttttttt" "cttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"
             "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"),
        128: ("cctttttttttt" "cttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"
              "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"),
        256: ("cctttttttttt" "cctttttttttt" "cttttttttttt" "tttttttttttt" "tttttttttttt"
              "tttttttttttt" "tttttttttttt" "tttttttttttt" "tttttttttttt"),
        512: ("cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc"
              "cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc"),
        1024: ("cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc"
               "cccccccccccc" "cccccccccccc" "cccccccccccc" "cccccccccccc"),
    },
}


def static_choice(arch: str, dtype: str, B: int | None, C: int | None, D: int | None
                  ) -> str | None:
    """The model's faster backend ("triton" / "cuda") for this arch ("9.0"), dtype and shape, or
    None (no modelled GPU for the arch, or a dtype the model does not cover). Sizes are bucketed
    to powers of two and clamped to the grid; unknown sizes (None) take MODEL_SHAPE's."""
    picks = MODEL_PICKS.get((MODEL_GPUS.get(int(arch.split(".")[0]), ""), dtype))
    if picks is None:
        return None

    def index(n, grid, default):
        n = bucket(default if n is None else n)
        return grid.index(min(max(n, grid[0]), grid[-1]))

    row = picks[MODEL_D[index(D, MODEL_D, MODEL_SHAPE[2])]]
    cell = index(B, MODEL_B, MODEL_SHAPE[0]) * len(MODEL_C) + index(C, MODEL_C, MODEL_SHAPE[1])
    return "triton" if row[cell] == "t" else "cuda"
