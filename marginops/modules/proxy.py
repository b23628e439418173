"""The families with terms on the nearest negative proxies, beyond the softmax: NPT-Loss (a hinge
on the top-k negatives) and the uncertainty-aware vMF margin (LH2Face: pull, push and
proxy-separation terms).

Both read the whole weight (top-k over every class, pairs of proxies), so they are not sharded
by :mod:`marginops.distributed`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import margins
from .._validation import check_int, check_margin, check_real
from ..core import topk_dot
from ..functional import normalize_rows, reduce_rows
from .base import MarginSoftmaxLoss, ema_update_
from .softmax import _AngularMixin


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
