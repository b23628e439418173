// The CPU kernels' GEMMs on the AVX-512 units, fp32 sums into an fp32 C:
//   fp32  C (+)= A · B   fp32 operands, `vfmadd231ps`                      (gemm_f32)
//   bf16  C (+)= A · Bᵀ  bf16 operands in k-pairs, `vdpbf16ps` (AVX512-BF16) (gemm_bf16*)
//
// Why our own. fp32: ATen's fp32 matmul is MKL's sgemm, which runs at ~100 GFLOP/s on one core of
// the AMD EPYC (Zen 5) this project runs on — MKL takes a 256-bit code path on AMD — while this
// kernel (and oneDNN) reach ~245 (measured, one thread, the chunk shapes of margin_lse). bf16:
// ATen's bf16 matmul (oneDNN) only writes a bf16 result, and the logit tile must stay fp32 (a bf16
// cosine is off by up to 2^-9, i.e. 0.125 in a logit at s = 64); MKL's cblas_gemm_bf16bf16f32
// writes fp32 but does not use the bf16 units on every vendor's CPU (measured 4× slower than
// ATen's bf16 matmul here). The kernel is small because its callers lay the operands out for it:
// the weight chunk is converted and normalised per chunk anyway.
//
// One kernel, two element types: K is counted in "words" — one float, or one pair of bf16 — and a
// multiply-add policy (F32, BF16) says what a word is and how a broadcast word of A meets a vector
// of 16 words of B:
//   A  M × K words, word (r, k) at A[r·sr + k·sk] (row-major: sr = lda, sk = 1; given as Aᵀ
//      row-major: sr = 1, sk = its row stride — the backward's DDᵀ is read in place);
//   B  K × N words, row k at B + k·ldb (N contiguous; loads are masked, so N needs no padding).
//      bf16 "pair-packed": word (p, n) = (B[2p][n], B[2p+1][n]) of the K × N matrix.
// `vdpbf16ps` adds exact bf16 products into fp32 (the arithmetic of oneDNN's bf16 GEMM before its
// final rounding to bf16, which we skip); `vfmadd231ps` is one rounding per product. Sums run
// over k in order. NaN/inf propagate like any fp32 FMA chain.
//
// Register blocking: MR = 6 rows × NQ = 4 vectors of 16 columns → 24 fp32 accumulators, 4 B loads
// and one broadcast per word of k. Loops: 64-column panels outer; k in slices of KC = 128 words (a
// 32 KiB slice of B stays in L1 while every row block passes over it); row blocks inner.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MO_HAVE_AVX512_GEMM 1
#include <immintrin.h>
#define MO_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define MO_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))
#else
#define MO_HAVE_AVX512_GEMM 0
#endif

namespace marginops {
namespace cpu {
namespace simd {

using bf16_t = c10::BFloat16;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Whether this CPU has AVX-512 (F, BW, VL: the fp32 kernel) — checked once.
inline bool f32_available() {
#if MO_HAVE_AVX512_GEMM
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
#else
  return false;
#endif
}

// Whether this CPU has the bf16 dot-product instructions (checked once).
inline bool bf16_available() {
#if MO_HAVE_AVX512_GEMM
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

#if MO_HAVE_AVX512_GEMM
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

// 16 values (valid lanes m) → 16 bf16 (floats rounded to nearest even) → zero-extended to 16
// uint32 words.
MO_BF16_TARGET inline __m512i widen_bf16(__mmask16 m, const float* s) {
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, s));
  return _mm512_maskz_cvtepu16_epi32(0xFFFF, h);
}
MO_BF16_TARGET inline __m512i widen_bf16(__mmask16 m, const bf16_t* s) {
  return _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_maskz_loadu_epi16(m, s));
}

// Two rows of n floats or bf16 → n bf16 pairs (s0[j], s1[j]) as uint32 words (s1 null: zeros).
template <typename T>
MO_BF16_TARGET inline void interleave_rows(const T* s0, const T* s1, int64_t n, uint32_t* d) {
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
// transpose16x16_store: the block given as 16 row registers; output row k (k < rows) stored at
// d + k·ldd.
MO_BF16_TARGET inline void transpose16x16_store(__m512i* r, uint32_t* d, int64_t ldd, int rows) {
  __m512i t[16];
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
    const __m512i out[4] = {_mm512_maskz_shuffle_i32x4(0xFFFF, x0, y0, 0x88),
                            _mm512_maskz_shuffle_i32x4(0xFFFF, x0, y0, 0xDD),
                            _mm512_maskz_shuffle_i32x4(0xFFFF, x1, y1, 0x88),
                            _mm512_maskz_shuffle_i32x4(0xFFFF, x1, y1, 0xDD)};
    for (int q = 0; q < 4; ++q)
      if (4 * q + k < rows) _mm512_storeu_si512(d + (4 * q + k) * ldd, out[q]);
  }
}
MO_BF16_TARGET inline void transpose16x16(const uint32_t* s, int64_t lds, uint32_t* d,
                                          int64_t ldd) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(s + i * lds);
  transpose16x16_store(r, d, ldd, 16);
}
#endif

// transpose() of 32-bit words with whole 16 × 16 blocks in vector registers.
inline void transpose32(const uint32_t* src, int64_t R, int64_t Cn, int64_t lds, uint32_t* dst,
                        int64_t ldd) {
#if MO_HAVE_AVX512_GEMM
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

// fp32 → bf16 operands, fast (the bf16 path only runs where bf16_available()).
// convert_rows_f32: A rows (M × K at stride ld) → bf16 rows of Kp.
inline void convert_rows_f32(const float* src, int64_t M, int64_t K, int64_t ld, bf16_t* dst) {
#if MO_HAVE_AVX512_GEMM
  const int64_t Kp = round_up(K, 2);
  for (int64_t i = 0; i < M; ++i) {
    cvt_row(src + i * ld, K, dst + i * Kp);
    if (Kp != K) dst[i * Kp + K] = bf16_t(0.f);
  }
#else
  convert_rows(src, M, K, ld, dst);
#endif
}

// pack_cols_fast: B given as K rows of N floats or bf16 (row r at src + r·ld) → pair-packed
// (consecutive rows interleaved).
template <typename T>
inline void pack_cols_fast(const T* src, int64_t N, int64_t K, int64_t ld, bf16_t* dst) {
#if MO_HAVE_AVX512_GEMM
  const int64_t Np = round_up(N, 16), P = round_up(K, 2) / 2;
  auto* d32 = reinterpret_cast<uint32_t*>(dst);
  for (int64_t p = 0; p < P; ++p) {
    const T* s0 = src + 2 * p * ld;
    const T* s1 = 2 * p + 1 < K ? s0 + ld : nullptr;
    interleave_rows(s0, s1, N, d32 + p * Np);
    std::fill(d32 + p * Np + N, d32 + (p + 1) * Np, 0u);
  }
#else
  pack_cols(src, N, K, ld, dst);
#endif
}

// pack_bf16_rows: B given as N bf16 rows of Kp = round_up(K, 2) (zero pad) → pair-packed: the
// rows transposed as a matrix of 32-bit pairs.
inline void pack_bf16_rows(const bf16_t* rows, int64_t N, int64_t K, bf16_t* dst) {
  const int64_t Np = round_up(N, 16), P = round_up(K, 2) / 2;
  auto* d32 = reinterpret_cast<uint32_t*>(dst);
  transpose32(reinterpret_cast<const uint32_t*>(rows), N, P, P, d32, Np);
  if (Np != N)
    for (int64_t p = 0; p < P; ++p) std::fill(d32 + p * Np + N, d32 + (p + 1) * Np, 0u);
}

// pack_rows_f32: B given as N rows of K floats → pair-packed, through `rows` (N × Kp bf16
// scratch): convert the rows, then pack_bf16_rows.
inline void pack_rows_f32(const float* src, int64_t N, int64_t K, int64_t ld, bf16_t* rows,
                          bf16_t* dst) {
  convert_rows_f32(src, N, K, ld, rows);
  pack_bf16_rows(rows, N, K, dst);
}

// ---------------------------------------------------------------------------------------------
// The kernel, shared by both element types through a multiply-add policy (Op):
//   F32   one float per word:          c += broadcast(a) · b           (vfmadd231ps)
//   BF16  one pair of bf16 per word:   c += Σ_pair broadcast(a) · b    (vdpbf16ps, exact products)
// ---------------------------------------------------------------------------------------------
#if MO_HAVE_AVX512_GEMM
struct F32 {
  using word = float;
  MO_AVX512_TARGET static inline __m512 bcast(const word* a) { return _mm512_set1_ps(*a); }
  MO_AVX512_TARGET static inline __m512 load(__mmask16 m, const word* b) {
    return _mm512_maskz_loadu_ps(m, b);
  }
  MO_AVX512_TARGET static inline __m512 madd(__m512 c, __m512 a, __m512 b) {
    return _mm512_fmadd_ps(a, b, c);
  }
};
struct BF16 {
  using word = uint32_t;
  MO_BF16_TARGET static inline __m512 bcast(const word* a) {
    return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(*a)));
  }
  MO_BF16_TARGET static inline __m512 load(__mmask16 m, const word* b) {
    return _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(m, b));
  }
  MO_BF16_TARGET static inline __m512 madd(__m512 c, __m512 a, __m512 b) {
    return _mm512_dpbf16_ps(c, (__m512bh)a, (__m512bh)b);
  }
};

// Both policies' instantiations carry the bf16 target (BF16's intrinsics must inline); the F32
// one contains only AVX-512F/BW/VL instructions, so it runs wherever f32_available().
// One MR × (16·NQ) block of C over kw words of k: word (r, k) of A at A[r·sr + k·sk], row k of B
// at B + k·ldb (the block's first column); mask[q]: valid columns of vector q.
template <class Op, int MR, int NQ>
MO_BF16_TARGET void block(int64_t kw, const typename Op::word* A, int64_t sr, int64_t sk,
                          const typename Op::word* B, int64_t ldb, float* C, int64_t ldc,
                          const __mmask16* mask, bool acc) {
  __m512 c[MR][NQ];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < NQ; ++q)
      c[r][q] = acc ? _mm512_maskz_loadu_ps(mask[q], C + r * ldc + 16 * q) : _mm512_setzero_ps();
  for (int64_t k = 0; k < kw; ++k) {
    __m512 b[NQ];
#pragma GCC unroll 4
    for (int q = 0; q < NQ; ++q) b[q] = Op::load(mask[q], B + k * ldb + 16 * q);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = Op::bcast(A + r * sr + k * sk);
#pragma GCC unroll 4
      for (int q = 0; q < NQ; ++q) c[r][q] = Op::madd(c[r][q], a, b[q]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < NQ; ++q) _mm512_mask_storeu_ps(C + r * ldc + 16 * q, mask[q], c[r][q]);
}

template <class Op, int MR>
void block_nq(int nq, int64_t kw, const typename Op::word* A, int64_t sr, int64_t sk,
              const typename Op::word* B, int64_t ldb, float* C, int64_t ldc,
              const __mmask16* mask, bool acc) {
  switch (nq) {
    case 4: return block<Op, MR, 4>(kw, A, sr, sk, B, ldb, C, ldc, mask, acc);
    case 3: return block<Op, MR, 3>(kw, A, sr, sk, B, ldb, C, ldc, mask, acc);
    case 2: return block<Op, MR, 2>(kw, A, sr, sk, B, ldb, C, ldc, mask, acc);
    default: return block<Op, MR, 1>(kw, A, sr, sk, B, ldb, C, ldc, mask, acc);
  }
}

// C[M × N] (fp32, row stride ldc) = A · B, or += when accumulate; K = kw words.
// Loops: 64-column panels outer; inside, k in slices of KC words (a KC × 64 slice of B, 32 KiB,
// stays in L1 while every row block passes over it); row blocks of MR innermost.
template <class Op>
void gemm_words(int64_t M, int64_t N, int64_t kw, const typename Op::word* A, int64_t sr,
                int64_t sk, const typename Op::word* B, int64_t ldb, float* C, int64_t ldc,
                bool accumulate) {
  constexpr int MR = 6, NQ = 4;
  constexpr int64_t KC = 128;
  if (kw == 0) {  // an empty sum: C = 0 (or unchanged)
    for (int64_t i = 0; i < M && !accumulate; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  for (int64_t n0 = 0; n0 < N; n0 += 16 * NQ) {
    const int64_t ncols = std::min<int64_t>(16 * NQ, N - n0);
    const int nq = static_cast<int>((ncols + 15) / 16);
    __mmask16 mask[NQ];
    for (int q = 0; q < NQ; ++q) {
      const int64_t v = std::clamp<int64_t>(ncols - 16 * q, 0, 16);
      mask[q] = static_cast<__mmask16>(v == 16 ? 0xFFFF : ((1u << v) - 1u));
    }
    for (int64_t k0 = 0; k0 < kw; k0 += KC) {
      const int64_t kc = std::min(KC, kw - k0);
      const bool acc = accumulate || k0 > 0;
      for (int64_t i0 = 0; i0 < M; i0 += MR) {
        const auto* a = A + i0 * sr + k0 * sk;
        const auto* b = B + k0 * ldb + n0;
        float* c = C + i0 * ldc + n0;
        switch (std::min<int64_t>(MR, M - i0)) {
          case 6: block_nq<Op, 6>(nq, kc, a, sr, sk, b, ldb, c, ldc, mask, acc); break;
          case 5: block_nq<Op, 5>(nq, kc, a, sr, sk, b, ldb, c, ldc, mask, acc); break;
          case 4: block_nq<Op, 4>(nq, kc, a, sr, sk, b, ldb, c, ldc, mask, acc); break;
          case 3: block_nq<Op, 3>(nq, kc, a, sr, sk, b, ldb, c, ldc, mask, acc); break;
          case 2: block_nq<Op, 2>(nq, kc, a, sr, sk, b, ldb, c, ldc, mask, acc); break;
          default: block_nq<Op, 1>(nq, kc, a, sr, sk, b, ldb, c, ldc, mask, acc); break;
        }
      }
    }
  }
}
#endif

// fp32: C[M × N] (+)= A · B over K; A's element (r, k) at A[r·sr + k·sk] (row-major A: sr = lda,
// sk = 1; Aᵀ given row-major: sr = 1, sk = its row stride); B: K rows of N floats at stride ldb.
// Only called where f32_available().
inline void gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t sr, int64_t sk,
                     const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
#if MO_HAVE_AVX512_GEMM
  gemm_words<F32>(M, N, K, A, sr, sk, B, ldb, C, ldc, accumulate);
#else
  (void)M, (void)N, (void)K, (void)A, (void)sr, (void)sk, (void)B, (void)ldb, (void)C, (void)ldc;
  (void)accumulate;
#endif
}

// bf16: C[M × N] (+)= A · Bᵀ over K = 2·P (zero-padded); A's k-pair (r, p) at A32[r·sr + p·sp]
// (see gemm / gemm_pair_major); Bp: pair-packed N × K (Np = round_up(N, 16)).
inline void gemm_bf16_strided(int64_t M, int64_t N, int64_t P, const bf16_t* A, int64_t sr,
                              int64_t sp, const bf16_t* Bp, float* C, int64_t ldc,
                              bool accumulate) {
#if MO_HAVE_AVX512_GEMM
  gemm_words<BF16>(M, N, P, reinterpret_cast<const uint32_t*>(A), sr, sp,
                   reinterpret_cast<const uint32_t*>(Bp), round_up(N, 16), C, ldc, accumulate);
#else
  (void)M, (void)N, (void)P, (void)A, (void)sr, (void)sp, (void)Bp, (void)C, (void)ldc;
  (void)accumulate;
#endif
}

// A: M rows of bf16 at stride lda (even).
inline void gemm_bf16(int64_t M, int64_t N, int64_t P, const bf16_t* A, int64_t lda,
                      const bf16_t* Bp, float* C, int64_t ldc, bool accumulate) {
  gemm_bf16_strided(M, N, P, A, lda / 2, 1, Bp, C, ldc, accumulate);
}

// A pair-major: pair p of row r at A32[p·ldp + r], i.e. A given as Aᵀ pair-packed by pack_cols
// (ldp = round_up(M, 16)); saves transposing A when it is the transpose of a row-major tile.
inline void gemm_bf16_pair_major(int64_t M, int64_t N, int64_t P, const bf16_t* A, int64_t ldp,
                                 const bf16_t* Bp, float* C, int64_t ldc, bool accumulate) {
  gemm_bf16_strided(M, N, P, A, 1, ldp, Bp, C, ldc, accumulate);
}

}  // namespace simd
}  // namespace cpu
}  // namespace marginops
