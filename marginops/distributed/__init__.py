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

Layout
======

:mod:`~marginops.distributed.collectives` (the all-gathers and cross-rank merges, with their
autograd), :mod:`~marginops.distributed.family` (a family's class side on a shard:
:func:`sharded_family_class`), :mod:`~marginops.distributed.sharded` (:class:`ShardedMarginLoss`,
its cross-rank consistency checks and checkpoints, :func:`shard_range`). Every name is importable
from ``marginops.distributed`` itself.
"""

from .collectives import (  # noqa: F401  (private helpers, importable from here as before the split)
    _DTYPE_CODES,
    _HALF,
    _REDUCE_SCATTER_WORKS,
    _agreed_seed,
    _all_gather_rows,
    _all_gather_single,
    _first_rank,
    _GatherRows,
    _LogSumExpAcrossRanks,
    _meta_device,
    _rank_seed,
    _reads_on_host,
    _reduce_scatter_single,
    _ShardEntry,
    _SumAcrossRanks,
)
from .family import (  # noqa: F401
    _NOT_SHARDED_EXTRAS,
    _refuse,
    _ShardContext,
    _ShardedFamily,
    sharded_family_class,
)
from .sharded import InconsistentInputsError, ShardedMarginLoss, shard_range

__all__ = ["InconsistentInputsError", "ShardedMarginLoss", "shard_range", "sharded_family_class"]
