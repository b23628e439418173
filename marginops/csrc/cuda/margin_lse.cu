// CUDA kernels of the marginops core op: margin_lse, margin_lse_backward, topk.
//
// Same structure as the CPU code (csrc/cpu/margin_lse.cpp), chunk by chunk over the class columns,
// all on the current stream:
//   1. load_rows_kernel   — gather the chunk's weight rows (indirectly through class_index),
//                           convert to fp32 and normalise into a nc·K × D workspace Ŵc;
//   2. at::mm (cuBLAS)    — T = F · Ŵcᵀ (B × nc·K) into a workspace;
//   3. epilogue kernels   — grid (row, split): sub-center max, target mask, hard-negative
//                           modulation, scale, bias; forward: per-split (max, Σexp) partials, merged
//                           by a small kernel in fixed order; backward: DD (the softmax gradient),
//                           then at::addmm_ for ∂F and at::mm for G = DDᵀ·F, and a kernel applying
//                           the normalisation Jacobian to the rows the chunk owns.
// The scalar math is csrc/include/epilogue.h, shared with the CPU kernels. Inputs may be
// bf16/fp16/fp32; everything accumulates in fp32 and fp32 master weights are read as they are.
// Nothing of size B×C is allocated: the workspaces are B×nc·K and nc·K×D.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "epilogue.h"

namespace marginops {
namespace cuda {

using at::Tensor;
namespace epi = marginops::epi;

constexpr int kThreads = 256;

// ------------------------------------------------------------------------------------------------
// Block reductions (deterministic tree order)
// ------------------------------------------------------------------------------------------------

__device__ float block_sum(float v, float* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) sh[threadIdx.x] += sh[threadIdx.x + stride];
    __syncthreads();
  }
  float r = sh[0];
  __syncthreads();
  return r;
}

// Merge per-thread (max, Σexp) pairs; the result is valid in thread 0.
__device__ void block_lse(float& m, float& s, float* shm, float* shs) {
  shm[threadIdx.x] = m;
  shs[threadIdx.x] = s;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      float a = shm[threadIdx.x], b = shs[threadIdx.x];
      epi::lse_merge(a, b, shm[threadIdx.x + stride], shs[threadIdx.x + stride]);
      shm[threadIdx.x] = a;
      shs[threadIdx.x] = b;
    }
    __syncthreads();
  }
  m = shm[0];
  s = shs[0];
  __syncthreads();
}

// ------------------------------------------------------------------------------------------------
// Chunk load: one block per weight row of the chunk
// ------------------------------------------------------------------------------------------------

template <typename w_t>
__global__ void load_rows_kernel(const w_t* __restrict__ W, const int64_t* __restrict__ class_index,
                                 const float* __restrict__ bias, int64_t n0, int64_t K, int64_t D,
                                 bool normalize, float* __restrict__ Wc, float* __restrict__ inv,
                                 float* __restrict__ sumsq, float* __restrict__ bias_c) {
  __shared__ float sh[kThreads];
  const int64_t r = blockIdx.x, j = r / K, k = r % K;
  const int64_t c = class_index ? class_index[n0 + j] : n0 + j;
  const w_t* src = W + (c * K + k) * D;
  float* dst = Wc + r * D;
  float ss = 0.f;
  for (int64_t e = threadIdx.x; e < D; e += blockDim.x) {
    const float v = static_cast<float>(src[e]);
    dst[e] = v;
    ss += v * v;
  }
  ss = block_sum(ss, sh);
  const float iv = epi::inv_norm(ss, normalize);
  if (normalize)
    for (int64_t e = threadIdx.x; e < D; e += blockDim.x) dst[e] *= iv;
  if (threadIdx.x == 0) {
    inv[r] = iv;
    sumsq[r] = ss;
    if (k == 0) bias_c[j] = bias ? bias[c] : 0.f;
  }
}

// Per-row epilogue parameters.
struct RowArgs {
  const int64_t* target;  // B
  const float* scale;     // B
  const float* tau;       // B or null
  const float* hard_t;    // 0-d or null
  int64_t n0, nc, K;
  float thr;              // interclass filtering threshold
  bool filter;            // threshold > 0 (decided in double on the host: a tiny positive
                          // threshold that rounds to 0.f still filters, as on the other backends)
};

// Column range [j0, j1) of split blockIdx.y.
__device__ inline void split_range(int64_t nc, int64_t* j0, int64_t* j1) {
  const int64_t per = (nc + gridDim.y - 1) / gridDim.y;
  *j0 = blockIdx.y * per;
  *j1 = min(nc, *j0 + per);
}

// ------------------------------------------------------------------------------------------------
// Forward epilogue: grid (B, S). Writes the split's (max, Σexp) and, for the target, dot_y.
// ------------------------------------------------------------------------------------------------

__global__ void forward_epilogue_kernel(const float* __restrict__ T, const float* __restrict__ bias_c,
                                        RowArgs a, float* __restrict__ part_m,
                                        float* __restrict__ part_s, float* __restrict__ dot_out) {
  __shared__ float shm[kThreads], shs[kThreads];
  const int64_t i = blockIdx.x, ncK = a.nc * a.K;
  int64_t j0, j1;
  split_range(a.nc, &j0, &j1);
  const int64_t tl = a.target[i] - a.n0;
  const float s = a.scale[i];
  const bool hard = a.tau != nullptr;
  const float tau = hard ? a.tau[i] : 0.f, t = hard ? *a.hard_t : 0.f;
  float m = epi::neg_inf<float>(), sum = 0.f;
  for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
    int64_t argk;
    const float d = epi::subcenter_max(T + i * ncK + j * a.K, a.K, &argk);
    if (j == tl) {
      dot_out[i] = d;  // exactly one thread of one chunk sees a row's target
      continue;
    }
    const bool f = epi::is_filtered(d, a.thr, a.filter);  // d' = 0 (insightface)
    const float dm = f ? 0.f : epi::modulate(d, t, epi::is_hard(d, tau, hard));
    const float z = epi::logit(dm, s, bias_c[j]);
    epi::lse_merge(m, sum, z, 1.f);
  }
  block_lse(m, sum, shm, shs);
  if (threadIdx.x == 0) {
    part_m[i * gridDim.y + blockIdx.y] = m;
    part_s[i * gridDim.y + blockIdx.y] = sum;
  }
}

// Fold the S split partials of this chunk into the running (max, Σexp) of each row, in order.
__global__ void merge_partials_kernel(const float* __restrict__ part_m, const float* __restrict__ part_s,
                                      int64_t B, int64_t S, float* run_m, float* run_s) {
  const int64_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= B) return;
  float m = run_m[i], s = run_s[i];
  for (int64_t sp = 0; sp < S; ++sp) epi::lse_merge(m, s, part_m[i * S + sp], part_s[i * S + sp]);
  run_m[i] = m;
  run_s[i] = s;
}

__global__ void finalize_kernel(const float* run_m, const float* run_s, int64_t B, float* lse) {
  const int64_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < B) lse[i] = epi::lse_finalize(run_m[i], run_s[i]);
}

// ------------------------------------------------------------------------------------------------
// Backward epilogue: grid (B, S). T (B × nc·K) → DD in place; P (B × nc) = softmax weights when
// a bias gradient is needed; per-split Σ g·d' for ∂scale.
// ------------------------------------------------------------------------------------------------

__global__ void backward_epilogue_kernel(float* __restrict__ T, const float* __restrict__ bias_c,
                                         RowArgs a, const float* __restrict__ grad_lse,
                                         const float* __restrict__ grad_dot,
                                         const float* __restrict__ lse_neg, float* __restrict__ P,
                                         float* __restrict__ part_gs) {
  __shared__ float sh[kThreads];
  const int64_t i = blockIdx.x, ncK = a.nc * a.K;
  int64_t j0, j1;
  split_range(a.nc, &j0, &j1);
  const int64_t tl = a.target[i] - a.n0;
  const float s = a.scale[i], gl = grad_lse[i], lse = lse_neg[i], gd = grad_dot[i];
  const bool hard = a.tau != nullptr;
  const float tau = hard ? a.tau[i] : 0.f, t = hard ? *a.hard_t : 0.f;
  float gsum = 0.f;
  for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
    float* cell = T + i * ncK + j * a.K;
    int64_t argk;
    const float d = epi::subcenter_max(cell, a.K, &argk);
    const bool h = epi::is_hard(d, tau, hard);
    const bool f = epi::is_filtered(d, a.thr, a.filter);  // d' = 0 with slope 0 (insightface)
    const float dm = f ? 0.f : epi::modulate(d, t, h);
    const float p = j == tl ? 0.f : epi::softmax_grad(epi::logit(dm, s, bias_c[j]), lse, gl);
    gsum += p * dm;
    if (P) P[i * a.nc + j] = p;
    const float dd = p * s * (f ? 0.f : epi::modulate_grad(d, t, h)) + (j == tl ? gd : 0.f);
    for (int64_t k = 0; k < a.K; ++k) cell[k] = k == argk ? dd : 0.f;
  }
  gsum = block_sum(gsum, sh);
  if (threadIdx.x == 0) part_gs[i * gridDim.y + blockIdx.y] = gsum;
}

__global__ void sum_partials_kernel(const float* __restrict__ part, int64_t B, int64_t S,
                                    float* __restrict__ out) {
  const int64_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= B) return;
  float acc = out[i];
  for (int64_t sp = 0; sp < S; ++sp) acc += part[i * S + sp];
  out[i] = acc;
}

// ∂bias for the chunk's columns, Σ_i P[i, j]: one thread per column, coalesced over j. Without
// class_index column j is class n0 + j, owned by this thread alone (chunks run one after another
// on the stream): gbias[n0 + j] += directly. With class_index two columns may name one class, so
// the sum goes to gcol[j] and the host adds columns into classes with a deterministic reduction.
__global__ void bias_grad_kernel(const float* __restrict__ P, int64_t B, int64_t nc, int64_t n0,
                                 float* __restrict__ gbias, float* __restrict__ gcol) {
  const int64_t j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= nc) return;
  float acc = 0.f;
  for (int64_t i = 0; i < B; ++i) acc += P[i * nc + j];
  if (gcol)
    gcol[j] = acc;
  else
    gbias[n0 + j] += acc;
}

// Normalisation Jacobian, one block per weight row r of the chunk:
//   ∂W_r = (G_r − ŵ_r (ŵ_r·G_r)) / wn_r  (projection only when normalising a non-zero row)
// Without class_index row r is weight row n0·K + r, written by this block alone. With class_index
// two columns may name one class (the contract accumulates them), so the result overwrites G_r in
// place (each thread reads g[e] before writing it; proj is complete after block_sum's barrier)
// and the host adds the chunk's rows into their classes (deterministic, no racing blocks).
template <typename w_t>
__global__ void weight_grad_kernel(float* __restrict__ G, const float* __restrict__ Wc,
                                   const float* __restrict__ inv, const float* __restrict__ sumsq,
                                   bool per_column, int64_t n0, int64_t K, int64_t D,
                                   bool normalize, w_t* __restrict__ gW) {
  __shared__ float sh[kThreads];
  const int64_t r = blockIdx.x;
  float* g = G + r * D;
  const float* w = Wc + r * D;
  float proj = 0.f;
  if (epi::norm_projects(sumsq[r], normalize)) {
    for (int64_t e = threadIdx.x; e < D; e += blockDim.x) proj += w[e] * g[e];
    proj = block_sum(proj, sh);
  }
  const float iv = inv[r];
  w_t* dst = gW + (n0 * K + r) * D;
  for (int64_t e = threadIdx.x; e < D; e += blockDim.x) {
    const float v = epi::normalize_backward(g[e], w[e], proj, iv);
    if (per_column)
      g[e] = v;
    else
      dst[e] = static_cast<w_t>(v);
  }
}

// topk helper: sub-center max with the excluded column set to −inf, T (B × nc·K) → Dm (B × nc).
__global__ void topk_reduce_kernel(const float* __restrict__ T, const int64_t* __restrict__ exclude,
                                   int64_t B, int64_t nc, int64_t K, int64_t n0,
                                   float* __restrict__ Dm) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= B * nc) return;
  const int64_t i = idx / nc, j = idx % nc;
  int64_t argk;
  const float d = epi::subcenter_max(T + i * nc * K + j * K, K, &argk);
  Dm[idx] = (exclude[i] - n0 == j) ? epi::neg_inf<float>() : d;
}

// ================================================================================================
// Host side
// ================================================================================================

inline unsigned blocks_for(int64_t n, int threads = kThreads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

// Columns per chunk: T (B × nc·K) up to 16M fp32 elements (64 MB) and Ŵc / G (nc·K × D) up to
// 8M (32 MB each), so the cuBLAS GEMMs are large but the workspaces stay bounded.
inline int64_t pick_chunk(int64_t B, int64_t K, int64_t D, int64_t N) {
  int64_t nc = std::min((int64_t(1) << 24) / std::max<int64_t>(1, B * K),
                        (int64_t(1) << 23) / std::max<int64_t>(1, K * D));
  nc = std::clamp<int64_t>(nc, 256, 65536);
  return std::max<int64_t>(1, std::min(nc, std::max<int64_t>(N, 1)));
}

// Splits per row: each block of the epilogue covers about 1024 columns.
inline int64_t pick_splits(int64_t nc) { return std::clamp<int64_t>((nc + 1023) / 1024, 1, 64); }

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
// inputs out as the kernels want them.
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
  p.F = features.detach().to(at::kFloat).contiguous();
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

// Dispatch over the weight dtype (bf16 / fp16 / fp32).
template <typename Fn>
void dispatch_weight(at::ScalarType wt, Fn&& f) {
  if (wt == at::kFloat) {
    f(float(0));
  } else if (wt == at::kHalf) {
    f(at::Half(0));
  } else if (wt == at::kBFloat16) {
    f(at::BFloat16(0));
  } else {
    TORCH_CHECK(false, "marginops: unsupported weight dtype ", wt);
  }
}

// Chunk workspaces.
struct Chunk {
  Tensor Wc, inv, sumsq, bias_c, T;
  Chunk(int64_t B, int64_t D, int64_t K, int64_t nc, const at::TensorOptions& opt)
      : Wc(at::empty({nc * K, D}, opt)),
        inv(at::empty({nc * K}, opt)),
        sumsq(at::empty({nc * K}, opt)),
        bias_c(at::empty({nc}, opt)),
        T(at::empty({B * nc * K}, opt)) {}
};

// Load columns [n0, n0+nc) and compute T = F·Ŵcᵀ; returns the (B, nc·K) view of T.
template <typename w_t>
Tensor load_and_gemm(const Prepared& p, Chunk& ws, int64_t n0, int64_t nc, bool normalize,
                     cudaStream_t stream) {
  const int64_t ncK = nc * p.K;
  load_rows_kernel<w_t><<<static_cast<unsigned>(ncK), kThreads, 0, stream>>>(
      p.W.data_ptr<w_t>(), opt_ptr<int64_t>(p.class_index), opt_ptr<float>(p.bias), n0, p.K, p.D,
      normalize, ws.Wc.data_ptr<float>(), ws.inv.data_ptr<float>(), ws.sumsq.data_ptr<float>(),
      ws.bias_c.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  Tensor T = ws.T.narrow(0, 0, p.B * ncK).view({p.B, ncK});
  at::mm_out(T, p.F, ws.Wc.narrow(0, 0, ncK).t());  // cuBLAS on the current stream
  return T;
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
  const auto opt = p.F.options();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  Tensor lse = at::empty({p.B}, opt);
  Tensor dot = at::zeros({p.B}, opt);
  Tensor run_m = at::full({p.B}, -std::numeric_limits<float>::infinity(), opt);
  Tensor run_s = at::zeros({p.B}, opt);
  if (p.B == 0) return {lse, dot};
  const int64_t nc_max = pick_chunk(p.B, p.K, p.D, p.N);
  Chunk ws(p.B, p.D, p.K, nc_max, opt);
  const int64_t S = pick_splits(nc_max);
  Tensor part_m = at::empty({p.B * S}, opt), part_s = at::empty({p.B * S}, opt);
  dispatch_weight(p.W.scalar_type(), [&](auto w0) {
    using w_t = decltype(w0);
    for (int64_t n0 = 0; n0 < p.N; n0 += nc_max) {
      const int64_t nc = std::min(nc_max, p.N - n0);
      Tensor T = load_and_gemm<w_t>(p, ws, n0, nc, normalize_weight, stream);
      const int64_t s = std::min<int64_t>(S, nc);
      RowArgs a{p.target.data_ptr<int64_t>(), p.scale.data_ptr<float>(), opt_ptr<float>(p.tau),
                opt_ptr<float>(p.t), n0, nc, p.K, static_cast<float>(filter_threshold),
                filter_threshold > 0};
      forward_epilogue_kernel<<<dim3(p.B, s), kThreads, 0, stream>>>(
          T.data_ptr<float>(), ws.bias_c.data_ptr<float>(), a, part_m.data_ptr<float>(),
          part_s.data_ptr<float>(), dot.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      merge_partials_kernel<<<blocks_for(p.B), kThreads, 0, stream>>>(
          part_m.data_ptr<float>(), part_s.data_ptr<float>(), p.B, s, run_m.data_ptr<float>(),
          run_s.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  const auto opt = p.F.options();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  Tensor gl = grad_lse.detach().to(at::kFloat).contiguous();
  Tensor gd = grad_dot.detach().to(at::kFloat).contiguous();
  Tensor ln = lse_neg.detach().to(at::kFloat).contiguous();
  Tensor gF = at::zeros({p.B, p.D}, opt);
  Tensor gW = at::zeros_like(p.W);  // rows never iterated (class_index) stay exactly zero
  Tensor gS = at::zeros({p.B}, opt);
  Tensor gBias = p.bias.has_value() ? at::zeros_like(*p.bias) : at::empty({0}, opt);
  // class_index: per-column results are added into their classes (duplicates accumulate),
  // directly in the weight's dtype — no C·K × D fp32 buffer for Partial FC's huge C.
  const bool per_column = p.class_index.has_value();
  if (p.B > 0 && p.N > 0) {
    const int64_t nc_max = pick_chunk(p.B, p.K, p.D, p.N);
    Chunk ws(p.B, p.D, p.K, nc_max, opt);
    const int64_t S = pick_splits(nc_max);
    Tensor part_gs = at::empty({p.B * S}, opt);
    Tensor P = p.bias.has_value() ? at::empty({p.B * nc_max}, opt) : Tensor();
    Tensor G = at::empty({nc_max * p.K, p.D}, opt);
    Tensor gbias_col = per_column && p.bias.has_value() ? at::empty({nc_max}, opt) : Tensor();
    const Tensor sub = at::arange(p.K, opt.dtype(at::kLong));
    dispatch_weight(p.W.scalar_type(), [&](auto w0) {
      using w_t = decltype(w0);
      for (int64_t n0 = 0; n0 < p.N; n0 += nc_max) {
        const int64_t nc = std::min(nc_max, p.N - n0), ncK = nc * p.K;
        Tensor T = load_and_gemm<w_t>(p, ws, n0, nc, normalize_weight, stream);
        const int64_t s = std::min<int64_t>(S, nc);
        RowArgs a{p.target.data_ptr<int64_t>(), p.scale.data_ptr<float>(), opt_ptr<float>(p.tau),
                  opt_ptr<float>(p.t), n0, nc, p.K, static_cast<float>(filter_threshold),
                  filter_threshold > 0};
        float* Pp = P.defined() ? P.data_ptr<float>() : nullptr;
        backward_epilogue_kernel<<<dim3(p.B, s), kThreads, 0, stream>>>(
            T.data_ptr<float>(), ws.bias_c.data_ptr<float>(), a, gl.data_ptr<float>(),
            gd.data_ptr<float>(), ln.data_ptr<float>(), Pp, part_gs.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        sum_partials_kernel<<<blocks_for(p.B), kThreads, 0, stream>>>(
            part_gs.data_ptr<float>(), p.B, s, gS.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
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
        const Tensor Wv = ws.Wc.narrow(0, 0, ncK);
        gF.addmm_(T, Wv);                       // ∂F += DD · Ŵc
        Tensor Gv = G.narrow(0, 0, ncK);
        at::mm_out(Gv, T.t(), p.F);             // G = DDᵀ · F
        weight_grad_kernel<w_t><<<static_cast<unsigned>(ncK), kThreads, 0, stream>>>(
            Gv.data_ptr<float>(), ws.Wc.data_ptr<float>(), ws.inv.data_ptr<float>(),
            ws.sumsq.data_ptr<float>(), per_column, n0, p.K, p.D, normalize_weight,
            gW.data_ptr<w_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (per_column) {  // rows class·K + k of the chunk's columns, summed in (deterministic)
          const Tensor rows = (classes.unsqueeze(1) * p.K + sub).reshape({-1});
          gW.index_put_(c10::List<std::optional<Tensor>>({rows}), Gv.to(p.W.scalar_type()),
                        /*accumulate=*/true);
        }
      }
    });
  }
  return {gF.to(features.scalar_type()), gW, gS, gBias};
}

std::tuple<Tensor, Tensor> topk_cuda(const Tensor& features, const Tensor& weight,
                                     const Tensor& exclude_col, int64_t k, bool normalize_weight,
                                     int64_t subcenters) {
  c10::cuda::OptionalCUDAGuard guard;
  Tensor scale = at::ones({features.size(0)}, features.options().dtype(at::kFloat));
  Prepared p = prepare(guard, features, weight, scale, std::nullopt, exclude_col, std::nullopt,
                       std::nullopt, std::nullopt, subcenters);
  TORCH_CHECK(k >= 0 && k <= p.N, "marginops: topk needs 0 <= k <= number of classes (", p.N, ")");
  const auto opt = p.F.options();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Running best (B × ≤k), values descending with ties in ascending column order. A stable
  // descending sort keeps equal values in their input order, and the running list always holds
  // lower columns than the chunk appended after it, so ties resolve to the lower column.
  Tensor best_v = at::empty({p.B, 0}, opt);
  Tensor best_c = at::empty({p.B, 0}, opt.dtype(at::kLong));
  if (p.B == 0 || k == 0) return {at::empty({p.B, k}, opt), at::empty({p.B, k}, opt.dtype(at::kLong))};
  const int64_t nc_max = pick_chunk(p.B, p.K, p.D, p.N);
  Chunk ws(p.B, p.D, p.K, nc_max, opt);
  Tensor Dm = at::empty({p.B * nc_max}, opt);
  dispatch_weight(p.W.scalar_type(), [&](auto w0) {
    using w_t = decltype(w0);
    for (int64_t n0 = 0; n0 < p.N; n0 += nc_max) {
      const int64_t nc = std::min(nc_max, p.N - n0);
      Tensor T = load_and_gemm<w_t>(p, ws, n0, nc, normalize_weight, stream);
      topk_reduce_kernel<<<blocks_for(p.B * nc), kThreads, 0, stream>>>(
          T.data_ptr<float>(), p.target.data_ptr<int64_t>(), p.B, nc, p.K, n0,
          Dm.data_ptr<float>());
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
