"""Drop-in replacements for insightface arcface_torch's ``CombinedMarginLoss`` and ``PartialFC_V2``.

An arcface_torch ``train_v2.py`` user changes two imports and nothing else::

    from losses import CombinedMarginLoss                                  # before
    from partial_fc_v2 import PartialFC_V2
    from marginops.compat.insightface import CombinedMarginLoss, PartialFC_V2   # after

    margin_loss = CombinedMarginLoss(64, *cfg.margin_list, cfg.interclass_filtering_threshold)
    module_partial_fc = PartialFC_V2(margin_loss, cfg.embedding_size, cfg.num_classes,
                                     cfg.sample_rate, cfg.fp16)
    loss = module_partial_fc(local_embeddings, local_labels)     # under torch.distributed

What runs underneath is :class:`marginops.distributed.ShardedMarginLoss` with the family the
margins select — the fused, class-sharded op; the B×C logits are never formed. The semantics are
arcface_torch's (read from its ``losses.py`` and ``partial_fc_v2.py``):

- ``CombinedMarginLoss(s, m1, m2, m3)``: with m3 > 0 it is CosFace with margin m3 and m1, m2 are
  ignored; with m1 = 1 and m3 = 0 it is ArcFace with margin m2, computed as cos(arccos c + m2)
  with no θ + m > π fallback (``angle_policy="none"``) and a straight-through gradient (the
  margin is applied under ``no_grad``, so ∂ψ/∂c = 1: ``grad_mode="straight_through"``); any other
  (m1, m3) raises (arcface_torch raises at its first forward; we raise at construction).
- ``PartialFC_V2``: rank r owns classes [start, start + n), n = C//R + (r < C % R); the weight
  shard is the parameter ``weight`` (n, D), N(0, 0.01), and ``state_dict()`` is ``{"weight": ...}``
  per rank, so arcface_torch checkpoints (``softmax_fc_gpu_{rank}.pt``) load both ways; the
  embeddings are all-gathered and their gradient is multiplied by the world size (to undo DDP's
  averaging); with ``sample_rate < 1`` each step keeps the local classes present in the global
  batch plus random others up to min(n, max(int(sample_rate·n), global batch)) (arcface_torch:
  max(int(sample_rate·n), #positives), the same in real configurations; ours needs no host sync).
- The loss is the mean over ALL gathered rows of −log(max(p_y, 1e-30)): a row's reported loss is
  at most 69.08 (the gradient is not clamped) and a row labelled −1 counts 69.08 in the mean.

- ``interclass_filtering_threshold`` > 0 (0.4 in the ``*_filter04`` configs): every cosine
  above it, except a labelled row's target, is multiplied by 0 under ``no_grad`` — it stays in the
  softmax as logit 0 and gets no gradient; fused in the op (the families' option of that name).

Differences (documented in docs/migration/insightface.md): a row labelled −1 gets no gradient
(arcface_torch pushes all its logits down by p/N); sampling happens in training mode only
(arcface_torch also samples in eval mode); the batch size may change between steps (it must
still be equal across ranks); the sampling uses marginops' seeded per-rank generator, not the
global CUDA RNG.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import margins
from ..distributed import ShardedMarginLoss, _all_gather_rows
from ..modules import ArcFaceLoss, CosFaceLoss

__all__ = ["CombinedMarginLoss", "PartialFC_V2"]

LOSS_CAP = -math.log(1e-30)  # 69.0776: arcface_torch clamps p_y at 1e-30 before the log


class CombinedMarginLoss(nn.Module):
    """arcface_torch's ``CombinedMarginLoss(s, m1, m2, m3, interclass_filtering_threshold=0)``.

    It selects the marginops family :class:`PartialFC_V2` runs (:meth:`family`), and, called on
    its own like arcface_torch's, maps cosine logits (B, C) and labels (B,) (−1: no margin) to the
    scaled logits with the margin on the targets::

        c = c · (1 − dirty)   dirty = c > thr except (i, y_i), y_i ≠ −1   (thr > 0; no_grad mask)
        t = c[i, y_i];  ψ = cos(arccos t + m2) (straight-through)  or  t − m3 (if m3 > 0)
        out = s · c.scatter(1, y[:, None], ψ)

    ``interclass_filtering_threshold`` > 0 runs in the fused op of :class:`PartialFC_V2` as the
    families' option of the same name (see :func:`marginops.margin_lse`).
    """

    def __init__(self, s: float, m1: float, m2: float, m3: float,
                 interclass_filtering_threshold: float = 0):
        super().__init__()
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"s={s!r} must be a positive scale.")
        if not math.isfinite(interclass_filtering_threshold):
            raise ValueError(f"interclass_filtering_threshold={interclass_filtering_threshold!r} "
                             "must be a finite number (0 disables it, as in arcface_torch).")
        # arcface_torch filters only when the threshold is > 0; a negative one is off as well.
        self._threshold = max(0.0, float(interclass_filtering_threshold))
        if m3 > 0:
            self._family, self._kwargs = CosFaceLoss, {"scale": float(s), "margin": float(m3)}
        elif m1 == 1.0 and m3 == 0.0:
            self._family, self._kwargs = ArcFaceLoss, {
                "scale": float(s), "margin": float(m2), "angle_policy": "none",
                "grad_mode": "straight_through"}
        else:
            raise ValueError(
                f"(m1, m2, m3) = ({m1}, {m2}, {m3}): arcface_torch's CombinedMarginLoss supports "
                "only m3 > 0 (CosFace) or m1 = 1 with m3 = 0 (ArcFace) and raises otherwise. For "
                "the paper's combined margin cos(m1·θ + m2) − m3 use marginops.CombinedMarginLoss.")
        if self._threshold > 0:  # fused in the op: the families' option of the same name
            self._kwargs["interclass_filtering_threshold"] = self._threshold
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold

    def family(self) -> tuple[type, dict]:
        """(marginops family class, its keyword arguments) equivalent to these margins."""
        return self._family, dict(self._kwargs)

    def _psi(self, target: Tensor) -> Tensor:
        if self._family is CosFaceLoss:
            return margins.cosface(target, self.m3)
        return margins.arcface(target, self.m2, angle_policy="none",
                               grad_mode="straight_through")

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """logits (B, C) cosines, labels (B,) or (B, 1) (−1: no margin) → (B, C) s·logits."""
        labels = labels.reshape(-1)
        valid = labels != -1
        column = labels.clamp_min(0)[:, None]
        if self._threshold > 0:  # every cosine above it but a labelled row's target → 0, no grad
            dirty = logits.detach() > self._threshold
            dirty = dirty & ~torch.zeros_like(dirty).scatter(1, column, valid[:, None])
            logits = logits * (~dirty).to(logits.dtype)
        target = logits.gather(1, column).squeeze(1)
        psi = torch.where(valid, self._psi(target), target)
        return self.s * logits.scatter(1, column, psi[:, None])

    def extra_repr(self) -> str:
        return (f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, "
                f"interclass_filtering_threshold={self.interclass_filtering_threshold}")


class PartialFC_V2(nn.Module):  # noqa: N801 - arcface_torch's name
    """arcface_torch's ``PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate=1.0,
    fp16=False)`` on marginops' sharded fused op. Needs an initialised process group.

    ``forward(local_embeddings, local_labels)``: this rank's (B, D) embeddings and (B,) global
    labels → the scalar loss of the global batch (mean over all R·B rows of the per-row
    cross-entropy capped at 69.08; the same on every rank). ``weight`` is this rank's (n, D)
    shard. Equivalent PyTorch on the gathered batch X (N, D), labels y, full weight W::

        logits = margin_loss(F.normalize(X) @ F.normalize(W).T, y)            # s·(c with ψ)
        p_y = logits.softmax(1).gather(1, y[:, None]).where(y[:, None] >= 0, 0)
        loss = -p_y.clamp_min(1e-30).log().mean()
    """

    _version = 2

    def __init__(self, margin_loss: CombinedMarginLoss, embedding_size: int, num_classes: int,
                 sample_rate: float = 1.0, fp16: bool = False):
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("PartialFC_V2 needs torch.distributed, as arcface_torch's: call "
                               "torch.distributed.init_process_group() first (e.g. run under "
                               "torchrun).")
        if not isinstance(margin_loss, CombinedMarginLoss):
            raise TypeError(
                "margin_loss must be marginops.compat.insightface.CombinedMarginLoss (the fused "
                f"op needs to know the margin family), got {type(margin_loss).__name__}.")
        family_cls, family_kwargs = margin_loss.family()
        self.margin_softmax = margin_loss
        self._sharded = ShardedMarginLoss(family_cls, embedding_size, num_classes,
                                          sample_rate=sample_rate, reduction="none",
                                          embedding_grad_scale="world_size", **family_kwargs)
        self.rank, self.world_size = self._sharded.rank, self._sharded.world_size
        self.embedding_size, self.sample_rate, self.fp16 = int(embedding_size), sample_rate, fp16
        self.class_start, self.num_local = self._sharded.class_start, self._sharded.local_classes
        self.num_sample = int(sample_rate * self.num_local)
        # arcface_torch's state dict is {"weight": (num_local, D)}; ours lives in the sharded
        # family: rename on save and on load (the prefix keeps nesting in a bigger model right).
        self.register_state_dict_post_hook(_save_as_weight)
        self.register_load_state_dict_pre_hook(_load_from_weight)

    @property
    def weight(self) -> nn.Parameter:
        """This rank's (num_local, embedding_size) weight shard."""
        return self._sharded.weight

    @property
    def weight_index(self) -> Tensor | None:
        """Local class ids sampled by the last training step (None without sampling)."""
        return self._sharded.last_class_index

    def forward(self, local_embeddings: Tensor, local_labels: Tensor) -> Tensor:
        labels = local_labels.reshape(-1).long()
        embeddings = local_embeddings
        if self.fp16 and embeddings.is_cuda:  # arcface_torch: the GEMM under fp16 autocast
            embeddings = embeddings.half()
        rows = self._sharded(embeddings, labels)        # (R·B,) per-row CE, 0 where label −1
        valid = _all_gather_rows(labels, self._sharded.process_group, self.world_size) >= 0
        cap = torch.full_like(rows, LOSS_CAP)
        reported = torch.where(valid, rows.detach().clamp_max(LOSS_CAP), cap)
        # Value: arcface_torch's report; gradient: the uncapped cross-entropy's.
        return (rows + (reported - rows.detach())).mean()

    def extra_repr(self) -> str:
        return (f"rank={self.rank}/{self.world_size}, num_local={self.num_local}, "
                f"class_start={self.class_start}, sample_rate={self.sample_rate}, fp16={self.fp16}")


_INNER_WEIGHT = "_sharded.family.weight"


def _save_as_weight(module, state_dict, prefix, local_metadata) -> None:
    state_dict[prefix + "weight"] = state_dict.pop(prefix + _INNER_WEIGHT)


def _load_from_weight(module, state_dict, prefix, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs) -> None:
    if prefix + "weight" in state_dict:
        state_dict[prefix + _INNER_WEIGHT] = state_dict.pop(prefix + "weight")
