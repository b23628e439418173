"""marginops: fused large-class margin softmax losses (ArcFace, CosFace, ...) for PyTorch.

Swap a module into training::

    loss_fn = marginops.ArcFaceLoss(embedding_size=512, num_classes=100_000)
    loss = loss_fn(embeddings, labels)      # embeddings (B, 512), labels (B,) int64, -1 = ignore

The loss streams over the classifier in tiles and never materialises the B×C logits. Backends:
"torch" (portable), "cpp" (CPU), "cuda" and "triton" (GPU); ``python -m marginops.info`` lists
what this install can run.
"""

from . import distributed, eval, functional, margins, optim, reference
from .core import BACKENDS, MarginLSE, backend_status, margin_lse, topk_dot
from .functional import margin_cross_entropy
from .modules import (
    AdaFaceLoss,
    ArcFaceLoss,
    CombinedMarginLoss,
    CosFaceLoss,
    CrystalLoss,
    CurricularFaceLoss,
    ElasticArcFaceLoss,
    ElasticCosFaceLoss,
    L2SoftmaxLoss,
    LH2FaceLoss,
    MagFaceLoss,
    MarginSoftmaxLoss,
    NormFaceLoss,
    NPTLoss,
    SphereFaceLoss,
    SubCenterArcFaceLoss,
    UncertaintyMarginLoss,
    crystal_alpha_low,
)

__version__ = "0.1.0"

__all__ = [
    "AdaFaceLoss", "ArcFaceLoss", "BACKENDS", "CombinedMarginLoss", "CosFaceLoss", "CrystalLoss",
    "CurricularFaceLoss", "ElasticArcFaceLoss", "ElasticCosFaceLoss", "L2SoftmaxLoss",
    "LH2FaceLoss", "MagFaceLoss", "MarginLSE", "MarginSoftmaxLoss", "NPTLoss", "NormFaceLoss",
    "SphereFaceLoss", "SubCenterArcFaceLoss", "UncertaintyMarginLoss", "backend_status",
    "crystal_alpha_low", "distributed", "eval", "functional", "margin_cross_entropy", "margin_lse",
    "margins", "optim", "reference", "topk_dot",
]
