// bf16 × bf16 → fp32 GEMM on the CPU's bf16 dot-product units (AVX512-BF16, `vdpbf16ps`).
//
// Why our own: ATen's bf16 matmul (oneDNN) only writes a bf16 result, and the logit tile must stay
// fp32 (a bf16 cosine is off by up to 2^-9, i.e. 0.125 in a logit at s = 64); MKL's
// cblas_gemm_bf16bf16f32 writes fp32 but does not use the bf16 units on every vendor's CPU
// (measured 4× slower than ATen's bf16 matmul on the AMD EPYC this project runs on). The kernel
// below is small because every operand it reads is one this file's caller packs anyway: the
// weight chunk is converted and normalised per chunk, so it is written straight into the layout
// the kernel wants.
//
//   C[M × N] (+)= A[M × K] · Bᵀ,   A: bf16, row-major, K contiguous (lda even, K padded to even
//                                     with zeros);
//                                  B: N × K, stored "pair-packed": Bp[(p·Np + n)·2 + r] = B[n][2p + r]
//                                     (Np = N rounded up to 16, padding zero).
// Each `vdpbf16ps` multiplies 16 columns × one k-pair by the row's broadcast k-pair and adds into
// fp32 (exact bf16 products, fp32 sums: the same arithmetic as oneDNN's bf16 GEMM before its final
// rounding to bf16, which we skip). NaN/inf propagate like any fp32 FMA chain.
//
// Register blocking: MR = 6 rows × NQ = 4 vectors of 16 columns → 24 fp32 accumulators, 4 B loads
// and one broadcast per k-pair. Loops: column blocks outer (a Kp × 64 panel of B stays in L1 while
// every row block passes over it), row blocks inner.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MO_HAVE_BF16_GEMM 1
#include <immintrin.h>
#define MO_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#else
#define MO_HAVE_BF16_GEMM 0
#endif

namespace marginops {
namespace cpu {
namespace bf16 {

using bf16_t = c10::BFloat16;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Whether this CPU has the bf16 dot-product instructions (checked once).
inline bool available() {
#if MO_HAVE_BF16_GEMM
  static const bool ok = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  return ok;
#else
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------
// Packing. Generic (scalar) versions for the features, packed once per call; vectorised
// fp32 → bf16 (`vcvtneps2bf16`, round to nearest even, NaN stays NaN) for what is packed per
// chunk — a scalar conversion per element costs as much as the GEMM at D = 128.
// ---------------------------------------------------------------------------------------------

// B given as N rows of K values (row n at src + n·ld): Bp[(p·Np + n)·2 + r] = src[n·ld + 2p + r].
template <typename T>
void pack_rows(const T* src, int64_t N, int64_t K, int64_t ld, bf16_t* dst) {
  const int64_t Np = round_up(N, 16), P = round_up(K, 2) / 2;
  std::memset(static_cast<void*>(dst), 0, sizeof(bf16_t) * P * Np * 2);
  for (int64_t n = 0; n < N; ++n) {
    const T* s = src + n * ld;
    for (int64_t k = 0; k < K; ++k) dst[((k >> 1) * Np + n) * 2 + (k & 1)] = bf16_t(float(s[k]));
  }
}

// B given transposed, as K rows of N values (row k at src + k·ld): Bp[(p·Np + n)·2 + r] =
// src[(2p + r)·ld + n].
template <typename T>
void pack_cols(const T* src, int64_t N, int64_t K, int64_t ld, bf16_t* dst) {
  const int64_t Np = round_up(N, 16), P = round_up(K, 2) / 2;
  std::memset(static_cast<void*>(dst), 0, sizeof(bf16_t) * P * Np * 2);
  for (int64_t k = 0; k < K; ++k) {
    const T* s = src + k * ld;
    bf16_t* d = dst + (k >> 1) * Np * 2 + (k & 1);
    for (int64_t n = 0; n < N; ++n) d[2 * n] = bf16_t(float(s[n]));
  }
}

// A row-major (M × K, row i at src + i·ld) → bf16 rows of Kp = round_up(K, 2) (zero pad).
template <typename T>
void convert_rows(const T* src, int64_t M, int64_t K, int64_t ld, bf16_t* dst) {
  const int64_t Kp = round_up(K, 2);
  for (int64_t i = 0; i < M; ++i) {
    const T* s = src + i * ld;
    bf16_t* d = dst + i * Kp;
    for (int64_t k = 0; k < K; ++k) d[k] = bf16_t(float(s[k]));
    if (Kp != K) d[K] = bf16_t(0.f);
  }
}

// Blocked transpose of an R × Cn matrix of W-byte words (src row stride lds, dst row stride ldd):
// dst[c·ldd + r] = src[r·lds + c].
template <typename W>
void transpose(const W* src, int64_t R, int64_t Cn, int64_t lds, W* dst, int64_t ldd) {
  constexpr int64_t Bk = 16;
  for (int64_t r0 = 0; r0 < R; r0 += Bk)
    for (int64_t c0 = 0; c0 < Cn; c0 += Bk) {
      const int64_t r1 = std::min(R, r0 + Bk), c1 = std::min(Cn, c0 + Bk);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ldd + r] = src[r * lds + c];
    }
}

#if MO_HAVE_BF16_GEMM
// n floats → n bf16.
MO_BF16_TARGET inline void cvt_row(const float* s, int64_t n, bf16_t* d) {
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + k),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + k)));
  if (k < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - k)) - 1u);
    _mm256_mask_storeu_epi16(d + k, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, s + k)));
  }
}

// Two rows of n floats → n pairs (s0[j], s1[j]) as uint32 words (s1 null: zeros).
// 16 floats (valid lanes m) → 16 bf16 → zero-extended to 16 uint32 words.
MO_BF16_TARGET inline __m512i widen_bf16(__mmask16 m, const float* s) {
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, s));
  return _mm512_maskz_cvtepu16_epi32(0xFFFF, h);
}

MO_BF16_TARGET inline void interleave_rows(const float* s0, const float* s1, int64_t n,
                                           uint32_t* d) {
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = static_cast<__mmask16>(n - k >= 16 ? 0xFFFFu : (1u << (n - k)) - 1u);
    __m512i v = widen_bf16(m, s0 + k);
    if (s1) v = _mm512_or_si512(v, _mm512_maskz_slli_epi32(0xFFFF, widen_bf16(m, s1 + k), 16));
    _mm512_mask_storeu_epi32(d + k, m, v);
  }
}

// 16 × 16 block of 32-bit words, d[c·ldd + r] = s[r·lds + c]: 32-bit then 64-bit interleaves
// give, in 128-bit lane L of u[4i + k], column 4L + k of rows 4i..4i+3; a 4 × 4 transpose of lanes
// (shuffle_i32x4) then gathers each column's 16 rows.
MO_BF16_TARGET inline void transpose16x16(const uint32_t* s, int64_t lds, uint32_t* d,
                                          int64_t ldd) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(s + i * lds);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_maskz_unpacklo_epi32(0xFFFF, r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_maskz_unpackhi_epi32(0xFFFF, r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_maskz_unpacklo_epi64(0xFF, t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_maskz_unpackhi_epi64(0xFF, t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_maskz_unpacklo_epi64(0xFF, t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_maskz_unpackhi_epi64(0xFF, t[4 * i + 1], t[4 * i + 3]);
  }
  for (int k = 0; k < 4; ++k) {
    const __m512i x0 = _mm512_maskz_shuffle_i32x4(0xFFFF, r[k], r[4 + k], 0x44);
    const __m512i x1 = _mm512_maskz_shuffle_i32x4(0xFFFF, r[k], r[4 + k], 0xEE);
    const __m512i y0 = _mm512_maskz_shuffle_i32x4(0xFFFF, r[8 + k], r[12 + k], 0x44);
    const __m512i y1 = _mm512_maskz_shuffle_i32x4(0xFFFF, r[8 + k], r[12 + k], 0xEE);
    _mm512_storeu_si512(d + (0 + k) * ldd, _mm512_maskz_shuffle_i32x4(0xFFFF, x0, y0, 0x88));
    _mm512_storeu_si512(d + (4 + k) * ldd, _mm512_maskz_shuffle_i32x4(0xFFFF, x0, y0, 0xDD));
    _mm512_storeu_si512(d + (8 + k) * ldd, _mm512_maskz_shuffle_i32x4(0xFFFF, x1, y1, 0x88));
    _mm512_storeu_si512(d + (12 + k) * ldd, _mm512_maskz_shuffle_i32x4(0xFFFF, x1, y1, 0xDD));
  }
}
#endif

// transpose() of 32-bit words with whole 16 × 16 blocks in vector registers.
inline void transpose32(const uint32_t* src, int64_t R, int64_t Cn, int64_t lds, uint32_t* dst,
                        int64_t ldd) {
#if MO_HAVE_BF16_GEMM
  const int64_t R16 = R / 16 * 16, C16 = Cn / 16 * 16;
  for (int64_t r0 = 0; r0 < R16; r0 += 16)
    for (int64_t c0 = 0; c0 < C16; c0 += 16)
      transpose16x16(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd);
  if (C16 < Cn) transpose(src + C16, R, Cn - C16, lds, dst + C16 * ldd, ldd);
  if (R16 < R) transpose(src + R16 * lds, R - R16, C16, lds, dst + R16, ldd);
#else
  transpose(src, R, Cn, lds, dst, ldd);
#endif
}

// fp32 → bf16 operands, fast (the bf16 path only runs where MO_HAVE_BF16_GEMM and available()).
// convert_rows_f32: A rows (M × K at stride ld) → bf16 rows of Kp.
inline void convert_rows_f32(const float* src, int64_t M, int64_t K, int64_t ld, bf16_t* dst) {
#if MO_HAVE_BF16_GEMM
  const int64_t Kp = round_up(K, 2);
  for (int64_t i = 0; i < M; ++i) {
    cvt_row(src + i * ld, K, dst + i * Kp);
    if (Kp != K) dst[i * Kp + K] = bf16_t(0.f);
  }
#else
  convert_rows(src, M, K, ld, dst);
#endif
}

// pack_cols_f32: B given as K rows of N floats → pair-packed (consecutive rows interleaved).
inline void pack_cols_f32(const float* src, int64_t N, int64_t K, int64_t ld, bf16_t* dst) {
#if MO_HAVE_BF16_GEMM
  const int64_t Np = round_up(N, 16), P = round_up(K, 2) / 2;
  auto* d32 = reinterpret_cast<uint32_t*>(dst);
  for (int64_t p = 0; p < P; ++p) {
    const float* s0 = src + 2 * p * ld;
    const float* s1 = 2 * p + 1 < K ? s0 + ld : nullptr;
    interleave_rows(s0, s1, N, d32 + p * Np);
    std::fill(d32 + p * Np + N, d32 + (p + 1) * Np, 0u);
  }
#else
  pack_cols(src, N, K, ld, dst);
#endif
}

// pack_rows_f32: B given as N rows of K floats → pair-packed, through `rows` (N × Kp bf16
// scratch): convert the rows, then transpose them as a matrix of 32-bit pairs.
inline void pack_rows_f32(const float* src, int64_t N, int64_t K, int64_t ld, bf16_t* rows,
                          bf16_t* dst) {
  const int64_t Np = round_up(N, 16), P = round_up(K, 2) / 2;
  convert_rows_f32(src, N, K, ld, rows);
  auto* d32 = reinterpret_cast<uint32_t*>(dst);
  transpose32(reinterpret_cast<const uint32_t*>(rows), N, P, P, d32, Np);
  if (Np != N)
    for (int64_t p = 0; p < P; ++p) std::fill(d32 + p * Np + N, d32 + (p + 1) * Np, 0u);
}

// ---------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------
#if MO_HAVE_BF16_GEMM
// One MR × (16·NQ) block of C. A32: the k-pairs of A as uint32, pair (r, p) at A32[r·sr + p·sp]
// (row-major A: sr = lda/2, sp = 1; pair-major A: sr = 1, sp = its row stride); B32: pair-packed,
// at the block's first column; mask[q]: valid columns of vector q.
template <int MR, int NQ>
MO_BF16_TARGET void block(int64_t P, const uint32_t* A32, int64_t sr, int64_t sp, const uint32_t* B32,
                          int64_t Np, float* C, int64_t ldc, const __mmask16* mask, bool acc) {
  __m512 c[MR][NQ];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < NQ; ++q)
      c[r][q] = acc ? _mm512_maskz_loadu_ps(mask[q], C + r * ldc + 16 * q) : _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    __m512i b[NQ];
#pragma GCC unroll 4
    for (int q = 0; q < NQ; ++q) b[q] = _mm512_loadu_si512(B32 + p * Np + 16 * q);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512i a = _mm512_set1_epi32(static_cast<int>(A32[r * sr + p * sp]));
#pragma GCC unroll 4
      for (int q = 0; q < NQ; ++q)
        c[r][q] = _mm512_dpbf16_ps(c[r][q], (__m512bh)a, (__m512bh)b[q]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < NQ; ++q) _mm512_mask_storeu_ps(C + r * ldc + 16 * q, mask[q], c[r][q]);
}

template <int MR>
void block_nq(int nq, int64_t P, const uint32_t* A32, int64_t sr, int64_t sp, const uint32_t* B32,
              int64_t Np, float* C, int64_t ldc, const __mmask16* mask, bool acc) {
  switch (nq) {
    case 4: return block<MR, 4>(P, A32, sr, sp, B32, Np, C, ldc, mask, acc);
    case 3: return block<MR, 3>(P, A32, sr, sp, B32, Np, C, ldc, mask, acc);
    case 2: return block<MR, 2>(P, A32, sr, sp, B32, Np, C, ldc, mask, acc);
    default: return block<MR, 1>(P, A32, sr, sp, B32, Np, C, ldc, mask, acc);
  }
}
#endif

// C[M × N] (fp32, row stride ldc) = A · Bᵀ, or += when accumulate; K = 2·P (zero-padded).
// A: its k-pair (r, p) at A32[r·sr + p·sp] (see gemm / gemm_pair_major); Bp: pair-packed N × K.
inline void gemm_strided(int64_t M, int64_t N, int64_t P, const bf16_t* A, int64_t sr, int64_t sp,
                         const bf16_t* Bp, float* C, int64_t ldc, bool accumulate) {
#if MO_HAVE_BF16_GEMM
  constexpr int MR = 6, NQ = 4;
  const int64_t Np = round_up(N, 16);
  const auto* A32 = reinterpret_cast<const uint32_t*>(A);
  const auto* B32 = reinterpret_cast<const uint32_t*>(Bp);
  for (int64_t n0 = 0; n0 < N; n0 += 16 * NQ) {
    const int64_t ncols = std::min<int64_t>(16 * NQ, N - n0);
    const int nq = static_cast<int>((ncols + 15) / 16);
    __mmask16 mask[NQ];
    for (int q = 0; q < NQ; ++q) {
      const int64_t v = std::clamp<int64_t>(ncols - 16 * q, 0, 16);
      mask[q] = static_cast<__mmask16>(v == 16 ? 0xFFFF : ((1u << v) - 1u));
    }
    for (int64_t i0 = 0; i0 < M; i0 += MR) {
      const uint32_t* a = A32 + i0 * sr;
      const uint32_t* b = B32 + n0;
      float* c = C + i0 * ldc + n0;
      switch (std::min<int64_t>(MR, M - i0)) {
        case 6: block_nq<6>(nq, P, a, sr, sp, b, Np, c, ldc, mask, accumulate); break;
        case 5: block_nq<5>(nq, P, a, sr, sp, b, Np, c, ldc, mask, accumulate); break;
        case 4: block_nq<4>(nq, P, a, sr, sp, b, Np, c, ldc, mask, accumulate); break;
        case 3: block_nq<3>(nq, P, a, sr, sp, b, Np, c, ldc, mask, accumulate); break;
        case 2: block_nq<2>(nq, P, a, sr, sp, b, Np, c, ldc, mask, accumulate); break;
        default: block_nq<1>(nq, P, a, sr, sp, b, Np, c, ldc, mask, accumulate); break;
      }
    }
  }
#else
  (void)M, (void)N, (void)P, (void)A, (void)sr, (void)sp, (void)Bp, (void)C, (void)ldc;
  (void)accumulate;
#endif
}

// A: M rows of bf16 at stride lda (even).
inline void gemm(int64_t M, int64_t N, int64_t P, const bf16_t* A, int64_t lda, const bf16_t* Bp,
                 float* C, int64_t ldc, bool accumulate) {
  gemm_strided(M, N, P, A, lda / 2, 1, Bp, C, ldc, accumulate);
}

// A pair-major: pair p of row r at A32[p·ldp + r], i.e. A given as Aᵀ pair-packed by pack_cols
// (ldp = round_up(M, 16)); saves transposing A when it is the transpose of a row-major tile.
inline void gemm_pair_major(int64_t M, int64_t N, int64_t P, const bf16_t* A, int64_t ldp,
                            const bf16_t* Bp, float* C, int64_t ldc, bool accumulate) {
  gemm_strided(M, N, P, A, 1, ldp, Bp, C, ldc, accumulate);
}

}  // namespace bf16
}  // namespace cpu
}  // namespace marginops
