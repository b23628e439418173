// CPU kernels of the marginops core op: margin_lse (+ margin_lse_keep), margin_lse_backward
// (+ margin_lse_backward_kept), topk. Building blocks (buffers, chunk GEMMs): tiles.h; row loops:
// row_kernels.h; the ops' arguments (checks, dtype dispatch, GEMM plan): op_args.h.
//
// Structure (the same in all three): stream over the class columns in chunks of `nc` columns.
// For each chunk
//   1. load   — read the chunk's weight rows (indirectly through class_index when given), convert
//               to the acc dtype and normalise them into a small nc·K × D buffer Ŵc (plain linear
//               weights already in the acc dtype are read in place);
//   2. GEMM   — T = F · Ŵcᵀ (B × nc·K): fp32 on our AVX-512 kernel, bf16 features on the
//               AVX512-BF16 units, both with fp32 sums into an fp32 tile (gemm.h); fp64 and CPUs
//               without AVX-512 with ATen's BLAS GEMM (MKL / OpenBLAS);
//   3. epilogue — one tight loop per row over T, in place: sub-center max, target mask, hard-negative
//               modulation, scale, bias, then max and Σexp (forward), or the softmax gradient dd
//               (backward), using the shared math of csrc/include/epilogue.h.
// The backward then does ∂F += DD · Ŵc and G = DDᵀ · F (two more GEMMs) and applies the
// normalisation Jacobian to G row by row; each chunk owns its weight rows, so no atomics. When the
// forward kept the dots (margin_lse_keep: B × N·K within the Python side's keep budget), the
// backward reads them instead of recomputing them: 3 GEMMs instead of 4.
//
// Parallelism: the chunks are split into `ngroups` contiguous ranges (one per thread); each group
// keeps its own partial results (running max/Σexp per row, or ∂F and ∂scale accumulators) that are
// merged in group order at the end, so results are deterministic for a given thread count. Inside a
// group the GEMMs run single-threaded on a tile that fits in cache. Memory is bounded by
// ngroups × (B·nc·K + 2·nc·K·D + B·D) acc elements (the second nc·K·D: Ŵcᵀ for the fp32 kernel,
// or the bf16 packings; held between calls in a per-thread scratch block, scratch.h) + the kept
// dots, bounded by the keep budget (their block recycled, keep_pool.h): nothing else grows with B·C.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "keep_pool.h"
#include "margin_lse.h"
#include "op_args.h"
#include "tiles.h"

namespace marginops {
namespace cpu {

// ================================================================================================
// Forward
// ================================================================================================

// keep (optional, B × N·K): receives the raw dots of every chunk, for a backward that does not
// recompute them (margin_lse_keep); keep_ssq (optional, N): the weight rows' squared norms
// (margin_loss, K = 1), which its backward reads instead of summing them again.
template <typename acc_t, typename w_t>
void forward_impl(const Problem<acc_t>& P, const w_t* W, const Tensor& Facc, acc_t* lse_out,
                  acc_t* dot_out, const GemmPlan& plan, acc_t* keep, acc_t* keep_ssq) {
  const int64_t B = P.B, D = P.D, K = P.K, N = P.N;
  const int64_t nthreads = at::get_num_threads();
  const int64_t nc_max = pick_chunk(B, K, N, sizeof(acc_t), nthreads);
  const int64_t nchunks = (N + nc_max - 1) / nc_max;
  const int64_t ngroups = std::max<int64_t>(1, std::min(nchunks, nthreads));
  const auto opt = Facc.options();

  // Per-group running (max, Σexp) for every row.
  std::vector<acc_t> gm(ngroups * B, epi::neg_inf<acc_t>()), gs(ngroups * B, acc_t(0));

  at::parallel_for(0, ngroups, 1, [&](int64_t gb, int64_t ge) {
    for (int64_t g = gb; g < ge; ++g) {
      int64_t c0, c1;
      group_range(g, ngroups, nchunks, &c0, &c1);
      if (c0 == c1) continue;
      Workspace<acc_t> ws(B, D, K, nc_max, opt, plan);
      ws.read_in_place(P, W, opt);
      acc_t* M = gm.data() + g * B;
      acc_t* S = gs.data() + g * B;
      for (int64_t ch = c0; ch < c1; ++ch) {
        const int64_t n0 = ch * nc_max, nc = std::min(nc_max, N - n0), ncK = nc * K;
        Tensor T = ws.chunk_dots(P, W, Facc, n0, nc);
        if (keep_ssq) std::copy_n(ws.sumsq.template data_ptr<acc_t>(), nc, keep_ssq + n0);
        acc_t* tp = T.data_ptr<acc_t>();
        const acc_t* bc = ws.bias_c.template data_ptr<acc_t>();
        for (int64_t i = 0; i < B; ++i) {
          acc_t* row = tp + i * ncK;
          if (keep && !P.fixed_shift)
            std::memcpy(keep + i * N * K + n0 * K, row, sizeof(acc_t) * ncK);
          subcenter_reduce(row, nc, K);
          const int64_t tl = P.target[i] - n0;
          if (tl >= 0 && tl < nc) dot_out[i] = row[tl];  // exactly one chunk holds the target
          if (P.fixed_shift) {  // one pass: Σ exp(z − σ); `keep` receives those exps (K = 1)
            const acc_t sigma = fixed_shift_of(P.scale[i]);
            const acc_t sum = row_exps(row, keep ? keep + i * N + n0 : nullptr, nc, tl,
                                       P.scale[i], sigma);
            epi::lse_merge(M[i], S[i], sigma, sum);
            continue;
          }
          const acc_t m = row_logits(row, nc, tl, P.scale[i], P.hard ? P.tau[i] : acc_t(0), P.t,
                                     P.hard, P.thr, P.filter, bc);
          if (m == epi::neg_inf<acc_t>()) continue;  // no non-target column in this chunk
          const acc_t sum = row_sum_exp(row, nc, m);
          epi::lse_merge(M[i], S[i], m, sum);
        }
      }
    }
  });

  // Merge the groups' partials in group order (deterministic).
  for (int64_t i = 0; i < B; ++i) {
    acc_t m = gm[i], s = gs[i];
    for (int64_t g = 1; g < ngroups; ++g) epi::lse_merge(m, s, gm[g * B + i], gs[g * B + i]);
    lse_out[i] = epi::lse_finalize(m, s);
  }
}

// ================================================================================================
// Backward
// ================================================================================================

// kept (optional, B × N·K): the forward's dots (margin_lse_keep), read by the epilogue instead
// of recomputed — 3 GEMMs instead of 4, the same epilogue on the same values.
template <typename acc_t, typename w_t>
void backward_impl(const Problem<acc_t>& P, const w_t* W, const Tensor& Facc, const acc_t* grad_lse,
                   const acc_t* grad_dot, const acc_t* lse_neg, Tensor& gF_out, w_t* gW,
                   acc_t* gscale_out, acc_t* gbias, bool accumulate_rows, const GemmPlan& plan,
                   const acc_t* kept) {
  const int64_t B = P.B, D = P.D, K = P.K, N = P.N;
  const int64_t nthreads = accumulate_rows ? 1 : at::get_num_threads();
  const int64_t nc_max = pick_chunk(B, K, N, sizeof(acc_t), nthreads);
  const int64_t nchunks = (N + nc_max - 1) / nc_max;
  const int64_t ngroups = std::max<int64_t>(1, std::min(nchunks, nthreads));
  const auto opt = Facc.options();

  // Per-group ∂F (B × D) and ∂scale (B) accumulators, merged in group order at the end.
  std::vector<Tensor> gF(ngroups);
  std::vector<acc_t> gsc(ngroups * B, acc_t(0));
  // Fixed shift (row_kernels.h): p_ij = e_ij · exp(σ_i − lse_i), so dd_ij = k_i · e_ij off target.
  std::vector<acc_t> kfac(P.fixed_shift ? B : 0);
  for (int64_t i = 0; i < static_cast<int64_t>(kfac.size()); ++i)
    kfac[i] = grad_lse[i] * P.scale[i] * epi::exp_acc(fixed_shift_of(P.scale[i]) - lse_neg[i]);
  // margin_loss's kept block: B rows of exps, then the weight rows' squared norms (forward_cpu)
  const acc_t* kept_ssq = kept && P.fixed_shift ? kept + B * N : nullptr;

  at::parallel_for(0, ngroups, 1, [&](int64_t gb, int64_t ge) {
    for (int64_t g = gb; g < ge; ++g) {
      gF[g] = at::zeros({B, D}, opt);
      int64_t c0, c1;
      group_range(g, ngroups, nchunks, &c0, &c1);
      if (c0 == c1) continue;
      Workspace<acc_t> ws(B, D, K, nc_max, opt, plan, /*grads=*/true);
      ws.read_in_place(P, W, opt);
      // In-place weights: G is the weight gradient itself (wn = 1), written straight into gW.
      const bool g_in_place = ws.in_place() && !accumulate_rows;
      std::vector<acc_t> gb_chunk(nc_max), dbuf(nc_max);
      std::vector<int64_t> abuf(nc_max);
      acc_t* gs = gsc.data() + g * B;
      for (int64_t ch = c0; ch < c1; ++ch) {
        const int64_t n0 = ch * nc_max, nc = std::min(nc_max, N - n0), ncK = nc * K;
        const acc_t* inv = ws.inv.template data_ptr<acc_t>();
        const acc_t* ssq = ws.sumsq.template data_ptr<acc_t>();
        const acc_t* bc = ws.bias_c.template data_ptr<acc_t>();
        Tensor T;
        bool w_packed = false;
        if (kept) {  // the dots are read from `kept` below; T only receives DD
          w_packed = ws.load_pairs_bf16(P, W, n0, nc, kept_ssq ? kept_ssq + n0 : nullptr);
          if (!w_packed) ws.load(P, W, n0, nc);
          T = ws.T_view(B, ncK);
        } else {
          T = ws.chunk_dots(P, W, Facc, n0, nc);  // recompute the dots
        }
        acc_t* tp = T.data_ptr<acc_t>();
        // fp32 ŵ rows for the Jacobian: the chunk's, or (bf16 GEMMs) none: ŵ = W_r / ‖W_r‖ is
        // formed from the weight row inside jacobian_row
        const acc_t* Wc = ws.rows_bf16() ? nullptr : ws.W_view(ncK).template data_ptr<acc_t>();
        acc_t* row_buf = ws.Wc.template data_ptr<acc_t>();
        std::fill(gb_chunk.begin(), gb_chunk.begin() + nc, acc_t(0));
        acc_t* gbc = gb_chunk.data();

        // Epilogue: dots row (T's, or the kept one) → DD row of T.
        //   g  = grad_lse · exp(z − lse_neg) off target;  dd = g · s · ∂d'/∂d (+ grad_dot at target)
        // Fixed shift: dd = k_i · e_ij from the kept exps or the recomputed dots (grad_dot at the
        // target); with bf16 GEMMs and kept exps straight into the bf16 DD layouts.
        bool dd_packed = false;
        if constexpr (std::is_same_v<acc_t, float>) {
          if (P.fixed_shift && kept && ws.dd_bf16()) {
            ws.dd_from_exps_bf16(P, kept, kfac.data(), grad_dot, n0, nc);
            dd_packed = true;
          }
        }
        for (int64_t i = 0; i < B && P.fixed_shift && !dd_packed; ++i) {
          acc_t* row = tp + i * nc;
          row_dd_shifted(kept ? kept + i * N + n0 : row, row, nc, kept != nullptr, P.scale[i],
                         fixed_shift_of(P.scale[i]), kfac[i]);
          const int64_t tl = P.target[i] - n0;
          if (tl >= 0 && tl < nc) row[tl] = grad_dot[i];
        }
        for (int64_t i = 0; i < B && !P.fixed_shift; ++i) {
          acc_t* row = tp + i * ncK;
          const acc_t* src = kept ? kept + (i * N + n0) * K : row;
          const acc_t* d;
          if (K == 1) {
            d = src;  // without kept, dd overwrites d element by element
          } else {
            for (int64_t j = 0; j < nc; ++j)
              dbuf[j] = epi::subcenter_max(src + j * K, K, &abuf[j]);
            std::fill(row, row + ncK, acc_t(0));
            d = dbuf.data();
          }
          const int64_t tl = P.target[i] - n0;
          const bool has_t = tl >= 0 && tl < nc;
          acc_t* out = K == 1 ? row : dbuf.data();  // K = 1: in place; else compact, scattered below
          const acc_t gsum = row_dd(d, out, nc, tl, P.scale[i], P.hard ? P.tau[i] : acc_t(0), P.t,
                                    P.hard, P.thr, P.filter, bc, lse_neg[i], grad_lse[i],
                                    P.bias ? gbc : nullptr);  // ∂bias only with a bias
          if (has_t) out[tl] += grad_dot[i];
          if (K > 1) {
            for (int64_t j = 0; j < nc; ++j) row[j * K + abuf[j]] = out[j];
          }
          gs[i] += gsum;
        }

        // ∂F += DD · Ŵc ;  G = DDᵀ · F, kGradRows rows at a time, each block's normalisation
        // Jacobian applied while it is in cache (in-place weights: G is gW, no Jacobian).
        ws.chunk_dF(T, gF[g], dd_packed, w_packed);
        for (int64_t j = 0; j < nc && gbias; ++j) {
          const int64_t c = P.class_of(n0 + j);
          gbias[c] = accumulate_rows ? gbias[c] + gbc[j] : gbc[j];
        }
        if (g_in_place) {
          ws.chunk_G(T, Facc, reinterpret_cast<acc_t*>(gW) + n0 * K * D, 0, ncK);
          continue;
        }
        acc_t* gp = ws.G.template data_ptr<acc_t>();
        for (int64_t r0 = 0; r0 < ncK; r0 += kGradRows) {
          const int64_t r1 = std::min(ncK, r0 + kGradRows);
          ws.chunk_G(T, Facc, gp, r0, r1);
          // Normalisation Jacobian per weight row, written to the rows this chunk owns.
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t w_row = P.class_of(n0 + r / K) * K + r % K;
            jacobian_row(gp + (r - r0) * D, Wc ? Wc + r * D : nullptr, W + w_row * D, row_buf,
                         epi::norm_projects(ssq[r], P.normalize), inv[r], gW + w_row * D, D,
                         accumulate_rows);
          }
        }
      }
    }
  });

  gF_out = gF[0];
  for (int64_t g = 1; g < ngroups; ++g) gF_out.add_(gF[g]);
  for (int64_t i = 0; i < B; ++i) {
    acc_t s = 0;
    for (int64_t g = 0; g < ngroups; ++g) s += gsc[g * B + i];
    gscale_out[i] = s;
  }
}

// ================================================================================================
// Top-k
// ================================================================================================

template <typename acc_t, typename w_t>
void topk_impl(const Problem<acc_t>& P, const w_t* W, const Tensor& Facc, const int64_t* exclude,
               int64_t k, acc_t* vals_out, int64_t* cols_out, const GemmPlan& plan) {
  const int64_t B = P.B, D = P.D, K = P.K, N = P.N;
  const int64_t nthreads = at::get_num_threads();
  const int64_t nc_max = pick_chunk(B, K, N, sizeof(acc_t), nthreads);
  const int64_t nchunks = (N + nc_max - 1) / nc_max;
  const int64_t ngroups = std::max<int64_t>(1, std::min(nchunks, nthreads));
  const auto opt = Facc.options();
  const int64_t kEmpty = std::numeric_limits<int64_t>::max();

  // Per-group sorted lists (B × k); empty slots are (−inf, kEmpty) so any real column beats them.
  std::vector<acc_t> gv(ngroups * B * k, epi::neg_inf<acc_t>());
  std::vector<int64_t> gc(ngroups * B * k, kEmpty);

  at::parallel_for(0, ngroups, 1, [&](int64_t gb, int64_t ge) {
    for (int64_t g = gb; g < ge; ++g) {
      int64_t c0, c1;
      group_range(g, ngroups, nchunks, &c0, &c1);
      if (c0 == c1) continue;
      Workspace<acc_t> ws(B, D, K, nc_max, opt, plan);
      for (int64_t ch = c0; ch < c1; ++ch) {
        const int64_t n0 = ch * nc_max, nc = std::min(nc_max, N - n0), ncK = nc * K;
        Tensor T = ws.chunk_dots(P, W, Facc, n0, nc);
        acc_t* tp = T.data_ptr<acc_t>();
        for (int64_t i = 0; i < B; ++i) {
          acc_t* row = tp + i * ncK;
          subcenter_reduce(row, nc, K);
          // The excluded column competes as −inf, like the dense oracle's masked_fill.
          const int64_t xl = exclude[i] - n0;
          if (xl >= 0 && xl < nc) row[xl] = epi::neg_inf<acc_t>();
          acc_t* v = gv.data() + (g * B + i) * k;
          int64_t* c = gc.data() + (g * B + i) * k;
          for (int64_t j = 0; j < nc; ++j) epi::topk_insert(v, c, k, row[j], n0 + j);
        }
      }
    }
  });

  // The order is total (value, then column), so merging the groups gives the same list whatever
  // the grouping.
  for (int64_t i = 0; i < B; ++i) {
    acc_t* v = vals_out + i * k;
    int64_t* c = cols_out + i * k;
    std::copy(gv.begin() + i * k, gv.begin() + (i + 1) * k, v);
    std::copy(gc.begin() + i * k, gc.begin() + (i + 1) * k, c);
    for (int64_t g = 1; g < ngroups; ++g)
      for (int64_t j = 0; j < k; ++j)
        epi::topk_insert(v, c, k, gv[(g * B + i) * k + j], gc[(g * B + i) * k + j]);
  }
}

// ================================================================================================
// Registered ops (their arguments: op_args.h)
// ================================================================================================

// Forward of margin_lse, margin_lse_keep and margin_loss; keep: also return the B × N·K dots —
// or, with fixed_shift where fixed_shift_allowed (margin_loss), the B × N exps (row_kernels.h).
std::tuple<Tensor, Tensor, Tensor> forward_cpu(const Tensor& features, const Tensor& weight,
                                               const Tensor& scale,
                                               const std::optional<Tensor>& bias,
                                               const Tensor& target_col,
                                               const std::optional<Tensor>& class_index,
                                               const std::optional<Tensor>& hard_tau,
                                               const std::optional<Tensor>& hard_t,
                                               bool normalize_weight, int64_t subcenters,
                                               double filter_threshold, bool keep,
                                               bool fixed_shift) {
  TORCH_CHECK(!fixed_shift || subcenters == 1, "marginops: fixed_shift needs subcenters = 1");
  Inputs in = prepare(features, weight, scale, bias, target_col, class_index, hard_tau, hard_t);
  const auto acc = in.F.scalar_type();
  const int64_t B = in.F.size(0);
  Tensor lse = at::empty({B}, in.F.options());
  Tensor dot = at::zeros({B}, in.F.options());
  Tensor dots;
  const GemmPlan plan = gemm_plan(features);
  dispatch_types(acc, in.W.scalar_type(), [&](auto acc0, auto w0) {
    using acc_t = decltype(acc0);
    using w_t = decltype(w0);
    auto P = make_problem<acc_t>(in.F, in.W, in.scale, in.bias, in.target, in.class_index, in.tau,
                                 in.t, normalize_weight, subcenters, filter_threshold);
    P.fixed_shift = fixed_shift && fixed_shift_allowed(P);
    // the kept dots' block is recycled between steps (keep_pool.h: no page faults per step);
    // margin_loss's (fixed_shift asked, K = 1) has one more row: the weight rows' squared norms
    const int64_t kept_rows = B + (fixed_shift ? 1 : 0);
    dots = keep ? KeepPool::instance().empty(kept_rows, P.N * P.K, in.F.options())
                : at::empty({0, 0}, in.F.options());
    acc_t* kp = keep ? dots.data_ptr<acc_t>() : nullptr;
    forward_impl<acc_t, w_t>(P, in.W.data_ptr<w_t>(), in.F, lse.data_ptr<acc_t>(),
                             dot.data_ptr<acc_t>(), plan, kp,
                             kp && fixed_shift ? kp + B * P.N : nullptr);
  });
  return {lse, dot, dots};
}

std::tuple<Tensor, Tensor> margin_lse_cpu(const Tensor& features, const Tensor& weight,
                                          const Tensor& scale, const std::optional<Tensor>& bias,
                                          const Tensor& target_col,
                                          const std::optional<Tensor>& class_index,
                                          const std::optional<Tensor>& hard_tau,
                                          const std::optional<Tensor>& hard_t,
                                          bool normalize_weight, int64_t subcenters,
                                          double filter_threshold) {
  auto [lse, dot, dots] = forward_cpu(features, weight, scale, bias, target_col, class_index,
                                      hard_tau, hard_t, normalize_weight, subcenters,
                                      filter_threshold, false, false);
  return {lse, dot};
}

std::tuple<Tensor, Tensor, Tensor> margin_lse_keep_cpu(
    const Tensor& features, const Tensor& weight, const Tensor& scale,
    const std::optional<Tensor>& bias, const Tensor& target_col,
    const std::optional<Tensor>& class_index, const std::optional<Tensor>& hard_tau,
    const std::optional<Tensor>& hard_t, bool normalize_weight, int64_t subcenters,
    double filter_threshold) {
  return forward_cpu(features, weight, scale, bias, target_col, class_index, hard_tau, hard_t,
                     normalize_weight, subcenters, filter_threshold, true, false);
}

// Backward of all three; kept: what the forward kept (its dots, or its exps under fixed_shift,
// decided again here by fixed_shift_allowed on the same inputs) or nullopt to recompute the dots.
std::tuple<Tensor, Tensor, Tensor, Tensor> backward_cpu(
    const Tensor& grad_lse, const Tensor& grad_dot, const Tensor& lse_neg,
    const std::optional<Tensor>& kept, const Tensor& features, const Tensor& weight,
    const Tensor& scale, const std::optional<Tensor>& bias, const Tensor& target_col,
    const std::optional<Tensor>& class_index, const std::optional<Tensor>& hard_tau,
    const std::optional<Tensor>& hard_t, bool normalize_weight, int64_t subcenters,
    double filter_threshold, bool fixed_shift) {
  TORCH_CHECK(!fixed_shift || subcenters == 1, "marginops: fixed_shift needs subcenters = 1");
  Inputs in = prepare(features, weight, scale, bias, target_col, class_index, hard_tau, hard_t);
  const auto acc = in.F.scalar_type();
  const int64_t B = in.F.size(0);
  Tensor gl = grad_lse.detach().to(acc).contiguous(), gd = grad_dot.detach().to(acc).contiguous();
  Tensor ln = lse_neg.detach().to(acc).contiguous();
  TORCH_CHECK(gl.numel() == B && gd.numel() == B && ln.numel() == B,
              "marginops: grad_lse, grad_dot and lse_neg must be (B,)");
  Tensor kd;
  if (kept.has_value()) {
    kd = kept->detach().to(acc).contiguous();
    const int64_t NK = (in.class_index.has_value() ? in.class_index->numel()
                                                   : in.W.size(0) / std::max<int64_t>(1, subcenters)) *
                       subcenters;
    TORCH_CHECK(kd.dim() == 2 && kd.size(0) == B + (fixed_shift ? 1 : 0) && kd.size(1) == NK,
                "marginops: margin_lse_backward_kept: dots must be the (B, N·K) tensor that "
                "margin_lse_keep returned for these inputs (margin_loss: (B + 1, C))");
  }
  // Rows never iterated (class_index) keep exactly zero; a repeated class in class_index is
  // accumulated, which needs the chunks to run one after another.
  const bool dup = in.class_index.has_value() && has_duplicates(*in.class_index);
  // A weight gradient within the keep budget comes from its recycling pool (keep_pool.h).
  const int64_t gw_bytes = in.W.numel() * static_cast<int64_t>(in.W.element_size());
  Tensor gW = (in.class_index.has_value() || dup) ? at::zeros_like(in.W)
              : gw_bytes <= KeepPool::grads().limit()
                  ? KeepPool::grads().empty(in.W.size(0), in.W.size(1), in.W.options())
                  : at::empty_like(in.W);
  Tensor gS = at::empty({B}, in.F.options());
  Tensor gBias = in.bias.has_value() ? at::zeros_like(*in.bias) : at::empty({0}, in.F.options());
  Tensor gF;
  const GemmPlan plan = gemm_plan(features, true, true, !kd.defined());
  dispatch_types(acc, in.W.scalar_type(), [&](auto acc0, auto w0) {
    using acc_t = decltype(acc0);
    using w_t = decltype(w0);
    auto P = make_problem<acc_t>(in.F, in.W, in.scale, in.bias, in.target, in.class_index, in.tau,
                                 in.t, normalize_weight, subcenters, filter_threshold);
    P.fixed_shift = fixed_shift && fixed_shift_allowed(P);
    backward_impl<acc_t, w_t>(P, in.W.data_ptr<w_t>(), in.F, gl.data_ptr<acc_t>(),
                              gd.data_ptr<acc_t>(), ln.data_ptr<acc_t>(), gF, gW.data_ptr<w_t>(),
                              gS.data_ptr<acc_t>(),
                              in.bias.has_value() ? gBias.data_ptr<acc_t>() : nullptr, dup, plan,
                              kd.defined() ? kd.data_ptr<acc_t>() : nullptr);
  });
  return {gF.to(features.scalar_type()), gW, gS, gBias};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> margin_lse_backward_cpu(
    const Tensor& grad_lse, const Tensor& grad_dot, const Tensor& lse_neg, const Tensor& features,
    const Tensor& weight, const Tensor& scale, const std::optional<Tensor>& bias,
    const Tensor& target_col, const std::optional<Tensor>& class_index,
    const std::optional<Tensor>& hard_tau, const std::optional<Tensor>& hard_t,
    bool normalize_weight, int64_t subcenters, double filter_threshold) {
  return backward_cpu(grad_lse, grad_dot, lse_neg, std::nullopt, features, weight, scale, bias,
                      target_col, class_index, hard_tau, hard_t, normalize_weight, subcenters,
                      filter_threshold, false);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> margin_lse_backward_kept_cpu(
    const Tensor& grad_lse, const Tensor& grad_dot, const Tensor& lse_neg, const Tensor& dots,
    const Tensor& features, const Tensor& weight, const Tensor& scale,
    const std::optional<Tensor>& bias, const Tensor& target_col,
    const std::optional<Tensor>& class_index, const std::optional<Tensor>& hard_tau,
    const std::optional<Tensor>& hard_t, bool normalize_weight, int64_t subcenters,
    double filter_threshold) {
  return backward_cpu(grad_lse, grad_dot, lse_neg, dots, features, weight, scale, bias,
                      target_col, class_index, hard_tau, hard_t, normalize_weight, subcenters,
                      filter_threshold, false);
}

std::tuple<Tensor, Tensor> topk_cpu(const Tensor& features, const Tensor& weight,
                                    const Tensor& exclude_col, int64_t k, bool normalize_weight,
                                    int64_t subcenters) {
  Tensor scale = at::ones({features.size(0)}, features.options().dtype(acc_type_of(features)));
  Inputs in = prepare(features, weight, scale, std::nullopt, exclude_col, std::nullopt,
                      std::nullopt, std::nullopt);
  const auto acc = in.F.scalar_type();
  const int64_t B = in.F.size(0);
  TORCH_CHECK(subcenters >= 1 && in.W.size(0) % subcenters == 0,
              "marginops: weight rows must be C·subcenters");
  const int64_t N = in.W.size(0) / subcenters;
  TORCH_CHECK(k >= 0 && k <= N, "marginops: topk needs 0 <= k <= number of classes (", N, ")");
  Tensor vals = at::empty({B, k}, in.F.options());
  Tensor cols = at::empty({B, k}, in.F.options().dtype(at::kLong));
  if (k == 0 || B == 0) return {vals, cols};
  dispatch_types(acc, in.W.scalar_type(), [&](auto acc0, auto w0) {
    using acc_t = decltype(acc0);
    using w_t = decltype(w0);
    auto P = make_problem<acc_t>(in.F, in.W, in.scale, std::nullopt, in.target, std::nullopt,
                                 std::nullopt, std::nullopt, normalize_weight, subcenters, 0.0);
    topk_impl<acc_t, w_t>(P, in.W.data_ptr<w_t>(), in.F, in.target.data_ptr<int64_t>(), k,
                          vals.data_ptr<acc_t>(), cols.data_ptr<int64_t>(),
                          gemm_plan(features, false));
  });
  return {vals, cols};
}

// The recycling pools (keep_pool.h): the bytes they hold between steps; release = true frees them
// (marginops.ops.cpp.set_keep_budget calls it).
int64_t keep_pool_held_bytes(bool release) {
  const int64_t held = KeepPool::instance().held_bytes() + KeepPool::grads().held_bytes();
  if (release) {
    KeepPool::instance().release();
    KeepPool::grads().release();
  }
  return held;
}

// The largest weight gradient the gradient pool recycles (the keep budget); returns the old one.
int64_t set_grad_pool_limit(int64_t nbytes) {
  const int64_t old = KeepPool::grads().limit();
  KeepPool::grads().set_limit(nbytes);
  return old;
}

TORCH_LIBRARY_FRAGMENT(marginops, m) {
  m.def("keep_pool_held_bytes(bool release=False) -> int", &keep_pool_held_bytes);
  m.def("set_grad_pool_limit(int nbytes) -> int", &set_grad_pool_limit);
}

TORCH_LIBRARY_IMPL(marginops, CPU, m) {
  m.impl("margin_lse", &margin_lse_cpu);
  m.impl("margin_lse_backward", &margin_lse_backward_cpu);
  m.impl("margin_lse_keep", &margin_lse_keep_cpu);
  m.impl("margin_lse_backward_kept", &margin_lse_backward_kept_cpu);
  m.impl("topk", &topk_cpu);
}

}  // namespace cpu
}  // namespace marginops
