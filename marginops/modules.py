"""The loss modules users swap into training: ``loss = loss_fn(embeddings, labels)``.

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

import math
import types
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import margins
from ._validation import (
    ANGLE_POLICIES,
    GRAD_MODES,
    REDUCTIONS,
    check_choice,
    check_embeddings,
    check_int,
    check_labels,
    check_margin,
    check_real,
    check_scale,
    check_validate,
    check_weight,
)
from .core import BACKENDS, MarginLSE, margin_lse, resolve_backend, topk_dot
from .functional import normalize_rows, reduce_rows, scale_times, softmax_rows

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
        validate: "device" (default) checks label values with device-side asserts and makes no
            host synchronisation (NaN/inf embeddings give a NaN loss); "full" checks on the host
            and lists the bad values, NaN/inf included (debugging; two syncs per call).
    """

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float = 64.0,
                 reduction: str = "mean", backend: str = "auto", subcenters: int = 1,
                 normalize_weight: bool = True, bias: bool = False, validate: str = "device",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        check_int("embedding_size", embedding_size)
        check_int("num_classes", num_classes)
        check_int("subcenters", subcenters)
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("backend", backend, ("auto", *BACKENDS))
        check_validate(validate)
        check_scale("scale", scale)
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

    def reset_parameters(self) -> None:
        """N(0, 0.01) like insightface (the rows are normalised, so only directions matter)."""
        nn.init.normal_(self.weight, std=0.01)

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"scale={self.scale}, subcenters={self.subcenters}, backend={self.backend!r}")

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

    # ---- the class side (overridden by marginops.distributed)
    def _class_range(self) -> tuple[int, int] | None:
        if self.class_start == 0 and self.local_classes == self.num_classes:
            return None
        return (self.class_start, self.local_classes)

    def _class_side(self, x_hat: Tensor, labels: Tensor, scale: float | Tensor,
                    hard_negative) -> MarginLSE:
        return margin_lse(x_hat, self.weight, labels, scale, self.bias,
                          normalize_weight=self.normalize_weight, class_range=self._class_range(),
                          hard_negative=hard_negative, subcenters=self.subcenters,
                          backend=self.backend, validate=self.validate)

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


class NormFaceLoss(MarginSoftmaxLoss):
    """NormFace (arXiv 1704.06369): z_ij = s·cos θ_ij for every class, no margin.

    ``scale`` defaults to 64 fixed; ``learnable_scale=True`` makes s a parameter (initial value
    ``scale``, default 10 then). Equivalent PyTorch::

        F.cross_entropy(s * F.normalize(x) @ F.normalize(W).T, labels, ignore_index=-1)
    """

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float | None = None,
                 learnable_scale: bool = False, **kwargs):
        init = scale if scale is not None else (10.0 if learnable_scale else 64.0)
        super().__init__(embedding_size, num_classes, scale=init, **kwargs)
        if learnable_scale:
            self.scale = nn.Parameter(torch.tensor(float(init)))


class CrystalLoss(MarginSoftmaxLoss):
    """Crystal loss / L2-softmax (arXiv 1703.09507, 1804.01159): features L2-constrained to α,
    weights NOT normalised, bias on: z_ij = W_j·(α x̂_i) + b_j.

    ``alpha=None`` uses α_low = log(p·(C−2)/(1−p)) with p = ``target_prob`` (0.9): ≈ 11.4 at
    C = 10 000. ``learnable_alpha=True`` makes α a parameter. Equivalent PyTorch::

        F.cross_entropy(alpha * F.normalize(x) @ W.T + b, labels, ignore_index=-1)
    """

    def __init__(self, embedding_size: int, num_classes: int, *, alpha: float | None = None,
                 target_prob: float = 0.9, learnable_alpha: bool = False, bias: bool = True,
                 **kwargs):
        if alpha is not None:
            check_real("alpha", alpha, low=0.0, low_open=True)
        else:
            if not 0 < target_prob < 1 or num_classes < 3:
                raise ValueError("alpha=None needs 0 < target_prob < 1 and num_classes >= 3; or "
                                 "pass alpha explicitly.")
            alpha = crystal_alpha_low(num_classes, target_prob)
        super().__init__(embedding_size, num_classes, scale=float(alpha), normalize_weight=False,
                         bias=bias, **kwargs)
        if learnable_alpha:
            self.scale = nn.Parameter(torch.tensor(float(alpha)))

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)

    @property
    def alpha(self) -> float | Tensor:
        return self.scale


L2SoftmaxLoss = CrystalLoss


def crystal_alpha_low(num_classes: int, target_prob: float = 0.9) -> float:
    """α_low = log(p·(C−2)/(1−p)): the smallest α for which softmax can reach probability p."""
    return math.log(target_prob * (num_classes - 2) / (1 - target_prob))


class CosFaceLoss(MarginSoftmaxLoss):
    """CosFace / LMCL (arXiv 1801.09414): target s·(cos θ_y − m), others s·cos θ_j.

    Defaults s=64, m=0.35 (insightface configs use 0.4). Equivalent PyTorch::

        c = F.normalize(x) @ F.normalize(W).T
        F.cross_entropy(s * (c - m * F.one_hot(labels, C)), labels)
    """

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float = 64.0,
                 margin: float = 0.35, **kwargs):
        check_margin("margin", margin)  # a cosine offset, but 35 is still degrees-like
        super().__init__(embedding_size, num_classes, scale=scale, **kwargs)
        self.margin = float(margin)

    def _target_logit(self, cos_y, scale, norms, labels, valid):
        return scale_times(scale, margins.cosface(cos_y, self.margin))


class _AngularMixin:
    def _set_angular(self, angle_policy: str, grad_mode: str) -> None:
        check_choice("angle_policy", angle_policy, ANGLE_POLICIES)
        check_choice("grad_mode", grad_mode, GRAD_MODES)
        self.angle_policy = angle_policy
        self.grad_mode = grad_mode


class ArcFaceLoss(_AngularMixin, MarginSoftmaxLoss):
    """ArcFace (arXiv 1801.07698): target s·cos(θ_y + m), others s·cos θ_j. s=64, m=0.5 rad.

    ``angle_policy`` for θ+m > π: "fallback" (default; c − m·sin m past π−m), "none"
    (insightface), "easy" (margin only where c > 0), "clip". ``grad_mode``: "exact" (default) or
    "straight_through" (insightface since Dec 2022: same loss, dψ/dc taken as 1).
    Equivalent PyTorch::

        c = F.normalize(x) @ F.normalize(W).T
        theta_y = c.gather(1, y[:, None]).clamp(-1+eps, 1-eps).acos()
        F.cross_entropy(s * c.scatter(1, y[:, None], (theta_y + m).cos()), y)
    """

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float = 64.0,
                 margin: float = 0.5, angle_policy: str = "fallback", grad_mode: str = "exact",
                 **kwargs):
        check_margin("margin", margin)
        super().__init__(embedding_size, num_classes, scale=scale, **kwargs)
        self._set_angular(angle_policy, grad_mode)
        self.margin = float(margin)

    def _target_logit(self, cos_y, scale, norms, labels, valid):
        return scale_times(scale, margins.arcface(cos_y, self.margin, angle_policy=self.angle_policy,
                                                  grad_mode=self.grad_mode))


class CombinedMarginLoss(_AngularMixin, MarginSoftmaxLoss):
    """Combined margin (ArcFace paper, insightface's m1, m2, m3): target s·(cos(m1·θ_y + m2) − m3).

    Defaults (m1, m2, m3) = (1, 0.5, 0) = ArcFace; the paper's combined settings are (1, 0.3, 0.2)
    and (0.9, 0.4, 0.15). ``angle_policy``/``grad_mode`` as ArcFace. All three margins always
    apply, as in the ArcFace paper and insightface's MXNet graph; insightface's arcface_torch
    ``CombinedMarginLoss`` differs: it ignores m1 and m2 whenever m3 > 0 (plain CosFace).
    """

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float = 64.0,
                 m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                 angle_policy: str = "fallback", grad_mode: str = "exact", **kwargs):
        check_margin("m2", m2)
        if not (m1 > 0 and math.isfinite(m1)) or not (0 <= m3 < 2):
            raise ValueError(f"m1={m1} must be a positive multiplicative angular margin and "
                             f"m3={m3} an additive cosine margin in [0, 2).")
        super().__init__(embedding_size, num_classes, scale=scale, **kwargs)
        self._set_angular(angle_policy, grad_mode)
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)

    def _target_logit(self, cos_y, scale, norms, labels, valid):
        return scale_times(scale, margins.combined(cos_y, self.m1, self.m2, self.m3,
                                                   angle_policy=self.angle_policy,
                                                   grad_mode=self.grad_mode))


class SphereFaceLoss(MarginSoftmaxLoss):
    """SphereFace / A-Softmax (arXiv 1704.08063): weights normalised, features not.

    Non-target ‖x‖·cos θ_j; target ‖x‖·(ψ(θ_y) + λ cos θ_y)/(1+λ), ψ(θ) = (−1)^k cos(mθ) − 2k,
    m=4; λ = max(λ_min, base·(1 + γ·iter)^(−power)) anneals from 1000 to 5 (``anneal=False``: λ=0).
    The iteration counter is a buffer advanced by every training-mode call.
    """

    _norm_aware = True  # accepts norms=; warns once on unit-norm embeddings

    def __init__(self, embedding_size: int, num_classes: int, *, margin: int = 4,
                 anneal: bool = True, lambda_base: float = 1000.0, lambda_gamma: float = 0.12,
                 lambda_power: float = 1.0, lambda_min: float = 5.0, **kwargs):
        if check_int("margin", margin) < 1:
            raise ValueError(f"margin={margin!r}: SphereFace's margin is a positive integer "
                             "multiplier of the angle (default 4).")
        super().__init__(embedding_size, num_classes, scale=1.0, **kwargs)
        self.margin = int(margin)
        self.anneal = anneal
        self.lambda_schedule = (lambda_base, lambda_gamma, lambda_power, lambda_min)
        self.register_buffer("iteration", torch.zeros(1, dtype=torch.long))

    @property
    def lambda_(self) -> Tensor:
        """λ = max(λ_min, base·(1 + γ·iter)^(−power)) at the current iteration (0 if not annealed)."""
        base, gamma, power, lambda_min = self.lambda_schedule
        lam = (base * (1 + gamma * self.iteration.double()) ** (-power)).clamp_min(lambda_min)
        return lam if self.anneal else torch.zeros_like(lam)

    def _row_scale(self, norms):
        return norms  # logits are ‖x‖·cos θ = x·ŵ

    def _target_logit(self, cos_y, scale, norms, labels, valid):
        lam = self.lambda_.to(cos_y.dtype)
        if self.training:
            self.iteration += 1
        return scale * margins.sphereface(cos_y, self.margin, lam)


class CurricularFaceLoss(MarginSoftmaxLoss):
    """CurricularFace (arXiv 2004.00288, authors' code).

    Target s·T(c_y), T = ArcFace with fallback; a negative with c_ij > cos(θ_y + m) becomes
    s·c_ij·(t + c_ij) (mask not differentiated; derivative t + 2c). Each training step, before use:
    t ← momentum·mean_i(c_iy) + (1 − momentum)·t (``t`` buffer, starts at 0, no gradient).
    """

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float = 64.0,
                 margin: float = 0.5, momentum: float = 0.01, **kwargs):
        check_margin("margin", margin)
        check_real("momentum", momentum, low=0.0, high=1.0)
        super().__init__(embedding_size, num_classes, scale=scale, **kwargs)
        self.margin = float(margin)
        self.momentum = float(momentum)
        self.register_buffer("t", torch.zeros(1))

    def _hard_negative(self, x_hat, labels, valid):
        cos_y = self._target_cosine(x_hat, labels)
        if self.training:
            ema_update_(self.t, cos_y, valid, self.momentum)
        tau = margins.curricular_threshold(cos_y, self.margin)
        tau = torch.where(valid, tau, torch.full_like(tau, float("inf")))  # ignored: no mining
        # A snapshot: the op saves t for its backward, and the next forward (gradient
        # accumulation, multi-crop) updates the buffer in place before that backward runs.
        return tau, self.t.clone()

    def _target_logit(self, cos_y, scale, norms, labels, valid):
        return scale_times(scale, margins.arcface(cos_y, self.margin, angle_policy="fallback"))


class AdaFaceLoss(MarginSoftmaxLoss):
    """AdaFace (arXiv 2204.00964, authors' head.py): a norm-adaptive margin.

    ẑ = clip(h·(n − μ)/(σ + ε), −1, 1) with n = clip(‖x‖, 0.001, 100) detached; target
    s·(cos(clip(θ_y − m·ẑ, ε, π−ε)) − (m + m·ẑ)), others s·cos θ_j. μ and σ are EMA buffers
    (start 20 and 100) of the batch's norm mean/std, updated before use in training mode.
    ``forward(features, labels, norms=norms)`` takes the norms separately (the authors' backbone
    returns normalised features and norms); unit-norm embeddings without it warn once.
    Deviation: the authors also clamp the non-target cosines to [−1+ε, 1−ε]; we do not (it only
    changes |c| > 0.999).
    """

    _norm_aware = True  # accepts norms=; warns once on unit-norm embeddings

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float = 64.0,
                 margin: float = 0.4, h: float = 0.333, t_alpha: float = 0.01, eps: float = 1e-3,
                 **kwargs):
        check_margin("margin", margin)
        check_real("t_alpha", t_alpha, low=0.0, high=1.0)
        super().__init__(embedding_size, num_classes, scale=scale, **kwargs)
        self.margin, self.h, self.t_alpha, self.eps = float(margin), float(h), float(t_alpha), eps
        self.register_buffer("batch_mean", torch.full((1,), 20.0))
        self.register_buffer("batch_std", torch.full((1,), 100.0))

    def _target_logit(self, cos_y, scale, norms, labels, valid):
        if self.training:
            n = norms.clamp(0.001, 100)
            ema_update_(self.batch_mean, n, valid, self.t_alpha)
            ema_update_(self.batch_std, n, valid, self.t_alpha, statistic="std")
        psi = margins.adaface(cos_y, norms, margin=self.margin, h=self.h, eps=self.eps,
                              batch_mean=self.batch_mean.to(cos_y.dtype),
                              batch_std=self.batch_std.to(cos_y.dtype))
        return scale_times(scale, psi)


class MagFaceLoss(MarginSoftmaxLoss):
    """MagFace (arXiv 2103.06627): target s·cos(θ_y + m(a)), a = clamp(‖x‖, l_a, u_a) (not
    detached), m(a) linear from l_m to u_m; loss += λ_g·(1/a + a/u_a²) per row. Easy margin by
    default (``angle_policy="easy"``), as the authors' code. ``forward(..., norms=)`` as AdaFace
    (differentiable: the magnitude is trained through it).
    """

    _norm_aware = True  # accepts norms=; warns once on unit-norm embeddings

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float = 64.0,
                 l_a: float = 10.0, u_a: float = 110.0, l_m: float = 0.45, u_m: float = 0.8,
                 lambda_g: float = 35.0, angle_policy: str = "easy", grad_mode: str = "exact",
                 **kwargs):
        check_margin("l_m", l_m)
        check_margin("u_m", u_m)
        if not 0 < l_a < u_a:
            raise ValueError(f"need 0 < l_a < u_a, got l_a={l_a}, u_a={u_a}.")
        if not l_m <= u_m:
            raise ValueError(f"need l_m <= u_m (the margin grows with the magnitude), got "
                             f"l_m={l_m}, u_m={u_m}.")
        super().__init__(embedding_size, num_classes, scale=scale, **kwargs)
        check_choice("angle_policy", angle_policy, ANGLE_POLICIES)
        check_choice("grad_mode", grad_mode, GRAD_MODES)
        self.l_a, self.u_a, self.l_m, self.u_m = float(l_a), float(u_a), float(l_m), float(u_m)
        self.lambda_g, self.angle_policy, self.grad_mode = float(lambda_g), angle_policy, grad_mode

    def _magnitude(self, norms: Tensor) -> Tensor:
        return norms.clamp(self.l_a, self.u_a)

    def _target_logit(self, cos_y, scale, norms, labels, valid):
        m = margins.magface_margin(self._magnitude(norms), self.l_a, self.u_a, self.l_m, self.u_m)
        return scale_times(scale, margins.arcface(cos_y, m.to(cos_y.dtype),
                                                  angle_policy=self.angle_policy,
                                                  grad_mode=self.grad_mode))

    def _extra_rows(self, x_hat, norms, labels, cos_y, valid):
        a = self._magnitude(norms)
        return self.lambda_g * (1 / a + a / self.u_a ** 2)


class _ElasticMixin:
    """Per-row margins m_i ~ N(m, σ), redrawn every training step; ``plus=True`` gives the larger
    margins to the harder rows (lower target cosine). In eval mode the margin is m itself.

    The draws are counter-based (``margins.counter_normal``): step n's margins are a function of
    (seed, n) only, held in the buffer ``draw_state = [seed, n]``. So the same seed gives the
    same margins, a checkpoint resumes the same sequence, several forwards before one backward
    each get their own step, and torch.compile traces the draw (no torch.Generator). ``seed=None``
    draws the seed from torch's global RNG at construction (``torch.manual_seed`` fixes it)."""

    def _set_elastic(self, margin: float, std: float, plus: bool, seed: int | None) -> None:
        check_margin("margin", margin)
        check_real("std", std, low=0.0)
        if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2 ** 63):
            raise ValueError(f"seed={seed!r} must be None or an int in [0, 2**63).")
        self.margin, self.std, self.plus, self.seed = float(margin), float(std), plus, seed
        first = int(torch.randint(0, 2 ** 62, (1,))) if seed is None else seed
        self.register_buffer("draw_state", torch.tensor([first, 0], dtype=torch.long))

    def _row_margins(self, cos_y: Tensor, valid: Tensor) -> Tensor | float:
        if not self.training:
            return self.margin
        z = margins.counter_normal(self.draw_state[0], self.draw_state[1], cos_y.shape[0],
                                   dtype=cos_y.dtype, device=cos_y.device)
        self.draw_state[1:] += 1
        draws = self.margin + self.std * z
        if self.plus:  # easiest row (highest cosine) gets the smallest margin
            order = torch.argsort(cos_y.detach(), descending=True)
            draws = torch.empty_like(draws).scatter_(0, order, torch.sort(draws).values)
        return draws


class ElasticArcFaceLoss(_ElasticMixin, _AngularMixin, MarginSoftmaxLoss):
    """ElasticFace-Arc (arXiv 2109.09416): target s·cos(θ_y + m_i), m_i ~ N(0.5, 0.05) per row per
    step (``plus=True``: σ default 0.0175 and harder rows get larger margins). ``seed`` makes the
    draws reproducible."""

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float = 64.0,
                 margin: float = 0.5, std: float | None = None, plus: bool = False,
                 seed: int | None = None, angle_policy: str = "fallback",
                 grad_mode: str = "exact", **kwargs):
        super().__init__(embedding_size, num_classes, scale=scale, **kwargs)
        self._set_angular(angle_policy, grad_mode)
        self._set_elastic(margin, (0.0175 if plus else 0.05) if std is None else std, plus, seed)

    def _target_logit(self, cos_y, scale, norms, labels, valid):
        m = self._row_margins(cos_y, valid)
        return scale_times(scale, margins.arcface(cos_y, m, angle_policy=self.angle_policy,
                                                  grad_mode=self.grad_mode))


class ElasticCosFaceLoss(_ElasticMixin, MarginSoftmaxLoss):
    """ElasticFace-Cos (arXiv 2109.09416): target s·(cos θ_y − m_i), m_i ~ N(0.35, 0.05)
    (``plus=True``: σ default 0.02, larger margins for harder rows)."""

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float = 64.0,
                 margin: float = 0.35, std: float | None = None, plus: bool = False,
                 seed: int | None = None, **kwargs):
        super().__init__(embedding_size, num_classes, scale=scale, **kwargs)
        self._set_elastic(margin, (0.02 if plus else 0.05) if std is None else std, plus, seed)

    def _target_logit(self, cos_y, scale, norms, labels, valid):
        return scale_times(scale, margins.cosface(cos_y, self._row_margins(cos_y, valid)))


class SubCenterArcFaceLoss(ArcFaceLoss):
    """Sub-center ArcFace (ECCV 2020): K sub-centers per class, weight (C·K, D), row = class·K + k;
    c_ij = max_k x̂_i·ŵ_{j,k}, then ArcFace. K=3, s=64, m=0.5.

    After training on noisy data: :meth:`dominant_subcenters` and :meth:`clean_mask` drop the
    samples farther than 75° from their class's dominant sub-center.
    """

    def __init__(self, embedding_size: int, num_classes: int, *, subcenters: int = 3, **kwargs):
        super().__init__(embedding_size, num_classes, subcenters=subcenters, **kwargs)

    @torch.no_grad()
    def _subcenter_cosines(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        x_hat, _ = normalize_rows(embeddings)
        rows = F.normalize(self.weight.view(self.num_classes, self.subcenters, -1)[labels], dim=-1)
        return torch.einsum("bd,bkd->bk", x_hat.to(rows.dtype), rows)  # (B, K)

    @torch.no_grad()
    def dominant_subcenters(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """(C,) the sub-center most samples of each class are closest to (-1: class unseen)."""
        check_embeddings(embeddings, self.embedding_size)
        check_labels(labels, embeddings.shape[0], self.num_classes, embeddings.device)
        keep = labels >= 0
        nearest = self._subcenter_cosines(embeddings[keep], labels[keep]).argmax(dim=1)
        votes = torch.zeros(self.num_classes, self.subcenters, device=labels.device)
        votes.index_put_((labels[keep], nearest), torch.ones_like(nearest, dtype=votes.dtype),
                         accumulate=True)
        return torch.where(votes.sum(dim=1) > 0, votes.argmax(dim=1), -1)

    @torch.no_grad()
    def clean_mask(self, embeddings: Tensor, labels: Tensor,
                   max_angle: float = math.radians(75)) -> Tensor:
        """(B,) True for samples within ``max_angle`` of their class's dominant sub-center."""
        dominant = self.dominant_subcenters(embeddings, labels)
        keep = labels >= 0
        cos = torch.zeros(labels.shape[0], device=labels.device)
        sub_cos = self._subcenter_cosines(embeddings[keep], labels[keep])
        cos[keep] = sub_cos.gather(1, dominant[labels[keep]][:, None]).squeeze(1).float()
        return keep & (cos >= math.cos(max_angle))


class NPTLoss(MarginSoftmaxLoss):
    """NPT-Loss (arXiv 2103.03503): a hinge on the k nearest negative proxies, no softmax.

        L_i = 2r²·Σ_{j ∈ top-k non-target} max(0, c_ij − c_iy + δ),   δ = Δ/(2r²) = 0.5, r = 1

    2r² is the paper's factor; the authors' code multiplies by 2r (the same at their r = 1).

    The negatives come from the fused top-k (target masked with −inf, so a batch whose negatives
    are all below 0 still picks a negative); gradient reaches only those k proxies and the target.
    ``logits`` are the plain cosines.
    """

    def __init__(self, embedding_size: int, num_classes: int, *, k: int = 1, delta: float = 0.5,
                 r: float = 1.0, **kwargs):
        if not 1 <= check_int("k", k) < check_int("num_classes", num_classes):
            raise ValueError(f"k={k} must be in [1, num_classes - 1 = {num_classes - 1}].")
        super().__init__(embedding_size, num_classes, scale=1.0, **kwargs)
        self.k, self.delta, self.r = int(k), float(delta), float(r)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        self._check_inputs(embeddings, labels)
        x_hat, _ = normalize_rows(embeddings)
        valid = labels >= 0
        hinge = npt_rows(x_hat, self.weight, labels, self.k, self.delta, self.backend)
        return reduce_rows(2 * self.r ** 2 * hinge, valid, self.reduction)


def npt_rows(x_hat: Tensor, weight: Tensor, labels: Tensor, k: int, delta: float,
             backend: str) -> Tensor:
    """Σ over the k nearest non-target proxies of max(0, c_ij − c_iy + δ), per row (B,)."""
    safe = labels.clamp_min(0)
    neg, _ = topk_dot(x_hat, weight, k, exclude=safe, backend=backend)
    acc = neg.dtype
    cos_y = (x_hat.to(acc) * F.normalize(weight[safe].to(acc), dim=1, eps=1e-12)).sum(dim=1)
    return F.relu(neg - cos_y[:, None] + delta).sum(dim=1)


class UncertaintyMarginLoss(_AngularMixin, MarginSoftmaxLoss):
    """Uncertainty-aware vMF margin with proxy constraints (LH2Face, arXiv 2506.23555).

    RECONSTRUCTED from the paper's abstract and summaries (its full text was not available):
    every form and constant below is ours and configurable.

    - vMF similarity: logits κ_i·cos θ_ij with κ_i = ‖x_i‖ (the Bessel normaliser depends only on
      κ_i and cancels in the softmax);
    - uncertainty-aware margin: target κ_i·cos(θ_y + m_i), m_i = clamp(m0·‖x_i‖/μ, 0, m_max)
      (detached), μ an EMA (``momentum``) of the batch-mean norm, updated in training mode;
    - proxy constraints added per row: ``pull_weight``·(1 − c_iy) + ``push_weight``·max(0,
      max_{j≠y} c_ij − c_iy + ``push_delta``), and ``proxy_weight``·mean over ordered pairs of
      distinct classes in the batch of max(0, ŵ_a·ŵ_b − ``proxy_margin``) (added to every row, so
      it enters the mean once).
    """

    _norm_aware = True  # accepts norms=; warns once on unit-norm embeddings

    def __init__(self, embedding_size: int, num_classes: int, *, margin: float = 0.35,
                 margin_max: float = 0.8, momentum: float = 0.01, init_norm_mean: float = 20.0,
                 pull_weight: float = 1.0, push_weight: float = 1.0, push_delta: float = 0.5,
                 proxy_weight: float = 1.0, proxy_margin: float = 0.0,
                 angle_policy: str = "fallback", grad_mode: str = "exact", **kwargs):
        check_margin("margin", margin)
        check_margin("margin_max", margin_max)
        check_real("momentum", momentum, low=0.0, high=1.0)
        check_real("init_norm_mean", init_norm_mean, low=0.0, low_open=True)
        if push_weight and check_int("num_classes", num_classes) < 2:
            raise ValueError(f"num_classes={num_classes}: the push term needs a non-target class "
                             "(num_classes >= 2), or pass push_weight=0.")
        super().__init__(embedding_size, num_classes, scale=1.0, **kwargs)
        self._set_angular(angle_policy, grad_mode)
        self.margin, self.margin_max, self.momentum = float(margin), float(margin_max), momentum
        self.pull_weight, self.push_weight, self.push_delta = pull_weight, push_weight, push_delta
        self.proxy_weight, self.proxy_margin = proxy_weight, proxy_margin
        self.register_buffer("norm_mean", torch.full((1,), float(init_norm_mean)))

    def _row_scale(self, norms):
        return norms  # κ_i = ‖x_i‖

    def _target_logit(self, cos_y, scale, norms, labels, valid):
        if self.training:
            ema_update_(self.norm_mean, norms, valid, self.momentum)
        m = (self.margin * norms.detach() / self.norm_mean.to(norms.dtype)).clamp(
            0, self.margin_max)
        return scale * margins.arcface(cos_y, m.to(cos_y.dtype), angle_policy=self.angle_policy,
                                       grad_mode=self.grad_mode)

    def _extra_rows(self, x_hat, norms, labels, cos_y, valid):
        rows = self.pull_weight * (1 - cos_y)
        if self.push_weight:
            rows = rows + self.push_weight * npt_rows(x_hat, self.weight, labels, 1,
                                                      self.push_delta, self.backend)
        if self.proxy_weight:
            rows = rows + self.proxy_weight * proxy_separation(self.weight, labels, valid,
                                                               self.proxy_margin).to(rows.dtype)
        return rows


def proxy_separation(weight: Tensor, labels: Tensor, valid: Tensor, margin: float = 0.0) -> Tensor:
    """Mean over ordered pairs of distinct classes among the valid rows' labels of
    max(0, ŵ_a·ŵ_b − margin) (0 with fewer than two classes). Equivalent PyTorch::

        classes = torch.unique(labels[valid]); n = len(classes)
        sim = F.relu(ŵ[classes] @ ŵ[classes].T - margin)
        (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))

    Computed over row pairs instead, with no data-dependent shape (no unique, no host sync, so
    torch.compile keeps one graph): row i weighs 1/count(y_i), so each class counts once.
    """
    same = (labels[:, None] == labels[None, :]) & valid[:, None] & valid[None, :]
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    weights = 1 / same.sum(dim=1).clamp_min(1).to(acc)
    weights = torch.where(valid, weights, torch.zeros_like(weights))
    n = weights.sum()  # the number of distinct classes (up to rounding: compared with 1.5)
    w = F.normalize(weight[labels.clamp_min(0)].to(acc), dim=1, eps=1e-12)
    sim = F.relu(w @ w.t() - margin).masked_fill(same | ~valid[:, None] | ~valid[None, :], 0)
    total = weights @ sim @ weights
    return torch.where(n > 1.5, total / (n * (n - 1)).clamp_min(1), torch.zeros_like(total))


LH2FaceLoss = UncertaintyMarginLoss
