"""Evaluation helpers for face-recognition-style embeddings.

Verification (is this pair the same identity?) works on similarity *scores*, higher = more alike:

* :func:`roc` — the full ROC curve (FAR, TAR per threshold), the same points as
  ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.
* :func:`tar_at_far` — the true-accept rate at a false-accept-rate budget, with an exact,
  tie-aware threshold rule.
* :func:`kfold_accuracy` — LFW-style accuracy: the threshold is chosen on 9 folds, the accuracy
  measured on the 10th, for each fold in turn.
* :func:`cosine_scores` — the cosine similarity of paired embeddings.

Closed-set identification (which of C known identities is this?):

* :func:`class_centres` — the mean normalised embedding of each class (a gallery).
* :func:`identification_accuracy` — rank-k accuracy against a gallery, through the fused
  :func:`marginops.topk_dot`: the probe × gallery score matrix is never formed.

Templates (sets of images of one identity):

* :func:`quality_pool` — Crystal-loss quality pooling (arXiv 1804.01159): the softmax(λ·q)-weighted
  mean of the normalised image features of each template.

Verification helpers accept numpy arrays, torch tensors or sequences and return numpy / Python
values (they are cheap: O(n log n) on the scores); the embedding helpers take and return tensors.
Every function validates its inputs and says what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .core import topk_dot

__all__ = [
    "RocCurve", "TarAtFar", "KFoldResult", "roc", "tar_at_far", "kfold_accuracy",
    "cosine_scores", "class_centres", "identification_accuracy", "quality_pool",
]

Scores = np.ndarray | Tensor | Sequence[float]


# ----------------------------------------------------------------------------- input checks

def _scores(name: str, values: Scores) -> np.ndarray:
    """A 1-D, non-empty, finite float64 numpy array."""
    if isinstance(values, Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a 1-D array of numbers (numpy, torch or a list): {err}"
                        ) from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one score per pair), got shape {arr.shape}.")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; pass at least one score.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf at positions "
                         f"{np.flatnonzero(~np.isfinite(arr))[:5].tolist()}.")
    return arr


def _bools(name: str, values, size: int) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},) like the scores, got {arr.shape}.")
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must be booleans (or 0/1): True = same identity.")
        arr = arr.astype(bool)
    return arr


def _matrix(name: str, t, dim: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if t.dim() != 2 or t.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D tensor (rows, embedding_size), got "
                         f"shape {tuple(t.shape)}.")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}.")
    if dim is not None and t.shape[1] != dim:
        raise ValueError(f"{name} has embedding size {t.shape[1]}, expected {dim}.")
    return t


def _ids(name: str, t, rows: int, device: torch.device) -> Tensor:
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be integer ids (torch.long), got {t.dtype}.")
    if t.shape != (rows,):
        raise ValueError(f"{name} must have shape ({rows},), got {tuple(t.shape)}.")
    return t.to(device=device, dtype=torch.long)


# ----------------------------------------------------------------------------- verification

class RocCurve(NamedTuple):
    """``far[i]``, ``tar[i]``: the rates when pairs with score >= ``thresholds[i]`` are accepted.
    ``thresholds`` descend from +inf (accept nothing: far = tar = 0)."""

    far: np.ndarray
    tar: np.ndarray
    thresholds: np.ndarray


class TarAtFar(NamedTuple):
    """``tar`` at the largest achievable ``far`` <= the requested one, with ``threshold``:
    pairs with score >= threshold are accepted."""

    tar: float
    far: float
    threshold: float


class KFoldResult(NamedTuple):
    """Mean and (population) standard deviation of the per-fold accuracies, each fold's
    threshold (chosen on the other folds; score > threshold = same) and accuracy."""

    mean: float
    std: float
    thresholds: np.ndarray
    accuracies: np.ndarray


def roc(genuine_scores: Scores, impostor_scores: Scores) -> RocCurve:
    """The ROC curve of a verification score.

    Args:
        genuine_scores: (G,) scores of same-identity pairs.
        impostor_scores: (I,) scores of different-identity pairs.

    Returns:
        ``RocCurve(far, tar, thresholds)``, each (T + 1,) for the T distinct scores: threshold
        +inf first, then every distinct score in descending order; far = #{impostor >= t} / I,
        tar = #{genuine >= t} / G. Tied scores move together (one point per distinct value).

    Equivalent (scikit-learn)::

        y = np.r_[np.ones(G), np.zeros(I)]; s = np.r_[genuine, impostor]
        far, tar, thresholds = sklearn.metrics.roc_curve(y, s, drop_intermediate=False)
    """
    gen = _scores("genuine_scores", genuine_scores)
    imp = _scores("impostor_scores", impostor_scores)
    thresholds = np.unique(np.concatenate([gen, imp]))[::-1]
    # #{x >= t} for each t: n − (number of x strictly below t)
    gen_sorted, imp_sorted = np.sort(gen), np.sort(imp)
    tar = (gen.size - np.searchsorted(gen_sorted, thresholds, side="left")) / gen.size
    far = (imp.size - np.searchsorted(imp_sorted, thresholds, side="left")) / imp.size
    return RocCurve(np.r_[0.0, far], np.r_[0.0, tar], np.r_[np.inf, thresholds])


def tar_at_far(genuine: Scores, impostor: Scores, far: float) -> TarAtFar:
    """True-accept rate at a false-accept-rate budget.

    The rule, exactly: accept a pair when its score is >= the threshold. At most
    k = floor(far · I) impostor pairs may be accepted. Sort the impostor scores in descending order
    i₁ >= i₂ >= … >= i_I. If k >= I every pair is accepted (threshold = the lowest score). Else the
    threshold is the smallest float64 strictly above i_{k+1}: every impostor score equal to
    i_{k+1} is rejected, so with ties at the boundary the achieved FAR is below the budget rather
    than above it, and genuine scores tied with i_{k+1} are rejected too. This is the threshold
    with the highest TAR whose FAR does not exceed ``far``.

    Args:
        genuine: (G,) same-identity scores. impostor: (I,) different-identity scores.
        far: the budget, in (0, 1]. Below 1/I no impostor may pass (k = 0).

    Returns:
        ``TarAtFar(tar, far, threshold)`` with the achieved far (<= the budget).

    Equivalent numpy::

        k = floor(far * I); t = np.sort(impostor)[::-1][k]           # (k < I)
        tar = np.mean(genuine > t); far = np.mean(impostor > t)
    """
    gen = _scores("genuine", genuine)
    imp = _scores("impostor", impostor)
    if not isinstance(far, (int, float)) or not 0.0 < far <= 1.0:
        raise ValueError(f"far={far!r} must be a number in (0, 1] (e.g. 1e-3 for FAR = 0.1%).")
    k = math.floor(far * imp.size + 1e-9)   # the epsilon guards 0.29·100 = 28.999…
    if k >= imp.size:
        threshold = float(min(gen.min(), imp.min()))
        return TarAtFar(1.0, 1.0, threshold)
    boundary = np.sort(imp)[::-1][k]
    threshold = float(np.nextafter(boundary, np.inf))
    return TarAtFar(float(np.mean(gen > boundary)), float(np.mean(imp > boundary)), threshold)


def _best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold (score > t = same) with the highest accuracy on these pairs: candidates are
    the midpoints between consecutive distinct scores and one point beyond each end; among the
    best, the lower median candidate."""
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], same[order]
    distinct = np.r_[np.flatnonzero(np.diff(s) > 0), s.size - 1]   # last index of each value
    # cut after position j (j = -1: everything "same"): correct = #diff in [0..j] + #same after j
    neg_upto = np.cumsum(~y)[distinct]
    pos_after = y.sum() - np.cumsum(y)[distinct]
    correct = np.r_[y.sum(), neg_upto + pos_after]
    cuts = np.r_[s[0] - 1.0, 0.5 * (s[distinct[:-1]] + s[distinct[:-1] + 1]), s[-1] + 1.0]
    best = np.flatnonzero(correct == correct.max())
    return float(cuts[best[(best.size - 1) // 2]])


def kfold_accuracy(scores: Scores, is_same, folds: int = 10) -> KFoldResult:
    """LFW-style verification accuracy with a threshold chosen on the other folds.

    The pairs are split, in their given order, into ``folds`` contiguous folds of (nearly) equal
    size (like ``sklearn.model_selection.KFold(folds, shuffle=False)``; LFW's list is already
    arranged in 10 folds of 600). For each fold, the threshold that maximises the accuracy on the
    other folds is applied to it: a pair is called "same" when its score is > the threshold.

    Args:
        scores: (N,) similarity scores, higher = more alike.
        is_same: (N,) bool (or 0/1) ground truth.
        folds: number of folds, 2 <= folds <= N.

    Returns:
        ``KFoldResult(mean, std, thresholds (folds,), accuracies (folds,))``.

    Equivalent (naive) numpy, per fold f with train = the other folds::

        cands = all midpoints of the sorted unique train scores (and one beyond each end)
        t = argmax over cands of mean((scores[train] > c) == is_same[train])
        acc[f] = mean((scores[f] > t) == is_same[f])
    """
    s = _scores("scores", scores)
    same = _bools("is_same", is_same, s.size)
    if not isinstance(folds, int) or not 2 <= folds <= s.size:
        raise ValueError(f"folds={folds!r} must be an int between 2 and the number of pairs "
                         f"({s.size}).")
    parts = np.array_split(np.arange(s.size), folds)
    thresholds, accuracies = np.empty(folds), np.empty(folds)
    for f, test in enumerate(parts):
        train = np.concatenate([p for g, p in enumerate(parts) if g != f])
        t = _best_threshold(s[train], same[train])
        thresholds[f] = t
        accuracies[f] = np.mean((s[test] > t) == same[test])
    return KFoldResult(float(accuracies.mean()), float(accuracies.std()), thresholds, accuracies)


def cosine_scores(a: Tensor, b: Tensor) -> Tensor:
    """(N,) cosine similarity of row i of ``a`` with row i of ``b`` (both (N, D)), in fp32/fp64.

    Equivalent: ``F.cosine_similarity(a, b, dim=1)`` with each row normalised by max(‖·‖, 1e-12).
    """
    a, b = _matrix("a", a), _matrix("b", b, a.shape[1])
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}.")
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    return (F.normalize(a.to(acc), dim=1, eps=1e-12) * F.normalize(b.to(acc), dim=1, eps=1e-12)
            ).sum(dim=1)


# ----------------------------------------------------------------------------- identification

@torch.no_grad()
def class_centres(embeddings: Tensor, labels: Tensor, num_classes: int, *,
                  normalize: bool = True) -> Tensor:
    """The gallery of class centres: the mean of each class's L2-normalised embeddings.

    Args:
        embeddings: (N, D). labels: (N,) int64 in [0, num_classes).
        normalize: rescale each centre to unit length (the ranking by cosine is the same).

    Returns:
        (num_classes, D) in fp32 (fp64 for fp64 input); a class with no sample gets a zero row.

    Equivalent PyTorch::

        x = F.normalize(embeddings)
        centres = torch.stack([x[labels == c].mean(0) for c in range(num_classes)])
    """
    x = _matrix("embeddings", embeddings)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive int.")
    y = _ids("labels", labels, x.shape[0], x.device)
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}); got values from {int(y.min())} "
                         f"to {int(y.max())}.")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = F.normalize(x.to(acc), dim=1, eps=1e-12)
    sums = torch.zeros(num_classes, x.shape[1], dtype=acc, device=x.device).index_add_(0, y, x)
    counts = torch.bincount(y, minlength=num_classes).to(acc)
    centres = sums / counts.clamp_min(1)[:, None]
    return F.normalize(centres, dim=1, eps=1e-12) if normalize else centres


@torch.no_grad()
def identification_accuracy(probe_emb: Tensor, probe_labels: Tensor,
                            gallery_weight_or_centres: Tensor, k: int | Sequence[int] = (1, 5),
                            *, subcenters: int = 1, backend: str = "auto",
                            batch_size: int = 8192) -> dict[int, float]:
    """Closed-set rank-k identification accuracy, without the probe × gallery score matrix.

    Each probe is ranked against every gallery row (class j = row j, or rows j·K … j·K+K−1 with
    ``subcenters=K``, max over them) by cosine similarity, streamed through the fused
    :func:`marginops.topk_dot`; a probe is correct at rank k when its label is among its k best
    classes. The gallery can be a trained classifier's weight or :func:`class_centres`.

    Args:
        probe_emb: (N, D) probe embeddings (any norm). probe_labels: (N,) int64 in [0, C).
        gallery_weight_or_centres: (C·K, D).
        k: one rank or several, each in [1, C].
        backend: the ``topk_dot`` backend ("auto", "torch", "cpp", "cuda", "triton").
        batch_size: probes per ``topk_dot`` call.

    Returns:
        ``{k: accuracy}`` for each requested k, accuracies in [0, 1].

    Equivalent PyTorch (materialising N×C)::

        cos = F.normalize(probe_emb) @ F.normalize(gallery).T     # (max over sub-centers)
        top = cos.topk(max(k), dim=1).indices
        {r: (top[:, :r] == probe_labels[:, None]).any(1).float().mean() for r in k}
    """
    x = _matrix("probe_emb", probe_emb)
    g = _matrix("gallery_weight_or_centres", gallery_weight_or_centres, x.shape[1])
    if g.device != x.device:
        raise ValueError(f"the gallery is on {g.device} but the probes are on {x.device}.")
    if not isinstance(subcenters, int) or subcenters < 1 or g.shape[0] % subcenters:
        raise ValueError(f"subcenters={subcenters!r} must be a positive int dividing the "
                         f"gallery's {g.shape[0]} rows.")
    num_classes = g.shape[0] // subcenters
    ranks = [k] if isinstance(k, int) else list(k)
    if not ranks or any(not isinstance(r, int) or not 1 <= r <= num_classes for r in ranks):
        raise ValueError(f"k={k!r}: every rank must be an int in [1, {num_classes}] (the number "
                         "of gallery classes).")
    y = _ids("probe_labels", probe_labels, x.shape[0], x.device)
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"probe_labels must lie in [0, {num_classes}) (closed set: every probe "
                         f"identity is in the gallery); got {int(y.min())}..{int(y.max())}.")
    if x.dtype != g.dtype:   # fp64 only together; otherwise compare in fp32
        x, g = x.float(), g.float()
    kmax = max(ranks)
    hits = torch.zeros(kmax, dtype=torch.long, device=x.device)   # hits[r-1]: label at rank r
    for start in range(0, x.shape[0], batch_size):
        xb = F.normalize(x[start:start + batch_size], dim=1, eps=1e-12)
        _, classes = topk_dot(xb, g, kmax, subcenters=subcenters, backend=backend)
        match = classes == y[start:start + batch_size, None]          # at most one True per row
        hits += match.sum(dim=0)
    cumulative = hits.cumsum(0).double() / x.shape[0]
    return {r: float(cumulative[r - 1]) for r in ranks}


# ----------------------------------------------------------------------------- templates

@torch.no_grad()
def quality_pool(features: Tensor, qualities: Tensor, template_ids: Tensor,
                 lam: float) -> tuple[Tensor, Tensor]:
    """Crystal-loss quality pooling of templates (Ranjan et al., arXiv 1804.01159).

    For each template T: f_T = Σ_{k∈T} softmax_k(λ·q_k) · x̂_k, with x̂_k = x_k/‖x_k‖: a weighted
    mean of the normalised image features in which higher-quality images (e.g. a higher face
    detector score q_k) weigh more. λ = 0 is the plain mean; λ → ∞ keeps the best image.
    The result is not renormalised (cosine scoring does that).

    Args:
        features: (N, D) image features. qualities: (N,) per-image quality (finite).
        template_ids: (N,) int64 template of each image (any ids, need not be contiguous).
        lam: λ >= 0.

    Returns:
        ``(pooled (T, D), ids (T,))``: one row per distinct template id, ids ascending; fp32
        (fp64 for fp64 features).

    Equivalent loop::

        for t in ids:  m = template_ids == t
            w = torch.softmax(lam * qualities[m], 0)
            pooled[t] = (w[:, None] * F.normalize(features[m])).sum(0)
    """
    x = _matrix("features", features)
    if not isinstance(qualities, Tensor):
        qualities = torch.as_tensor(qualities)
    if qualities.shape != (x.shape[0],) or not qualities.is_floating_point():
        raise ValueError(f"qualities must be a floating ({x.shape[0]},) tensor, got "
                         f"{qualities.dtype} {tuple(qualities.shape)}.")
    if not bool(torch.isfinite(qualities).all()):
        raise ValueError("qualities contains NaN or inf.")
    if not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam={lam!r} must be a finite number >= 0.")
    tid = _ids("template_ids", template_ids, x.shape[0], x.device)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    ids, inverse = torch.unique(tid, return_inverse=True)
    logits = float(lam) * qualities.to(device=x.device, dtype=acc)
    peak = torch.full((ids.numel(),), -torch.inf, dtype=acc, device=x.device)
    peak = peak.scatter_reduce(0, inverse, logits, reduce="amax")
    e = torch.exp(logits - peak[inverse])                               # <= 1, no overflow
    denom = torch.zeros_like(peak).index_add_(0, inverse, e)
    weights = e / denom[inverse]
    xn = F.normalize(x.to(acc), dim=1, eps=1e-12)
    pooled = torch.zeros(ids.numel(), x.shape[1], dtype=acc, device=x.device)
    pooled.index_add_(0, inverse, weights[:, None] * xn)
    return pooled, ids
