"""The classifier's optimizer step, fused into the loss's backward: the dense weight gradient
never exists.

Usage (an ordinary training loop, unchanged but for the import)::

    opt = marginops.optim.SGD(loss_fn.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss = loss_fn(emb, labels)
    loss.backward()      # the classifier weight is stepped here, chunk by chunk; .grad stays None
    opt.step()           # steps everything else (bias, a learnable scale, ...) like torch.optim
    opt.zero_grad()

Why: with SGD + momentum a head costs W + grad W + momentum = 3 × W (12 GB at 2M classes × 512
fp32). Here it costs W + momentum: the backward computes the weight gradient one chunk of classes
at a time and applies the update to those rows right away.

Design
======

* ``SGD`` and ``AdamW`` *are* ``torch.optim.SGD`` / ``torch.optim.AdamW`` (subclasses): same
  constructor checks and messages, ``param_groups``, ``state_dict()`` keys (``momentum_buffer``;
  ``step``, ``exp_avg``, ``exp_avg_sq``), ``lr_scheduler`` support. ``step()`` is torch's own: a
  fused weight has ``.grad`` None, so torch's step skips it and steps every other parameter.
* A parameter is *fused* when it is a marginops classifier ``weight`` (tagged by its module at
  construction: every ``MarginSoftmaxLoss`` family, and ``ShardedMarginLoss``'s shard). Its entry
  in ``marginops.ops.FUSED_STEPS`` makes the core op's one autograd backward
  (``marginops.ops.register_core_autograd``, every backend) call `_fused_backward` instead
  of returning grad W.
* `_fused_backward` loops over chunks of classes: it calls the backend's own backward op on
  the chunk's rows (``bias``, ``target_col`` and the kept dots sliced to the chunk, the global
  ``lse_neg``), sums grad_features / grad_scale, and steps the chunk's rows and their state rows
  with its weight gradient. The update is elementwise, so running it on row slices is the same
  arithmetic, in the same order, as torch.optim on the whole tensor. Extra memory: one chunk of
  gradient (plus, on the functional path, the update's temporaries), whatever C.
* The update itself: on CPU (fp32 / fp64, the extension loaded) the C++ op
  ``marginops::sgd_step_`` / ``adamw_step_`` (csrc/cpu/optim_step.cpp) does it in ONE pass per
  element (read g, p, state; write p, state) with the per-element arithmetic of torch's
  single-tensor functional; everywhere else torch.optim's *own functional update*
  (``torch.optim.sgd.sgd`` / ``torch.optim.adam.adam``, single-tensor path), which makes a pass
  and a temporary per tensor op (SGD + momentum + weight decay: ~9 chunk-sized reads and writes
  instead of 5). The update is memory-bound: that difference is what made the fused step slower
  than marginops + torch.optim on CPU (issue 15), and what the op removes.
* Partial FC (``class_index``, sorted unique local ids — what the sampler makes): the sampled
  classes are gathered chunk by chunk, differentiated, updated and scattered back; then every
  chunk of rows gets the zero-gradient update (weight decay, momentum / moment decay) on the rows
  that were *not* sampled (a device-side mask, no host sync). That is exactly what torch.optim
  does with the dense gradient, whose unsampled rows are zeros.
* The bias is C floats and also receives gradient from the target term outside the core op: it
  keeps its ``.grad`` and ``opt.step()`` steps it, exactly like torch.optim.
* Chunk size: ``chunk_bytes`` of gradient (default ``DEFAULT_CHUNK_BYTES`` = 16 MiB, i.e. 8192
  classes at D = 512 fp32), a constructor argument.

What cannot work raises (each before anything changes) or is documented:

* two backward passes before ``opt.step()`` (gradient accumulation): the first already stepped the
  weight. RuntimeError; call ``opt.step()`` after every backward, or use torch.optim.
* fp16 (features or weight) — under ``GradScaler`` the gradient is scaled and the step could not
  be skipped on overflow: RuntimeError naming bf16 or torch.optim. ``scaler.step(opt)`` with an
  enabled scaler raises too (fp32 with a scaler: the fused step already used the scaled gradient).
* a classifier replicated on several ranks (a non-sharded module under an initialised process
  group with world size > 1, e.g. inside DDP): each rank would step its replica with its local
  gradient. RuntimeError naming ``ShardedMarginLoss`` or torch.optim.
* NPT-Loss and UncertaintyMarginLoss with a push/proxy term read the weight outside the core op
  (their gradient would arrive after the step): ValueError at construction naming torch.optim.
* ``torch.compile``: AOTAutograd traces the backward ahead of time, where the fused step cannot
  run, so a compiled loss returns the dense gradient; ``opt.step()`` then steps the weight like
  torch.optim (the same update) and warns once that the memory saving is lost. Run the loss
  eagerly (compile the backbone only) to fuse.
* ``step(closure)``, ``zero_grad(set_to_none=False)``, ``add_param_group`` work as in torch.optim.
  One difference: the weight's gradient is never accumulated across steps (there is no
  ``.grad``), as if ``zero_grad()`` ran after every step — which training loops do anyway.
* ``marginops.compat.pml``'s losses keep PML's (D, C) ``W``: it reaches the op as a transposed
  copy, so it is an ordinary parameter here (stepped like torch.optim, no saving).
* One optimizer per classifier weight (a second marginops optimizer over it raises). Deep copies
  and unpickled modules are classifiers too (``MarginSoftmaxLoss.__setstate__`` tags them).

The CUDA backend goes through the same Python loop (its registered backward op per chunk); it is
exercised on CPU only here (no GPU in CI).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.adam import adam as _adam
from torch.optim.optimizer import _get_scalar_dtype
from torch.optim.sgd import sgd as _sgd
from torch.utils.weak import WeakTensorKeyDictionary

from .ops import FUSED_STEPS
from .ops import cpp as _cpp

__all__ = ["SGD", "AdamW", "DEFAULT_CHUNK_BYTES", "tag_classifier_weight"]

DEFAULT_CHUNK_BYTES = 16 << 20
"""Bytes of weight gradient per chunk of the fused backward (16 MiB: 8192 classes at D = 512
fp32). Large enough for efficient GEMMs and to amortise the per-chunk calls, small beside W and
within a server CPU's L3, where the update finds the gradient the backward just wrote; the extra
memory of a step is about one chunk, whatever the number of classes. Measured on the 2-core EPYC
(A/B interleaved in one process, B = 64, D = 512 fp32, C = 100K): at load average 1.0-1.4, median
step 130 ms with 16 MiB chunks against 166 ms with 64 MiB (SGD), 167 against 209 ms (AdamW); at
load 5-6 (C = 100K / 300K) 16 MiB had the lowest minimum and medians within the noise of 32 and
64 MiB; 4 MiB and below were slower."""


# classifier weight -> weak reference to its module. A registry, not an attribute of the
# Parameter: a weakref attribute would make torch.save(module) fail (weakrefs do not pickle).
_OWNERS = WeakTensorKeyDictionary()


def tag_classifier_weight(weight: Tensor, module) -> None:
    """Mark ``weight`` as the classifier weight of ``module`` (fusable by marginops.optim)."""
    _OWNERS[weight] = weakref.ref(module)


def _owner(p: Tensor):
    ref = _OWNERS.get(p)
    return ref() if ref is not None else None


def _replicated_world(owner) -> int:
    """World size > 1 when ``owner`` (not a shard) runs under an initialised process group."""
    if getattr(owner, "_shard", None) is not None or not torch.distributed.is_available():
        return 1
    if not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size()


def _refusal(owner) -> str | None:
    """Why ``owner``'s weight cannot be fused (it gets gradient outside the core op), or None."""
    from .modules import NPTLoss, UncertaintyMarginLoss
    if isinstance(owner, NPTLoss):
        return "NPTLoss reads the weight in its top-k hinge, outside the fused op"
    if isinstance(owner, UncertaintyMarginLoss) and (owner.push_weight or owner.proxy_weight):
        return ("UncertaintyMarginLoss's push/proxy terms read the weight outside the fused op "
                "(push_weight=0 and proxy_weight=0 would allow fusing)")
    return None


class _Fused:
    """What SGD and AdamW share: which parameters are fused, the checks, the chunked update."""

    _step_supports_amp_scaling = True  # so GradScaler calls step() directly, and we can refuse

    def _setup_fused(self, chunk_bytes: int) -> None:
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes={chunk_bytes!r} must be a positive int (bytes of weight "
                             f"gradient per chunk; default {DEFAULT_CHUNK_BYTES}).")
        self.chunk_bytes = chunk_bytes

    def add_param_group(self, param_group: dict) -> None:
        """torch.optim's, then the group's classifier weights are fused (checked first)."""
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif not isinstance(params, set):  # torch.optim raises its own error for a set
            params = list(params)          # a generator is read once: hand torch the list
            param_group = {**param_group, "params": params}
        fused = []
        for p in params:
            owner = _owner(p) if isinstance(p, Tensor) else None
            if owner is None:
                continue
            reason = _refusal(owner)
            if reason is not None:
                raise ValueError(f"marginops.optim.{type(self).__name__}: {reason}, so its step "
                                 f"cannot be fused; use torch.optim.{type(self).__name__} for it.")
            other = FUSED_STEPS.get(p)
            if other is not None and other.__self__ is not None:
                raise ValueError(f"the classifier weight of {type(owner).__name__} is already "
                                 "stepped by another marginops.optim optimizer; give each "
                                 "weight one optimizer (delete the other one first).")
            fused.append(p)
        super().add_param_group(param_group)
        for p in fused:
            FUSED_STEPS[p] = _BoundStep(self)

    def _fused_params(self):
        return [p for g in self.param_groups for p in g["params"]
                if getattr(FUSED_STEPS.get(p), "__self__", None) is self]

    def step(self, closure: Callable[[], float] | None = None, **kwargs):
        """torch.optim's step for every parameter with a ``.grad``; fused weights were stepped in
        the backward (their ``.grad`` is None) and are skipped."""
        if kwargs.get("grad_scaler") is not None or getattr(self, "grad_scale", None) is not None:
            raise RuntimeError(
                "marginops.optim cannot run under GradScaler: the classifier weight was already "
                "stepped in the backward with the scaled gradient, and the step cannot be skipped "
                "on overflow. Train in bf16 (no scaler needed), or use torch.optim.")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p in self._fused_params():
            if p.grad is not None:
                if id(p) in self._pending:
                    raise RuntimeError(
                        "the classifier weight got a gradient outside the fused op after its "
                        "fused step; use torch.optim for this loss.")
                if not getattr(self, "_warned_dense", False):
                    self._warned_dense = True
                    warnings.warn(
                        "marginops.optim: the classifier weight received a dense .grad (e.g. the "
                        "loss ran under torch.compile, whose backward cannot fuse the step): it "
                        "is stepped like torch.optim, without the memory saving. Run the loss "
                        "eagerly to fuse.", RuntimeWarning, stacklevel=2)
        super().step()
        self._pending.clear()
        return loss

    @property
    def _pending(self) -> set:
        # ids of the weights stepped in a backward since the last step()
        if "_pending_ids" not in self.__dict__:
            self.__dict__["_pending_ids"] = set()
        return self.__dict__["_pending_ids"]

    # ---- the fused backward
    def _check_fusable(self, weight: Tensor, features: Tensor) -> None:
        if id(weight) in self._pending:
            raise RuntimeError(
                "marginops.optim: a second backward through the classifier before opt.step(): "
                "the first one already stepped the weight (gradient accumulation cannot be "
                "fused). Call opt.step() after every backward, or use torch.optim to accumulate.")
        if torch.float16 in (features.dtype, weight.dtype):
            raise RuntimeError(
                "marginops.optim does not fuse fp16: with GradScaler the gradient is scaled and "
                "the step could not be skipped on overflow. Use bf16 (autocast dtype=torch.bfloat16,"
                " no scaler), or torch.optim.")
        world = _replicated_world(_owner(weight))
        if world > 1:
            raise RuntimeError(
                f"marginops.optim: this classifier is replicated on {world} ranks (e.g. inside "
                "DDP); a fused step would use each rank's local gradient and the replicas would "
                "diverge. Shard it with marginops.distributed.ShardedMarginLoss (its gradient "
                "stays local by design), or use torch.optim.")

    def _group_of(self, p: Tensor) -> dict:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))


class _BoundStep:
    """FUSED_STEPS' value: a weak handle on the optimizer (the registry must not keep it alive)."""

    def __init__(self, optimizer):
        self._ref = weakref.ref(optimizer)

    @property
    def __self__(self):
        return self._ref()

    def __call__(self, *args):
        optimizer = self._ref()
        if optimizer is None:
            return None  # the optimizer is gone: the caller computes the dense gradient
        return _fused_backward(optimizer, *args)


def _step_op_applies(group: dict, *tensors: Tensor) -> bool:
    """Whether the C++ one-pass update (csrc/cpu/optim_step.cpp) can step these chunks: the
    extension is loaded (it is not compiled just for this), CPU fp32/fp64 tensors of one dtype,
    contiguous (row slices of W and its state are), Python-number hyperparameters. Elsewhere
    (CUDA, bf16 weights, the masked zero-gradient pass's broadcast zero gradient, a Tensor lr)
    torch.optim's functional runs instead: the same update, in several passes."""
    if not (_cpp.loaded() and _USE_STEP_OPS):
        return False
    hyper = (group["lr"], group["weight_decay"], *group.get("betas", ()))
    if any(isinstance(h, Tensor) for h in hyper):
        return False
    dtype = tensors[0].dtype
    return dtype in (torch.float32, torch.float64) and all(
        t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for t in tensors)


_USE_STEP_OPS = True  # a benchmarking knob (A/B against torch's functional); tests read it too


def _rows_update(opt, group: dict, state: dict, p: Tensor, grad: Tensor, rows,
                 gathered: Tensor | None = None) -> None:
    """Step rows ``rows`` (a slice, or a LongTensor of sorted unique rows) of the 2-D ``p`` (and
    of its state) with their gradient ``grad``, in place, by torch.optim's functional update.
    ``gathered``: ``p[rows]`` already gathered (a copy, reused rather than gathered again)."""
    names = opt._state_names(group)
    sub = p[rows] if gathered is None else gathered       # a view (slice) or a gathered copy
    subs = [state[n][rows] for n in names]
    opt._update(group, state, sub, grad, subs)
    if not isinstance(rows, slice):
        p.index_copy_(0, rows, sub)
        for n, s in zip(names, subs):
            state[n].index_copy_(0, rows, s)


def _masked_zero_update(opt, group: dict, state: dict, p: Tensor, rows: slice,
                        keep: Tensor) -> None:
    """The zero-gradient update of the rows in ``rows`` where ``keep`` (rows,) is False."""
    names = opt._state_names(group)
    sub, subs = p[rows].clone(), [state[n][rows].clone() for n in names]
    zero = sub.new_zeros(()).expand_as(sub)  # a zero gradient that allocates nothing
    opt._update(group, state, sub, zero, subs)
    keep = keep[:, None]
    for target, new in ((p[rows], sub), *((state[n][rows], s) for n, s in zip(names, subs))):
        target.copy_(torch.where(keep, target, new, out=new))  # no third chunk-sized buffer


@torch.no_grad()
def _fused_backward(opt, backward_op, kept, grad_lse, grad_dot, lse_neg, features, weight, scale,
                    bias, target_col, class_index, hard_tau, hard_t, normalize_weight, subcenters,
                    filter_threshold):
    """The core op's backward with the optimizer step fused: returns (grad_features, None,
    grad_scale, grad_bias) and steps ``weight`` in place, one chunk of classes at a time."""
    opt._check_fusable(weight, features)
    group, state = opt._group_of(weight), opt.state[weight]
    K, D = subcenters, weight.shape[1]
    C = weight.shape[0] // K
    opt._init_state(group, state, weight)
    p2 = weight.view(C, K * D)                 # one row per class: the update is elementwise
    st2 = {n: state[n].view(C, K * D) for n in opt._state_names(group)}
    chunk = max(1, opt.chunk_bytes // (K * D * weight.element_size()))
    acc = lse_neg.dtype
    grad_f = torch.zeros(features.shape, dtype=acc, device=features.device)
    grad_s = torch.zeros_like(scale)
    grad_b = torch.zeros_like(bias) if bias is not None else None

    def chunk_backward(w_rows, cols: slice, b_rows):
        # target_col and the kept dots are indexed by column (position in the iterated list)
        tc = target_col - cols.start
        tc = torch.where((tc >= 0) & (tc < cols.stop - cols.start), tc, torch.full_like(tc, -1))
        extra = (kept[0][:, cols.start * K:cols.stop * K].contiguous(),) if kept else ()
        gf, gw, gs, gb = backward_op(grad_lse, grad_dot, lse_neg, *extra, features, w_rows,
                                     scale, b_rows, tc, None, hard_tau, hard_t, normalize_weight,
                                     K, filter_threshold)
        grad_f.add_(gf)
        grad_s.add_(gs)
        return gw.view(-1, K * D), gb

    if class_index is None:
        for c0 in range(0, C, chunk):
            rows = slice(c0, min(C, c0 + chunk))
            b_rows = bias[rows] if bias is not None else None
            gw, gb = chunk_backward(weight[rows.start * K:rows.stop * K], rows, b_rows)
            if bias is not None:
                grad_b[rows] = gb
            _rows_update(opt, group, st2, p2, gw, rows)
    else:
        # Partial FC: sampled classes (sorted, unique) first, then the others' zero-gradient step.
        torch._assert_async((class_index[1:] > class_index[:-1]).all(),
                            "marginops.optim needs class_index sorted and unique")
        N = class_index.shape[0]
        for n0 in range(0, N, chunk):
            cols = slice(n0, min(N, n0 + chunk))
            idx = class_index[cols]
            b_rows = bias[idx] if bias is not None else None
            w_sub = p2[idx]  # gathered once: read by the backward, then stepped, scattered
            gw, gb = chunk_backward(w_sub.view(-1, D), cols, b_rows)
            if bias is not None:
                grad_b.index_add_(0, idx, gb)
            _rows_update(opt, group, st2, p2, gw, idx, gathered=w_sub)
        sampled = torch.zeros(C, dtype=torch.bool, device=weight.device)
        sampled[class_index] = True
        for c0 in range(0, C, chunk):
            rows = slice(c0, min(C, c0 + chunk))
            _masked_zero_update(opt, group, st2, p2, rows, sampled[rows])
    opt._finish_state(group, state)
    opt._pending.add(id(weight))
    return grad_f.to(features.dtype), None, grad_s, grad_b


class SGD(_Fused, torch.optim.SGD):
    """``torch.optim.SGD`` whose marginops classifier weights are stepped inside the backward.

    Same arguments, checks, state (``momentum_buffer``) and update as
    ``torch.optim.SGD(params, lr, momentum, dampening, weight_decay, nesterov)``, per element::

        d_p = g + weight_decay·p
        buf = d_p (first step)  else  momentum·buf + (1 − dampening)·d_p
        d_p = d_p + momentum·buf (nesterov)  else  buf
        p  -= lr·d_p

    ``chunk_bytes``: weight gradient computed per chunk of classes (bounds the extra memory).
    """

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self._setup_fused(chunk_bytes)
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov)

    @staticmethod
    def _state_names(group: dict) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _init_state(self, group: dict, state: dict, p: Tensor) -> None:
        self._first = group["momentum"] != 0 and "momentum_buffer" not in state
        if self._first:  # filled chunk by chunk with torch's clone of d_p
            state["momentum_buffer"] = torch.empty_like(p, memory_format=torch.preserve_format)

    def _update(self, group: dict, state: dict, p: Tensor, grad: Tensor, states: list) -> None:
        if _step_op_applies(group, p, grad, *states):  # one fused pass, the same arithmetic
            torch.ops.marginops.sgd_step_(
                p, grad, states[0] if states else None, group["lr"], group["weight_decay"],
                group["momentum"], group["dampening"], group["nesterov"],
                group.get("maximize", False), self._first)
            return
        bufs = list(states) if states and not self._first else [None]
        _sgd([p], [grad], bufs, foreach=False, weight_decay=group["weight_decay"],
             momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
             nesterov=group["nesterov"], maximize=group.get("maximize", False))
        if self._first and states:
            states[0].copy_(bufs[0])

    def _finish_state(self, group: dict, state: dict) -> None:
        self._first = False


class AdamW(_Fused, torch.optim.AdamW):
    """``torch.optim.AdamW`` whose marginops classifier weights are stepped inside the backward.

    Same arguments, checks, state (``step``, ``exp_avg``, ``exp_avg_sq``) and update as
    ``torch.optim.AdamW(params, lr, betas, eps, weight_decay)``, per element::

        p *= 1 − lr·weight_decay
        m.lerp_(g, 1 − β1);  v = β2·v + (1 − β2)·g²;  t += 1
        p -= lr/(1 − β1^t) · m / (sqrt(v)/sqrt(1 − β2^t) + eps)

    ``chunk_bytes``: weight gradient computed per chunk of classes (bounds the extra memory).
    """

    def __init__(self, params, lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self._setup_fused(chunk_bytes)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    @staticmethod
    def _state_names(group: dict) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _init_state(self, group: dict, state: dict, p: Tensor) -> None:
        if len(state) == 0:  # as torch.optim.Adam._init_group (not capturable, not fused)
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self._step_now = state["step"]

    def _update(self, group: dict, state: dict, p: Tensor, grad: Tensor, states: list) -> None:
        beta1, beta2 = group["betas"]
        if _step_op_applies(group, p, grad, *states):  # one fused pass, the same arithmetic
            # the step count after this step's increment, as the functional reads it (a float)
            torch.ops.marginops.adamw_step_(
                p, grad, states[0], states[1], group["lr"], group["weight_decay"], beta1, beta2,
                group["eps"], float(self._step_now) + 1.0, group.get("maximize", False))
            return
        step = self._step_now.clone()  # the functional increments it: once per chunk, on a copy
        _adam([p], [grad], [states[0]], [states[1]], [], [step], foreach=False,
              decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2,
              lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
              maximize=group.get("maximize", False))

    def _finish_state(self, group: dict, state: dict) -> None:
        state["step"] += 1
