"""Naive, independent reference implementations of every marginops loss family.

This module is the yardstick: it materialises the full B×C logit matrix, lets autograd do every
derivative and imports nothing from marginops. Each function is written straight from the formulas
in LOSSES.md (the project's loss specification); the docstrings give the formula and the source.

Common conventions
------------------
* ``embeddings`` (B, D), ``weight`` (C, D) — row j is class j; for sub-centers (C·K, D) with row
  ``j·K + k``. ``labels`` (B,) int64, −1 = ignore the row (no margin, no loss, zero gradient).
* x̂ = x / max(‖x‖, 1e-12), ŵ likewise (``F.normalize(eps=1e-12)``); c_ij = x̂_i·ŵ_j.
* Margins are in radians. Everything runs in the input dtype (fp64 = truth, fp32/bf16 = the
  same-precision naive baseline). Inputs are never mutated.
* ``reduction``: "mean" (over non-ignored rows; NaN if every row is ignored, like
  ``F.cross_entropy``), "sum", or "none" ((B,), 0 on ignored rows). For families with extra
  per-row terms (MagFace, the uncertainty-aware loss) "none" returns the per-row total, so that
  "sum" = Σ none and "mean" = Σ none / #non-ignored.
* Only the *target* cosine is clamped into [−1+ε, 1−ε] before ``acos`` (so acos' derivative stays
  finite); non-target cosines are used as they are. For fp16/bf16 ε is raised to half the
  dtype's machine epsilon so that 1−ε is representable (fp32/fp64 are unaffected).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "normface_loss", "crystal_loss", "crystal_alpha_low", "cosface_loss", "arcface_loss",
    "arcface_logits", "combined_margin_loss", "sphereface_psi", "sphereface_loss",
    "sphereface_lambda",
    "curricularface_loss", "curricularface_update_t", "adaface_loss", "adaface_update_stats",
    "magface_loss", "elastic_arcface_loss", "elastic_cosface_loss", "elastic_margins",
    "subcenter_arcface_loss", "npt_loss", "uncertainty_margin_loss",
    "uncertainty_update_norm_mean",
]

ANGLE_POLICIES = ("fallback", "none", "easy", "clip")
GRAD_MODES = ("exact", "straight_through")


# --------------------------------------------------------------------------- helpers

def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2.0, dim=1, eps=1e-12)


def _cosines(embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, C) matrix c_ij = x̂_i·ŵ_j."""
    return _normalize(embeddings) @ _normalize(weight).t()


def _valid(labels: torch.Tensor) -> torch.Tensor:
    return labels >= 0


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C) bool, all False on ignored rows."""
    cols = torch.arange(num_classes, device=labels.device)
    return cols[None, :] == labels[:, None]


def _target(cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """c_iy (B,); column 0 on ignored rows (value unused, masked out later)."""
    return cos.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)


def _eps_for(dtype: torch.dtype, eps: float) -> float:
    return max(eps, torch.finfo(dtype).eps / 2)


def _clamp_cos(c: torch.Tensor, eps: float) -> torch.Tensor:
    e = _eps_for(c.dtype, eps)
    return c.clamp(-1.0 + e, 1.0 - e)


def _with_target(nontarget: torch.Tensor, target: torch.Tensor, labels: torch.Tensor):
    """Logit matrix: ``target`` (B,) in column y_i, ``nontarget`` (B, C) elsewhere."""
    hot = _one_hot(labels, nontarget.shape[1])
    return torch.where(hot, target[:, None], nontarget)


def _ce(logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return F.cross_entropy(logits, labels, ignore_index=-1, reduction=reduction)


def _reduce_rows(per_row: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce a (B,) per-row term over the non-ignored rows (0 on ignored rows for "none")."""
    valid = _valid(labels)
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.sum() / valid.sum()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _arc_psi(c: torch.Tensor, margin, policy: str, eps: float) -> torch.Tensor:
    """ArcFace target cosine ψ(c) = cos(θ + m) with a θ+m > π policy (LOSSES.md "ArcFace details").

    ``c`` is the raw target cosine (B,), ``margin`` a float or a (B,) tensor (per-row margins).
    θ = acos(clamp(c, −1+ε, 1−ε)).
      fallback: cos(θ+m) where c > cos(π−m), else c − m·sin(m)   (ArcFace code, pml, TFace)
      none:     cos(θ+m)                                          (insightface arcface_torch)
      easy:     cos(θ+m) where c > 0, else c                      (MagFace)
      clip:     cos(clamp(θ+m, ε, π−ε))                           (AdaFace)
    """
    if torch.is_tensor(margin):
        m = margin.to(c.dtype)
        threshold, mm = torch.cos(math.pi - m), m * torch.sin(m)
    else:   # python float: keep the constants exact in every dtype
        m = float(margin)
        threshold, mm = math.cos(math.pi - m), m * math.sin(m)
    theta = torch.acos(_clamp_cos(c, eps))
    cos_tm = torch.cos(theta + m)
    if policy == "fallback":
        return torch.where(c > threshold, cos_tm, c - mm)
    if policy == "none":
        return cos_tm
    if policy == "easy":
        return torch.where(c > 0, cos_tm, c)
    if policy == "clip":
        e = _eps_for(c.dtype, eps)
        return torch.cos((theta + m).clamp(e, math.pi - e))
    raise ValueError(f"angle_policy must be one of {ANGLE_POLICIES}, got {policy!r}")


def _apply_grad_mode(c: torch.Tensor, psi: torch.Tensor, grad_mode: str) -> torch.Tensor:
    """"exact": ψ as is; "straight_through": value ψ(c), dψ/dc = 1."""
    if grad_mode == "exact":
        return psi
    if grad_mode == "straight_through":
        return c + (psi - c).detach()
    raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")


def arcface_logits(cos, labels, *, scale=64.0, margin=0.5, angle_policy="fallback",
                   grad_mode="exact", eps=1e-7):
    """ArcFace logits from a cosine matrix (B, C): s·ψ(c_iy) in the target column, s·c_ij elsewhere.

    Exposed so tests can differentiate with respect to a cosine-matrix leaf.
    """
    c_y = _target(cos, labels)
    psi = _apply_grad_mode(c_y, _arc_psi(c_y, margin, angle_policy, eps), grad_mode)
    return _with_target(scale * cos, scale * psi, labels)


# --------------------------------------------------------------------------- NormFace / Crystal

def normface_loss(embeddings, weight, labels, *, scale=64.0, reduction="mean"):
    """NormFace (Wang et al., arXiv 1704.06369): z_ij = s·c_ij for every j, CE.

    ``scale`` may be a float or a 0-d tensor (learnable: its gradient flows).
    """
    return _ce(scale * _cosines(embeddings, weight), labels, reduction)


def crystal_loss(embeddings, weight, labels, *, alpha, bias=None, reduction="mean"):
    """Crystal / L2-constrained softmax (Ranjan et al., arXiv 1703.09507, 1804.01159).

    z_ij = W_j·(α x̂_i) + b_j — weights NOT normalised, optional bias (C,). α float or 0-d tensor.
    """
    logits = (alpha * _normalize(embeddings)) @ weight.t()
    if bias is not None:
        logits = logits + bias[None, :]
    return _ce(logits, labels, reduction)


def crystal_alpha_low(num_classes: int, target_prob: float = 0.9) -> float:
    """Lower bound on α (arXiv 1703.09507): α_low = log(p·(C−2)/(1−p)).

    C = 10 000, p = 0.9 → 11.41.
    """
    return math.log(target_prob * (num_classes - 2) / (1.0 - target_prob))


# ------------------------------------------------------------------ CosFace / ArcFace / combined

def cosface_loss(embeddings, weight, labels, *, scale=64.0, margin=0.35, reduction="mean"):
    """CosFace / LMCL (Wang et al., arXiv 1801.09414): target s·(c_iy − m), non-target s·c_ij."""
    cos = _cosines(embeddings, weight)
    return _ce(_with_target(scale * cos, scale * (_target(cos, labels) - margin), labels),
               labels, reduction)


def arcface_loss(embeddings, weight, labels, *, scale=64.0, margin=0.5, angle_policy="fallback",
                 grad_mode="exact", eps=1e-7, reduction="mean"):
    """ArcFace (Deng et al., arXiv 1801.07698): target s·ψ(c_iy), ψ = cos(θ+m) under
    ``angle_policy`` (see ``_arc_psi``), non-target s·c_ij.

    grad_mode "exact": autograd through ψ (dψ/dc = cos m + sin m·c/√(1−c²));
    "straight_through": value ψ(c), dψ/dc = 1 (insightface arcface_torch since Dec 2022).
    """
    cos = _cosines(embeddings, weight)
    logits = arcface_logits(cos, labels, scale=scale, margin=margin, angle_policy=angle_policy,
                            grad_mode=grad_mode, eps=eps)
    return _ce(logits, labels, reduction)


def combined_margin_loss(embeddings, weight, labels, *, scale=64.0, m1=1.0, m2=0.5, m3=0.0,
                         angle_policy="fallback", grad_mode="exact", eps=1e-7, reduction="mean"):
    """Combined margin (ArcFace paper, arXiv 1801.07698 §2.3): target s·(cos(m1·θ + m2) − m3).

    θ = acos(clamp(c, −1+ε, 1−ε)), a = m1·θ + m2. Policies (marginops' definitions):
      fallback: cos(a) − m3 where a ≤ π, else c − m2·sin(m2) − m3 (= ArcFace's for m1=1, m3=0)
      none:     cos(a) − m3
      easy:     cos(a) − m3 where c > 0, else c − m3
      clip:     cos(clamp(a, ε, π−ε)) − m3
    """
    cos = _cosines(embeddings, weight)
    c = _target(cos, labels)
    theta = torch.acos(_clamp_cos(c, eps))
    a = m1 * theta + m2
    formula = torch.cos(a) - m3
    if angle_policy == "fallback":
        psi = torch.where(a <= math.pi, formula, c - m2 * math.sin(m2) - m3)
    elif angle_policy == "none":
        psi = formula
    elif angle_policy == "easy":
        psi = torch.where(c > 0, formula, c - m3)
    elif angle_policy == "clip":
        e = _eps_for(c.dtype, eps)
        psi = torch.cos(a.clamp(e, math.pi - e)) - m3
    else:
        raise ValueError(f"angle_policy must be one of {ANGLE_POLICIES}, got {angle_policy!r}")
    psi = _apply_grad_mode(c, psi, grad_mode)
    return _ce(_with_target(scale * cos, scale * psi, labels), labels, reduction)


# --------------------------------------------------------------------------- SphereFace

def sphereface_psi(cos: torch.Tensor, margin: int = 4) -> torch.Tensor:
    """SphereFace ψ(θ) = (−1)^k·cos(mθ) − 2k, k = floor(m·θ/π) ∈ [0, m−1], θ = acos(c).

    cos(mθ) is the Chebyshev polynomial T_m(c) (as in the authors' code, wy1iu/sphereface), so
    no acos is differentiated; k is piecewise constant (no gradient).
    """
    m = int(margin)
    t_prev, t_cur = torch.ones_like(cos), cos          # T_0, T_1
    for _ in range(m - 1):
        t_prev, t_cur = t_cur, 2 * cos * t_cur - t_prev
    cos_m_theta = t_cur if m >= 1 else t_prev
    with torch.no_grad():
        theta = torch.acos(cos.clamp(-1.0, 1.0))
        k = torch.floor(m * theta / math.pi).clamp(0, m - 1)
        sign = 1.0 - 2.0 * torch.remainder(k, 2)        # (−1)^k
    return sign * cos_m_theta - 2 * k


def sphereface_loss(embeddings, weight, labels, *, margin=4, lambda_=0.0, reduction="mean"):
    """SphereFace / A-Softmax (Liu et al., arXiv 1704.08063). Weights normalised, features NOT.

    non-target ‖x_i‖·c_ij; target ‖x_i‖·(ψ(θ_iy) + λ·c_iy)/(1 + λ) (annealing λ, authors' code).
    """
    norm = embeddings.norm(dim=1)
    cos = _cosines(embeddings, weight)
    c = _target(cos, labels)
    target = norm * (sphereface_psi(c, margin) + lambda_ * c) / (1.0 + lambda_)
    return _ce(_with_target(norm[:, None] * cos, target, labels), labels, reduction)


def sphereface_lambda(iteration, base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0) -> float:
    """λ = max(λ_min, base·(1 + γ·iteration)^(−power)) (SphereFace authors' schedule)."""
    return max(lambda_min, base * (1.0 + gamma * iteration) ** (-power))


# --------------------------------------------------------------------------- CurricularFace

def curricularface_loss(embeddings, weight, labels, *, scale=64.0, margin=0.5, t=0.0, eps=1e-7,
                        reduction="mean"):
    """CurricularFace (Huang et al., arXiv 2004.00288; authors' code HuangYG123/CurricularFace).

    target s·T(c_iy), T = ArcFace "fallback"; non-target j≠y: s·c_ij·(t + c_ij) where
    c_ij > cos(θ_y + m) (raw, from the clamped target cosine; mask and threshold detached),
    else s·c_ij. ``t`` is already updated by the caller (``curricularface_update_t``), no gradient.
    """
    cos = _cosines(embeddings, weight)
    c_y = _target(cos, labels)
    t = torch.as_tensor(t, dtype=cos.dtype, device=cos.device).detach()
    with torch.no_grad():
        threshold = torch.cos(torch.acos(_clamp_cos(c_y, eps)) + margin)
        hard = (cos > threshold[:, None]) & ~_one_hot(labels, cos.shape[1])
    nontarget = torch.where(hard, cos * (t + cos), cos)
    target = _arc_psi(c_y, margin, "fallback", eps)
    return _ce(_with_target(scale * nontarget, scale * target, labels), labels, reduction)


def curricularface_update_t(t, target_cos, momentum=0.01, labels=None) -> torch.Tensor:
    """t ← momentum·mean_i(c_iy) + (1 − momentum)·t (authors' code, a no-grad buffer).

    The mean is over the rows with ``labels >= 0`` if ``labels`` is given; t unchanged if none.
    """
    with torch.no_grad():
        c = target_cos.detach()
        if labels is not None:
            c = c[_valid(labels)]
        t = torch.as_tensor(t, dtype=c.dtype, device=c.device).clone()
        if c.numel() == 0:
            return t
        return momentum * c.mean() + (1.0 - momentum) * t


# --------------------------------------------------------------------------- AdaFace

def adaface_loss(embeddings, weight, labels, *, batch_mean, batch_std, scale=64.0, margin=0.4,
                 h=0.333, eps=1e-3, reduction="mean"):
    """AdaFace (Kim et al., arXiv 2204.00964; authors' head.py, mk-minchul/AdaFace).

    n = clamp(‖x‖, 0.001, 100) detached; ẑ = clamp(h·(n − μ)/(σ + ε), −1, 1) with μ, σ the
    caller's (already updated) EMAs; g_angle = −m·ẑ, g_add = m + m·ẑ;
    target s·(cos(clamp(acos(clamp(c_y, −1+ε, 1−ε)) + g_angle, ε, π−ε)) − g_add); non-target s·c.
    Documented deviation: the authors clamp every cosine to [−1+ε, 1−ε]; we clamp only the target
    (changes only non-target |c| > 1 − 1e-3).
    """
    cos = _cosines(embeddings, weight)
    c_y = _target(cos, labels)
    n = embeddings.detach().norm(dim=1).clamp(0.001, 100.0)
    mu = torch.as_tensor(batch_mean, dtype=cos.dtype, device=cos.device).detach()
    sigma = torch.as_tensor(batch_std, dtype=cos.dtype, device=cos.device).detach()
    z = (h * (n - mu) / (sigma + eps)).clamp(-1.0, 1.0)
    g_angle = -margin * z
    g_add = margin + margin * z
    e = _eps_for(cos.dtype, eps)
    theta = torch.acos(c_y.clamp(-1.0 + e, 1.0 - e))
    target = torch.cos((theta + g_angle).clamp(e, math.pi - e)) - g_add
    return _ce(_with_target(scale * cos, scale * target, labels), labels, reduction)


def adaface_update_stats(batch_mean, batch_std, norms, t_alpha=0.01, labels=None):
    """AdaFace EMA update (authors' head.py): with n = clamp(norms, 0.001, 100) over the
    non-ignored rows, mean ← t_alpha·mean(n) + (1−t_alpha)·mean,
    std ← t_alpha·std(n) + (1−t_alpha)·std
    (std unbiased, torch.std's default). Returns the new (mean, std) as 0-d tensors, no grad.
    With no valid row both are unchanged; with a single valid row std is unchanged (its sample
    std is undefined).
    """
    with torch.no_grad():
        n = norms.detach().clamp(0.001, 100.0)
        if labels is not None:
            n = n[_valid(labels)]
        mean = torch.as_tensor(batch_mean, dtype=n.dtype, device=n.device).clone()
        std = torch.as_tensor(batch_std, dtype=n.dtype, device=n.device).clone()
        if n.numel() >= 1:
            mean = t_alpha * n.mean() + (1.0 - t_alpha) * mean
        if n.numel() >= 2:
            std = t_alpha * n.std() + (1.0 - t_alpha) * std
        return mean, std


# --------------------------------------------------------------------------- MagFace

def magface_loss(embeddings, weight, labels, *, scale=64.0, l_a=10.0, u_a=110.0, l_m=0.45,
                 u_m=0.8, lambda_g=35.0, angle_policy="easy", eps=1e-7, reduction="mean"):
    """MagFace (Meng et al., arXiv 2103.06627; authors' code IrvingMeng/MagFace).

    a_i = clamp(‖x_i‖, l_a, u_a) (NOT detached), m(a) = l_m + (u_m − l_m)(a − l_a)/(u_a − l_a);
    target s·ψ(c_iy; m(a_i)) with the ArcFace ``angle_policy`` (default "easy"), non-target s·c;
    loss = CE + λ_g·g(a), g(a) = 1/a + a/u_a², reduced like the CE over non-ignored rows.
    As in the authors' code, gradient flows into ‖x‖ through both m(a) and g(a).
    """
    cos = _cosines(embeddings, weight)
    a = embeddings.norm(dim=1).clamp(l_a, u_a)
    m = l_m + (u_m - l_m) * (a - l_a) / (u_a - l_a)
    target = _arc_psi(_target(cos, labels), m, angle_policy, eps)
    ce = _ce(_with_target(scale * cos, scale * target, labels), labels, reduction)
    g = 1.0 / a + a / (u_a ** 2)
    return ce + lambda_g * _reduce_rows(g, labels, reduction)


# --------------------------------------------------------------------------- ElasticFace

def elastic_arcface_loss(embeddings, weight, labels, *, margins, scale=64.0,
                         angle_policy="fallback", eps=1e-7, reduction="mean"):
    """ElasticFace-Arc (Boutros et al., arXiv 2109.09416): ArcFace with per-row margins m_i (B,)
    given by the caller (see ``elastic_margins``); target s·ψ(c_iy; m_i), non-target s·c."""
    cos = _cosines(embeddings, weight)
    m = margins.detach().to(cos.dtype)
    target = _arc_psi(_target(cos, labels), m, angle_policy, eps)
    return _ce(_with_target(scale * cos, scale * target, labels), labels, reduction)


def elastic_cosface_loss(embeddings, weight, labels, *, margins, scale=64.0, reduction="mean"):
    """ElasticFace-Cos (arXiv 2109.09416): target s·(c_iy − m_i), m_i (B,) from the caller."""
    cos = _cosines(embeddings, weight)
    target = _target(cos, labels) - margins.detach().to(cos.dtype)
    return _ce(_with_target(scale * cos, scale * target, labels), labels, reduction)


def counter_normal(seed: int, step: int, n: int) -> np.ndarray:
    """(n,) fp64 standard normals from (seed, step): NumPy uint32 arithmetic (wrap-around),
    written independently of ``marginops.margins.counter_normal`` (int64 tensors, split products).

    key = h(h(h(seed_hi) ^ seed_lo) ^ step mod 2³²), h = lowbias32; draw j of the step uses
    u_j = ((h(key ^ j) >> 8) + ½)/2²⁴, and row i pairs u_{2i}, u_{2i+1} by Box–Muller.
    """
    def h(x):
        x = np.asarray(x, dtype=np.uint32)
        with np.errstate(over="ignore"):
            x = x ^ (x >> np.uint32(16))
            x = x * np.uint32(0x7FEB352D)
            x = x ^ (x >> np.uint32(15))
            x = x * np.uint32(0x846CA68B)
            return x ^ (x >> np.uint32(16))

    key = h(np.uint32((seed >> 32) & 0xFFFFFFFF))
    key = h(key ^ np.uint32(seed & 0xFFFFFFFF))
    key = h(key ^ np.uint32(step & 0xFFFFFFFF))
    u = ((h(key ^ np.arange(2 * n, dtype=np.uint32)) >> np.uint32(8)).astype(np.float64)
         + 0.5) / 2 ** 24
    return np.sqrt(-2 * np.log(u[0::2])) * np.cos(2 * np.pi * u[1::2])


def elastic_margins(target_cos, mean, std, seed: int, step: int, plus=False) -> torch.Tensor:
    """Per-row margins m_i = mean + std·z_i, z = ``counter_normal(seed, step, B)`` (the modules'
    training step ``step`` counts from 0; ``draw_state = [seed, step]`` before the call).

    ``plus`` (ElasticFace+): the draws sorted ascending are assigned by descending target cosine,
    i.e. the row with the highest c_iy (easiest) gets the smallest margin (rank-matched, as the
    paper describes). The authors' code indexes ``sorted_margin[argsort_desc(cos)]``, which
    applies that permutation rather than its inverse; the two agree only when the permutation is
    an involution. We follow the stated intent.
    """
    with torch.no_grad():
        c = target_cos.detach()
        z = torch.from_numpy(counter_normal(int(seed), int(step), c.shape[0]))
        draws = (float(mean) + float(std) * z).to(dtype=c.dtype, device=c.device)
        if not plus:
            return draws
        order = torch.argsort(c, descending=True)
        margins = torch.empty_like(draws)
        margins[order] = torch.sort(draws).values
        return margins


# --------------------------------------------------------------------------- Sub-center ArcFace

def subcenter_arcface_loss(embeddings, weight, labels, *, subcenters=3, scale=64.0, margin=0.5,
                           angle_policy="fallback", grad_mode="exact", eps=1e-7, reduction="mean"):
    """Sub-center ArcFace (Deng et al., ECCV 2020): c_ij = max_k x̂_i·ŵ_{j·K+k}, then ArcFace.

    ``weight`` is (C·K, D) with row j·K + k. The max uses ``amax`` (ties share the gradient).
    """
    cos_all = _cosines(embeddings, weight)
    cos = cos_all.view(cos_all.shape[0], -1, subcenters).amax(dim=2)
    logits = arcface_logits(cos, labels, scale=scale, margin=margin, angle_policy=angle_policy,
                            grad_mode=grad_mode, eps=eps)
    return _ce(logits, labels, reduction)


# --------------------------------------------------------------------------- NPT-Loss

def npt_loss(embeddings, weight, labels, *, k=1, delta=0.5, r=1.0, reduction="mean"):
    """NPT-Loss (arXiv 2103.03503): L_i = 2r²·Σ_{j ∈ top-k non-target} max(0, c_ij − c_iy + δ)
    (the paper's 2r²; the authors' code uses 2r, equal at their r = 1).

    The target is masked with −inf before top-k (the authors mask with 0, which selects the target
    when every negative is below 0). Gradient reaches only the k selected classes and the target.
    """
    cos = _cosines(embeddings, weight)
    c_y = _target(cos, labels)
    negatives = cos.masked_fill(_one_hot(labels, cos.shape[1]), float("-inf"))
    top = negatives.topk(k, dim=1).values
    per_row = 2.0 * r * r * torch.relu(top - c_y[:, None] + delta).sum(dim=1)
    return _reduce_rows(per_row, labels, reduction)


# ------------------------------------------------------------------ Uncertainty-aware vMF margin

def uncertainty_margin_loss(embeddings, weight, labels, *, norm_mean, margin=0.35, margin_max=0.8,
                            pull_weight=1.0, push_weight=1.0, push_delta=0.5, proxy_weight=1.0,
                            proxy_margin=0.0, angle_policy="fallback", eps=1e-7,
                            reduction="mean"):
    """Uncertainty-aware vMF margin loss — marginops' RECONSTRUCTION of LH2Face (arXiv 2506.23555)
    from its abstract and summaries (the full paper text was not available); every constant is
    configurable.

    κ_i = ‖x_i‖ (vMF concentration, not detached); m_i = clamp(margin·‖x_i‖/μ, 0, margin_max),
    detached, μ = ``norm_mean`` (caller's already-updated EMA);
    logits κ_i·c_ij (j≠y), κ_i·ψ_arc(c_iy; m_i, angle_policy) (target);
    loss_i = CE_i + pull_weight·(1 − c_iy) + push_weight·max(0, max_{j≠y} c_ij − c_iy + push_delta)
    plus the batch term proxy_weight·P, P = mean over ordered pairs a≠b of the distinct classes in
    the batch of max(0, ŵ_a·ŵ_b − proxy_margin) (0 with fewer than 2 classes). "mean" =
    mean_i loss_i + proxy_weight·P over non-ignored rows; "none" returns loss_i + proxy_weight·P
    on each non-ignored row (0 elsewhere); "sum" = Σ of "none".
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    cos = _cosines(embeddings, weight)
    c_y = _target(cos, labels)
    kappa = embeddings.norm(dim=1)
    mu = torch.as_tensor(norm_mean, dtype=cos.dtype, device=cos.device).detach()
    m = (margin * kappa.detach() / mu).clamp(0.0, margin_max)
    target = kappa * _arc_psi(c_y, m, angle_policy, eps)
    ce = _ce(_with_target(kappa[:, None] * cos, target, labels), labels, "none")

    hot = _one_hot(labels, cos.shape[1])
    hardest_neg = cos.masked_fill(hot, float("-inf")).amax(dim=1)
    pull = 1.0 - c_y
    push = torch.relu(hardest_neg - c_y + push_delta)

    classes = torch.unique(labels[_valid(labels)])
    if classes.numel() >= 2:
        w = _normalize(weight[classes])
        gram = w @ w.t()
        off = ~torch.eye(classes.numel(), dtype=torch.bool, device=gram.device)
        proxy = torch.relu(gram[off] - proxy_margin).mean()
    else:
        proxy = weight.sum() * 0.0

    per_row = ce + pull_weight * pull + push_weight * push + proxy_weight * proxy
    return _reduce_rows(per_row, labels, reduction)


def uncertainty_update_norm_mean(norm_mean, norms, momentum=0.01, labels=None) -> torch.Tensor:
    """μ ← momentum·mean(‖x_i‖) + (1 − momentum)·μ over non-ignored rows (no grad).

    Unchanged if there is no non-ignored row.
    """
    with torch.no_grad():
        n = norms.detach()
        if labels is not None:
            n = n[_valid(labels)]
        mu = torch.as_tensor(norm_mean, dtype=n.dtype, device=n.device).clone()
        if n.numel() == 0:
            return mu
        return momentum * n.mean() + (1.0 - momentum) * mu
