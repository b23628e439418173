"""Target-logit functions ψ of each margin family: B-sized PyTorch, differentiated by autograd.

Each takes the target cosines c (B,) and returns ψ(c) (B,); the family multiplies by its scale.
Margins are radians and may be floats or (B,) tensors (per-row margins: ElasticFace, MagFace,
the vMF family). Cosines are clamped into [−1+ε, 1−ε] before any angle is taken, so the exact
ArcFace derivative d cos(θ+m)/dc = cos m + sin m · c/√((1−c)(1+c)) stays finite at c → ±1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._validation import ANGLE_POLICIES, GRAD_MODES, check_choice


def default_eps(c: Tensor) -> float:
    """Cosine clamp: 1e-7 keeps 1−ε representable in fp32 (and is negligible in fp64)."""
    return 1e-7


def straight_through(c: Tensor, psi: Tensor) -> Tensor:
    """Value ψ(c), derivative 1 (insightface arcface_torch since Dec 2022)."""
    return c + (psi - c).detach()


def arcface(c: Tensor, margin: float | Tensor, *, angle_policy: str = "fallback",
            grad_mode: str = "exact", eps: float | None = None) -> Tensor:
    """ψ(c) = cos(θ + m), θ = arccos c, with the θ + m > π policy:

    - ``"fallback"``: cos(θ+m) where c > cos(π−m), else c − m·sin m (ArcFace paper, PML, TFace)
    - ``"none"``: cos(θ+m) everywhere (insightface arcface_torch)
    - ``"easy"``: cos(θ+m) where c > 0, else c (MagFace)
    - ``"clip"``: cos(clamp(θ+m, ε, π−ε)) (AdaFace)
    """
    check_choice("angle_policy", angle_policy, ANGLE_POLICIES)
    check_choice("grad_mode", grad_mode, GRAD_MODES)
    eps = default_eps(c) if eps is None else eps
    m = torch.as_tensor(margin, dtype=c.dtype, device=c.device)
    cc = c.clamp(-1 + eps, 1 - eps)
    if angle_policy == "clip":
        psi = torch.cos((torch.acos(cc) + m).clamp(eps, math.pi - eps))
    else:
        # cos(θ+m) = c·cos m − sin θ·sin m, sin θ = √((1−c)(1+c)) (no cancellation near c = ±1)
        cos_theta_m = cc * torch.cos(m) - torch.sqrt((1 - cc) * (1 + cc)) * torch.sin(m)
        # the linear branches use the raw c: their derivative is exactly 1, even at c = ±1
        if angle_policy == "none":
            psi = cos_theta_m
        elif angle_policy == "fallback":
            psi = torch.where(c > torch.cos(math.pi - m), cos_theta_m, c - m * torch.sin(m))
        else:  # easy
            psi = torch.where(c > 0, cos_theta_m, c)
    return straight_through(c, psi) if grad_mode == "straight_through" else psi


def combined(c: Tensor, m1: float, m2: float, m3: float, *, angle_policy: str = "fallback",
             grad_mode: str = "exact", eps: float | None = None) -> Tensor:
    """ψ(c) = cos(m1·θ + m2) − m3 (ArcFace paper's combined margin, insightface's m1, m2, m3).

    Policies generalise ArcFace's: ``"fallback"`` uses c − m2·sin m2 − m3 where m1·θ + m2 > π;
    ``"easy"`` keeps c − m3 where c ≤ 0; ``"clip"`` clamps m1·θ + m2 into [ε, π−ε].
    """
    check_choice("angle_policy", angle_policy, ANGLE_POLICIES)
    check_choice("grad_mode", grad_mode, GRAD_MODES)
    if m1 == 1.0 and angle_policy != "clip":  # the ArcFace formula, without an acos
        psi = arcface(c, m2, angle_policy=angle_policy, eps=eps) - m3
        return straight_through(c, psi) if grad_mode == "straight_through" else psi
    eps = default_eps(c) if eps is None else eps
    cc = c.clamp(-1 + eps, 1 - eps)
    angle = m1 * torch.acos(cc) + m2
    if angle_policy == "clip":
        angle = angle.clamp(eps, math.pi - eps)
    psi = torch.cos(angle) - m3
    if angle_policy == "fallback":
        psi = torch.where(angle <= math.pi, psi, cc - m2 * math.sin(m2) - m3)
    elif angle_policy == "easy":
        psi = torch.where(cc > 0, psi, cc - m3)
    return straight_through(c, psi) if grad_mode == "straight_through" else psi


def cosface(c: Tensor, margin: float | Tensor) -> Tensor:
    """ψ(c) = c − m (CosFace / LMCL, arXiv 1801.09414)."""
    return c - margin


def sphereface(c: Tensor, margin: int, lambda_: float | Tensor = 0.0,
               eps: float | None = None) -> Tensor:
    """Annealed A-Softmax target (ψ(θ) + λ·c)/(1+λ), ψ(θ) = (−1)^k cos(mθ) − 2k on
    θ ∈ [kπ/m, (k+1)π/m] (SphereFace, arXiv 1704.08063). The family's scale is ‖x‖."""
    eps = default_eps(c) if eps is None else eps
    theta = torch.acos(c.clamp(-1 + eps, 1 - eps))
    k = torch.floor(margin * theta.detach() / math.pi).clamp(max=margin - 1)
    sign = 1 - 2 * torch.remainder(k, 2)
    psi = sign * torch.cos(margin * theta) - 2 * k
    return (psi + lambda_ * c) / (1 + lambda_)


def sphereface_lambda(iteration: int | Tensor, base: float = 1000.0, gamma: float = 0.12,
                      power: float = 1.0, lambda_min: float = 5.0) -> float:
    """λ = max(λ_min, base·(1 + γ·iter)^(−power)) (SphereFace's annealing schedule)."""
    return max(lambda_min, base * (1 + gamma * float(iteration)) ** (-power))


def adaface(c: Tensor, norms: Tensor, *, margin: float, h: float, eps: float,
            batch_mean: Tensor, batch_std: Tensor) -> Tensor:
    """AdaFace target (arXiv 2204.00964, authors' head.py), before the scale:

        ẑ = clip(h·(n − μ)/(σ + ε), −1, 1),  n = clip(‖x‖, 0.001, 100) detached
        ψ = cos(clip(θ − m·ẑ, ε, π−ε)) − (m + m·ẑ),  c clamped to [−1+ε, 1−ε]
    """
    n = norms.detach().clamp(0.001, 100)
    z = (h * (n - batch_mean) / (batch_std + eps)).clamp(-1, 1)
    theta = torch.acos(c.clamp(-1 + eps, 1 - eps))
    return torch.cos((theta - margin * z).clamp(eps, math.pi - eps)) - (margin + margin * z)


def magface_margin(a: Tensor, l_a: float, u_a: float, l_m: float, u_m: float) -> Tensor:
    """m(a) = l_m + (u_m − l_m)(a − l_a)/(u_a − l_a), a = clamp(‖x‖, l_a, u_a) (MagFace)."""
    return l_m + (u_m - l_m) * (a - l_a) / (u_a - l_a)


def curricular_threshold(c: Tensor, margin: float, eps: float | None = None) -> Tensor:
    """cos(θ_y + m), raw (no fallback): CurricularFace's hard-negative threshold."""
    return arcface(c, margin, angle_policy="none", eps=eps)


# ---- counter-based normal draws (ElasticFace's per-row margins)
#
# A stateless draw: value i of step n is a hash of (seed, n, i), so the margins are reproducible
# from (seed, step) alone, need no torch.Generator (an object torch.compile cannot put in a
# graph), and come out identical on every device and under compile. The hash is Chris Wellons'
# "lowbias32" integer mixer, chained over the key words; 32-bit products are formed from 16-bit
# halves so that no int64 multiplication overflows.

_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x·c) mod 2³² for int64 x in [0, 2³²) and a constant c < 2³² (every product < 2⁴⁹)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: Tensor) -> Tensor:
    """lowbias32: a bijective avalanche mixer on 32-bit words held in int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_normal(seed: Tensor, step: Tensor, n: int, *, dtype: torch.dtype,
                   device: torch.device) -> Tensor:
    """(n,) standard normal draws that depend only on (seed, step, i): Box–Muller on two 24-bit
    uniforms u = (h + ½)/2²⁴ ∈ (0, 1), h = hash(seed_hi, seed_lo, step, 2i or 2i+1).

    seed and step are int64 tensors of one element (on any device); no generator, no host sync.
    Equivalent NumPy (uint32 wrap-around arithmetic): ``marginops.reference.elastic_margins``.
    """
    seed, step = seed.reshape(()).to(device), step.reshape(()).to(device)
    key = _hash32((seed >> 32) & _MASK32)
    key = _hash32(key ^ (seed & _MASK32))
    key = _hash32(key ^ (step & _MASK32))
    counter = torch.arange(2 * n, dtype=torch.long, device=device)
    h = _hash32(key ^ counter) >> 8                                   # 24 bits
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    u = (h.to(acc) + 0.5) / 2 ** 24
    u1, u2 = u[0::2], u[1::2]
    return (torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)).to(dtype)
