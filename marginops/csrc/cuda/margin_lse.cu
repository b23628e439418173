// CUDA kernels of the marginops core op: margin_lse, margin_lse_backward, topk.
//
// Same structure as the CPU code (csrc/cpu/margin_lse.cpp), chunk by chunk over the class columns
// (the kernels are in csrc/cuda/kernels.h, the GEMMs and the chunk size in csrc/cuda/tc_gemm.h),
// all on the current stream. Once per call:
//   row_norms_kernel  — 1/wn and ‖W_r‖² of every iterated weight row (normalize_weight only).
// Per chunk of nc classes (nc·K weight rows; nc from plan_chunks, csrc/cuda/tc_gemm.h: the fp32
// tile stays in L2):
//   1. GEMM (tc_gemm.h) — T = F · W_cᵀ (B × nc·K, fp32) on the tensor cores, in the features'
//      dtype: W_c is the weight's own rows (a pointer into W, no copy) unless class_index gathers
//      them or the weight's dtype differs from the features' — then load_chunk_kernel writes the
//      chunk's nc·K × D rows in the features' dtype (bf16 activations with fp32 master weights run
//      bf16 GEMMs, as autocast's F.linear would; fp32 features with a bf16 weight convert the
//      chunk up, exactly). F is never copied; W at most one chunk at a time (these rows, and
//      fp16's normalised rows below), never in full.
//   2. epilogue kernels — grid (row, split), one read of the tile: d = T·(1/wn) (the weight
//      normalisation, exact to the contract, applied to the fp32 dots — epi::subcenter_max),
//      sub-center max, target mask, filtering, hard-negative modulation, scale, bias; forward:
//      (max, Σexp), merged into each row's running pair; backward: DD = ∂L/∂d (the softmax
//      gradient), written in the GEMMs' dtype, then ∂F += DD·W_c and G = DDᵀ·F (fp32 out) and a
//      kernel applying the normalisation Jacobian to G, written in the weight's dtype chunk by
//      chunk (no (R, D) fp32 buffer).
// The scalar math is csrc/include/epilogue.h, shared with the CPU kernels. Everything accumulates
// in fp32 (dots, max, Σexp, ∂F, G); only the GEMM operands are 16-bit for 16-bit inputs.
//
// Where 1/wn goes in the backward. With d_ir = (f_i·W_r)·inv_r, ∂L/∂f_i = Σ_r (dd_ir·inv_r)·W_r and
// G'_r = Σ_i (dd_ir·inv_r)·f_i = inv_r·G_r, so grad_W_r = G'_r − ŵ_r(ŵ_r·G'_r): the epilogue writes
// DD' = dd·inv and both GEMMs read the raw W. That needs DD' representable in the GEMM dtype: fine
// for fp32 and bf16 (fp32's exponent range), not for fp16 (max 65504), where a row of tiny norm
// (inv up to 1e12) would overflow. So with fp16 and normalize_weight the epilogue writes the
// unscaled dd, ∂F reads a chunk of normalised rows Ŵc (fp16, entries in [−1, 1]) and the Jacobian
// multiplies by inv: grad_W_r = (G_r − ŵ_r(ŵ_r·G_r))·inv_r.
//
// Nothing of size B×C is allocated: the workspaces are B × nc·K and nc·K × D, and the per-row
// vectors (1/wn, ‖W‖², bias per column) are N·K.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "kernels.h"
#include "tc_gemm.h"

namespace marginops {
namespace cuda {

using at::Tensor;

// ================================================================================================
// Host side
// ================================================================================================

inline unsigned blocks_for(int64_t n, int per_block = kThreads) {
  return static_cast<unsigned>((n + per_block - 1) / per_block);
}

struct Prepared {
  Tensor F, W, scale, target;
  std::optional<Tensor> bias, class_index, tau, t;
  int64_t B, D, K, C, N;
};

// Every tensor argument must live on the features' CUDA device before any pointer reaches a
// kernel: a CPU target_col / tau / hard_t would be dereferenced on the GPU (illegal address, a
// dead CUDA context), another GPU's tensor read from the wrong device.
inline void check_device(const Tensor& t, const char* name, const c10::Device& dev) {
  TORCH_CHECK(t.device() == dev, "marginops: ", name, " is on ", t.device(), " but features are on ",
              dev, "; every input of the CUDA op must be on the features' device (use ", name,
              ".to(features.device))");
}

inline void check_device(const std::optional<Tensor>& t, const char* name, const c10::Device& dev) {
  if (t.has_value()) check_device(*t, name, dev);
}

// Checks every argument (devices first), then makes the features' device current in `guard`
// (kernels and cuBLAS calls below run on that device and its current stream), then lays the
// inputs out as the kernels want them. F and W keep their dtypes (bf16 / fp16 / fp32).
inline Prepared prepare(c10::cuda::OptionalCUDAGuard& guard, const Tensor& features,
                        const Tensor& weight, const Tensor& scale,
                        const std::optional<Tensor>& bias, const Tensor& target_col,
                        const std::optional<Tensor>& class_index,
                        const std::optional<Tensor>& hard_tau,
                        const std::optional<Tensor>& hard_t, int64_t subcenters) {
  const c10::Device dev = features.device();
  TORCH_CHECK(dev.is_cuda(), "marginops: the CUDA op got features on ", dev,
              "; move features and every other input to one CUDA device");
  check_device(weight, "weight", dev);
  check_device(scale, "scale", dev);
  check_device(bias, "bias", dev);
  check_device(target_col, "target_col (labels)", dev);
  check_device(class_index, "class_index", dev);
  check_device(hard_tau, "hard_tau", dev);
  check_device(hard_t, "hard_t", dev);
  TORCH_CHECK(features.scalar_type() != at::kDouble && weight.scalar_type() != at::kDouble,
              "marginops: the CUDA kernels take bf16/fp16/fp32 inputs (fp64 is CPU-only)");
  TORCH_CHECK(features.dim() == 2 && weight.dim() == 2 && weight.size(1) == features.size(1),
              "marginops: features (B, D) and weight (R, D) expected");
  TORCH_CHECK(subcenters >= 1 && weight.size(0) % subcenters == 0,
              "marginops: weight rows must be C·subcenters");
  TORCH_CHECK(hard_tau.has_value() == hard_t.has_value(),
              "marginops: hard_tau and hard_t are given together");
  guard.set_device(dev);
  Prepared p;
  // detach(): the ATen calls inside must not be recorded by autograd.
  p.F = features.detach().contiguous();
  p.W = weight.detach().contiguous();
  p.scale = scale.detach().to(at::kFloat).contiguous();
  p.target = target_col.detach().to(at::kLong).contiguous();
  if (bias.has_value()) p.bias = bias->detach().to(at::kFloat).contiguous();
  if (class_index.has_value()) p.class_index = class_index->to(at::kLong).contiguous();
  if (hard_tau.has_value()) p.tau = hard_tau->detach().to(at::kFloat).contiguous();
  if (hard_t.has_value()) p.t = hard_t->detach().to(at::kFloat).contiguous();
  p.B = p.F.size(0);
  p.D = p.F.size(1);
  p.K = subcenters;
  p.C = p.W.size(0) / subcenters;
  p.N = class_index.has_value() ? class_index->numel() : p.C;
  return p;
}

template <typename T>
inline const T* opt_ptr(const std::optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// Calls f(w_t(0), c_t(0)) for the weight's and the features' dtypes (bf16 / fp16 / fp32 each).
template <typename Fn>
void dispatch_dtypes(at::ScalarType wt, at::ScalarType ct, Fn&& f) {
  auto one = [](at::ScalarType t, auto&& g) {
    if (t == at::kFloat)
      g(float(0));
    else if (t == at::kHalf)
      g(at::Half(0));
    else if (t == at::kBFloat16)
      g(at::BFloat16(0));
    else
      TORCH_CHECK(false, "marginops: unsupported dtype ", t, " (bf16, fp16 or fp32)");
  };
  one(wt, [&](auto w0) { one(ct, [&](auto c0) { f(w0, c0); }); });
}

// What a call streams over: 1/wn and ‖W‖² of its N·K rows (normalize_weight only, else empty),
// the bias of each column (gathered through class_index), the chunk plan, the row arguments.
struct Sweep {
  Tensor inv, sumsq, bias_cols;
  ChunkPlan plan;
  bool needs_rows;  // the GEMM operand is a gathered / converted copy of the chunk's rows
};

// Tile bytes per logit in the backward (the forward and topk use the same plan, so a backward
// recomputes the forward's logits with the same GEMM shapes): T (fp32) + DD in the GEMM dtype
// unless that is fp32 (DD is then written over T) + P (fp32) when there is a bias.
inline int64_t bytes_per_logit(const Prepared& p) {
  return 4 + (p.F.scalar_type() == at::kFloat ? 0 : p.F.element_size()) + (p.bias ? 4 : 0);
}

template <typename w_t>
Sweep begin_sweep(const Prepared& p, bool normalize, cudaStream_t stream) {
  Sweep s;
  const auto opt = p.F.options().dtype(at::kFloat);
  if (normalize && p.N > 0) {
    const int64_t rows = p.N * p.K;
    s.inv = at::empty({rows}, opt);
    s.sumsq = at::empty({rows}, opt);
    row_norms_kernel<w_t><<<blocks_for(rows, kWarps), kThreads, 0, stream>>>(
        p.W.data_ptr<w_t>(), opt_ptr<int64_t>(p.class_index), rows, p.K, p.D,
        s.inv.data_ptr<float>(), s.sumsq.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (p.bias.has_value())
    s.bias_cols = p.class_index.has_value() ? p.bias->index_select(0, *p.class_index) : *p.bias;
  s.plan = plan_chunks(p.F.device(), p.B, p.K, p.D, p.N, bytes_per_logit(p));
  s.needs_rows = p.class_index.has_value() || p.W.scalar_type() != p.F.scalar_type();
  return s;
}

RowArgs row_args(const Prepared& p, const Sweep& s, int64_t n0, int64_t nc, double thr) {
  return RowArgs{p.target.data_ptr<int64_t>(), p.scale.data_ptr<float>(), opt_ptr<float>(p.tau),
                 opt_ptr<float>(p.t), s.inv.defined() ? s.inv.data_ptr<float>() + n0 * p.K : nullptr,
                 s.bias_cols.defined() ? s.bias_cols.data_ptr<float>() + n0 : nullptr, n0, nc, p.K,
                 static_cast<float>(thr), thr > 0};
}

// The chunk's rows n0·K … (n0+nc)·K − 1 as a GEMM operand in the features' dtype c_t: a pointer
// into W itself when nothing has to change, else load_chunk_kernel's copy in `buf` (gathered,
// converted, and multiplied by inv when `inv` is given).
template <typename w_t, typename c_t>
const c_t* chunk_rows(const Prepared& p, int64_t n0, int64_t nc, const float* inv, Tensor& buf,
                      cudaStream_t stream) {
  const int64_t r0 = n0 * p.K, rows = nc * p.K;
  if (!inv && !p.class_index.has_value() && std::is_same<w_t, c_t>::value)
    return static_cast<const c_t*>(p.W.data_ptr()) + r0 * p.D;
  if (rows * p.D == 0) return buf.data_ptr<c_t>();  // D = 0: nothing to load (no empty grid)
  load_chunk_kernel<w_t, c_t><<<blocks_for(rows * p.D), kThreads, 0, stream>>>(
      p.W.data_ptr<w_t>(), opt_ptr<int64_t>(p.class_index), r0, rows, p.K, p.D, inv,
      buf.data_ptr<c_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return buf.data_ptr<c_t>();
}

// T (B × rows, fp32) = F · W_cᵀ on the tensor cores.
inline void chunk_dots(const Prepared& p, const void* Wc, int64_t rows, float* T,
                       cudaStream_t stream) {
  gemm_f32out(false, true, p.B, rows, p.D, p.F.data_ptr(), p.D, Wc, p.D, 0.f, T, rows,
              p.F.scalar_type(), stream);
}

std::tuple<Tensor, Tensor> margin_lse_cuda(const Tensor& features, const Tensor& weight,
                                           const Tensor& scale, const std::optional<Tensor>& bias,
                                           const Tensor& target_col,
                                           const std::optional<Tensor>& class_index,
                                           const std::optional<Tensor>& hard_tau,
                                           const std::optional<Tensor>& hard_t,
                                           bool normalize_weight, int64_t subcenters,
                                           double filter_threshold) {
  c10::cuda::OptionalCUDAGuard guard;
  Prepared p = prepare(guard, features, weight, scale, bias, target_col, class_index, hard_tau,
                       hard_t, subcenters);
  const auto opt = p.F.options().dtype(at::kFloat);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  Tensor lse = at::empty({p.B}, opt);
  Tensor dot = at::zeros({p.B}, opt);
  Tensor run_m = at::full({p.B}, -std::numeric_limits<float>::infinity(), opt);
  Tensor run_s = at::zeros({p.B}, opt);
  if (p.B == 0) return {lse, dot};
  dispatch_dtypes(p.W.scalar_type(), p.F.scalar_type(), [&](auto w0, auto c0) {
    using w_t = decltype(w0);
    using c_t = decltype(c0);
    const Sweep s = begin_sweep<w_t>(p, normalize_weight, stream);
    const int64_t nc_max = s.plan.nc, S = s.plan.splits;
    Tensor T = at::empty({p.B * nc_max * p.K}, opt);
    Tensor rows = s.needs_rows ? at::empty({nc_max * p.K, p.D}, p.F.options()) : Tensor();
    Tensor part_m = S > 1 ? at::empty({p.B * S}, opt) : Tensor();
    Tensor part_s = S > 1 ? at::empty({p.B * S}, opt) : Tensor();
    for (int64_t n0 = 0; n0 < p.N; n0 += nc_max) {
      const int64_t nc = std::min(nc_max, p.N - n0), sp = std::min<int64_t>(S, nc);
      chunk_dots(p, chunk_rows<w_t, c_t>(p, n0, nc, nullptr, rows, stream), nc * p.K,
                 T.data_ptr<float>(), stream);
      forward_epilogue_kernel<<<dim3(p.B, sp), kThreads, 0, stream>>>(
          T.data_ptr<float>(), row_args(p, s, n0, nc, filter_threshold),
          sp > 1 ? part_m.data_ptr<float>() : nullptr, sp > 1 ? part_s.data_ptr<float>() : nullptr,
          run_m.data_ptr<float>(), run_s.data_ptr<float>(), dot.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (sp > 1) {
        merge_partials_kernel<<<blocks_for(p.B), kThreads, 0, stream>>>(
            part_m.data_ptr<float>(), part_s.data_ptr<float>(), p.B, sp, run_m.data_ptr<float>(),
            run_s.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  finalize_kernel<<<blocks_for(p.B), kThreads, 0, stream>>>(run_m.data_ptr<float>(),
                                                             run_s.data_ptr<float>(), p.B,
                                                             lse.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {lse, dot};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> margin_lse_backward_cuda(
    const Tensor& grad_lse, const Tensor& grad_dot, const Tensor& lse_neg, const Tensor& features,
    const Tensor& weight, const Tensor& scale, const std::optional<Tensor>& bias,
    const Tensor& target_col, const std::optional<Tensor>& class_index,
    const std::optional<Tensor>& hard_tau, const std::optional<Tensor>& hard_t,
    bool normalize_weight, int64_t subcenters, double filter_threshold) {
  c10::cuda::OptionalCUDAGuard guard;
  Prepared p = prepare(guard, features, weight, scale, bias, target_col, class_index, hard_tau,
                       hard_t, subcenters);
  check_device(grad_lse, "grad_lse", features.device());
  check_device(grad_dot, "grad_dot", features.device());
  check_device(lse_neg, "lse_neg", features.device());
  const auto opt = p.F.options().dtype(at::kFloat);
  const at::ScalarType ct = p.F.scalar_type();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  Tensor gl = grad_lse.detach().to(at::kFloat).contiguous();
  Tensor gd = grad_dot.detach().to(at::kFloat).contiguous();
  Tensor ln = lse_neg.detach().to(at::kFloat).contiguous();
  const bool work = p.B > 0 && p.N > 0;
  // class_index: per-column results are added into their classes (duplicates accumulate),
  // directly in the weight's dtype — no C·K × D fp32 buffer for Partial FC's huge C. Without it
  // every weight row is written by weight_grad_kernel, so grad_W needs no zero fill.
  const bool per_column = p.class_index.has_value();
  Tensor gF = at::zeros({p.B, p.D}, opt);  // fp32 accumulator over the chunks
  Tensor gW = work && !per_column ? at::empty_like(p.W) : at::zeros_like(p.W);
  Tensor gS = at::zeros({p.B}, opt);
  Tensor gBias = p.bias.has_value() ? at::zeros_like(*p.bias) : at::empty({0}, opt);
  // DD' = dd·inv in the GEMM dtype, except fp16 with normalisation (see the file comment).
  const bool scale_dd = !(ct == at::kHalf && normalize_weight);
  if (work) {
    dispatch_dtypes(p.W.scalar_type(), ct, [&](auto w0, auto c0) {
      using w_t = decltype(w0);
      using c_t = decltype(c0);
      const Sweep s = begin_sweep<w_t>(p, normalize_weight, stream);
      const int64_t nc_max = s.plan.nc, S = s.plan.splits, rows_max = nc_max * p.K;
      Tensor T = at::empty({p.B * rows_max}, opt);
      Tensor DD = ct == at::kFloat ? T : at::empty({p.B * rows_max}, p.F.options());
      Tensor rows = s.needs_rows ? at::empty({rows_max, p.D}, p.F.options()) : Tensor();
      Tensor rows_hat = scale_dd ? Tensor() : at::empty({rows_max, p.D}, p.F.options());
      Tensor G = at::empty({rows_max, p.D}, opt);
      Tensor part_gs = S > 1 ? at::empty({p.B * S}, opt) : Tensor();
      Tensor P = p.bias.has_value() ? at::empty({p.B * nc_max}, opt) : Tensor();
      Tensor gbias_col = per_column && p.bias.has_value() ? at::empty({nc_max}, opt) : Tensor();
      const Tensor sub = at::arange(p.K, opt.dtype(at::kLong));
      const float* inv_all = s.inv.defined() ? s.inv.data_ptr<float>() : nullptr;
      for (int64_t n0 = 0; n0 < p.N; n0 += nc_max) {
        const int64_t nc = std::min(nc_max, p.N - n0), ncK = nc * p.K;
        const int64_t sp = std::min<int64_t>(S, nc);
        const c_t* Wc = chunk_rows<w_t, c_t>(p, n0, nc, nullptr, rows, stream);
        chunk_dots(p, Wc, ncK, T.data_ptr<float>(), stream);
        float* Pp = P.defined() ? P.data_ptr<float>() : nullptr;
        backward_epilogue_kernel<c_t><<<dim3(p.B, sp), kThreads, 0, stream>>>(
            T.data_ptr<float>(), row_args(p, s, n0, nc, filter_threshold), gl.data_ptr<float>(),
            gd.data_ptr<float>(), ln.data_ptr<float>(), scale_dd, DD.data_ptr<c_t>(), Pp,
            sp > 1 ? part_gs.data_ptr<float>() : nullptr, gS.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (sp > 1) {
          sum_partials_kernel<<<blocks_for(p.B), kThreads, 0, stream>>>(
              part_gs.data_ptr<float>(), p.B, sp, gS.data_ptr<float>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        const Tensor classes = per_column ? p.class_index->narrow(0, n0, nc) : Tensor();
        if (Pp) {
          float* gcol = per_column ? gbias_col.data_ptr<float>() : nullptr;
          bias_grad_kernel<<<blocks_for(nc), kThreads, 0, stream>>>(Pp, p.B, nc, n0,
                                                                    gBias.data_ptr<float>(), gcol);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          if (per_column)  // gBias[class_index[n0 + j]] += gcol[j]: sort-based, deterministic
            gBias.index_put_(c10::List<std::optional<Tensor>>({classes}),
                             gbias_col.narrow(0, 0, nc), /*accumulate=*/true);
        }
        // ∂F += DD'·W_c (or DD·Ŵc for fp16), G = DDᵀ·F: fp32 outputs
        const c_t* Wf = scale_dd ? Wc : chunk_rows<w_t, c_t>(p, n0, nc, inv_all, rows_hat, stream);
        gemm_f32out(false, false, p.B, p.D, ncK, DD.data_ptr<c_t>(), ncK, Wf, p.D, 1.f,
                    gF.data_ptr<float>(), p.D, ct, stream);
        gemm_f32out(true, false, ncK, p.D, p.B, DD.data_ptr<c_t>(), ncK, p.F.data_ptr(), p.D, 0.f,
                    G.data_ptr<float>(), p.D, ct, stream);
        weight_grad_kernel<w_t><<<static_cast<unsigned>(ncK), kThreads, 0, stream>>>(
            G.data_ptr<float>(), p.W.data_ptr<w_t>(), opt_ptr<int64_t>(p.class_index), inv_all,
            s.sumsq.defined() ? s.sumsq.data_ptr<float>() : nullptr, n0 * p.K, p.K, p.D, scale_dd,
            gW.data_ptr<w_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (per_column) {  // rows class·K + k of the chunk's columns, summed in (deterministic)
          const Tensor wrows = (classes.unsqueeze(1) * p.K + sub).reshape({-1});
          gW.index_put_(c10::List<std::optional<Tensor>>({wrows}),
                        G.narrow(0, 0, ncK).to(p.W.scalar_type()), /*accumulate=*/true);
        }
      }
    });
  }
  return {ct == at::kFloat ? gF : gF.to(ct), gW, gS, gBias};
}

std::tuple<Tensor, Tensor> topk_cuda(const Tensor& features, const Tensor& weight,
                                     const Tensor& exclude_col, int64_t k, bool normalize_weight,
                                     int64_t subcenters) {
  c10::cuda::OptionalCUDAGuard guard;
  Tensor scale = at::ones({features.size(0)}, features.options().dtype(at::kFloat));
  Prepared p = prepare(guard, features, weight, scale, std::nullopt, exclude_col, std::nullopt,
                       std::nullopt, std::nullopt, subcenters);
  TORCH_CHECK(k >= 0 && k <= p.N, "marginops: topk needs 0 <= k <= number of classes (", p.N, ")");
  const auto opt = p.F.options().dtype(at::kFloat);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Running best (B × ≤k), values descending with ties in ascending column order. A stable
  // descending sort keeps equal values in their input order, and the running list always holds
  // lower columns than the chunk appended after it, so ties resolve to the lower column.
  Tensor best_v = at::empty({p.B, 0}, opt);
  Tensor best_c = at::empty({p.B, 0}, opt.dtype(at::kLong));
  if (p.B == 0 || k == 0) return {at::empty({p.B, k}, opt), at::empty({p.B, k}, opt.dtype(at::kLong))};
  dispatch_dtypes(p.W.scalar_type(), p.F.scalar_type(), [&](auto w0, auto c0) {
    using w_t = decltype(w0);
    using c_t = decltype(c0);
    const Sweep s = begin_sweep<w_t>(p, normalize_weight, stream);
    const int64_t nc_max = s.plan.nc;
    Tensor T = at::empty({p.B * nc_max * p.K}, opt);
    Tensor rows = s.needs_rows ? at::empty({nc_max * p.K, p.D}, p.F.options()) : Tensor();
    Tensor Dm = at::empty({p.B * nc_max}, opt);
    for (int64_t n0 = 0; n0 < p.N; n0 += nc_max) {
      const int64_t nc = std::min(nc_max, p.N - n0);
      chunk_dots(p, chunk_rows<w_t, c_t>(p, n0, nc, nullptr, rows, stream), nc * p.K,
                 T.data_ptr<float>(), stream);
      topk_reduce_kernel<<<blocks_for(p.B * nc), kThreads, 0, stream>>>(
          T.data_ptr<float>(), row_args(p, s, n0, nc, 0.0), p.B, Dm.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      Tensor dv = Dm.narrow(0, 0, p.B * nc).view({p.B, nc});
      auto [cv, ci] = at::sort(dv, /*stable=*/true, /*dim=*/1, /*descending=*/true);
      const int64_t take = std::min(k, nc);
      Tensor cand_v = at::cat({best_v, cv.narrow(1, 0, take)}, 1);
      Tensor cand_c = at::cat({best_c, ci.narrow(1, 0, take) + n0}, 1);
      auto [mv, mi] = at::sort(cand_v, /*stable=*/true, /*dim=*/1, /*descending=*/true);
      const int64_t keep = std::min(k, cand_v.size(1));
      best_v = mv.narrow(1, 0, keep).contiguous();
      best_c = cand_c.gather(1, mi.narrow(1, 0, keep)).contiguous();
    }
  });
  return {best_v, best_c};
}

TORCH_LIBRARY_IMPL(marginops, CUDA, m) {
  m.impl("margin_lse", &margin_lse_cuda);
  m.impl("margin_lse_backward", &margin_lse_backward_cuda);
  m.impl("topk", &topk_cuda);
}

}  // namespace cuda
}  // namespace marginops
