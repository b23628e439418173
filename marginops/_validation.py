"""Input checks shared by the functional API and the modules.

Every check runs before anything is computed or any state buffer is touched, and every error names
the argument and says how to fix it. Checks that read tensor values (NaN/inf, label range) are
skipped while ``torch.compile`` traces, since they would break the graph; eager calls always run them.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ANGLE_POLICIES = ("fallback", "none", "easy", "clip")
GRAD_MODES = ("exact", "straight_through")
REDUCTIONS = ("mean", "sum", "none")


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}.")


def check_margin(name: str, value: float, *, allow_negative: bool = False) -> None:
    """Margins are radians; anything above π/2 is almost certainly a value in degrees."""
    if isinstance(value, torch.Tensor):
        return
    if not math.isfinite(value) or (value < 0 and not allow_negative):
        raise ValueError(f"{name}={value!r} must be a finite, non-negative angle in radians.")
    if abs(value) > math.pi / 2:
        raise ValueError(
            f"{name}={value!r} is above π/2: it looks like degrees. marginops takes margins in "
            f"radians; pass {name}=math.radians({value!r}) = {math.radians(value):.4f}.")


def check_embeddings(embeddings: torch.Tensor, embedding_size: int | None = None,
                     name: str = "embeddings") -> None:
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (batch, embedding_size), "
                        f"got {type(embeddings).__name__}.")
    if embeddings.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, embedding_size), got shape "
                         f"{tuple(embeddings.shape)}; flatten or reshape it first.")
    if embeddings.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got "
                        f"{embeddings.dtype}; call .float() on it.")
    if embeddings.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(embeddings.shape)}); pass at "
                         "least one row.")
    if embedding_size is not None and embeddings.shape[1] != embedding_size:
        raise ValueError(f"{name} has width {embeddings.shape[1]} but the classifier expects "
                         f"embedding_size={embedding_size}.")
    if not _tracing() and not bool(torch.isfinite(embeddings).all()):
        bad = (~torch.isfinite(embeddings)).any(dim=1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} contains NaN or inf (rows {bad}...); check the backbone's output "
                         "(learning rate, fp16 overflow) before the loss.")


def check_weight(weight: torch.Tensor, embeddings: torch.Tensor, name: str = "weight") -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor (num_classes, embedding_size).")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {weight.dtype}.")
    if weight.device != embeddings.device:
        raise ValueError(f"{name} is on {weight.device} but embeddings are on "
                         f"{embeddings.device}; move one of them (e.g. loss_fn.to(embeddings.device)).")
    if weight.shape[1] != embeddings.shape[1]:
        raise ValueError(f"{name} has embedding_size {weight.shape[1]} but embeddings have width "
                         f"{embeddings.shape[1]}.")
    if (embeddings.dtype == torch.float64) != (weight.dtype == torch.float64):
        raise TypeError(f"fp64 needs both embeddings and {name} in fp64 (got {embeddings.dtype} "
                        f"and {weight.dtype}); call .double() on both.")


def check_labels(labels: torch.Tensor, batch: int, num_classes: int, device: torch.device,
                 name: str = "labels") -> None:
    """labels: (batch,) integer class ids in [0, num_classes), or -1 to ignore a row."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer class ids.")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{name} must be an integer tensor (torch.long), got {labels.dtype}; "
                        "call .long() on it.")
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},) to match the embeddings' batch, got "
                         f"{tuple(labels.shape)}.")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but embeddings are on {device}; move them.")
    if not _tracing():
        bad = (labels < -1) | (labels >= num_classes)
        if bool(bad.any()):
            raise ValueError(f"{name} has values outside [0, {num_classes}) other than -1 (ignore): "
                             f"{labels[bad][:5].tolist()}. Check num_classes={num_classes}.")
