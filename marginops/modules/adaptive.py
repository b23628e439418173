"""The families whose margin or scale moves during training: SphereFace (annealed), CurricularFace
(hard-negative curriculum), AdaFace and MagFace (feature-norm aware) and ElasticFace (random
per-row margins).

Their state lives in buffers of shape (1,) and is updated only in training mode, after the inputs
were validated (see :mod:`marginops.modules.base`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import margins
from .._validation import ANGLE_POLICIES, GRAD_MODES, check_choice, check_int, check_margin, check_real
from ..functional import scale_times
from .base import MarginSoftmaxLoss, ema_update_
from .softmax import _AngularMixin


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
