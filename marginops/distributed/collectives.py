"""The collectives the sharded class side is built from, with their autograd.

The embedding all-gather (:class:`_GatherRows`), the identity whose backward sums the ranks'
contributions (:class:`_ShardEntry`), the log-sum-exp and sum merges of the per-rank B-vectors
(:class:`_LogSumExpAcrossRanks`, :class:`_SumAcrossRanks`), and the small helpers around them
(first rank of a group, where bookkeeping lives, seeds agreed across ranks). Why the gradients are
summed exactly where they are: see "Where gradients are summed across ranks" in
:mod:`marginops.distributed`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

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
