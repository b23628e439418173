"""Input checks shared by the core op, the functional API and the modules.

Every check runs before anything is computed or any state buffer is touched, and every error names
the argument and says how to fix it. Two kinds of checks:

- type, shape, dtype and device checks read only metadata: they always run and raise at once;
- value checks (label range, class_index range and distinctness, NaN/inf) read tensor data. By
  default (``validate="device"``) they are device-side asserts (``torch._assert_async``): no host
  synchronisation, so a training step stays asynchronous and CUDA-graph capturable. On CPU the
  assert raises at once (RuntimeError with the message); on CUDA it is a device-side assert that
  surfaces at the next synchronisation. NaN/inf inputs are not an error by default: they propagate
  to a NaN loss, as in PyTorch. ``validate="full"`` reads the values on the host instead (two or
  three syncs per call) and raises ValueError listing the offending values, NaN/inf included: use
  it to debug. Host-side checks are skipped while ``torch.compile`` traces (they would break the
  graph); device asserts are traced.
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ANGLE_POLICIES = ("fallback", "none", "easy", "clip")
GRAD_MODES = ("exact", "straight_through")
REDUCTIONS = ("mean", "sum", "none")
VALIDATE_MODES = ("device", "full")
_UNSIGNED = (torch.uint8, torch.uint16, torch.uint32, torch.uint64)


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}.")


def check_int(name: str, value, minimum: int = 1) -> int:
    """A Python/NumPy integer ≥ minimum (bool, float and str are refused, not coerced)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} must be an int, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}.")
    return int(value)


def check_real(name: str, value, *, low: float = -math.inf, high: float = math.inf,
               low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (not bool or str) in the interval [low, high] (ends open on request)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} must be a float, got {type(value).__name__}.")
    value = float(value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if not math.isfinite(value) or below or above:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name}={value!r} must be a finite number in {lo}{low}, {high}{hi}.")
    return value


def check_scale(name: str, value, device: torch.device | None = None) -> None:
    """A logit scale: a positive finite number, or a float tensor (0-d or per row) on ``device``
    (a learnable scale; its values are the model's business)."""
    if isinstance(value, torch.Tensor):
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}.")
        if device is not None and value.device != device:
            raise ValueError(f"{name} is on {value.device} but the embeddings are on {device}; "
                             "move it.")
        return
    check_real(name, value, low=0.0, low_open=True)


def assert_values(ok: torch.Tensor, message: str) -> None:
    """Device-side assert that every element of ``ok`` holds: no host synchronisation."""
    torch._assert_async(ok.all(), message)


def check_validate(validate: str) -> None:
    check_choice("validate", validate, VALIDATE_MODES)


def check_margin(name: str, value: float, *, allow_negative: bool = False) -> None:
    """Margins are radians; anything above π/2 is almost certainly a value in degrees."""
    if isinstance(value, torch.Tensor):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} must be a float (radians), got {type(value).__name__}.")
    if not math.isfinite(value) or (value < 0 and not allow_negative):
        raise ValueError(f"{name}={value!r} must be a finite, non-negative angle in radians.")
    if abs(value) > math.pi / 2:
        raise ValueError(
            f"{name}={value!r} is above π/2: it looks like degrees. marginops takes margins in "
            f"radians; pass {name}=math.radians({value!r}) = {math.radians(value):.4f}.")


def check_embeddings(embeddings: torch.Tensor, embedding_size: int | None = None,
                     name: str = "embeddings", *, validate: str = "device",
                     allow_empty: bool = False) -> None:
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (batch, embedding_size), "
                        f"got {type(embeddings).__name__}.")
    if embeddings.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, embedding_size), got shape "
                         f"{tuple(embeddings.shape)}; flatten or reshape it first.")
    if embeddings.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got "
                        f"{embeddings.dtype}; call .float() on it.")
    if embeddings.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is an empty batch (shape {tuple(embeddings.shape)}); pass at "
                         "least one row.")
    if embedding_size is not None and embeddings.shape[1] != embedding_size:
        raise ValueError(f"{name} has width {embeddings.shape[1]} but the classifier expects "
                         f"embedding_size={embedding_size}.")
    # NaN/inf propagate to a NaN loss by default; only the opt-in host check raises on them.
    if validate == "full" and not _tracing() and not bool(torch.isfinite(embeddings).all()):
        bad = (~torch.isfinite(embeddings)).any(dim=1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} contains NaN or inf (rows {bad}...); check the backbone's output "
                         "(learning rate, fp16 overflow) before the loss.")


def check_weight(weight: torch.Tensor, embeddings: torch.Tensor, name: str = "weight",
                 rows: int | None = None, rows_hint: str = "") -> None:
    """weight (rows, D) float on the embeddings' device; ``rows`` (if given) is the expected count."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{name} must be a 2-D tensor (num_classes, embedding_size), got {got}.")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {weight.dtype}.")
    if weight.device != embeddings.device:
        raise ValueError(f"{name} is on {weight.device} but embeddings are on "
                         f"{embeddings.device}; move one of them (e.g. loss_fn.to(embeddings.device)).")
    width = embeddings.shape[1]
    if weight.shape[1] != width:
        if weight.shape[0] == width:
            raise ValueError(f"{name} has shape {tuple(weight.shape)}: it looks transposed "
                             f"(embedding_size, num_classes), the pytorch-metric-learning layout. "
                             f"marginops takes (num_classes, embedding_size) like nn.Linear: pass "
                             f"{name}.T.")
        raise ValueError(f"{name} has embedding_size {weight.shape[1]} but embeddings have width "
                         f"{width}.")
    if rows is not None and weight.shape[0] != rows:
        raise ValueError(f"{name} has {weight.shape[0]} rows but must have {rows}{rows_hint}; "
                         f"a replaced weight must keep the shape ({rows}, {width}).")
    if (embeddings.dtype == torch.float64) != (weight.dtype == torch.float64):
        raise TypeError(f"fp64 needs both embeddings and {name} in fp64 (got {embeddings.dtype} "
                        f"and {weight.dtype}); call .double() on both.")


def check_labels(labels: torch.Tensor, batch: int, num_classes: int | None, device: torch.device,
                 name: str = "labels", *, validate: str = "device") -> None:
    """labels: (batch,) integer class ids in [0, num_classes), or -1 to ignore a row
    (``num_classes=None``: no upper bound, e.g. global ids seen by one class shard)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer class ids, got "
                        f"{type(labels).__name__}.")
    if (labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex()
            or labels.dtype in _UNSIGNED):
        raise TypeError(f"{name} must be a signed integer tensor (torch.long), got {labels.dtype}"
                        "; call .long() on it.")
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},) to match the embeddings' batch, got "
                         f"{tuple(labels.shape)}.")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but embeddings are on {device}; move them "
                         f"({name}.to(embeddings.device)).")
    upper = math.inf if num_classes is None else num_classes
    where = f"[0, {num_classes})" if num_classes is not None else "[0, ∞)"
    if validate == "full":
        if not _tracing():
            bad = (labels < -1) | (labels >= upper)
            if bool(bad.any()):
                raise ValueError(f"{name} has values outside {where} other than -1 (ignore): "
                                 f"{labels[bad][:5].tolist()}. Check num_classes={num_classes}.")
        return
    ok = labels >= -1 if num_classes is None else (labels >= -1) & (labels < num_classes)
    assert_values(ok, f"{name} has values outside {where} other than -1 (ignore); check "
                      f"num_classes={num_classes} (validate='full' lists the values).")


def check_class_index(class_index: torch.Tensor, num_local: int, device: torch.device, *,
                      validate: str = "device") -> None:
    """class_index: (N,) torch.long distinct local class ids in [0, num_local)."""
    if not isinstance(class_index, torch.Tensor) or class_index.dtype != torch.long or (
            class_index.dim() != 1):
        raise TypeError("class_index must be a 1-D torch.long tensor of local class ids.")
    if class_index.device != device:
        raise ValueError(f"class_index is on {class_index.device} but features are on {device}; "
                         "move it.")
    if class_index.numel() == 0:
        return
    ordered = class_index.sort().values  # distinct ⇔ strictly increasing once sorted
    ok = torch.cat([ordered[:1] >= 0, ordered[-1:] < num_local, ordered[1:] > ordered[:-1]])
    message = f"class_index must hold distinct local class ids in [0, {num_local})."
    if validate == "full":
        if not _tracing() and not bool(ok.all()):
            raise ValueError(message + f" Got {class_index[:8].tolist()}...")
        return
    assert_values(ok, message)
