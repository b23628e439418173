"""The fixed-margin softmax families: NormFace, Crystal (L2-softmax), CosFace, ArcFace, the
combined (m1, m2, m3) margin and sub-center ArcFace, with the angular options they share.

Each is :class:`~marginops.modules.base.MarginSoftmaxLoss` with its own target logit; none keeps
state beyond a learnable scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import margins
from .._validation import (
    ANGLE_POLICIES,
    GRAD_MODES,
    check_choice,
    check_embeddings,
    check_labels,
    check_margin,
    check_real,
)
from ..functional import normalize_rows, scale_times
from ..ops import cpp_loss
from .base import MarginSoftmaxLoss


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

    def _psi(self):
        return cpp_loss.normface()


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

    def _psi(self):
        return cpp_loss.cosface(self.margin)


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

    def _psi(self):
        return cpp_loss.arcface(self.margin, self.angle_policy, self.grad_mode)


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

    def _psi(self):
        if self.m1 != 1.0:
            return None
        return cpp_loss.arcface(self.m2, self.angle_policy, self.grad_mode, offset=self.m3)


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
