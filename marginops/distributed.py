"""Model parallelism and Partial FC for every softmax family, on ``torch.distributed``.

When the classifier outgrows one device, the classes are sharded across the ranks of a process
group (NCCL on GPUs, gloo on CPU) and every rank holds only its slice of ``weight``::

    loss_fn = ShardedMarginLoss(ArcFaceLoss, embedding_size=512, num_classes=10_000_000,
                                sample_rate=0.2)            # any MarginSoftmaxLoss family
    loss = loss_fn(local_embeddings, local_labels)           # same scalar on every rank
    loss.backward()

Design
======

**Shards.** Rank r of R owns classes [start, start + n) with the Partial-FC split (insightface
``partial_fc_v2``): n = C//R + (r < C % R), start = (C//R)·r + min(r, C % R) (:func:`shard_range`).
The family module (``ShardedMarginLoss.family``, an instance of a subclass of the family made by
:func:`sharded_family_class`) holds a ``weight`` of n·K rows (row = local class·K + k) and, for
families with a bias (Crystal loss), a ``shard_bias`` of n entries. ``num_classes`` stays global.
The full weight is never allocated: the family is built on the meta device, then only the shard
is materialised and initialised with the family's own ``reset_parameters`` (under a per-rank seed,
so the shards differ; fan-based inits such as Crystal's Xavier see the shard's fan-out).

**Forward.** ``ShardedMarginLoss.forward(embeddings, labels)`` takes this rank's rows only:

1. a cheap metadata all-gather checks that every rank passes consistent inputs (see below);
2. embeddings are all-gathered (differentiable) and labels all-gathered, giving the global batch
   of R·B rows, in rank order; then the family's ordinary pipeline runs on the global batch;
3. its class side calls the core op with ``class_range=(start, n)`` (and ``class_index`` when
   sampling) and merges the two B-vectors across ranks: ``lse_neg`` by a log-sum-exp all-reduce
   (max all-reduce, then sum of exp all-reduce) and ``dot_y`` by a sum all-reduce;
4. the target logit, margins, reduction — everything B-sized — are computed identically on every
   rank, so every rank returns the same loss over the global batch (``reduction="none"`` gives the
   global (R·B,) rows).

**Where gradients are summed across ranks.** Every rank differentiates the same replicated
objective, so a replicated tensor (x̂, the target logit, norms, a learnable scale) already has its
full gradient on every rank *except* for the part that flows through the rank-local core op. The
cross-rank sum is therefore placed exactly there: the normalised embeddings and a differentiable
scale enter the local core op through an identity whose backward sums the per-rank contributions
(a reduce-scatter for the embedding rows — each rank only needs its own rows — an all-reduce for
the scale). The merges need no communication in backward: d lse_global / d lse_r =
exp(lse_r − lse_global) and d dot_global / d dot_r = 1 are local, and the embedding all-gather's
backward just keeps this rank's rows. (Summing at the all-gather instead, as insightface does,
is equivalent only when nothing replicated lies on the path — here it would count the
norm-dependent terms of MagFace/SphereFace/… R times.) Weight and bias gradients stay local.
Consequence: **every rank must call forward and backward on the same loss**, in the same order,
as with any collective code; do not reduce the "none" rows differently on different ranks.

**DDP on the backbone.** DDP averages the backbone's gradients over ranks. With the defaults the
embedding gradient handed back to the backbone is multiplied by the world size
(``embedding_grad_scale="world_size"``, as insightface does), so that after DDP's averaging the
backbone gradient equals the gradient of the global-batch loss — exactly what one process would
compute on the concatenated batch, and the same scale the classifier shard gets. Pass
``embedding_grad_scale=1.0`` when nothing averages afterwards (no DDP, or a sum all-reduce); then
``embeddings.grad`` is the plain gradient of the returned loss. Both are tested.

**Stateful families.** The state lives in replicated buffers and every rank sees the same global
batch, so it agrees without extra communication as long as its inputs are global: CurricularFace's
target-cosine pre-pass (``_target_cosine``) gathers the target rows this rank owns and
sum-all-reduces, so t and the hard-negative threshold use the global target cosines; AdaFace's
norm statistics are computed from the global batch; ElasticFace draws its per-row margins from
(seed, step) counters that are the same on every rank (``seed=None`` is replaced by a seed
broadcast from the group's first rank). SphereFace's iteration counter and MagFace need nothing.

**Partial FC** (``sample_rate < 1``, training mode only; eval uses every class). Per step and per
rank, as insightface ``partial_fc_v2``: keep the local classes present in the global batch, fill up
with random others (a seedable per-rank generator: ``sample_seed``) to min(n, max(int(sample_rate·n),
global batch)) classes: insightface's int(sample_rate·n) whenever that covers the global batch; the
size never depends on label values, so sampling makes no host sync. The sorted local ids go to the
core op as
``class_index`` (``family.last_class_index`` keeps them); it reads only those rows and writes
gradient only to them. Unsampled rows get exactly zero gradient — but standard optimizers still
move them: SGD momentum keeps applying the old velocity and weight decay keeps shrinking them
(Adam too, and its zero-gradient steps also decay its moments). That is what insightface's
``partial_fc_v2`` does (one SGD, momentum 0.9, weight decay, over the whole shard); with normalised
weights weight decay only changes row norms, i.e. the effective step size of those rows. To freeze
unsampled rows exactly (insightface's original ``partial_fc``), give the weight its own optimizer
without momentum/weight decay, or restore the rows not in ``last_class_index`` after the step.

**Checkpoints.** ``state_dict()`` stays the per-rank shard (it must not hide collectives: the
common ``if rank == 0: torch.save(m.state_dict())`` would hang). ``full_state_dict()`` gathers
one full (num_classes·K, D) weight (and (num_classes,) bias) on every rank, or on the first only,
in the key layout of the single-process family, so it loads into a plain ``ArcFaceLoss`` etc.;
``load_full_state_dict()`` takes such a dict (from any world size, also a single-process module's
``state_dict()``) and keeps this rank's slice — ``torch.load(path, mmap=True)`` avoids reading
the whole weight into memory on every rank.

**Inconsistent inputs fail fast, on every rank.** Construction all-gathers the configuration
(family, sizes, hyper-parameters, dtype, sample rate); every forward all-gathers a few integers
(input validity, batch size, width, dtype, grad mode, training mode, call count). Any mismatch —
different batch sizes (all-gather needs equal sizes; uneven batches are not supported), a
different num_classes or margin, an invalid label on one rank — raises
:class:`InconsistentInputsError` on every rank, naming the ranks and values, instead of leaving the
others blocked in a collective. Collectives use the loss's process group (``process_group``); a
separate group from the backbone's DDP is fine.

**Not supported in sharded mode** (NotImplementedError): NPT-Loss and the vMF
``UncertaintyMarginLoss`` (their top-k negatives and proxy terms read the whole weight), the
family's ``logits()`` (B×C), and sub-center ``dominant_subcenters``/``clean_mask`` (gather the
weight with ``full_state_dict()`` into a single-process module). ``ShardedMarginLoss.predict``
does work sharded.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import assert_values, check_embeddings, check_labels
from .core import MarginLSE, margin_lse, topk_dot
from .functional import normalize_rows
from .modules import MarginSoftmaxLoss, NPTLoss, UncertaintyMarginLoss, _ElasticMixin

__all__ = ["InconsistentInputsError", "ShardedMarginLoss", "shard_range", "sharded_family_class"]


class InconsistentInputsError(ValueError):
    """Raised on every rank when the ranks' configurations or inputs disagree."""


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, n)``: rank ``rank`` of ``world_size`` owns classes [start, start + n)."""
    base, extra = divmod(int(num_classes), int(world_size))
    return base * rank + min(rank, extra), base + int(rank < extra)


# ------------------------------------------------------------------------- collective helpers

_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(
    dist, "all_gather_into_tensor", None)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or getattr(
    dist, "reduce_scatter_tensor", None)
_REDUCE_SCATTER_WORKS: dict[str, bool] = {}
_HALF = (torch.float16, torch.bfloat16)
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


def _all_gather_rows(t: Tensor, group, world: int) -> Tensor:
    """Concatenate equal-shaped tensors of every rank along dim 0 (rank order)."""
    t = t.contiguous()
    out = t.new_empty((world * t.shape[0],) + tuple(t.shape[1:]))
    _all_gather_single(out, t, group=group)
    return out


def _first_rank(group) -> int:
    """Global rank of the group's first member (src/dst of broadcast and gather)."""
    return dist.get_global_rank(group if group is not None else dist.group.WORLD, 0)


def _meta_device(group) -> torch.device:
    """Where small bookkeeping tensors live: CPU unless the group is NCCL-only."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "nccl" not in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _reads_on_host(device: torch.device) -> bool:
    """Bookkeeping on ``device`` can be read without a device sync (CPU memory, e.g. gloo)."""
    return device.type == "cpu"


def _agreed_seed(group) -> int:
    """A random seed drawn on the group's first rank, known to every rank."""
    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.long).to(_meta_device(group))
    dist.broadcast(seed, src=_first_rank(group), group=group)
    return int(seed.item())


def _rank_seed(seed: int, rank: int) -> int:
    return (int(seed) + 0x9E3779B97F4A7C15 * (rank + 1)) % (2 ** 63)


# ------------------------------------------------------------------------- autograd pieces

class _GatherRows(torch.autograd.Function):
    """All-gather of the embeddings. Backward keeps this rank's rows of the (already complete,
    see _ShardEntry) global gradient, times ``grad_scale`` (world size, to undo DDP averaging)."""

    @staticmethod
    def forward(ctx, x: Tensor, group, rank: int, world: int, grad_scale: float) -> Tensor:
        ctx.rank, ctx.rows, ctx.grad_scale = rank, x.shape[0], grad_scale
        return _all_gather_rows(x, group, world)

    @staticmethod
    def backward(ctx, grad: Tensor):
        mine = grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]
        return mine * ctx.grad_scale, None, None, None, None


class _ShardEntry(torch.autograd.Function):
    """Identity on a replicated tensor entering the rank-local core op. Backward sums the ranks'
    contributions: reduce-scatter over the R equal row blocks (``rows=True``: each rank needs
    only its own rows; the others are left 0 and are discarded by _GatherRows) or all-reduce."""

    @staticmethod
    def forward(ctx, x: Tensor, group, rank: int, world: int, rows: bool) -> Tensor:
        ctx.group, ctx.rank, ctx.world, ctx.rows = group, rank, world, rows
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        dtype = grad.dtype
        g = (grad.float() if dtype in _HALF else grad).contiguous()  # never sum in half precision
        if ctx.rows and ctx.world > 1 and _reduce_scatter_single is not None:
            block = g.shape[0] // ctx.world
            part = g.new_empty((block,) + tuple(g.shape[1:]))
            key = str(dist.get_backend(ctx.group))
            if _REDUCE_SCATTER_WORKS.get(key, True):
                try:
                    _reduce_scatter_single(part, g, group=ctx.group)
                    _REDUCE_SCATTER_WORKS[key] = True
                except (RuntimeError, NotImplementedError) as err:
                    text = str(err).lower()
                    if not any(w in text for w in ("support", "not implemented")):
                        raise  # a real failure (timeout, peer gone), not a missing collective
                    _REDUCE_SCATTER_WORKS[key] = False  # backend without reduce-scatter
            if _REDUCE_SCATTER_WORKS[key]:
                out = torch.zeros_like(g)
                out[ctx.rank * block:(ctx.rank + 1) * block] = part
                return out.to(dtype), None, None, None, None
        out = g.clone()
        dist.all_reduce(out, group=ctx.group)
        return out.to(dtype), None, None, None, None


class _LogSumExpAcrossRanks(torch.autograd.Function):
    """lse_global = log Σ_r exp(lse_r) per row (−inf stays −inf). Backward, local:
    d lse_global / d lse_r = exp(lse_r − lse_global)."""

    @staticmethod
    def forward(ctx, lse: Tensor, group) -> Tensor:
        top = lse.detach().clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        finite = torch.isfinite(top)
        shift = torch.where(finite, top, torch.zeros_like(top))
        total = torch.exp(lse.detach() - shift)  # exp(−inf) = 0 for rows without local negatives
        dist.all_reduce(total, group=group)
        out = torch.where(finite, shift + torch.log(total), top)
        ctx.save_for_backward(lse, out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        lse, out = ctx.saved_tensors
        weight = torch.exp(lse - out)
        weight = torch.where(torch.isfinite(out) & torch.isfinite(lse), weight,
                             torch.zeros_like(weight))
        return grad * weight, None


class _SumAcrossRanks(torch.autograd.Function):
    """Sum all-reduce; backward is the identity (every rank differentiates the same objective)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        out = x.detach().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


# ------------------------------------------------------------------------- the sharded family

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


# ------------------------------------------------------------------------- the user-facing module

class ShardedMarginLoss(nn.Module):
    """A margin-softmax family with its classes sharded over a process group (Partial FC).

    Args:
        family_cls: a :class:`marginops.MarginSoftmaxLoss` subclass (ArcFaceLoss, CosFaceLoss,
            CurricularFaceLoss, AdaFaceLoss, ElasticArcFaceLoss, SubCenterArcFaceLoss,
            CrystalLoss, ...). NPTLoss and UncertaintyMarginLoss are not supported.
        embedding_size, num_classes: D and the global C (C ≥ world size).
        process_group: the group the classes are sharded over (default: the world).
        sample_rate: Partial FC rate in (0, 1]; < 1 samples negative classes per step in training.
        sample_seed: seed of the per-rank sampling generators (default: drawn on the first rank).
        init_seed: seed of the shard initialisation (default: drawn from torch's global RNG, so
            ``torch.manual_seed`` makes it reproducible); each rank uses a different stream.
        embedding_grad_scale: factor on the embedding gradient returned to the backbone;
            ``"world_size"`` (default) undoes DDP's gradient averaging; 1.0 gives the plain
            gradient.
        check_consistency: all-gather a few integers per forward to fail fast on inconsistent
            inputs (recommended; the only cost is one small collective). With a gloo group the
            gathered integers are compared on the host (CPU memory, no device sync) and every rank
            raises InconsistentInputsError naming rank and field; with an NCCL group they are
            compared by a device-side assert (no host sync), unless the family was built with
            ``validate="full"``, which reads them on the host for the detailed message.
            False still all-gathers (batch size, width, dtype) so that unequal shapes fail on
            every rank rather than abort or hang the group.
        **family_kwargs: the family's own arguments (scale, margin, reduction, backend, subcenters,
            device, dtype, ...), identical on every rank.

    ``forward(embeddings, labels)`` takes this rank's (B, D) embeddings and (B,) labels (global
    class ids, −1 = ignore; B equal on every rank) and returns the loss of the global batch, the
    same on every rank. See the module docstring for the design.
    """

    def __init__(self, family_cls: type, embedding_size: int, num_classes: int, *,
                 process_group=None, sample_rate: float = 1.0, sample_seed: int | None = None,
                 init_seed: int | None = None, embedding_grad_scale: float | str = "world_size",
                 check_consistency: bool = True, **family_kwargs):
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ShardedMarginLoss needs torch.distributed: call "
                               "torch.distributed.init_process_group() first (e.g. run under "
                               "torchrun).")
        if not (isinstance(family_cls, type) and issubclass(family_cls, MarginSoftmaxLoss)):
            raise TypeError(f"family_cls must be a MarginSoftmaxLoss subclass such as "
                            f"marginops.ArcFaceLoss, got {family_cls!r}.")
        if issubclass(family_cls, (NPTLoss, UncertaintyMarginLoss)):
            raise NotImplementedError(
                f"{family_cls.__name__} cannot be sharded: its top-k negatives / proxy terms read "
                "the whole classifier. Use it single-process.")
        if not (isinstance(sample_rate, float | int) and 0 < sample_rate <= 1):
            raise ValueError(f"sample_rate={sample_rate!r} must be in (0, 1].")
        if embedding_grad_scale != "world_size" and not (
                isinstance(embedding_grad_scale, float | int)
                and math.isfinite(embedding_grad_scale)):
            raise ValueError(f"embedding_grad_scale={embedding_grad_scale!r} must be 'world_size' "
                             "or a finite float.")
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        if self.rank < 0:
            raise RuntimeError("this process is not a member of process_group: construct "
                               "ShardedMarginLoss only on the group's ranks.")
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        self.sample_rate = float(sample_rate)
        self.embedding_grad_scale = (float(self.world_size) if embedding_grad_scale == "world_size"
                                     else float(embedding_grad_scale))
        self.check_consistency = bool(check_consistency)
        self._calls = 0

        # 1. Same configuration everywhere, before anything is allocated or can fail differently.
        config = {"family": f"{family_cls.__module__}.{family_cls.__qualname__}",
                  "embedding_size": self.embedding_size, "num_classes": self.num_classes,
                  "sample_rate": self.sample_rate, "sample_seed": sample_seed,
                  "init_seed": init_seed, "embedding_grad_scale": self.embedding_grad_scale,
                  "check_consistency": self.check_consistency}
        config.update({k: v for k, v in family_kwargs.items() if k != "device"})
        self._check_config(config)
        if self.num_classes < self.world_size:
            raise ValueError(f"num_classes={self.num_classes} is smaller than the world size "
                             f"{self.world_size}: every rank must own at least one class.")
        self._config_crc = zlib.crc32(repr(sorted(config.items(), key=lambda kv: kv[0])).encode())

        # 2. The family, with only this rank's shard materialised.
        start, n = shard_range(self.num_classes, self.world_size, self.rank)
        device = family_kwargs.pop("device", None)
        dtype = family_kwargs.get("dtype")
        family = sharded_family_class(family_cls)(embedding_size, num_classes, device="meta",
                                                  **family_kwargs)
        K = family.subcenters
        family.class_start, family.local_classes = start, n
        family.weight = nn.Parameter(torch.empty(n * K, self.embedding_size, device=device,
                                                 dtype=dtype))
        had_bias = family.bias is not None
        family.bias = None  # the global-index bias of the base pipeline is replaced by shard_bias
        family.register_parameter("shard_bias", nn.Parameter(
            torch.zeros(n, device=device, dtype=dtype)) if had_bias else None)
        stray = [name for name, t in [*family.named_parameters(), *family.named_buffers()]
                 if t.is_meta]
        if stray:
            raise RuntimeError(f"{family_cls.__name__} created {stray} on the meta device; "
                               "ShardedMarginLoss only materialises weight and bias.")
        if device is not None:
            family.to(device)
        base_seed = (int(torch.randint(0, 2 ** 62, (1,)).item()) if init_seed is None
                     else int(init_seed))
        wdev = family.weight.device
        on_cuda = wdev.type == "cuda"
        index = (wdev.index if wdev.index is not None else torch.cuda.current_device()
                 ) if on_cuda else None
        with torch.random.fork_rng(devices=[index] if on_cuda else []):
            if on_cuda:
                with torch.cuda.device(index):
                    torch.cuda.manual_seed(_rank_seed(base_seed, self.rank))
            else:
                torch.random.default_generator.manual_seed(_rank_seed(base_seed, self.rank))
            family.reset_parameters()
        if sample_seed is None:
            sample_seed = _agreed_seed(process_group)
        family._shard = _ShardContext(process_group, self.rank, self.world_size,
                                      self.sample_rate, int(sample_seed))
        if isinstance(family, _ElasticMixin) and family.seed is None:
            family.seed = _agreed_seed(process_group)  # margins must agree across ranks
            family.draw_state[0] = family.seed
        self.family = family

    # ---- conveniences
    @property
    def weight(self) -> nn.Parameter:
        """This rank's (local_classes·K, D) weight shard."""
        return self.family.weight

    @property
    def bias(self) -> nn.Parameter | None:
        """This rank's (local_classes,) bias shard, or None."""
        return self.family.shard_bias

    @property
    def class_start(self) -> int:
        return self.family.class_start

    @property
    def local_classes(self) -> int:
        return self.family.local_classes

    @property
    def last_class_index(self) -> Tensor | None:
        """Local class ids the last training step sampled (None without sampling)."""
        return self.family.last_class_index

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            family = self.__dict__.get("_modules", {}).get("family")
            if family is None:
                raise
            return getattr(family, name)  # margin, t, batch_mean, ... of the family

    def extra_repr(self) -> str:
        return (f"rank={self.rank}/{self.world_size}, classes=[{self.class_start}, "
                f"{self.class_start + self.local_classes}) of {self.num_classes}, "
                f"sample_rate={self.sample_rate}, embedding_grad_scale={self.embedding_grad_scale}")

    # ---- consistency checks
    def _check_config(self, config: dict) -> None:
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, config, group=self.process_group)
        problems = []
        for key in sorted({k for c in everyone for k in c}):
            values = [c.get(key, "<not given>") for c in everyone]
            if any(repr(v) != repr(values[0]) for v in values):
                problems.append(f"  {key}: " + ", ".join(f"rank {r}: {v!r}"
                                                        for r, v in enumerate(values)))
        if problems:
            raise InconsistentInputsError(
                "ShardedMarginLoss was constructed with different configurations on different "
                "ranks (every rank must pass the same arguments):\n" + "\n".join(problems))

    _STEP_FIELDS = ("valid inputs", "batch size", "embedding width", "embedding dtype",
                    "grad enabled", "embeddings require grad", "training mode", "forward call #")

    def _check_step(self, embeddings, labels, what: str = "forward") -> None:
        err: Exception | None = None
        try:
            validate = self.family.validate
            check_embeddings(embeddings, self.embedding_size, validate=validate)
            check_labels(labels, embeddings.shape[0], self.num_classes, embeddings.device,
                         validate=validate)
        except (TypeError, ValueError, RuntimeError) as e:  # RuntimeError: a CPU device assert
            err = e
        is_tensor = isinstance(embeddings, Tensor)
        shape = tuple(embeddings.shape) if is_tensor else ()
        meta = torch.tensor([
            int(err is None), shape[0] if len(shape) >= 1 else -1,
            shape[1] if len(shape) == 2 else -1,
            _DTYPE_CODES.get(embeddings.dtype, 0) if is_tensor else -1,
            int(torch.is_grad_enabled()), int(is_tensor and embeddings.requires_grad),
            int(self.training), self._calls], dtype=torch.long,
            device=_meta_device(self.process_group))
        self._calls += 1
        table = _all_gather_rows(meta[None], self.process_group, self.world_size)
        if not _reads_on_host(table.device) and self.family.validate != "full":
            # The table is on the GPU (NCCL): reading it would sync. Compare it on the device;
            # the rank whose own inputs were bad raises its message, the others a device assert.
            assert_values(table == table[:1], (
                f"ShardedMarginLoss.{what}: the ranks' inputs are inconsistent (batch size, "
                "embedding width or dtype, grad/training mode or call count differ, or a rank was "
                "given invalid inputs); validate='full' names the rank and the field."))
            if err is not None:
                raise err
            return
        table = table.tolist()  # CPU memory (gloo): a read, no device sync
        problems = []
        if not all(row[0] for row in table):
            messages: list[Any] = [None] * self.world_size
            dist.all_gather_object(messages, None if err is None else str(err),
                                   group=self.process_group)
            problems += [f"  rank {r} was given invalid inputs: {m}"
                         for r, m in enumerate(messages) if m is not None]
        else:
            for j, name in enumerate(self._STEP_FIELDS[1:], start=1):
                column = [row[j] for row in table]
                if any(v != column[0] for v in column):
                    problems.append(f"  {name} differs: " + ", ".join(
                        f"rank {r}: {v}" for r, v in enumerate(column)))
        if problems:
            raise InconsistentInputsError(
                f"ShardedMarginLoss.{what}: the ranks' inputs are inconsistent (raised on every "
                f"rank; every rank must call {what} with the same batch size, embedding width, "
                f"dtype and grad/training mode):\n" + "\n".join(problems)) from err

    def _check_shapes(self, embeddings: Tensor, what: str = "forward") -> None:
        """With ``check_consistency=False``: still exchange (B, D, dtype) in one tiny all-gather.
        The embedding all-gather needs equal shapes on every rank, and gloo answers unequal
        ones with a C++ terminate on one rank and a hang on the others; this makes that step
        fail on every rank instead. On a CPU (gloo) group the table is read on the host (a CPU
        tensor: no device sync) and raises InconsistentInputsError; on an NCCL group it is a
        device-side assert (no host sync; the step fails with a CUDA error on every rank)."""
        if not (isinstance(embeddings, Tensor) and embeddings.dim() == 2):
            return  # the family's own validation names the problem
        meta = torch.tensor([*embeddings.shape, _DTYPE_CODES.get(embeddings.dtype, 0)],
                            dtype=torch.long, device=_meta_device(self.process_group))
        table = _all_gather_rows(meta[None], self.process_group, self.world_size)
        if table.device.type != "cpu":
            torch._assert_async((table == table[0]).all(),
                                f"ShardedMarginLoss.{what}: batch size, embedding width or dtype "
                                "differs across ranks")
            return
        rows = table.numpy()
        problems = [f"  {name} differs: " + ", ".join(f"rank {r}: {v}"
                                                      for r, v in enumerate(rows[:, j]))
                    for j, name in enumerate(("batch size", "embedding width", "embedding dtype"))
                    if (rows[:, j] != rows[0, j]).any()]
        if problems:
            raise InconsistentInputsError(
                f"ShardedMarginLoss.{what}: the ranks' inputs are inconsistent (raised on every "
                f"rank, check_consistency=False checks only these shapes; every rank must call "
                f"{what} with the same batch size, embedding width and dtype):\n"
                + "\n".join(problems))

    # ---- the loss
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """This rank's (B, D) embeddings and (B,) labels → loss of the global batch (every rank)."""
        if self.check_consistency:
            self._check_step(embeddings, labels)
        else:
            self._check_shapes(embeddings)
        group, world = self.process_group, self.world_size
        x = _GatherRows.apply(embeddings, group, self.rank, world, self.embedding_grad_scale)
        y = _all_gather_rows(labels.long(), group, world)
        return self.family(x, y)

    @torch.no_grad()
    def predict(self, embeddings: Tensor, k: int = 1) -> Tensor:
        """(B, k) most likely global classes of this rank's rows, merged over the shards (by
        cosine, or by logit when there is a bias). Collective: every rank must call it."""
        if not 1 <= k <= self.num_classes:
            raise ValueError(f"k={k} must be in [1, {self.num_classes}].")
        if self.check_consistency:
            self._check_step(embeddings, torch.zeros(embeddings.shape[0], dtype=torch.long,
                                                     device=embeddings.device)
                             if isinstance(embeddings, Tensor) and embeddings.dim() == 2
                             else embeddings, "predict")
        else:
            self._check_shapes(embeddings, "predict")
        group, world, fam = self.process_group, self.world_size, self.family
        x_hat, norms = normalize_rows(_all_gather_rows(embeddings, group, world))
        k_local = min(k, fam.local_classes)
        if fam.shard_bias is None:
            values, classes = topk_dot(x_hat, fam.weight, k_local,
                                       normalize_weight=fam.normalize_weight,
                                       subcenters=fam.subcenters, backend=fam.backend)
        else:
            w = fam.weight.to(x_hat.dtype)
            if fam.normalize_weight:
                w = F.normalize(w, dim=1, eps=1e-12)
            cos = (x_hat @ w.t()).view(x_hat.shape[0], -1, fam.subcenters).amax(dim=2)
            scale = fam._row_scale(norms)
            if isinstance(scale, Tensor) and scale.dim():
                scale = scale[:, None]
            logits = cos * (scale.to(cos.dtype) if isinstance(scale, Tensor) else scale)
            values, classes = (logits + fam.shard_bias.to(cos.dtype)).topk(k_local, dim=1)
        values = values.to(torch.float64)
        if k_local < k:  # a shard smaller than k: pad with −inf
            pad = k - k_local
            values = torch.cat([values, values.new_full((values.shape[0], pad), -math.inf)], 1)
            classes = torch.cat([classes, classes.new_zeros((classes.shape[0], pad))], 1)
        classes = classes + fam.class_start
        all_values = _all_gather_rows(values[None], group, world)    # (R, B_global, k)
        all_classes = _all_gather_rows(classes[None], group, world)
        rows = slice(self.rank * embeddings.shape[0], (self.rank + 1) * embeddings.shape[0])
        values = all_values[:, rows].permute(1, 0, 2).reshape(embeddings.shape[0], -1)
        classes = all_classes[:, rows].permute(1, 0, 2).reshape(embeddings.shape[0], -1)
        best = values.topk(k, dim=1).indices
        return classes.gather(1, best)

    # ---- checkpoints
    @torch.no_grad()
    def gather_full(self, shard: Tensor, *, rank0_only: bool = False) -> Tensor | None:
        """Concatenate a per-class shard tensor ((local_classes·m, ...) on each rank, e.g. the
        weight, its gradient or an optimizer state) into the full (num_classes·m, ...) tensor, on
        every rank or (``rank0_only``) on the group's first rank (None elsewhere). Collective."""
        n = self.local_classes
        if shard.shape[0] % n:
            raise ValueError(f"shard has {shard.shape[0]} rows, not a multiple of this rank's "
                             f"{n} classes.")
        per_class = shard.shape[0] // n
        most = -(-self.num_classes // self.world_size)  # the largest shard
        padded = shard.new_zeros((most * per_class,) + tuple(shard.shape[1:]))
        padded[:shard.shape[0]] = shard
        if rank0_only:
            parts = ([torch.empty_like(padded) for _ in range(self.world_size)]
                     if self.rank == 0 else None)
            dist.gather(padded, parts, dst=_first_rank(self.process_group),
                        group=self.process_group)
            if self.rank != 0:
                return None
        else:
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.all_gather(parts, padded, group=self.process_group)
        sizes = [shard_range(self.num_classes, self.world_size, r)[1] * per_class
                 for r in range(self.world_size)]
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    @torch.no_grad()
    def full_state_dict(self, *, rank0_only: bool = False) -> dict[str, Tensor]:
        """The single-process family's state dict: full (num_classes·K, D) ``weight``, full
        ``bias`` if any, and the replicated parameters/buffers (learnable scale, t, AdaFace
        statistics, ...). Loads into the plain family or, through :meth:`load_full_state_dict`,
        into any world size. Collective; with ``rank0_only`` the other ranks get ``{}``."""
        fam = self.family
        weight = self.gather_full(fam.weight.detach(), rank0_only=rank0_only)
        bias = (None if fam.shard_bias is None
                else self.gather_full(fam.shard_bias.detach(), rank0_only=rank0_only))
        if rank0_only and self.rank != 0:
            return {}
        out = {"weight": weight}
        if bias is not None:
            out["bias"] = bias
        for key, value in fam.state_dict().items():
            if key not in ("weight", "shard_bias"):
                out[key] = value.detach().clone()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True) -> None:
        """Load a full state dict (from :meth:`full_state_dict` at any world size, or a
        single-process family's ``state_dict()``): this rank keeps its slice. Not collective."""
        fam = self.family
        sd = dict(state_dict)
        K, D = fam.subcenters, self.embedding_size
        start, n = fam.class_start, fam.local_classes
        local: dict[str, Tensor] = {}
        if "weight" in sd:
            w = sd.pop("weight")
            if tuple(w.shape) != (self.num_classes * K, D):
                raise ValueError(f"weight has shape {tuple(w.shape)}; a full weight of this loss "
                                 f"is ({self.num_classes * K}, {D}) (num_classes·K, D).")
            local["weight"] = w[start * K:(start + n) * K]
        elif strict:
            raise KeyError("state_dict has no 'weight'.")
        bias = sd.pop("bias", None)
        if fam.shard_bias is not None:
            if bias is not None:
                if tuple(bias.shape) != (self.num_classes,):
                    raise ValueError(f"bias has shape {tuple(bias.shape)}, expected "
                                     f"({self.num_classes},).")
                local["shard_bias"] = bias[start:start + n]
            elif strict:
                raise KeyError("state_dict has no 'bias' but this family has one.")
        elif bias is not None and strict:
            raise KeyError("state_dict has a 'bias' but this family has none.")
        local.update(sd)
        fam.load_state_dict(local, strict=strict)

    def load_full_weight(self, weight: Tensor, bias: Tensor | None = None) -> None:
        """Load only a full (num_classes·K, D) weight (and (num_classes,) bias)."""
        sd = {"weight": weight}
        if bias is not None:
            sd["bias"] = bias
        self.load_full_state_dict(sd, strict=False)
