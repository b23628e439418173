"""The pipeline every loss module runs, and the helpers the families share.

Each module owns its classifier ``weight`` of shape (num_classes·K, embedding_size) (K = 1 but for
sub-center ArcFace; row = class·K + k) and evaluates

    L_i = logsumexp_j z_ij − z_iy = softplus(lse_neg_i − z_iy),   z_ij = s_i·c_ij (+ b_j)

through the core op, which streams over the classes. A family only says how its target logit
z_iy is made from the target cosine (``_target_logit``), its per-row scale (``_row_scale``), and, for
CurricularFace, the hard-negative modulation of the other logits. Stateful families keep state in
buffers and update it only in training mode, after the inputs were validated.

The class side goes through two methods, ``_class_side`` and ``_target_cosine``, so that
``marginops.distributed`` can shard the classes without touching the families.
"""

from __future__ import annotations

import types
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import (
    REDUCTIONS,
    check_choice,
    check_embeddings,
    check_int,
    check_labels,
    check_real,
    check_scale,
    check_validate,
    check_weight,
)
from ..core import BACKENDS, MarginLSE, margin_lse_checked, resolve_backend, topk_dot
from ..functional import normalize_rows, reduce_rows, scale_times, softmax_rows
from ..ops import cpp_loss
from ..optim import tag_classifier_weight

# State buffers have shape (1,), not (): torch.compile (2.13, CPU) drops in-place updates of 0-d
# fp64 buffers, and one shape for every dtype keeps state_dicts uniform.


class MarginSoftmaxLoss(nn.Module):
    """Base of the softmax families: NormFace behaviour (target s·c_y) unless overridden.

    Args:
        embedding_size: D.
        num_classes: C (global, also when the classes are sharded).
        scale: s, the logit scale.
        reduction: "mean" (over non-ignored rows), "sum" or "none" ((B,), 0 on ignored rows).
        backend: "auto", "torch", "cpp", "cuda" or "triton" (see ``python -m marginops.info``).
        subcenters: K rows per class.
        normalize_weight: False keeps raw weight rows (Crystal loss).
        bias: add a learnable per-class bias (Crystal loss).
        interclass_filtering_threshold: insightface arcface_torch's option (0.4 in its
            ``*_filter04`` configs); 0 (default) disables it. When > 0, every non-target cosine
            above it enters the softmax as 0 (logit s·0 + bias) with no gradient — fused in the
            core op (``marginops.margin_lse``), every backend.
        validate: "device" (default) checks label values with device-side asserts and makes no
            host synchronisation (NaN/inf embeddings give a NaN loss); "full" checks on the host
            and lists the bad values, NaN/inf included (debugging; two syncs per call).
    """

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float = 64.0,
                 reduction: str = "mean", backend: str = "auto", subcenters: int = 1,
                 normalize_weight: bool = True, bias: bool = False,
                 interclass_filtering_threshold: float = 0.0, validate: str = "device",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        check_int("embedding_size", embedding_size)
        check_int("num_classes", num_classes)
        check_int("subcenters", subcenters)
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("backend", backend, ("auto", *BACKENDS))
        check_validate(validate)
        check_scale("scale", scale)
        self.interclass_filtering_threshold = check_real(
            "interclass_filtering_threshold", interclass_filtering_threshold, low=0.0)
        self.validate = validate
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.subcenters = int(subcenters)
        self.reduction = reduction
        self.backend = backend
        self.normalize_weight = normalize_weight
        self.scale = scale
        # This module's classes: [class_start, class_start + local_classes). marginops.distributed
        # narrows it to a shard; a single process owns them all.
        self.class_start = 0
        self.local_classes = self.num_classes
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.num_classes * self.subcenters,
                                               self.embedding_size, **factory))
        tag_classifier_weight(self.weight, self)  # marginops.optim may fuse its step
        self.bias = nn.Parameter(torch.zeros(self.num_classes, **factory)) if bias else None
        self.reset_parameters()

    def __init_subclass__(cls, **kwargs):
        # torch.compile caches graphs per code object, and dynamo's recompile_limit (8) counts
        # the entries of one code object: if every family ran the base class's forward, compiling
        # more than 8 families (or configurations) in one process would silently fall back to
        # eager, or fail under fullgraph=True. So each subclass gets its own copy of the forward
        # it inherits (same code, distinct code object).
        super().__init_subclass__(**kwargs)
        if "forward" not in cls.__dict__:
            inherited = cls.forward
            forward = types.FunctionType(inherited.__code__.replace(), inherited.__globals__,
                                         "forward", inherited.__defaults__, inherited.__closure__)
            forward.__kwdefaults__ = inherited.__kwdefaults__
            forward.__doc__, forward.__annotations__ = inherited.__doc__, inherited.__annotations__
            forward.__qualname__ = f"{cls.__qualname__}.forward"
            cls.forward = forward

    def __setstate__(self, state: dict) -> None:
        # copy.deepcopy and unpickling rebuild the module here: tag its new weight as well
        super().__setstate__(state)
        weight = self._parameters.get("weight")
        if isinstance(weight, Tensor):
            tag_classifier_weight(weight, self)

    def reset_parameters(self) -> None:
        """N(0, 0.01) like insightface (the rows are normalised, so only directions matter)."""
        nn.init.normal_(self.weight, std=0.01)

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"scale={self.scale}, subcenters={self.subcenters}, backend={self.backend!r}"
                + (f", interclass_filtering_threshold={self.interclass_filtering_threshold}"
                   if self.interclass_filtering_threshold > 0 else ""))

    # ---- what a family defines
    def _row_scale(self, norms: Tensor) -> float | Tensor:
        return self.scale

    def _hard_negative(self, x_hat: Tensor, labels: Tensor, valid: Tensor):
        return None

    def _target_logit(self, cos_y: Tensor, scale: float | Tensor, norms: Tensor, labels: Tensor,
                      valid: Tensor) -> Tensor:
        return scale_times(scale, cos_y)

    def _extra_rows(self, x_hat: Tensor, norms: Tensor, labels: Tensor, cos_y: Tensor,
                    valid: Tensor) -> Tensor | None:
        """Per-row terms added to the cross-entropy (MagFace's g(a), the vMF constraints)."""
        return None

    # ---- the cpp backend's one-op loss (marginops/ops/cpp_loss.py)
    def _psi(self) -> cpp_loss.Psi | None:
        """This family's target function as margin_loss takes it (None: not fusable). Only a
        class that defines it itself takes the one-op loss: a subclass may change any step."""
        return None

    def _one_op_psi(self, embeddings: Tensor, norms: Tensor | None) -> cpp_loss.Psi | None:
        """ψ when margin_loss serves this call, else None: one of the fixed-margin families
        itself (not a subclass, which may override any step of the pipeline), no norms, bias,
        sub-centers, class shard or weight normalisation off, and ``cpp_loss.applies``."""
        if "_psi" not in type(self).__dict__ or norms is not None or (
                self.bias is not None or self.subcenters != 1 or not self.normalize_weight
                or self._class_range() is not None):
            return None
        name = resolve_backend(self.backend, embeddings.device, embeddings.dtype,
                               (embeddings.shape[0], self.local_classes, embeddings.shape[1]))
        if not cpp_loss.applies(name, embeddings, self.weight, self.scale):
            return None
        return self._psi()

    # ---- the class side (overridden by marginops.distributed)
    def _class_range(self) -> tuple[int, int] | None:
        if self.class_start == 0 and self.local_classes == self.num_classes:
            return None
        return (self.class_start, self.local_classes)

    def _class_side(self, x_hat: Tensor, labels: Tensor, scale: float | Tensor,
                    hard_negative) -> MarginLSE:
        # _check_inputs validated embeddings, weight and labels (against num_classes, so against
        # local_classes when this module owns every class): the core op does not check them again.
        return margin_lse_checked(x_hat, self.weight, labels, scale, self.bias,
                                  normalize_weight=self.normalize_weight,
                                  class_range=self._class_range(), class_index=None,
                                  hard_negative=hard_negative, subcenters=self.subcenters,
                                  interclass_filtering_threshold=self.interclass_filtering_threshold,
                                  backend=self.backend, validate=self.validate,
                                  # eager: checked every call (a reassigned self.scale too);
                                  # compiled: as checked in __init__ (see margin_lse_checked)
                                  floats_checked=torch.compiler.is_compiling())

    @torch.no_grad()
    def _target_cosine(self, x_hat: Tensor, labels: Tensor) -> Tensor:
        """c_iy from a B×D gather of the target rows (0 for ignored rows): a cheap pre-pass."""
        acc = torch.float64 if x_hat.dtype == torch.float64 else torch.float32
        local = (labels - self.class_start).clamp(0, self.local_classes - 1)
        rows = self.weight.view(self.local_classes, self.subcenters, -1)[local].to(acc)
        if self.normalize_weight:
            rows = F.normalize(rows, dim=-1, eps=1e-12)
        cos = torch.einsum("bd,bkd->bk", x_hat.to(acc), rows).amax(dim=1)
        return torch.where(labels >= 0, cos, torch.zeros_like(cos))

    # ---- norm-aware families: the unit-norm warning
    _norm_aware = False        # True where the loss depends on ‖x‖ (accepts norms=)
    _unit_norm_probe = None    # None: not checked yet; (host flag, CUDA event): pending; "done"

    def _watch_unit_norms(self, norms: Tensor) -> None:
        """Warn once per module if every embedding of the first eager call has norm 1 ± 1e-3: the
        features were normalised already, so the norm-dependent margin or scale no longer adapts
        (pass the backbone's norms with ``norms=``).

        Sync-free by construction: the flag is computed on the device, then read on the host only
        once it is there. On CPU that is at once (a CPU tensor is read through NumPy: no device,
        nothing dispatched, nothing to wait for). On CUDA the flag goes to pinned memory with a
        non-blocking copy and an event; later calls poll ``event.query()``, which never blocks,
        and warn when it has landed. Not checked under torch.compile, during CUDA graph capture,
        or on other devices (reading them would sync)."""
        if torch.compiler.is_compiling():  # first: dynamo must not trace (or guard on) the probe
            return
        probe = self._unit_norm_probe
        if probe == "done":
            return
        if probe is None:
            device = norms.device
            if norms.numel() == 0 or device.type not in ("cpu", "cuda") or (
                    device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
                return
            flag = ((norms.detach() - 1).abs() <= 1e-3).all()
            event = None
            if device.type == "cuda":
                host = torch.empty((), dtype=torch.bool, pin_memory=True)
                host.copy_(flag, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                flag = host
            self._unit_norm_probe = probe = (flag, event)
        flag, event = probe
        if event is not None and not event.query():
            return  # not on the host yet: look again on the next call
        self._unit_norm_probe = "done"
        if bool(flag.numpy()):
            warnings.warn(
                f"{type(self).__name__}: every embedding has norm 1 (within 1e-3), but this "
                "family's margin/scale depends on the embedding norm. If your backbone returns "
                "normalised features and their norms separately, pass them: "
                "loss_fn(features, labels, norms=norms).", UserWarning, stacklevel=3)

    # ---- the pipeline
    def _check_inputs(self, embeddings: Tensor, labels: Tensor) -> None:
        """Every check of a call, before any state moves: metadata (raises at once), the backend,
        then label values (device-side assert, or host-side with validate="full")."""
        if isinstance(embeddings, Tensor) and self.weight.device != embeddings.device:
            raise ValueError(f"the loss's weight is on {self.weight.device} but embeddings are on "
                             f"{embeddings.device}; call loss_fn.to({str(embeddings.device)!r}).")
        check_embeddings(embeddings, self.embedding_size, validate=self.validate)
        k = self.subcenters
        check_weight(self.weight, embeddings, rows=self.local_classes * k,
                     rows_hint=f" (num_classes={self.local_classes} × subcenters={k})")
        bias = getattr(self, "shard_bias", None) if self.bias is None else self.bias
        if bias is not None and (bias.shape != (self.local_classes,)
                                 or not bias.dtype.is_floating_point):
            raise ValueError(f"bias must be a floating ({self.local_classes},) tensor (one per "
                             f"class), got {bias.dtype} of shape {tuple(bias.shape)}.")
        resolve_backend(self.backend, embeddings.device, embeddings.dtype)
        check_labels(labels, embeddings.shape[0], self.num_classes, embeddings.device,
                     validate=self.validate)

    def _check_norms(self, norms: Tensor | None, embeddings: Tensor) -> None:
        if norms is None:
            return
        if not self._norm_aware:
            raise TypeError(f"{type(self).__name__} does not use embedding norms: drop norms=. "
                            "(norms= is for the norm-aware families: AdaFace, MagFace, SphereFace, "
                            "UncertaintyMargin.)")
        batch = embeddings.shape[0]
        if not isinstance(norms, Tensor) or norms.shape != (batch,) or not norms.is_floating_point():
            got = (f"{norms.dtype} of shape {tuple(norms.shape)}" if isinstance(norms, Tensor)
                   else type(norms).__name__)
            raise TypeError(f"norms must be a float tensor of shape ({batch},) (one ‖x‖ per "
                            f"embedding row), got {got}.")
        if norms.device != embeddings.device:
            raise ValueError(f"norms is on {norms.device} but embeddings are on "
                             f"{embeddings.device}; move norms to {str(embeddings.device)!r}.")

    def forward(self, embeddings: Tensor, labels: Tensor, norms: Tensor | None = None) -> Tensor:
        """embeddings (B, D) raw, labels (B,) int64 with -1 = ignore → loss (scalar, or (B,)).

        norms: (B,) ‖x‖ for the norm-aware families (AdaFace, MagFace, SphereFace,
        UncertaintyMargin) when the backbone returns normalised features and their norms
        separately (AdaFace's convention); the embeddings' own norms otherwise. Differentiable.
        """
        self._check_inputs(embeddings, labels)
        self._check_norms(norms, embeddings)
        psi = self._one_op_psi(embeddings, norms)
        if psi is not None:  # the cpp backend's one-op loss: the same math, below
            return cpp_loss.margin_loss(embeddings, self.weight, labels, psi, self.scale,
                                        self.interclass_filtering_threshold, self.reduction)
        x_hat, own_norms = normalize_rows(embeddings)
        if norms is None:
            norms = own_norms
            if self._norm_aware:
                self._watch_unit_norms(norms)
        else:
            norms = norms.to(own_norms.dtype)
        valid = labels >= 0
        scale = self._row_scale(norms)
        hard_negative = self._hard_negative(x_hat, labels, valid)
        lse_neg, cos_y = self._class_side(x_hat, labels, scale, hard_negative)
        target = self._target_logit(cos_y, scale, norms, labels, valid)
        if self.bias is not None:
            target = target + self.bias.to(target.dtype)[labels.clamp_min(0)]
        rows = softmax_rows(lse_neg, target)
        extra = self._extra_rows(x_hat, norms, labels, cos_y, valid)
        if extra is not None:
            rows = rows + extra
        return reduce_rows(rows, valid, self.reduction)

    # ---- inference helpers
    def logits(self, embeddings: Tensor) -> Tensor:
        """(B, C) logits without margin: scale · cosine (+ bias). Materialises B×C."""
        check_embeddings(embeddings, self.embedding_size)
        x_hat, norms = normalize_rows(embeddings)
        w = self.weight.to(x_hat.dtype)
        if self.normalize_weight:
            w = F.normalize(w, dim=1, eps=1e-12)
        cos = (x_hat @ w.t()).view(x_hat.shape[0], -1, self.subcenters).amax(dim=2)
        scale = self._row_scale(norms)
        if isinstance(scale, Tensor) and scale.dim() == 1:  # per-row scale (‖x‖ families)
            scale = scale[:, None]
        logits = scale_times(scale, cos)
        return logits + self.bias.to(cos.dtype) if self.bias is not None else logits

    @torch.no_grad()
    def predict(self, embeddings: Tensor, k: int = 1) -> Tensor:
        """(B, k) most likely classes. Without a bias the ranking is by cosine, so it streams
        through the fused top-k and never forms the logits."""
        if check_int("k", k) > self.num_classes:
            raise ValueError(f"k={k} must be between 1 and num_classes={self.num_classes}.")
        if self.bias is not None:
            return self.logits(embeddings).topk(k, dim=1).indices
        check_embeddings(embeddings, self.embedding_size)
        x_hat, _ = normalize_rows(embeddings)
        return topk_dot(x_hat, self.weight, k, normalize_weight=self.normalize_weight,
                        subcenters=self.subcenters, backend=self.backend)[1]


def ema_update_(buffer: Tensor, values: Tensor, valid: Tensor, momentum: float,
                statistic: str = "mean") -> None:
    """buffer ← momentum·stat(values[valid]) + (1 − momentum)·buffer, in place and branch-free
    (so torch.compile keeps one graph); left unchanged when too few rows are valid (std: 2)."""
    count = valid.sum()
    v = torch.where(valid, values.detach(), torch.zeros_like(values)).double()
    mean = v.sum() / count.clamp_min(1)
    if statistic == "mean":
        stat, enough = mean, count >= 1
    else:  # unbiased std, torch.std's default
        sq = torch.where(valid, (v - mean) ** 2, torch.zeros_like(v)).sum()
        stat, enough = (sq / (count - 1).clamp_min(1)).sqrt(), count >= 2
    updated = momentum * stat + (1 - momentum) * buffer.double()
    buffer.copy_(torch.where(enough, updated, buffer.double()))
