"""The loss modules users swap into training: ``loss = loss_fn(embeddings, labels)``.

- :mod:`~marginops.modules.base`: ``MarginSoftmaxLoss``, the pipeline every family runs (validation,
  class side through the core op, target logit, reduction), and ``ema_update_``;
- :mod:`~marginops.modules.softmax`: the fixed-margin families (NormFace, Crystal, CosFace, ArcFace,
  combined margin, sub-center ArcFace);
- :mod:`~marginops.modules.adaptive`: the families whose margin or scale moves during training
  (SphereFace, CurricularFace, AdaFace, MagFace, ElasticFace);
- :mod:`~marginops.modules.proxy`: the families with terms on the nearest negative proxies (NPT-Loss,
  the uncertainty-aware vMF margin).

Every name is importable from ``marginops.modules`` itself.
"""

from .adaptive import (
    AdaFaceLoss,
    CurricularFaceLoss,
    ElasticArcFaceLoss,
    ElasticCosFaceLoss,
    MagFaceLoss,
    SphereFaceLoss,
    _ElasticMixin,  # noqa: F401  (private, imported by marginops.distributed)
)
from .base import MarginSoftmaxLoss, ema_update_
from .proxy import LH2FaceLoss, NPTLoss, UncertaintyMarginLoss, npt_rows, proxy_separation
from .softmax import (
    ArcFaceLoss,
    CombinedMarginLoss,
    CosFaceLoss,
    CrystalLoss,
    L2SoftmaxLoss,
    NormFaceLoss,
    SubCenterArcFaceLoss,
    _AngularMixin,  # noqa: F401  (private, kept importable from here as before the split)
    crystal_alpha_low,
)

__all__ = [
    "AdaFaceLoss", "ArcFaceLoss", "CombinedMarginLoss", "CosFaceLoss", "CrystalLoss",
    "CurricularFaceLoss", "ElasticArcFaceLoss", "ElasticCosFaceLoss", "L2SoftmaxLoss",
    "LH2FaceLoss", "MagFaceLoss", "MarginSoftmaxLoss", "NPTLoss", "NormFaceLoss", "SphereFaceLoss",
    "SubCenterArcFaceLoss", "UncertaintyMarginLoss", "crystal_alpha_low", "ema_update_", "npt_rows",
    "proxy_separation",
]
