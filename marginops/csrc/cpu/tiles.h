// Building blocks of the CPU kernels (csrc/cpu/margin_lse.cpp, the only file that includes this
// one: the clone-dispatched row functions below are defined here, not just declared):
//   Problem      the op's inputs as raw pointers;  pick_chunk / group_range  chunking and threads
//   load_chunk   a chunk of weight rows → acc dtype, normalised (+ norms, bias)
//   (row_kernels.h: the epilogue loops — logits + max, Σexp, softmax gradient)
//   GemmPlan, Workspace  a thread's buffers and the chunk GEMMs (fp32 on our AVX-512 kernel, bf16
//                on the AVX512-BF16 units — csrc/cpu/gemm.h — or ATen's: fp64, older CPUs); the
//                loops over weight rows (norms, bf16 packing, Jacobian): csrc/cpu/weight_rows.h
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "epilogue.h"
#include "gemm.h"
#include "weight_rows.h"
#include "row_kernels.h"
#include "scratch.h"

namespace marginops {
namespace cpu {

using at::Tensor;
namespace epi = marginops::epi;

// ------------------------------------------------------------------------------------------------
// Problem description shared by the three ops
// ------------------------------------------------------------------------------------------------

template <typename acc_t>
struct Problem {
  int64_t B = 0, D = 0, K = 1, N = 0;   // rows, embedding dim, sub-centers, iterated columns
  const acc_t* F = nullptr;              // B × D features in acc dtype
  const int64_t* class_index = nullptr;  // N class ids, or null: column n is class n
  const int64_t* target = nullptr;       // B target columns (−1: none)
  const acc_t* scale = nullptr;          // B
  const acc_t* bias = nullptr;           // C_local (by class) or null
  const acc_t* tau = nullptr;            // B or null
  acc_t t = 0;                           // CurricularFace t
  bool hard = false;
  acc_t thr = 0;                         // interclass filtering threshold (filter: thr > 0)
  bool filter = false;
  bool normalize = true;
  bool fixed_shift = false;              // row_kernels.h: set where fixed_shift_allowed says so

  int64_t class_of(int64_t n) const { return class_index ? class_index[n] : n; }
};

// Whether the logits are bounded as the fixed shift needs (row_kernels.h): normalised rows, no
// bias, no sub-centres, no modulation or filtering, 0 < s <= kShiftMaxScale on every row, at most
// kShiftMaxColumns columns. The ∂scale output is not computed under it (its callers take a float
// scale).
template <typename acc_t>
bool fixed_shift_allowed(const Problem<acc_t>& P) {
  if (!P.normalize || P.K != 1 || P.hard || P.filter || P.bias || P.N > kShiftMaxColumns)
    return false;
  for (int64_t i = 0; i < P.B; ++i)
    if (!(P.scale[i] > acc_t(0) && P.scale[i] <= acc_t(kShiftMaxScale))) return false;  // NaN too
  return true;
}

// Columns per chunk. The B × nc·K tile should stay in the per-core L2 cache while the epilogue
// runs over it, yet be large enough for an efficient GEMM. MARGINOPS_CPU_TILE_KB overrides the
// tile budget (a benchmarking knob, not a behaviour switch: results do not depend on it beyond
// rounding).
inline int64_t pick_chunk(int64_t B, int64_t K, int64_t N, int64_t acc_size, int64_t nthreads) {
  int64_t budget = 1024 * 1024;  // bytes of tile
  if (const char* env = std::getenv("MARGINOPS_CPU_TILE_KB")) {
    int64_t kb = std::atoll(env);
    if (kb > 0) budget = kb * 1024;
  }
  int64_t nc = budget / std::max<int64_t>(1, B * K * acc_size);
  nc = std::clamp<int64_t>(nc / 16 * 16, 16, 2048);
  // A whole number of chunks per thread, all about the same width: with 2 threads, 5 chunks of
  // 2048 columns would leave one thread 3 chunks and the other 2 (B = 64, C = 10K).
  const int64_t T = std::max<int64_t>(1, nthreads);
  int64_t nchunks = (std::max<int64_t>(N, 1) + nc - 1) / nc;
  nchunks = (nchunks + T - 1) / T * T;
  nc = simd::round_up((N + nchunks - 1) / nchunks, 16);
  return std::max<int64_t>(1, std::min(nc, std::max<int64_t>(N, 1)));
}

// Contiguous range of chunks owned by group g of ngroups.
inline void group_range(int64_t g, int64_t ngroups, int64_t nchunks, int64_t* c0, int64_t* c1) {
  *c0 = nchunks * g / ngroups;
  *c1 = nchunks * (g + 1) / ngroups;
}

// Per weight row (D values), the loops of the load and of the normalisation Jacobian, one overload
// per (acc, weight) dtype pair so that each gets its clones:
//   load_row: dst = float(src), returns Σ dst² (or 0 when !norms);  scale_row: dst *= iv
//   dot_row: Σ a·b;  grad_row: dst (+)= w_t((g − ŵ·proj)·iv)
#define MO_DEFINE_WEIGHT_ROWS(A, W)                                                              \
  MO_CPU_CLONES A load_row(const W* src, A* dst, int64_t D, bool norms) {                        \
    A ss = 0;                                                                                    \
    if (norms) {                                                                                 \
      _Pragma("omp simd reduction(+ : ss)") for (int64_t e = 0; e < D; ++e) {                    \
        const A v = static_cast<A>(src[e]);                                                      \
        dst[e] = v;                                                                              \
        ss += v * v;                                                                             \
      }                                                                                          \
    } else {                                                                                     \
      for (int64_t e = 0; e < D; ++e) dst[e] = static_cast<A>(src[e]);                           \
    }                                                                                            \
    return ss;                                                                                   \
  }                                                                                              \
  MO_CPU_CLONES void grad_row(const A* g, const A* what, A proj, A iv, W* dst, int64_t D,        \
                              bool accumulate) {                                                 \
    if (accumulate) {                                                                            \
      for (int64_t e = 0; e < D; ++e)                                                            \
        dst[e] = static_cast<W>(static_cast<A>(dst[e]) +                                         \
                                epi::normalize_backward(g[e], what[e], proj, iv));               \
    } else {                                                                                     \
      for (int64_t e = 0; e < D; ++e)                                                            \
        dst[e] = static_cast<W>(epi::normalize_backward(g[e], what[e], proj, iv));               \
    }                                                                                            \
  }
MO_DEFINE_WEIGHT_ROWS(float, float)
MO_DEFINE_WEIGHT_ROWS(float, at::BFloat16)
MO_DEFINE_WEIGHT_ROWS(float, at::Half)
MO_DEFINE_WEIGHT_ROWS(double, double)
#undef MO_DEFINE_WEIGHT_ROWS

#define MO_DEFINE_ACC_ROWS(A)                                                                    \
  MO_CPU_CLONES void scale_row(A* dst, int64_t D, A iv) {                                        \
    for (int64_t e = 0; e < D; ++e) dst[e] *= iv;                                                \
  }                                                                                              \
  MO_CPU_CLONES A dot_row(const A* a, const A* b, int64_t D) {                                   \
    A sum = 0;                                                                                   \
    _Pragma("omp simd reduction(+ : sum)") for (int64_t e = 0; e < D; ++e) sum += a[e] * b[e];   \
    return sum;                                                                                  \
  }
MO_DEFINE_ACC_ROWS(float)
MO_DEFINE_ACC_ROWS(double)
#undef MO_DEFINE_ACC_ROWS

// The normalisation Jacobian of one weight row (see MO_DEFINE_WEIGHT_ROWS):
//   dst (+)= w_t((g − ŵ·proj)·iv),  proj = ŵ·g when the projection applies (norm_projects), else 0
// ŵ is `what`, or when what is null src·iv (the chunk was loaded with rows_bf16: no fp32 ŵ
// stored), formed in registers on AVX-512 and in `buf` (D values) otherwise. On AVX-512 for fp32
// and bf16 weights (simd::jacobian_row: one fused call per row), else the clone-dispatched
// dot_row + grad_row.
template <typename acc_t, typename w_t>
inline void jacobian_row(const acc_t* g, const acc_t* what, const w_t* src, acc_t* buf,
                         bool projects, acc_t iv, w_t* dst, int64_t D, bool accumulate) {
#if MO_HAVE_AVX512_GEMM
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<w_t, float>) {
    if (simd::f32_available())
      return simd::jacobian_row(g, what, src, projects, iv, dst, D, accumulate);
  }
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<w_t, at::BFloat16>) {
    if (simd::bf16_available())
      return simd::jacobian_row(g, what, src, projects, iv, dst, D, accumulate);
  }
#endif
  if (!what) {
    load_row(src, buf, D, false);
    scale_row(buf, D, iv);
    what = buf;
  }
  const acc_t proj = projects ? dot_row(what, g, D) : acc_t(0);
  grad_row(g, what, proj, iv, dst, D, accumulate);
}

// Load columns [n0, n0 + nc) : their K weight rows each, converted to acc and normalised, into
// Wc (nc·K × D). inv[r] = 1/wn, sumsq[r] = ‖W_r‖², bias_c[j] = bias of column j (0 without bias).
template <typename acc_t, typename w_t>
void load_chunk(const Problem<acc_t>& P, const w_t* W, int64_t n0, int64_t nc, acc_t* Wc,
                acc_t* inv, acc_t* sumsq, acc_t* bias_c) {
  const int64_t D = P.D, K = P.K;
  for (int64_t j = 0; j < nc; ++j) {
    const int64_t c = P.class_of(n0 + j);
    bias_c[j] = P.bias ? P.bias[c] : acc_t(0);
    for (int64_t k = 0; k < K; ++k) {
      const w_t* src = W + (c * K + k) * D;
      acc_t* dst = Wc + (j * K + k) * D;
      // plain linear CE (no normalisation): a conversion only, the norms are never used
      const acc_t ss = load_row(src, dst, D, P.normalize);
      const acc_t iv = epi::inv_norm(ss, P.normalize);
      inv[j * K + k] = iv;
      sumsq[j * K + k] = ss;
      if (P.normalize) scale_row(dst, D, iv);
    }
  }
}

// In place: row of nc·K dots → nc sub-center maxima (forward and topk; the backward also needs
// the argmax and keeps it separately). Writing position j never overtakes reading position j·K.
template <typename acc_t>
inline void subcenter_reduce(acc_t* row, int64_t nc, int64_t K) {
  if (K == 1) return;
  for (int64_t j = 0; j < nc; ++j) {
    int64_t a;
    row[j] = epi::subcenter_max(row + j * K, K, &a);
  }
}

// Which GEMMs a call runs, decided once per call (gemm_plan in margin_lse.cpp) and shared
// read-only by the threads:
//   kAten  ATen's mm (MKL / OpenBLAS): fp64, CPUs without AVX-512, or switched off by a knob;
//   kF32   fp32 operands on our AVX-512 kernel (gemm.h: 2.4× MKL's sgemm on the AMD EPYC here);
//   kBF16  bf16 features on the AVX512-BF16 units, with the features packed here once, each
//          form only where a GEMM of the call reads it:
//            Fb  B × Dp row-major (Dp = D rounded up to even, zero pad): A of the logits GEMM F·Ŵcᵀ
//                (forward, top-k, a backward that recomputes the dots)
//            Fp  F pair-packed as the B operand of G = DDᵀ·F (N = D, K = B): backward
struct GemmPlan {
  enum Kind { kAten, kF32, kBF16 };
  Kind kind = kAten;
  int64_t Dp = 0;
  Tensor Fb, Fp;
  explicit GemmPlan(Kind k = kAten) : kind(k) {}
  static GemmPlan bf16(const Tensor& features, bool rows, bool pairs) {
    GemmPlan g(kBF16);
    const int64_t B = features.size(0), D = features.size(1);
    g.Dp = simd::round_up(D, 2);
    const auto opt = features.options().dtype(at::kBFloat16);
    Tensor Fh = features.scalar_type() == at::kBFloat16 ? features : features.to(at::kBFloat16);
    Fh = Fh.contiguous();
    const auto* src = Fh.data_ptr<at::BFloat16>();
    if (rows && g.Dp == D) {
      g.Fb = Fh;  // already B × Dp bf16 rows: read in place
    } else if (rows) {
      g.Fb = at::empty({B, g.Dp}, opt);
      simd::convert_rows(src, B, D, D, g.Fb.data_ptr<at::BFloat16>());
    }
    if (pairs) {
      g.Fp = at::empty({simd::round_up(B, 2) * simd::round_up(D, 16)}, opt);
      simd::pack_cols_fast(src, D, B, D, g.Fp.data_ptr<at::BFloat16>());
    }
    return g;
  }
};

// Rows of ∂L/∂Ŵ computed at a time in the backward (chunk_G): their block (96 × D fp32, 48 KiB at
// D = 128) is still in L1/L2 when the normalisation Jacobian reads it right after.
constexpr int64_t kGradRows = 96;

// Scratch of one group (one thread), carved from the thread's scratch block (scratch.h): no
// allocation and no page fault per pass once a thread has run one.
template <typename acc_t>
struct Workspace {
  Tensor Wc, tile, inv, sumsq, bias_c;
  Tensor G;                          // grads: ∂L/∂Ŵ of kGradRows of the chunk's rows (× D)
  Tensor Wt;                         // kF32: Ŵcᵀ (D × Rt, Rt = nc·K rounded up to 16), the B
                                     // operand of the logits GEMM
  Tensor Wrows, Wnt, Wnn, DDb, DDt;  // kBF16: Ŵc in bf16 (rows, and packed both ways),
                                     // the DD tile in bf16 (rows, and DDᵀ pair-major)
  const GemmPlan& plan;
  Tensor Wall;       // in-place mode (see read_in_place): the whole weight, and this chunk's row
  int64_t row0 = 0;
  std::optional<ScratchLease> lease;
  const bool grads;  // a backward's workspace: Wrows kept for the dF operand
  // grads: the backward's buffers too (G, and the bf16 DD tiles).
  Workspace(int64_t B, int64_t D, int64_t K, int64_t nc, const at::TensorOptions& opt,
            const GemmPlan& plan_, bool grads_ = false)
      : plan(plan_), grads(grads_) {
    using Opt = at::TensorOptions;
    ScratchLayout sizes;
    each_buffer(B, D, K, nc, opt, grads_, [&](Tensor&, at::IntArrayRef s, const Opt& o) {
      sizes.add(c10::multiply_integers(s), o.dtype().toScalarType());
    });
    lease.emplace(sizes.bytes());
    ScratchLayout taken;
    each_buffer(B, D, K, nc, opt, grads_, [&](Tensor& t, at::IntArrayRef s, const Opt& o) {
      t = taken.take(lease->base(), s, o);
    });
  }
  // Every buffer of the group and its shape, in one place (sized first, then taken).
  template <typename Fn>
  void each_buffer(int64_t B, int64_t D, int64_t K, int64_t nc, const at::TensorOptions& opt,
                   bool grads, Fn&& buffer) {
    using simd::round_up;
    const int64_t R = nc * K;
    buffer(Wc, {R, D}, opt);
    buffer(tile, {B * R}, opt);
    buffer(inv, {R}, opt);
    buffer(sumsq, {R}, opt);
    buffer(bias_c, {nc}, opt);
    if (grads) buffer(G, {std::min(R, kGradRows), D}, opt);
    if (plan.kind == GemmPlan::kF32) buffer(Wt, {D * round_up(R, 16)}, opt);
    if (plan.kind == GemmPlan::kBF16) {
      const auto ho = opt.dtype(at::kBFloat16);
      buffer(Wrows, {R * round_up(D, 2)}, ho);
      buffer(Wnt, {round_up(D, 2) * round_up(R, 16)}, ho);
      if (grads) {
        buffer(Wnn, {round_up(R, 2) * round_up(D, 16)}, ho);
        buffer(DDb, {B * round_up(R, 2)}, ho);
        buffer(DDt, {round_up(B, 2) * round_up(R, 16)}, ho);
      }
    }
  }
  // Plain linear weights (no normalisation, no class_index, weight already in the acc dtype):
  // the chunk's rows are read where they are, with no copy (plain cross-entropy).
  template <typename w_t>
  void read_in_place(const Problem<acc_t>& P, const w_t* W, const at::TensorOptions& opt) {
    if constexpr (std::is_same_v<w_t, acc_t>) {
      if (!P.normalize && !P.class_index)
        Wall = at::from_blob(const_cast<acc_t*>(W), {P.N * P.K, P.D}, opt);
    }
  }
  bool in_place() const { return Wall.defined(); }
  // Views sized for a chunk of nc columns (the last chunk may be narrower).
  Tensor W_view(int64_t rows) {
    return in_place() ? Wall.narrow(0, row0, rows) : Wc.narrow(0, 0, rows);
  }
  Tensor T_view(int64_t B, int64_t cols) { return tile.narrow(0, 0, B * cols).view({B, cols}); }
  // bf16 GEMMs on weight rows to normalise or convert: straight to bf16 (load_rows_bf16), not
  // through the fp32 chunk Wc (whose first D values are the Jacobian's row buffer off AVX-512).
  bool rows_bf16() const { return plan.kind == GemmPlan::kBF16 && !in_place(); }
  // Load columns [n0, n0 + nc): normalised rows, their norms, their bias.
  template <typename w_t>
  void load(const Problem<acc_t>& P, const w_t* W, int64_t n0, int64_t nc) {
    if constexpr (std::is_same_v<acc_t, float>) {
      if (rows_bf16()) return load_rows_bf16(P, W, n0, nc);
    }
    if (in_place()) {  // wn = 1, no projection: only the bias to gather
      row0 = n0 * P.K;
      inv.fill_(1);
      sumsq.zero_();
      acc_t* bc = bias_c.template data_ptr<acc_t>();
      for (int64_t j = 0; j < nc; ++j) bc[j] = P.bias ? P.bias[n0 + j] : acc_t(0);
      return;
    }
    load_chunk(P, W, n0, nc, Wc.template data_ptr<acc_t>(), inv.template data_ptr<acc_t>(),
               sumsq.template data_ptr<acc_t>(), bias_c.template data_ptr<acc_t>());
  }
  // The bias of columns [n0, n0 + nc) (0 without one) into bias_c; the weight row of the chunk's
  // row r (column n0 + r / K, sub-center r % K).
  void gather_bias(const Problem<acc_t>& P, int64_t n0, int64_t nc) {
    acc_t* bc = bias_c.template data_ptr<acc_t>();
    for (int64_t j = 0; j < nc; ++j) bc[j] = P.bias ? P.bias[P.class_of(n0 + j)] : acc_t(0);
  }
  template <typename w_t>
  static const w_t* weight_row(const Problem<acc_t>& P, const w_t* W, int64_t n0, int64_t r) {
    return W + (P.class_of(n0 + r / P.K) * P.K + r % P.K) * P.D;
  }
  // Whether load_rows_bf16 packs Wnt itself (loads_into_wnt) — outside a backward, which packs
  // Wrows for its dF GEMM too — or leaves Wrows for chunk_dots to pack.
  template <typename w_t>
  bool loads_into_wnt() const {
    return !grads && simd::packs_rows_scaled<w_t>();
  }
  // load_chunk for the bf16 GEMMs: rows scaled by 1/‖W_r‖ and rounded to bf16 straight into Wrows
  // (Dp = D rounded up to even, zero pad), the values an fp32 chunk would give — or straight into
  // Wnt, the logits GEMM's operand (loads_into_wnt). 16 rows at a time: sums of squares, then 16
  // independent norms (no latency chain per row), then the rows.
  template <typename w_t>
  void load_rows_bf16(const Problem<acc_t>& P, const w_t* W, int64_t n0, int64_t nc) {
    const int64_t D = P.D, R = nc * P.K, Dp = simd::round_up(D, 2);
    auto* out = Wrows.template data_ptr<at::BFloat16>();
    acc_t* iv = inv.template data_ptr<acc_t>();
    acc_t* ss = sumsq.template data_ptr<acc_t>();
    gather_bias(P, n0, nc);
    const w_t* src[16];  // this group's weight rows
    auto* wnt = reinterpret_cast<uint32_t*>(Wnt.template data_ptr<at::BFloat16>());
    const int64_t Np = simd::round_up(R, 16);
    for (int64_t r0 = 0; r0 < R; r0 += 16) {
      const int64_t g = std::min<int64_t>(16, R - r0);
      for (int64_t t = 0; t < g; ++t) {
        const int64_t r = r0 + t;
        src[t] = weight_row(P, W, n0, r);
        ss[r] = P.normalize ? simd::row_sum_squares(src[t], D) : acc_t(0);
      }
      for (int64_t r = r0; r < r0 + g; ++r) iv[r] = epi::inv_norm(ss[r], P.normalize);  // 1: plain
      if constexpr (simd::packs_rows_scaled<w_t>()) {
        if (loads_into_wnt<w_t>()) {
          simd::pack_rows_scaled(src, iv + r0, static_cast<int>(g), D, wnt + r0, Np);
          continue;
        }
      }
      for (int64_t t = 0; t < g; ++t) {
        const int64_t r = r0 + t;
        simd::scale_to_bf16(src[t], D, iv[r], out + r * Dp);
        if (Dp != D) out[r * Dp + D] = at::BFloat16(0.f);
      }
    }
  }
  // The backward's load when its dots are kept (no logits GEMM to feed), bf16 GEMMs: the rows
  // normalised and rounded as load_rows_bf16 does, two at a time, written straight into Wnn —
  // the dF GEMM's operand, consecutive rows interleaved as pack_cols_fast gives — with no Wrows
  // between (chunk_dF(…, w_packed = true)). Returns false (nothing loaded) where this does not
  // apply: then load(). ssq_known (optional, nc): the rows' squared norms, as the forward summed
  // them (margin_loss keeps them), instead of summing them again.
  template <typename w_t>
  bool load_pairs_bf16(const Problem<acc_t>& P, const w_t* W, int64_t n0, int64_t nc,
                       const acc_t* ssq_known) {
    if constexpr (std::is_same_v<acc_t, float>) {
      if (!rows_bf16()) return false;
      const int64_t D = P.D, R = nc * P.K, Np = simd::round_up(D, 16);
      auto* wnn = Wnn.template data_ptr<at::BFloat16>();
      acc_t* iv = inv.template data_ptr<acc_t>();
      acc_t* ss = sumsq.template data_ptr<acc_t>();
      gather_bias(P, n0, nc);
      for (int64_t r0 = 0; r0 < R; r0 += 2) {
        const w_t* src[2] = {nullptr, nullptr};
        for (int64_t r = r0; r < std::min(r0 + 2, R); ++r) {
          src[r - r0] = weight_row(P, W, n0, r);
          ss[r] = ssq_known ? ssq_known[r]
                  : P.normalize ? simd::row_sum_squares(src[r - r0], D) : acc_t(0);
          iv[r] = epi::inv_norm(ss[r], P.normalize);
        }
        at::BFloat16* pair = wnn + r0 * Np;  // pair r0 / 2, Np words of two bf16
        simd::scale_pair_bf16(src[0], src[1], iv[r0], src[1] ? iv[r0 + 1] : 0.f, D, nullptr,
                              nullptr, pair);
        std::fill(pair + 2 * D, pair + 2 * Np, at::BFloat16(0.f));
      }
      return true;
    }
    return false;
  }
  // Load columns [n0, n0 + nc) and return the B × nc·K tile of dots F·Ŵ_cᵀ: the one GEMM every
  // pass (forward, backward, top-k) starts with. bf16 path: Ŵc rounded to bf16 once per chunk
  // and per pass (like the naive bf16 loss's normalised weight), bf16 products, fp32 sums/tile.
  template <typename w_t>
  Tensor chunk_dots(const Problem<acc_t>& P, const w_t* W, const Tensor& Facc, int64_t n0,
                    int64_t nc) {
    const int64_t B = Facc.size(0), D = P.D, ncK = nc * P.K;
    load(P, W, n0, nc);
    Tensor T = T_view(B, ncK);
    if constexpr (std::is_same_v<acc_t, float>) {
      const float* wv = W_view(ncK).template data_ptr<float>();
      if (plan.kind == GemmPlan::kF32) {  // T = F · Ŵcᵀ, with Ŵcᵀ transposed into Wt
        const int64_t ldt = simd::round_up(ncK, 16);
        float* wt = Wt.template data_ptr<float>();
        simd::transpose32(reinterpret_cast<const uint32_t*>(wv), ncK, D, D,
                          reinterpret_cast<uint32_t*>(wt), ldt);
        simd::gemm_f32(B, ncK, D, Facc.data_ptr<float>(), D, 1, wt, ldt, T.data_ptr<float>(),
                       ncK, false);
        return T;
      }
      if (plan.kind == GemmPlan::kBF16) {
        auto* wnt = Wnt.template data_ptr<at::BFloat16>();
        auto* rows = Wrows.template data_ptr<at::BFloat16>();
        if (rows_bf16() && !loads_into_wnt<w_t>())
          simd::pack_bf16_rows(rows, ncK, D, wnt);
        else if (!rows_bf16())  // plain fp32 weights read in place
          simd::pack_rows_f32(wv, ncK, D, D, rows, wnt);
        simd::gemm_bf16(B, ncK, plan.Dp / 2, plan.Fb.template data_ptr<at::BFloat16>(),
                        plan.Dp, wnt, T.data_ptr<float>(), ncK, false);
        return T;
      }
    }
    at::mm_out(T, Facc, W_view(ncK).t());
    return T;
  }
  // bf16 GEMMs: chunk_dF and chunk_G read the DD tile as bf16 rows (DDb) and pairs (DDt).
  bool dd_bf16() const { return plan.kind == GemmPlan::kBF16; }
  // Fixed shift, bf16 GEMMs, kept exps (row_kernels.h): dd_ij = k_i·e_ij (grad_dot_i at the
  // target) rounded to bf16 once, written straight into DDb and DDt — no fp32 tile between;
  // chunk_dF(…, dd_packed = true) then skips its conversions. kept: B rows of P.N exps.
  void dd_from_exps_bf16(const Problem<float>& P, const float* kept, const float* k,
                         const float* grad_dot, int64_t n0, int64_t nc) {
    const int64_t B = P.B, Rp = simd::round_up(nc, 2), Np = simd::round_up(nc, 16);
    auto* ddb = DDb.template data_ptr<at::BFloat16>();
    auto* ddt = DDt.template data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < B; i += 2) {
      const int64_t rows = std::min<int64_t>(2, B - i);
      at::BFloat16* pair = ddt + 2 * (i / 2) * Np;
      simd::scale_pair_bf16(kept + i * P.N + n0, rows == 2 ? kept + (i + 1) * P.N + n0 : nullptr,
                            k[i], rows == 2 ? k[i + 1] : 0.f, nc, ddb + i * Rp,
                            rows == 2 ? ddb + (i + 1) * Rp : nullptr, pair);
      std::fill(pair + 2 * nc, pair + 2 * Np, at::BFloat16(0.f));
      for (int64_t r = i; r < i + rows; ++r) {
        if (Rp != nc) ddb[r * Rp + nc] = at::BFloat16(0.f);
        const int64_t tl = P.target[r] - n0;
        if (tl < 0 || tl >= nc) continue;
        ddb[r * Rp + tl] = at::BFloat16(grad_dot[r]);
        pair[2 * tl + (r - i)] = at::BFloat16(grad_dot[r]);
      }
    }
  }
  // Backward GEMMs of a chunk, from the DD tile T (B × ncK): chunk_dF, then chunk_G per block of
  // rows (the Jacobian reads each block while it is in cache).
  // ∂F += DD·Ŵc. bf16 GEMMs: also packs DD both ways for chunk_G (dd_packed: DDb and DDt already
  // written by dd_from_exps_bf16; w_packed: Wnn already written by load_pairs_bf16).
  void chunk_dF(const Tensor& T, Tensor& gF, bool dd_packed = false, bool w_packed = false) {
    const int64_t B = T.size(0), ncK = T.size(1), D = Wc.size(1);
    const Tensor Wv = W_view(ncK);
    if constexpr (std::is_same_v<acc_t, float>) {
      const float* tp = T.data_ptr<float>();
      if (plan.kind == GemmPlan::kF32) {
        simd::gemm_f32(B, D, ncK, tp, ncK, 1, Wv.data_ptr<float>(), D, gF.data_ptr<float>(), D,
                       true);
        return;
      }
      if (plan.kind == GemmPlan::kBF16) {
        // DD rounded to bf16, as in the naive bf16 loss's logit gradient; fp32 sums and outputs.
        using simd::round_up;
        auto* ddb = DDb.template data_ptr<at::BFloat16>();
        auto* wnn = Wnn.template data_ptr<at::BFloat16>();
        const int64_t Rp = round_up(ncK, 2);
        if (!dd_packed) simd::convert_rows_f32(tp, B, ncK, ncK, ddb);
        if (!w_packed && rows_bf16())
          simd::pack_cols_fast(Wrows.template data_ptr<at::BFloat16>(), D, ncK, round_up(D, 2),
                               wnn);
        else if (!w_packed)
          simd::pack_cols_fast(Wv.template data_ptr<float>(), D, ncK, D, wnn);
        simd::gemm_bf16(B, D, Rp / 2, ddb, Rp, wnn, gF.data_ptr<float>(), D, true);
        if (!dd_packed)  // DDᵀ pair-major for chunk_G: no transpose
          simd::pack_cols_fast(tp, ncK, B, ncK, DDt.template data_ptr<at::BFloat16>());
        return;
      }
    }
    gF.addmm_(T, Wv);
  }
  // Rows [r0, r1) of G = DDᵀ·F (∂L/∂Ŵ of the chunk's rows) into g (r1 − r0 rows of D), after
  // chunk_dF. Raw pointers: called once per kGradRows rows, where a Tensor view per call costs.
  void chunk_G(const Tensor& T, const Tensor& Facc, acc_t* g, int64_t r0, int64_t r1) {
    const int64_t B = T.size(0), ncK = T.size(1), D = Wc.size(1), m = r1 - r0;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (plan.kind == GemmPlan::kF32) {  // DDᵀ is read in place (A strided by rows)
        simd::gemm_f32(m, D, B, T.data_ptr<float>() + r0, 1, ncK, Facc.data_ptr<float>(), D, g, D,
                       false);
        return;
      }
      if (plan.kind == GemmPlan::kBF16) {
        const auto* ddt = DDt.template data_ptr<at::BFloat16>();
        simd::gemm_bf16_pair_major(m, D, simd::round_up(B, 2) / 2, ddt + 2 * r0,
                                   simd::round_up(ncK, 16),
                                   plan.Fp.template data_ptr<at::BFloat16>(), g, D, false);
        return;
      }
    }
    Tensor Gv = at::from_blob(g, {m, D}, Facc.options());
    at::mm_out(Gv, T.t().narrow(0, r0, m), Facc);
  }
};

}  // namespace cpu
}  // namespace marginops
