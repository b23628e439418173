// The row epilogues of the CPU kernels (csrc/cpu/margin_lse.cpp, through tiles.h: the only file
// that includes this one, so the clone-dispatched functions below are defined here, not just
// declared): logits and their max (forward), Σexp (forward), the softmax gradient (backward), and
// their fixed-shift forms (one pass forward; the backward from kept exps).
#pragma once

#include <cstdint>
#include <limits>

#include "clones.h"
#include "epilogue.h"

namespace marginops {
namespace cpu {

namespace epi = marginops::epi;


// ------------------------------------------------------------------------------------------------
// Row epilogues: the hot loops. Written as plain loops over one tile row that GCC vectorises
// (-fno-trapping-math lets it if-convert the selects; exp_acc is branch-free), and compiled in
// AVX-512 / AVX2 / baseline clones picked at load time (GCC function multi-versioning), so one
// binary runs everywhere and uses the wide units where they exist.
// ------------------------------------------------------------------------------------------------

// Each row kernel is specialised at run time (one branch per row) on kMod — hard-negative
// modulation or filtering in play — and, in the backward, on a bias gradient to accumulate; the
// plain variants carry neither the compares nor the stores. The target column is taken out of the
// vector loops (two ranges around it, the target element on its own), so no per-element index
// compare remains.

// One logit: z = s·d' + b, with d' = d unless kMod (see epilogue.h).
template <typename acc_t, bool kMod>
MO_ALWAYS_INLINE acc_t logit_of(acc_t d, acc_t s, acc_t tau, acc_t t, bool hard, acc_t thr,
                                bool filter, acc_t b) {
  if constexpr (!kMod) {
    return epi::logit(d, s, b);
  } else {
    const bool h = epi::is_hard(d, tau, hard);
    const bool f = epi::is_filtered(d, thr, filter);
    return epi::logit(f ? acc_t(0) : epi::modulate(d, t, h), s, b);
  }
}

// Forward over columns [j0, j1): row[j] = z_j, folding max and NaN count into (m, nans).
template <typename acc_t, bool kMod>
MO_ALWAYS_INLINE void logits_range(acc_t* row, int64_t j0, int64_t j1, acc_t s, acc_t tau,
                                   acc_t t, bool hard, acc_t thr, bool filter, const acc_t* bc,
                                   acc_t& m_io, int& nans_io) {
  acc_t m = m_io;
  int nans = nans_io;  // int, not int64: same lane width as float, so the loop stays one width
#pragma omp simd reduction(max : m) reduction(+ : nans)
  for (int64_t j = j0; j < j1; ++j) {
    const acc_t z = logit_of<acc_t, kMod>(row[j], s, tau, t, hard, thr, filter, bc[j]);
    row[j] = z;
    m = m > z ? m : z;
    nans += z != z;
  }
  m_io = m;
  nans_io = nans;
}

// Forward: d → z = s·d' + b in place, −inf at the target column tl; returns max_j z, or NaN if
// any z is NaN (NaN in, NaN out). A vectorised max reduction may drop NaN (maxps returns its second
// operand), so NaNs are counted separately — one compare and one add per element, beside an
// exp polynomial of ~20 operations in the next pass — and the returned max is poisoned at the end;
// a NaN max then makes every exp(z − m) NaN, and lse_merge / lse_finalize keep it.
template <typename acc_t, bool kMod>
MO_ALWAYS_INLINE acc_t row_logits_as(acc_t* row, int64_t nc, int64_t tl, acc_t s, acc_t tau,
                                     acc_t t, bool hard, acc_t thr, bool filter,
                                     const acc_t* bc) {
  acc_t m = epi::neg_inf<acc_t>();
  int nans = 0;
  const bool has_t = tl >= 0 && tl < nc;
  logits_range<acc_t, kMod>(row, 0, has_t ? tl : nc, s, tau, t, hard, thr, filter, bc, m, nans);
  if (has_t) {
    row[tl] = epi::neg_inf<acc_t>();
    logits_range<acc_t, kMod>(row, tl + 1, nc, s, tau, t, hard, thr, filter, bc, m, nans);
  }
  return nans ? std::numeric_limits<acc_t>::quiet_NaN() : m;
}

template <typename acc_t>
MO_ALWAYS_INLINE acc_t row_logits_impl(acc_t* row, int64_t nc, int64_t tl, acc_t s, acc_t tau,
                                       acc_t t, bool hard, acc_t thr, bool filter,
                                       const acc_t* bc) {
  if (hard || filter)
    return row_logits_as<acc_t, true>(row, nc, tl, s, tau, t, hard, thr, filter, bc);
  return row_logits_as<acc_t, false>(row, nc, tl, s, tau, t, hard, thr, filter, bc);
}

// Forward: Σ_j exp(z_j − m).
template <typename acc_t>
MO_ALWAYS_INLINE acc_t row_sum_exp_impl(const acc_t* row, int64_t nc, acc_t m) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < nc; ++j) sum += epi::exp_acc(row[j] - m);
  return sum;
}

// Backward, one column: g = grad_lse · exp(z − lse_neg) (0 at the target), d', and
// dd = g · s · ∂d'/∂d (0 where filtered).
template <typename acc_t>
struct DDElem {
  acc_t g, dm, dd;
};

template <typename acc_t, bool kMod>
MO_ALWAYS_INLINE DDElem<acc_t> dd_of(acc_t d, bool target, acc_t s, acc_t tau, acc_t t,
                                     bool hard, acc_t thr, bool filter, acc_t b, acc_t lse,
                                     acc_t gl) {
  if constexpr (!kMod) {
    acc_t g = epi::softmax_grad(epi::logit(d, s, b), lse, gl);
    g = target ? acc_t(0) : g;
    return {g, d, g * s};
  } else {
    const bool h = epi::is_hard(d, tau, hard);
    const bool f = epi::is_filtered(d, thr, filter);
    const acc_t dm = f ? acc_t(0) : epi::modulate(d, t, h);
    acc_t g = epi::softmax_grad(epi::logit(dm, s, b), lse, gl);
    g = target ? acc_t(0) : g;
    return {g, dm, g * s * (f ? acc_t(0) : epi::modulate_grad(d, t, h))};  // NaN g stays NaN
  }
}

// Backward over columns [j0, j1) (none the target): out[j] = dd_j, gbc[j] += g_j (kBias);
// returns Σ g_j · d'_j.
template <typename acc_t, bool kMod, bool kBias>
MO_ALWAYS_INLINE acc_t dd_range(const acc_t* d, acc_t* out, int64_t j0, int64_t j1, acc_t s,
                                acc_t tau, acc_t t, bool hard, acc_t thr, bool filter,
                                const acc_t* bc, acc_t lse, acc_t gl, acc_t* gbc) {
  acc_t gsum = 0;
#pragma omp simd reduction(+ : gsum)
  for (int64_t j = j0; j < j1; ++j) {
    const DDElem<acc_t> e = dd_of<acc_t, kMod>(d[j], false, s, tau, t, hard, thr, filter, bc[j],
                                               lse, gl);
    gsum += e.g * e.dm;
    if constexpr (kBias) gbc[j] += e.g;
    out[j] = e.dd;
  }
  return gsum;
}

// Backward: from d (sub-center maxima) to dd, written to out (may be d itself):
//   g_j = grad_lse · exp(z_j − lse_neg) for j ≠ tl, 0 at tl;   gbc_j += g_j (when gbc is given)
//   dd_j = g_j · s · ∂d'/∂d (0 where filtered);   returns Σ_j g_j · d'_j (this row's ∂scale)
// The target's grad_dot is added by the caller.
template <typename acc_t, bool kMod, bool kBias>
MO_ALWAYS_INLINE acc_t row_dd_as(const acc_t* d, acc_t* out, int64_t nc, int64_t tl, acc_t s,
                                 acc_t tau, acc_t t, bool hard, acc_t thr, bool filter,
                                 const acc_t* bc, acc_t lse, acc_t gl, acc_t* gbc) {
  const bool has_t = tl >= 0 && tl < nc;
  acc_t gsum = dd_range<acc_t, kMod, kBias>(d, out, 0, has_t ? tl : nc, s, tau, t, hard, thr,
                                            filter, bc, lse, gl, gbc);
  if (has_t) {
    const DDElem<acc_t> e = dd_of<acc_t, kMod>(d[tl], true, s, tau, t, hard, thr, filter, bc[tl],
                                               lse, gl);
    gsum += e.g * e.dm;  // 0 · d' (NaN when d' is: NaN in, NaN out)
    out[tl] = e.dd;
    gsum += dd_range<acc_t, kMod, kBias>(d, out, tl + 1, nc, s, tau, t, hard, thr, filter, bc,
                                         lse, gl, gbc);
  }
  return gsum;
}

template <typename acc_t>
MO_ALWAYS_INLINE acc_t row_dd_impl(const acc_t* d, acc_t* out, int64_t nc, int64_t tl, acc_t s,
                                   acc_t tau, acc_t t, bool hard, acc_t thr, bool filter,
                                   const acc_t* bc, acc_t lse, acc_t gl, acc_t* gbc) {
  const bool mod = hard || filter;
  if (gbc) {
    return mod ? row_dd_as<acc_t, true, true>(d, out, nc, tl, s, tau, t, hard, thr, filter, bc,
                                              lse, gl, gbc)
               : row_dd_as<acc_t, false, true>(d, out, nc, tl, s, tau, t, hard, thr, filter, bc,
                                               lse, gl, gbc);
  }
  return mod ? row_dd_as<acc_t, true, false>(d, out, nc, tl, s, tau, t, hard, thr, filter, bc,
                                             lse, gl, gbc)
             : row_dd_as<acc_t, false, false>(d, out, nc, tl, s, tau, t, hard, thr, filter, bc,
                                              lse, gl, gbc);
}

// ------------------------------------------------------------------------------------------------
// Fixed shift (margin_loss's families; Problem::fixed_shift says when): the logits are z = s·d
// with |d| <= (1 + 2^-9)² (unit rows, rounded to bf16 at worst), so exp(z − σ) with the shift
// σ = s − kShiftGap, known before any column is seen, is a normal float for every column when
// 0 < s <= kShiftMaxScale: e ∈ [exp(−2.01·s + 70), exp(0.01·s + 70)] ⊂ [e^−81, e^71], and a sum of
// up to kShiftMaxColumns of them stays below 4e37. The forward then needs one pass per row
// (Σ exp(z − σ), no max first) and no chunk-dependent state: lse = σ + log Σ, and the backward's
// softmax is p_j = e_j · exp(σ − lse) — the kept exps e_j (margin_loss keeps them instead of the
// dots) or exps of the recomputed dots, by the same formula (shifted_exp), so the two agree bit for
// bit. Same precision as a max shift: every e_j is a full-precision normal float.
// ------------------------------------------------------------------------------------------------
constexpr double kShiftGap = 70.0;
constexpr double kShiftMaxScale = 75.0;
constexpr int64_t kShiftMaxColumns = 10'000'000;

template <typename acc_t>
MO_ALWAYS_INLINE acc_t fixed_shift_of(acc_t s) {
  return s - acc_t(kShiftGap);
}

// exp_acc without its range clamps, for arguments known to lie in [−87, 88] (or NaN: NaN in,
// NaN out): the same value bit for bit there, in ~15 vector operations instead of ~20 — the fixed
// shift's forward pass is bound by them.
MO_ALWAYS_INLINE float exp_in_range(float x) { return epi::exp_poly(x); }
MO_ALWAYS_INLINE double exp_in_range(double x) { return epi::exp_acc(x); }

template <typename acc_t>
MO_ALWAYS_INLINE acc_t shifted_exp(acc_t d, acc_t s, acc_t sigma) {
  return exp_in_range(s * d - sigma);
}

// Forward over columns [j0, j1): Σ e_j, e_j also stored to out when kStore.
template <typename acc_t, bool kStore>
MO_ALWAYS_INLINE acc_t exps_range(const acc_t* d, acc_t* out, int64_t j0, int64_t j1, acc_t s,
                                  acc_t sigma) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = j0; j < j1; ++j) {
    const acc_t e = shifted_exp(d[j], s, sigma);
    if constexpr (kStore) out[j] = e;
    sum += e;
  }
  return sum;
}

// Forward, fixed shift: Σ_{j ≠ tl} exp(s·d_j − σ); out (null: not kept) receives those exps, 0 at
// the target column tl. NaN in, NaN out (exp_in_range keeps NaN, the sum keeps it).
template <typename acc_t, bool kStore>
MO_ALWAYS_INLINE acc_t row_exps_as(const acc_t* d, acc_t* out, int64_t nc, int64_t tl, acc_t s,
                                   acc_t sigma) {
  const bool has_t = tl >= 0 && tl < nc;
  acc_t sum = exps_range<acc_t, kStore>(d, out, 0, has_t ? tl : nc, s, sigma);
  if (has_t) {
    if constexpr (kStore) out[tl] = 0;
    sum += exps_range<acc_t, kStore>(d, out, tl + 1, nc, s, sigma);
  }
  return sum;
}

template <typename acc_t>
MO_ALWAYS_INLINE acc_t row_exps_impl(const acc_t* d, acc_t* out, int64_t nc, int64_t tl, acc_t s,
                                     acc_t sigma) {
  return out ? row_exps_as<acc_t, true>(d, out, nc, tl, s, sigma)
             : row_exps_as<acc_t, false>(d, nullptr, nc, tl, s, sigma);
}

// Backward, fixed shift: out[j] = k · e_j with e_j the kept exps (exps_kept) or shifted_exp of the
// recomputed dots; k = grad_lse · s · exp(σ − lse_neg). The caller writes the target column.
template <typename acc_t>
MO_ALWAYS_INLINE void row_dd_shifted_impl(const acc_t* src, acc_t* out, int64_t nc, bool exps_kept,
                                          acc_t s, acc_t sigma, acc_t k) {
  if (exps_kept) {
#pragma omp simd
    for (int64_t j = 0; j < nc; ++j) out[j] = k * src[j];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < nc; ++j) out[j] = k * shifted_exp(src[j], s, sigma);
  }
}

// flatten: every call inside (exp_acc above all) is inlined into each variant's loops, which
// vectorise only then.
#define MO_DEFINE_ROW_KERNELS(T)                                                                 \
  MO_CPU_CLONES MO_FLATTEN T row_logits(T* row, int64_t nc, int64_t tl, T s, T tau, T t,         \
                                        bool hard, T thr, bool filter, const T* bc) {            \
    return row_logits_impl<T>(row, nc, tl, s, tau, t, hard, thr, filter, bc);                    \
  }                                                                                              \
  MO_CPU_CLONES MO_FLATTEN T row_sum_exp(const T* row, int64_t nc, T m) {                        \
    return row_sum_exp_impl<T>(row, nc, m);                                                      \
  }                                                                                              \
  MO_CPU_CLONES MO_FLATTEN T row_dd(const T* d, T* out, int64_t nc, int64_t tl, T s, T tau, T t, \
                                    bool hard, T thr, bool filter, const T* bc, T lse, T gl,     \
                                    T* gbc) {                                                    \
    return row_dd_impl<T>(d, out, nc, tl, s, tau, t, hard, thr, filter, bc, lse, gl, gbc);       \
  }                                                                                              \
  MO_CPU_CLONES MO_FLATTEN T row_exps(const T* d, T* out, int64_t nc, int64_t tl, T s, T sigma) { \
    return row_exps_impl<T>(d, out, nc, tl, s, sigma);                                           \
  }                                                                                              \
  MO_CPU_CLONES MO_FLATTEN void row_dd_shifted(const T* src, T* out, int64_t nc, bool exps_kept, \
                                               T s, T sigma, T k) {                              \
    row_dd_shifted_impl<T>(src, out, nc, exps_kept, s, sigma, k);                                \
  }
MO_DEFINE_ROW_KERNELS(float)
MO_DEFINE_ROW_KERNELS(double)
#undef MO_DEFINE_ROW_KERNELS

}  // namespace cpu
}  // namespace marginops
