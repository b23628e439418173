"""Drop-in layers for the training code users already run (change the imports, keep the script).

- :mod:`marginops.compat.pml` — pytorch-metric-learning's ArcFaceLoss, CosFaceLoss,
  SubCenterArcFaceLoss and NormalizedSoftmaxLoss (margins in degrees, ``W`` of shape (D, C)).
- :mod:`marginops.compat.insightface` — arcface_torch's CombinedMarginLoss and PartialFC_V2
  (same signatures, semantics and checkpoint keys, on ``marginops.distributed``).

Both are thin adapters over marginops' families and core op: no second implementation of the math.
"""

from . import insightface, pml

__all__ = ["insightface", "pml"]
