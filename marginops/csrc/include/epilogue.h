// Epilogue math of the marginops core op, written once for the CPU and the CUDA kernels.
//
// Everything here is a scalar, branch-light inline function. The CPU code (csrc/cpu) calls it in
// loops the compiler vectorises; the CUDA code (csrc/cuda) calls it per thread. Compiled as plain
// C++ when __CUDACC__ is not defined, so the CPU tests exercise exactly the math the GPU runs.
//
// Notation (marginops/ops/__init__.py has the full contract):
//   d_in   cosine-like dot of row i with column n (after the sub-center max)
//   d'_in  = 0 when filtered (d > filter threshold, non-target); else d·(t + d) when
//            hard-negative modulated (CurricularFace); else d
//   z_in   = scale_i · d'_in + bias_n
//   lse_neg_i = log Σ_{n ≠ target} exp(z_in),  kept as a running (max m, Σ exp(z − m)) pair.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MO_HD __host__ __device__ __forceinline__
#else
#define MO_HD inline
#endif

namespace marginops {
namespace epi {

// Smallest weight-row norm used as a divisor (matches F.normalize / the reference's clamp_min).
constexpr double kNormEps = 1e-12;

template <typename T>
MO_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// ---------------------------------------------------------------------------------------------
// Exponentials. Never called with half-precision arguments: the acc type is float or double.
//
// On the host, float uses a Cephes-style polynomial written with plain arithmetic and integer bit
// manipulation only, so GCC vectorises loops that call it (libm's expf would stop vectorisation).
// Relative error ≲ 2 ulp over the range used here (x ≤ 0 up to rounding); x < -87.3 → exactly 0,
// so masked (−inf) entries contribute nothing; NaN → NaN (NaN in, NaN out: a NaN logit must poison
// the sum, never vanish from it). On the device, expf (full precision) is used.
// Double always uses exp(), which keeps fp64 gradcheck exact.
// ---------------------------------------------------------------------------------------------
#if !defined(__CUDA_ARCH__) && !defined(__HIP_DEVICE_COMPILE__)
// exp_acc's polynomial for an argument already in [−87.34, 88] (NaN: NaN through p). The CPU's
// fixed-shift pass (csrc/cpu/row_kernels.h), whose arguments lie there by construction, calls it
// without exp_acc's clamps.
inline __attribute__((always_inline)) float exp_poly(float xc) {
  // k = round(x / ln2) with the 1.5·2^23 magic constant (no floor/rint call, vectorisable).
  const float magic = 12582912.0f;
  float t = xc * 1.44269504088896341f + magic;
  float k = t - magic;
  // r = x − k·ln2 in two pieces (Cody–Waite), |r| ≤ ln2/2.
  float r = xc - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^k by building the exponent field directly.
  int32_t ki = static_cast<int32_t>(k);
  int32_t bits = (ki + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(float));
  return p * two_k;
}
#endif

MO_HD float exp_acc(float x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return expf(x);
#else
  const float lo = -87.33654f, hi = 88.0f;
  // in_range is false for x < lo (−inf included) and for NaN; NaN is clamped to lo here so that the
  // float → int conversion in exp_poly stays defined, and restored at the end (one compare, one
  // select).
  const bool in_range = x >= lo;
  const float y = exp_poly(in_range ? (x > hi ? hi : x) : lo);
  return in_range ? y : (x < lo ? 0.0f : x);  // underflow → 0, NaN → NaN
#endif
}

MO_HD double exp_acc(double x) { return exp(x); }

MO_HD float log_acc(float x) { return logf(x); }
MO_HD double log_acc(double x) { return log(x); }
MO_HD float sqrt_acc(float x) { return sqrtf(x); }
MO_HD double sqrt_acc(double x) { return sqrt(x); }

// ---------------------------------------------------------------------------------------------
// Online log-sum-exp. A partial result is (m, s) with lse = m + log s; the empty set is (−inf, 0).
// Merging two partials rescales the one with the smaller max. Merging is commutative up to
// rounding; callers merge in a fixed order so results are deterministic.
// ---------------------------------------------------------------------------------------------
template <typename T>
MO_HD void lse_merge(T& m, T& s, T m2, T s2) {
  if (s2 == T(0)) return;  // other side empty
  if (s == T(0)) {
    m = m2;
    s = s2;
    return;
  }
  if (m2 > m) {
    s = s * exp_acc(m - m2) + s2;
    m = m2;
  } else {
    s = s + s2 * exp_acc(m2 - m);
  }
}

// lse from a partial; −inf when the set was empty (no non-target column). A NaN partial (s or m
// NaN: a NaN logit was seen) finalises to NaN — written as s == 0, not s > 0, so NaN is not
// mistaken for the empty set. lse_merge keeps NaN in s: every branch adds or scales it.
template <typename T>
MO_HD T lse_finalize(T m, T s) {
  return s == T(0) ? neg_inf<T>() : m + log_acc(s);
}

// ---------------------------------------------------------------------------------------------
// Target masking and hard-negative modulation (CurricularFace).
//   hard   = has_hard && n ≠ target && d > tau
//   d'     = hard ? d·(t + d) : d,      ∂d'/∂d = hard ? t + 2d : 1
// ---------------------------------------------------------------------------------------------
template <typename T>
MO_HD bool is_hard(T d, T tau, bool has_hard) {
  return has_hard && d > tau;
}

template <typename T>
MO_HD T modulate(T d, T t, bool hard) {
  return hard ? d * (t + d) : d;
}

template <typename T>
MO_HD T modulate_grad(T d, T t, bool hard) {
  return hard ? t + T(2) * d : T(1);
}

// Interclass filtering (insightface arcface_torch's interclass_filtering_threshold), applied
// before the modulation: with thr > 0 (has_filter), a non-target cosine above thr is multiplied by
// 0 under no_grad — the column stays in the softmax with d' = 0 (z = bias) and gets no gradient:
//   filtered = has_filter && d > thr,   d' = 0,   ∂d'/∂d = 0.
// The target column is never filtered (it is excluded from lse_neg and dot_y is unmodified).
template <typename T>
MO_HD bool is_filtered(T d, T thr, bool has_filter) {
  return has_filter && d > thr;
}

// z = scale · d' + bias
template <typename T>
MO_HD T logit(T d_mod, T scale, T bias) {
  return scale * d_mod + bias;
}

// Softmax weight of a non-target column in the backward: g = grad_lse · exp(z − lse_neg).
// lse_neg = −inf means there was no non-target column: g = 0 (avoids exp(−inf + inf) = NaN).
template <typename T>
MO_HD T softmax_grad(T z, T lse_neg, T grad_lse) {
  return lse_neg == neg_inf<T>() ? T(0) : grad_lse * exp_acc(z - lse_neg);
}

// ---------------------------------------------------------------------------------------------
// Sub-center max: class column n owns rows n·K .. n·K+K−1 of the tile; its value is the max, and
// the gradient flows to the first row attaining it (argmax). NaN wins, like torch.max: the first
// NaN row is the max and its argmax.
// With `inv` (the K rows' 1/wn), the values are row[k]·inv[k]: the CUDA kernels multiply the raw
// weight rows on the tensor cores and normalise the fp32 dots here, in their one read of the tile.
// ---------------------------------------------------------------------------------------------
template <typename T>
MO_HD T subcenter_max(const T* row, int64_t K, int64_t* argk, const T* inv = nullptr) {
  T best = inv ? row[0] * inv[0] : row[0];
  int64_t a = 0;
  for (int64_t k = 1; k < K; ++k) {
    const T v = inv ? row[k] * inv[k] : row[k];
    if (v > best || (v != v && best == best)) {
      best = v;
      a = k;
    }
  }
  *argk = a;
  return best;
}

// ---------------------------------------------------------------------------------------------
// Weight normalisation. Forward: ŵ = W / wn with wn = max(‖W‖, eps) (1 when not normalising).
// Backward for a row, given G = ∂L/∂ŵ (or ∂L/∂W when not normalising):
//   ∂L/∂W = (G − ŵ (ŵ·G)) / wn     if normalising and ‖W‖ > eps   (projection onto ŵ⊥)
//   ∂L/∂W = G / wn                 otherwise (clamped norm is a constant)
// ---------------------------------------------------------------------------------------------
template <typename T>
MO_HD T inv_norm(T sumsq, bool normalize) {
  if (!normalize) return T(1);
  T n = sqrt_acc(sumsq);
  return T(1) / (n > T(kNormEps) ? n : T(kNormEps));
}

// Whether the projection term applies to a row with squared norm sumsq.
template <typename T>
MO_HD bool norm_projects(T sumsq, bool normalize) {
  return normalize && sqrt_acc(sumsq) > T(kNormEps);
}

// One element of the row backward; proj = ŵ·G (0 when the projection does not apply).
template <typename T>
MO_HD T normalize_backward(T g, T w_hat, T proj, T inv) {
  return (g - w_hat * proj) * inv;
}

// ---------------------------------------------------------------------------------------------
// Top-k order: larger value first, NaN above every number (+inf included) as in torch.topk, ties
// (NaN vs NaN included) broken by the lower column. A total order, so a merge of partial lists
// gives the same answer whatever the split.
// ---------------------------------------------------------------------------------------------
template <typename T>
MO_HD bool topk_better(T v1, int64_t c1, T v2, int64_t c2) {
  const bool n1 = v1 != v1, n2 = v2 != v2;
  if (n1 || n2) return n1 && (!n2 || c1 < c2);
  return v1 > v2 || (v1 == v2 && c1 < c2);
}

// Insert (v, c) into a descending list of k entries if it beats the last one.
template <typename T>
MO_HD void topk_insert(T* vals, int64_t* cols, int64_t k, T v, int64_t c) {
  if (!topk_better(v, c, vals[k - 1], cols[k - 1])) return;
  int64_t j = k - 1;
  while (j > 0 && topk_better(v, c, vals[j - 1], cols[j - 1])) {
    vals[j] = vals[j - 1];
    cols[j] = cols[j - 1];
    --j;
  }
  vals[j] = v;
  cols[j] = c;
}

}  // namespace epi
}  // namespace marginops
