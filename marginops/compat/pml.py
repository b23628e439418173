"""Drop-in replacements for pytorch-metric-learning 2.9's classifier losses.

A PML user changes one import::

    from pytorch_metric_learning import losses          # before
    from marginops.compat import pml as losses          # after

    loss_func = losses.ArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64)
    loss = loss_func(embeddings, labels)

Each class here IS the corresponding ``marginops`` family (a subclass: same forward, same fused
op, same validation); only the conventions PML users rely on change:

- the constructor is PML's: ``(num_classes, embedding_size, margin, scale, ...)``, with ArcFace's
  margin in DEGREES (PML's default 28.6°; ``loss_func.margin`` then holds radians, as in PML);
- the classifier is the parameter ``W`` of shape (D, C) (sub-center: (D, C·K), column
  class·K + k), initialised N(0, 1) like PML (``weight_init_func`` to change it); the family reads
  its (C, D) ``weight`` as the transposed view ``W.T`` — state dicts are ``{"W": ...}`` and load
  both ways with PML;
- ``forward(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)`` and
  ``get_logits(embeddings)`` (scale · cosine, no margin).

The (D, C) layout costs nothing: the core op streams over contiguous class rows, and ``W`` is
stored column-major (strides (1, D)), i.e. as the contiguous (C, D) matrix marginops uses, so
``W.T`` is read and its gradient written without a copy (``W.grad`` has W's strides). A W that was
made row-major (e.g. replaced by the user with a plain (D, C) tensor) still works, at the price
of one (C, D) copy per forward and per backward. Saving and loading state dicts is unaffected
(values, not strides, are copied).

What has no equivalent raises, naming it: miners' ``indices_tuple``, ``ref_emb``/``ref_labels``,
reducers other than PML's default ``MeanReducer``, ``distance`` objects, weight/embedding
regularizers, ``collect_stats=True``. Label −1 ignores a row (in PML it would index the last
class).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .. import modules

__all__ = ["ArcFaceLoss", "CosFaceLoss", "NormalizedSoftmaxLoss", "SubCenterArcFaceLoss"]

_UNSUPPORTED_KWARGS = {
    "distance": "marginops always uses the cosine (normalised embeddings and weights)",
    "weight_regularizer": "add the regulariser's term to the loss yourself, e.g. "
                          "loss + reg(loss_func.W.T)",
    "embedding_regularizer": "add the regulariser's term to the loss yourself",
}


def _check_pml_kwargs(kwargs: dict) -> Callable[[Tensor], object] | None:
    """Validate PML's base-class keyword arguments; returns ``weight_init_func``."""
    init = kwargs.pop("weight_init_func", None)
    for name, hint in _UNSUPPORTED_KWARGS.items():
        if kwargs.pop(name, None) is not None:
            raise NotImplementedError(f"{name}= is not supported by marginops.compat.pml: {hint}.")
    for name in ("weight_reg_weight", "embedding_reg_weight"):
        kwargs.pop(name, None)  # only meaningful with a regulariser, refused above
    reducer = kwargs.pop("reducer", None)
    if reducer is not None and type(reducer).__name__ != "MeanReducer":
        raise NotImplementedError(
            f"reducer={type(reducer).__name__}() is not supported by marginops.compat.pml: the "
            "loss is the mean over the rows (PML's default MeanReducer). For per-row losses use "
            "marginops' own modules with reduction='none'.")
    if kwargs.pop("collect_stats", False):
        raise NotImplementedError("collect_stats=True is not supported by marginops.compat.pml "
                                  "(the fused op records no statistics such as avg_angle).")
    if init is not None and not callable(init):
        raise TypeError(f"weight_init_func must be callable (it is applied to W), got {init!r}.")
    return init


class _PMLClassifier:
    """Mixed in front of a marginops family: PML's ``W`` (D, C·K) parameter, call and logits.

    The family reads ``self.weight``; here that name is a property returning the (C·K, D) view
    ``W.T``, so the family's pipeline runs unchanged on PML's parameter. The family's own
    (C·K, D) parameter, created by its ``__init__``, is dropped right after it.
    """

    W: nn.Parameter

    @property
    def weight(self) -> Tensor:
        """(num_classes·K, embedding_size) view of ``W`` (the layout of marginops' families)."""
        return self.W.t()

    def _adopt_pml_weight(self, weight_init_func) -> None:
        # W is (D, C·K) but laid out as the transpose of a contiguous (C·K, D) matrix: the family's
        # view W.T is then contiguous, so the op reads it (and writes its gradient) in place.
        self.W = nn.Parameter(torch.empty_like(self._parameters.pop("weight")).t())
        self.weight_init_func = weight_init_func
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 1), PML's default (``torch.nn.init.normal_``), or ``weight_init_func(W)``."""
        if "W" not in self._parameters:  # called by the family's __init__, before W exists
            return
        # Drawn into a row-major (D, C) tensor, as PML's W, so that a seeded init gives PML's
        # values (W's own memory is column-major), then copied into W.
        values = torch.empty(self.W.shape, device=self.W.device, dtype=self.W.dtype)
        with torch.no_grad():
            (self.weight_init_func or nn.init.normal_)(values)
            self.W.copy_(values)

    def forward(self, embeddings: Tensor, labels: Tensor | None = None,
                indices_tuple=None, ref_emb: Tensor | None = None,
                ref_labels: Tensor | None = None) -> Tensor:
        """embeddings (B, D), labels (B,) int64 → mean loss over the rows (PML's MeanReducer).

        ``indices_tuple`` (miners), ``ref_emb`` and ``ref_labels`` are not supported, as PML's
        classifier losses do not support the latter either.
        """
        if labels is None:
            raise ValueError(f"{type(self).__name__} needs labels: call loss_func(embeddings, "
                             "labels).")
        if indices_tuple is not None:
            raise NotImplementedError(
                "indices_tuple (a miner's output) is not supported by marginops.compat.pml: the "
                "fused loss uses every row. Select the rows yourself instead, e.g. "
                "loss_func(embeddings[rows], labels[rows]).")
        if ref_emb is not None or ref_labels is not None:
            raise NotImplementedError("ref_emb / ref_labels are not supported (PML's classifier "
                                      "losses do not support them either).")
        return super().forward(embeddings, labels)

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """(B, C) logits without margin, as PML: scale · cos θ (sub-center: max over K).
        Materialises B×C."""
        return self.logits(embeddings)


def _degrees_to_radians(margin: float) -> float:
    if not (isinstance(margin, float | int) and math.isfinite(margin) and 0 <= margin < 180):
        raise ValueError(f"margin={margin!r} is in degrees (PML's convention, default 28.6) and "
                         "must be in [0, 180).")
    return math.radians(margin)


def _set_angular_margin(module, degrees: float) -> None:
    """The families refuse margins above π/2 as probably-degrees; here the unit is explicit
    (degrees, checked above), so PML's whole [0°, 180°) range is accepted: the family is built
    with margin 0 and given the converted margin afterwards."""
    module.margin = _degrees_to_radians(degrees)


class ArcFaceLoss(_PMLClassifier, modules.ArcFaceLoss):
    """PML's ``ArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64)``: margin in
    degrees, W (D, C); the θ + m > π fallback of PML (``angle_policy="fallback"``) and the exact
    gradient. Equivalent PyTorch (W as PML)::

        c = F.normalize(x) @ F.normalize(W, dim=0)                     # (B, C)
        th = c.gather(1, y[:, None]).clamp(-1, 1).acos(); m = radians(margin)
        t = torch.where(th <= pi - m, (th + m).cos(), th.cos() - m * sin(m))
        F.cross_entropy(scale * c.scatter(1, y[:, None], t), y)
    """

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6,
                 scale: float = 64, *, backend: str = "auto", **kwargs):
        init = _check_pml_kwargs(kwargs)
        _degrees_to_radians(margin)
        super().__init__(embedding_size, num_classes, scale=float(scale), margin=0.0,
                         backend=backend, **kwargs)
        _set_angular_margin(self, margin)
        self._adopt_pml_weight(init)


class CosFaceLoss(_PMLClassifier, modules.CosFaceLoss):
    """PML's ``CosFaceLoss(num_classes, embedding_size, margin=0.35, scale=64)``: W (D, C),
    target s·(cos θ_y − m). Equivalent PyTorch::

        c = F.normalize(x) @ F.normalize(W, dim=0)
        F.cross_entropy(scale * (c - margin * F.one_hot(y, C)), y)
    """

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.35,
                 scale: float = 64, *, backend: str = "auto", **kwargs):
        init = _check_pml_kwargs(kwargs)
        super().__init__(embedding_size, num_classes, scale=float(scale), margin=margin,
                         backend=backend, **kwargs)
        self._adopt_pml_weight(init)


class SubCenterArcFaceLoss(_PMLClassifier, modules.SubCenterArcFaceLoss):
    """PML's ``SubCenterArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64,
    sub_centers=3)``: W (D, C·K), column class·K + k; ArcFace on max_k cos θ_{j,k}.

    PML's ``get_outliers`` is not provided; ``dominant_subcenters``/``clean_mask`` of
    :class:`marginops.SubCenterArcFaceLoss` are the equivalent: load ``W.T`` into that module.
    """

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6,
                 scale: float = 64, sub_centers: int = 3, *, backend: str = "auto", **kwargs):
        init = _check_pml_kwargs(kwargs)
        _degrees_to_radians(margin)
        super().__init__(embedding_size, num_classes, scale=float(scale), margin=0.0,
                         subcenters=int(sub_centers), backend=backend, **kwargs)
        _set_angular_margin(self, margin)
        self.sub_centers = self.subcenters
        self._adopt_pml_weight(init)

    def dominant_subcenters(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError(
            "dominant_subcenters()/clean_mask() are not provided on the PML layout; load the "
            "weight into marginops.SubCenterArcFaceLoss (state_dict {'weight': W.T.contiguous()}) "
            "and call them there.")

    def clean_mask(self, embeddings: Tensor, labels: Tensor, max_angle: float = 0.0) -> Tensor:
        return self.dominant_subcenters(embeddings, labels)


class NormalizedSoftmaxLoss(_PMLClassifier, modules.NormFaceLoss):
    """PML's ``NormalizedSoftmaxLoss(num_classes, embedding_size, temperature=0.05)``: NormFace
    with scale 1/temperature (20), W (D, C). Equivalent PyTorch::

        F.cross_entropy(F.normalize(x) @ F.normalize(W, dim=0) / temperature, y)
    """

    def __init__(self, num_classes: int, embedding_size: int, temperature: float = 0.05, *,
                 backend: str = "auto", **kwargs):
        init = _check_pml_kwargs(kwargs)
        if not (isinstance(temperature, float | int) and temperature > 0):
            raise ValueError(f"temperature={temperature!r} must be positive.")
        super().__init__(embedding_size, num_classes, scale=1.0 / temperature, backend=backend,
                         **kwargs)
        self.temperature = float(temperature)
        self._adopt_pml_weight(init)
