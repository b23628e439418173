"""The user-facing module, :class:`ShardedMarginLoss`: it builds a family on this rank's class
shard, checks at construction and on every step that the ranks' configurations and inputs agree
(raising :class:`InconsistentInputsError` on every rank), runs the forward on the all-gathered
batch, predicts across the shards, and gathers or loads full checkpoints. Also
:func:`shard_range`, the Partial-FC split of the classes. The design: :mod:`marginops.distributed`.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import assert_values, check_embeddings, check_labels
from ..core import topk_dot
from ..functional import normalize_rows
from ..modules import MarginSoftmaxLoss, NPTLoss, UncertaintyMarginLoss, _ElasticMixin
from ..optim import tag_classifier_weight
from .collectives import (
    _DTYPE_CODES,
    _agreed_seed,
    _all_gather_rows,
    _first_rank,
    _GatherRows,
    _meta_device,
    _rank_seed,
    _reads_on_host,
)
from .family import _ShardContext, sharded_family_class


class InconsistentInputsError(ValueError):
    """Raised on every rank when the ranks' configurations or inputs disagree."""


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, n)``: rank ``rank`` of ``world_size`` owns classes [start, start + n)."""
    base, extra = divmod(int(num_classes), int(world_size))
    return base * rank + min(rank, extra), base + int(rank < extra)


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
    same on every rank. See the ``marginops.distributed`` docstring for the design.
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
        tag_classifier_weight(family.weight, family)  # marginops.optim may fuse its step
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
