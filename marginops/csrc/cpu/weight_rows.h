// The AVX-512 loops over weight rows of the CPU kernels (tiles.h): squared norms, rows scaled by
// 1/‖w‖ and rounded to bf16 (as rows, as pairs of rows — the dF GEMM's operand — or as 16-row
// blocks packed for the logits GEMM), the fixed-shift backward's DD pairs, and the normalisation
// Jacobian of a row. Each has a scalar fallback for weight types the vector loads do not read
// (fp16) and for builds without AVX-512; the bf16 paths only run where bf16_available().
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "gemm.h"

namespace marginops {
namespace cpu {
namespace simd {

#if MO_HAVE_AVX512_GEMM
// Masked loads and stores of 16 weights (fp32 or bf16) as fp32 lanes.
MO_BF16_TARGET inline __m512 load_w(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
MO_BF16_TARGET inline __m512 load_w(__mmask16 m, const bf16_t* p) {
  const __m512i h = _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, h, 16));
}
MO_BF16_TARGET inline void store_w(__mmask16 m, float* p, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
MO_BF16_TARGET inline void store_w(__mmask16 m, bf16_t* p, __m512 v) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

// Σ float(s)² over n weights (fp32 or bf16), 16 lanes at a time.
template <typename W>
MO_BF16_TARGET inline float sum_squares(const W* s, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = static_cast<__mmask16>(n - k >= 16 ? 0xFFFFu : (1u << (n - k)) - 1u);
    const __m512 x = load_w(m, s + k);
    acc = _mm512_fmadd_ps(x, x, acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// n weights (fp32 or bf16) times iv → n bf16: bf16(float(s)·iv), one rounding of the fp32 product
// (what load_row, scale_row and cvt_row give, without the fp32 row in between).
template <typename W>
MO_BF16_TARGET inline void cvt_row_scaled(const W* s, int64_t n, float iv, bf16_t* d) {
  const __m512 v = _mm512_set1_ps(iv);
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = static_cast<__mmask16>(n - k >= 16 ? 0xFFFFu : (1u << (n - k)) - 1u);
    const __m512 x = _mm512_mul_ps(load_w(m, s + k), v);
    _mm256_mask_storeu_epi16(d + k, m, (__m256i)_mm512_cvtneps_pbh(x));
  }
}

// Up to 16 weight rows (src[t], t < g; the others zero) times iv[t], rounded to bf16 (one rounding
// of the fp32 product, as cvt_row_scaled) and written pair-packed: word p (elements 2p, 2p + 1) of
// row t at d[p·ldd + t], p < ⌈D/2⌉ — the logits GEMM's B operand for 16 columns, as
// pack_bf16_rows gives it, in one pass over the rows with no bf16 rows between.
template <typename W>
MO_BF16_TARGET void pack_rows_scaled_avx512(const W* const* src, const float* iv, int g,
                                            int64_t D, uint32_t* d, int64_t ldd) {
  const int64_t P = (D + 1) / 2;
  for (int64_t p0 = 0; p0 < P; p0 += 16) {
    const int64_t e0 = 2 * p0, n0 = std::min<int64_t>(16, D - e0);
    const int64_t n1 = std::clamp<int64_t>(D - e0 - 16, 0, 16);
    const __mmask16 m0 = static_cast<__mmask16>(n0 == 16 ? 0xFFFFu : (1u << n0) - 1u);
    const __mmask16 m1 = static_cast<__mmask16>(n1 == 16 ? 0xFFFFu : (1u << n1) - 1u);
    __m512i r[16];
    for (int t = 0; t < 16; ++t) {
      if (t >= g) {
        r[t] = _mm512_setzero_si512();
        continue;
      }
      const __m512 v = _mm512_set1_ps(iv[t]);
      const __m512 lo = _mm512_mul_ps(load_w(m0, src[t] + e0), v);
      const __m512 hi = _mm512_mul_ps(load_w(m1, src[t] + e0 + 16), v);
      r[t] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
    }
    transpose16x16_store(r, d + p0 * ldd, ldd, static_cast<int>(std::min<int64_t>(16, P - p0)));
  }
}

// scale_pair_bf16 (below) on the AVX512-BF16 units.
template <typename T>
MO_BF16_TARGET inline void scale_pair_bf16_avx512(const T* s0, const T* s1, float k0, float k1,
                                                  int64_t n, bf16_t* d0, bf16_t* d1,
                                                  uint32_t* pair) {
  const __m512 v0 = _mm512_set1_ps(k0), v1 = _mm512_set1_ps(k1);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = static_cast<__mmask16>(n - j >= 16 ? 0xFFFFu : (1u << (n - j)) - 1u);
    const __m256i h0 = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(load_w(m, s0 + j), v0));
    if (d0) _mm256_mask_storeu_epi16(d0 + j, m, h0);
    __m512i w = _mm512_maskz_cvtepu16_epi32(0xFFFF, h0);
    if (s1) {
      const __m256i h1 = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(load_w(m, s1 + j), v1));
      if (d1) _mm256_mask_storeu_epi16(d1 + j, m, h1);
      w = _mm512_or_si512(
          w, _mm512_maskz_slli_epi32(0xFFFF, _mm512_maskz_cvtepu16_epi32(0xFFFF, h1), 16));
    }
    _mm512_mask_storeu_epi32(pair + j, m, w);
  }
}

// The weight-normalisation Jacobian of one weight row (D values), 16 lanes at a time:
//   proj = ŵ·g if projects else 0;   dst (+)= W((g − ŵ·proj)·iv)
// with ŵ stored (what: the arithmetic of epi::normalize_backward, one FMA and one multiply), or
// left implicit (what null: ŵ = src·iv, so dst (+)= W(g·iv − src·(iv²·proj)), proj = iv·(src·g);
// the same math, rounded in another order). One call per row instead of dot_row + grad_row (two
// clone-dispatched calls and a scalar bf16 rounding per element). bf16 stores round to nearest
// even (`vcvtneps2bf16`, NaN stays NaN).
template <typename W>
MO_BF16_TARGET void jacobian_row(const float* g, const float* what, const W* src, bool projects,
                                 float iv, W* dst, int64_t D, bool accumulate) {
  const __m512 vi = _mm512_set1_ps(iv);
  if (!what) {
    // ŵ = src·iv left implicit: proj = iv·(src·g), dst (+)= g·iv − src·(iv²·proj). The dot in
    // four independent sums (no 4-cycle FMA chain per 16 lanes of the row).
    float dot = 0.f;
    if (projects) {
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                       _mm512_setzero_ps()};
      int64_t e = 0;
      for (; e + 64 <= D; e += 64)
        for (int q = 0; q < 4; ++q)
          acc[q] = _mm512_fmadd_ps(load_w(0xFFFF, src + e + 16 * q),
                                   _mm512_loadu_ps(g + e + 16 * q), acc[q]);
      for (; e < D; e += 16) {
        const __mmask16 m = static_cast<__mmask16>(D - e >= 16 ? 0xFFFFu : (1u << (D - e)) - 1u);
        acc[0] = _mm512_fmadd_ps(load_w(m, src + e), _mm512_maskz_loadu_ps(m, g + e), acc[0]);
      }
      dot = _mm512_reduce_add_ps(
          _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
    }
    const __m512 vc = _mm512_set1_ps(iv * iv * (iv * dot));
    for (int64_t e = 0; e < D; e += 16) {
      const __mmask16 m = static_cast<__mmask16>(D - e >= 16 ? 0xFFFFu : (1u << (D - e)) - 1u);
      __m512 v = _mm512_fnmadd_ps(load_w(m, src + e), vc,
                                  _mm512_mul_ps(_mm512_maskz_loadu_ps(m, g + e), vi));
      if (accumulate) v = _mm512_add_ps(load_w(m, dst + e), v);
      store_w(m, dst + e, v);
    }
    return;
  }
  float proj = 0.f;
  if (projects) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t e = 0; e < D; e += 16) {
      const __mmask16 m = static_cast<__mmask16>(D - e >= 16 ? 0xFFFFu : (1u << (D - e)) - 1u);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, what + e), _mm512_maskz_loadu_ps(m, g + e),
                            acc);
    }
    proj = _mm512_reduce_add_ps(acc);
  }
  const __m512 vp = _mm512_set1_ps(proj);
  for (int64_t e = 0; e < D; e += 16) {
    const __mmask16 m = static_cast<__mmask16>(D - e >= 16 ? 0xFFFFu : (1u << (D - e)) - 1u);
    __m512 v = _mm512_mul_ps(
        _mm512_fnmadd_ps(_mm512_maskz_loadu_ps(m, what + e), vp, _mm512_maskz_loadu_ps(m, g + e)),
        vi);
    if (accumulate) v = _mm512_add_ps(load_w(m, dst + e), v);
    store_w(m, dst + e, v);
  }
}
#endif

// Σ float(s)² of a weight row (the bf16 path's load; fp16 weights take the scalar loop).
template <typename W>
inline float row_sum_squares(const W* s, int64_t n) {
#if MO_HAVE_AVX512_GEMM
  if constexpr (std::is_same_v<W, float> || std::is_same_v<W, bf16_t>) return sum_squares(s, n);
#endif
  float ss = 0.f;
  for (int64_t k = 0; k < n; ++k) ss += float(s[k]) * float(s[k]);
  return ss;
}

// n weights times iv → n bf16, bf16(float(s)·iv) (the bf16 path only runs where
// bf16_available(); fp16 weights, which load_w does not read, take the scalar loop).
template <typename W>
inline void scale_to_bf16(const W* s, int64_t n, float iv, bf16_t* d) {
#if MO_HAVE_AVX512_GEMM
  if constexpr (std::is_same_v<W, float> || std::is_same_v<W, bf16_t>) return cvt_row_scaled(s, n, iv, d);
#endif
  for (int64_t k = 0; k < n; ++k) d[k] = bf16_t(float(s[k]) * iv);
}

// Two rows of n values (float, or bf16 weights) times k0, k1 → bf16 (one rounding of the fp32
// product), written as n pairs (row 0, row 1) in `pair` — the layout pack_cols_fast gives — and,
// when d0 / d1 are given, as rows too; s1 null: a zero second row. Uses: the fixed-shift
// backward's DD from kept exps, and weight rows normalised straight into the dF GEMM's operand
// (tiles.h). Other weight types (fp16) take the scalar loop.
template <typename T>
inline void scale_pair_bf16(const T* s0, const T* s1, float k0, float k1, int64_t n, bf16_t* d0,
                            bf16_t* d1, bf16_t* pair) {
#if MO_HAVE_AVX512_GEMM
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, bf16_t>)
    return scale_pair_bf16_avx512(s0, s1, k0, k1, n, d0, d1, reinterpret_cast<uint32_t*>(pair));
#endif
  for (int64_t j = 0; j < n; ++j) {
    pair[2 * j] = bf16_t(float(s0[j]) * k0);
    pair[2 * j + 1] = s1 ? bf16_t(float(s1[j]) * k1) : bf16_t(0.f);
    if (d0) d0[j] = pair[2 * j];
    if (d1 && s1) d1[j] = pair[2 * j + 1];
  }
}

// Whether pack_rows_scaled packs weights of type W: fp32 and bf16 on AVX-512 builds. The others
// (fp16) go through bf16 rows and pack_bf16_rows.
template <typename W>
constexpr bool packs_rows_scaled() {
  return MO_HAVE_AVX512_GEMM && (std::is_same_v<W, float> || std::is_same_v<W, bf16_t>);
}

// pack_rows_scaled_avx512 (above), for the weight types packs_rows_scaled<W>() accepts.
template <typename W>
inline void pack_rows_scaled(const W* const* src, const float* iv, int g, int64_t D, uint32_t* d,
                             int64_t ldd) {
  static_assert(packs_rows_scaled<W>(), "pack_rows_scaled: fp32 or bf16 weights, AVX-512 builds");
#if MO_HAVE_AVX512_GEMM
  pack_rows_scaled_avx512(src, iv, g, D, d, ldd);
#endif
}

}  // namespace simd
}  // namespace cpu
}  // namespace marginops
