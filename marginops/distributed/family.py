"""A family's class side on a class shard: :func:`sharded_family_class` puts :class:`_ShardedFamily`
in front of any :class:`~marginops.modules.MarginSoftmaxLoss` family, so that its ordinary
pipeline runs on the global batch while the core op reads only this rank's classes (and, with
Partial FC, a sample of them); what cannot run on a shard raises NotImplementedError.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..core import MarginLSE, margin_lse
from .collectives import _LogSumExpAcrossRanks, _rank_seed, _ShardEntry, _SumAcrossRanks


@dataclass
class _ShardContext:
    group: Any
    rank: int
    world: int
    sample_rate: float
    sample_seed: int
    generator: torch.Generator | None = field(default=None, repr=False)

    def sampling_generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(_rank_seed(self.sample_seed, self.rank))
        return self.generator


class _ShardedFamily:
    """Mixed in front of a family class: the class side of the pipeline on a class shard. The
    instance attributes ``_shard`` (a _ShardContext), ``class_start``, ``local_classes`` and
    ``shard_bias`` are set by ShardedMarginLoss."""

    _shard: _ShardContext
    last_class_index: Tensor | None = None

    def _class_range(self) -> tuple[int, int]:
        return (self.class_start, self.local_classes)

    def _owned(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(mine, local): rows whose label this shard owns, and labels − class_start."""
        local = labels - self.class_start
        return (labels >= 0) & (local >= 0) & (local < self.local_classes), local

    def _class_side(self, x_hat: Tensor, labels: Tensor, scale, hard_negative) -> MarginLSE:
        ctx = self._shard
        x_in = _ShardEntry.apply(x_hat, ctx.group, ctx.rank, ctx.world, True)
        if isinstance(scale, Tensor) and scale.requires_grad:
            scale = _ShardEntry.apply(scale, ctx.group, ctx.rank, ctx.world, False)
        class_index = None
        if self.training and ctx.sample_rate < 1:
            class_index = self._sample_classes(labels)
        self.last_class_index = class_index
        lse_neg, dot_y = margin_lse(x_in, self.weight, labels, scale, self.shard_bias,
                                    normalize_weight=self.normalize_weight,
                                    class_range=self._class_range(), class_index=class_index,
                                    hard_negative=hard_negative, subcenters=self.subcenters,
                                    interclass_filtering_threshold=(
                                        self.interclass_filtering_threshold),
                                    backend=self.backend)
        return MarginLSE(_LogSumExpAcrossRanks.apply(lse_neg, ctx.group),
                         _SumAcrossRanks.apply(dot_y, ctx.group))

    @torch.no_grad()
    def _target_cosine(self, x_hat: Tensor, labels: Tensor) -> Tensor:
        """Global c_iy: this shard's target rows (0 elsewhere), sum-all-reduced."""
        acc = torch.float64 if x_hat.dtype == torch.float64 else torch.float32
        mine, local = self._owned(labels)
        rows = self.weight.view(self.local_classes, self.subcenters, -1)[
            local.clamp(0, self.local_classes - 1)].to(acc)
        if self.normalize_weight:
            rows = F.normalize(rows, dim=-1, eps=1e-12)
        cos = torch.einsum("bd,bkd->bk", x_hat.to(acc), rows).amax(dim=1)
        cos = torch.where(mine, cos, torch.zeros_like(cos))
        dist.all_reduce(cos, group=self._shard.group)
        return cos

    def _target_logit(self, cos_y, scale, norms, labels, valid):
        target = super()._target_logit(cos_y, scale, norms, labels, valid)
        if self.shard_bias is None:
            return target
        mine, local = self._owned(labels)
        b = self.shard_bias.to(target.dtype)[local.clamp(0, self.local_classes - 1)]
        b = torch.where(mine, b, torch.zeros_like(b))
        return target + _SumAcrossRanks.apply(b, self._shard.group)

    @torch.no_grad()
    def _sample_classes(self, labels: Tensor) -> Tensor:
        """Partial FC (insightface partial_fc_v2): sorted local class ids to iterate — every local
        class present in the global batch, filled up with random others.

        The size is fixed on the host, min(n, max(int(rate·n), B_global)), so sampling reads no
        label value (no host sync, CUDA-graph capturable): B_global bounds the positives, so they
        always fit. It equals insightface's size whenever int(rate·n) ≥ B_global (real
        configurations); insightface keeps just the positives when they exceed int(rate·n), a
        size only known after a sync.
        """
        ctx = self._shard
        n = self.local_classes
        mine, local = self._owned(labels)
        num_sample = min(n, max(int(ctx.sample_rate * n), labels.shape[0]))
        device = self.weight.device
        perm = torch.rand(n, generator=ctx.sampling_generator(device), device=device)
        # positives rank first (2.0 > any draw); rows of other shards write a spare slot n
        perm = torch.cat([perm, perm.new_zeros(1)]).index_fill_(
            0, torch.where(mine, local, torch.full_like(local, n)), 2.0)[:n]
        return torch.topk(perm, k=num_sample).indices.sort().values

    # ---- what does not shard
    def _not_sharded(self, name: str, hint: str = ""):
        hint = hint or ("Gather the weight with ShardedMarginLoss.full_state_dict() and load it "
                        "into a single-process module.")
        raise NotImplementedError(
            f"{type(self).__name__}.{name}() is not available on a class shard (this rank holds "
            f"classes [{self.class_start}, {self.class_start + self.local_classes}) of "
            f"{self.num_classes}). {hint}")

    def logits(self, embeddings: Tensor) -> Tensor:
        self._not_sharded("logits", "It would materialise B×C; use ShardedMarginLoss.predict(), "
                          "or full_state_dict() into a single-process module.")

    def predict(self, embeddings: Tensor, k: int = 1) -> Tensor:
        self._not_sharded("predict", "Use ShardedMarginLoss.predict(), which merges the shards.")


_NOT_SHARDED_EXTRAS = ("dominant_subcenters", "clean_mask")


def _refuse(name: str):
    def method(self, *args, **kwargs):
        self._not_sharded(name)
    method.__name__ = name
    return method


@functools.cache
def sharded_family_class(family_cls: type) -> type:
    """The subclass of ``family_cls`` that ShardedMarginLoss instantiates (cached per family)."""
    namespace: dict[str, Any] = {"__module__": __name__,
                                 "__doc__": f"{family_cls.__name__} on a class shard "
                                            "(built by marginops.distributed.ShardedMarginLoss)."}
    for name in _NOT_SHARDED_EXTRAS:
        if hasattr(family_cls, name):
            namespace[name] = _refuse(name)
    return type(f"Sharded{family_cls.__name__}", (_ShardedFamily, family_cls), namespace)
