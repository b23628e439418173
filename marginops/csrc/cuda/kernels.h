// Device kernels of the CUDA core op (csrc/cuda/margin_lse.cu launches them; the math of each
// element is csrc/include/epilogue.h, shared with the CPU kernels).
//
//   reductions      block_sum, warp_sum, block_lse — fixed orders, so results are deterministic
//   weight rows     row_norms_kernel (1/wn, ‖W‖² once per call), load_chunk_kernel (a chunk's rows
//                   gathered / converted / normalised as a GEMM operand), weight_grad_kernel (the
//                   normalisation Jacobian, written in the weight's dtype)
//   tile epilogues  forward_epilogue_kernel (+ merge_partials_kernel, finalize_kernel),
//                   backward_epilogue_kernel (+ sum_partials_kernel, bias_grad_kernel),
//                   topk_reduce_kernel
// Included by margin_lse.cu only (it holds __global__ functions).
#pragma once

#include <ATen/ATen.h>

#include "epilogue.h"

namespace marginops {
namespace cuda {

namespace epi = marginops::epi;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;  // row_norms_kernel: one warp per weight row

// ------------------------------------------------------------------------------------------------
// Reductions (deterministic: fixed tree / butterfly order)
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

// Every lane ends with the same sum (lanes i and i^o add the same two values at each step).
__device__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
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
// Weight rows. Iterated row r = n·K + k (column n, sub-center k) is weight row
// class(n)·K + k, class(n) = class_index[n] or n.
// ------------------------------------------------------------------------------------------------

__device__ inline int64_t weight_row(const int64_t* class_index, int64_t r, int64_t K) {
  return class_index ? class_index[r / K] * K + r % K : r;
}

// inv[r] = 1/max(‖W_r‖, eps), sumsq[r] = ‖W_r‖², for the `rows` iterated rows: one warp per row
// (all N·K rows in one launch, so the grid is large).
template <typename w_t>
__global__ void row_norms_kernel(const w_t* __restrict__ W, const int64_t* __restrict__ class_index,
                                 int64_t rows, int64_t K, int64_t D, float* __restrict__ inv,
                                 float* __restrict__ sumsq) {
  const int64_t r = blockIdx.x * int64_t(kWarps) + threadIdx.x / 32;
  if (r >= rows) return;  // the whole warp
  const int lane = threadIdx.x % 32;
  const w_t* src = W + weight_row(class_index, r, K) * D;
  float ss = 0.f;
  for (int64_t e = lane; e < D; e += 32) {
    const float v = static_cast<float>(src[e]);
    ss += v * v;
  }
  ss = warp_sum(ss);
  if (lane == 0) {
    sumsq[r] = ss;
    inv[r] = epi::inv_norm(ss, true);
  }
}

// dst (rows × D, c_t) = the iterated rows r0 … r0+rows−1 of W, times inv[r] when given: one
// thread per element (rows·D/256 blocks: whole waves even for a narrow chunk).
template <typename w_t, typename c_t>
__global__ void load_chunk_kernel(const w_t* __restrict__ W, const int64_t* __restrict__ class_index,
                                  int64_t r0, int64_t rows, int64_t K, int64_t D,
                                  const float* __restrict__ inv, c_t* __restrict__ dst) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= rows * D) return;
  const int64_t r = idx / D, e = idx % D;
  const float v = static_cast<float>(W[weight_row(class_index, r0 + r, K) * D + e]);
  dst[idx] = static_cast<c_t>(inv ? v * inv[r0 + r] : v);
}

// Normalisation Jacobian, one block per iterated row r0 + r of the chunk (nc·K blocks: whole
// waves; a warp per row would leave a 1024-row chunk 128 blocks on 132 SMs), from G_r (fp32, the
// GEMM's DDᵀ·F) and the weight row itself:
//   grad_W_r = (G_r − ŵ_r (ŵ_r·G_r)) · c,  ŵ_r = W_r·inv_r,  c = 1 if G is G' = inv·G (see
//   margin_lse.cu) else inv_r;  projection only when normalising a row with ‖W_r‖ > eps.
// Without class_index iterated row r0 + r is weight row r0 + r, written by this block alone. With
// class_index two columns may name one class (the contract accumulates them), so the result
// overwrites G_r in place (each thread reads g[e] before writing it; proj is complete after
// block_sum's barrier) and the host adds the chunk's rows into their classes (deterministic).
template <typename w_t>
__global__ void weight_grad_kernel(float* __restrict__ G, const w_t* __restrict__ W,
                                   const int64_t* __restrict__ class_index,
                                   const float* __restrict__ inv, const float* __restrict__ sumsq,
                                   int64_t r0, int64_t K, int64_t D, bool g_scaled,
                                   w_t* __restrict__ gW) {
  __shared__ float sh[kThreads];
  const int64_t r = blockIdx.x, rg = r0 + r;
  float* g = G + r * D;
  const w_t* w = W + weight_row(class_index, rg, K) * D;
  const float iv = inv ? inv[rg] : 1.f;
  float proj = 0.f;
  if (inv && epi::norm_projects(sumsq[rg], true)) {  // uniform over the block
    for (int64_t e = threadIdx.x; e < D; e += blockDim.x)
      proj += static_cast<float>(w[e]) * iv * g[e];
    proj = block_sum(proj, sh);
  }
  const float c = g_scaled ? 1.f : iv;
  for (int64_t e = threadIdx.x; e < D; e += blockDim.x) {
    const float v = epi::normalize_backward(g[e], static_cast<float>(w[e]) * iv, proj, c);
    if (class_index)
      g[e] = v;
    else
      gW[rg * D + e] = static_cast<w_t>(v);
  }
}

// ------------------------------------------------------------------------------------------------
// Epilogues over the tile T (B × nc·K fp32 raw dots f_i·W_r): grid (B, S), block (i, split).
// ------------------------------------------------------------------------------------------------

// Per-row epilogue parameters.
struct RowArgs {
  const int64_t* target;  // B
  const float* scale;     // B
  const float* tau;       // B or null
  const float* hard_t;    // 0-d or null
  const float* inv;       // the chunk's nc·K values of 1/wn, or null (not normalising)
  const float* bias;      // the chunk's nc biases, or null
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

// d of column j of row i: sub-center max of the normalised dots.
__device__ inline float column_dot(const float* T, const RowArgs& a, int64_t i, int64_t j,
                                   int64_t* argk) {
  return epi::subcenter_max(T + (i * a.nc + j) * a.K, a.K, argk, a.inv ? a.inv + j * a.K : nullptr);
}

// Forward: the split's (max, Σexp) — merged straight into the row's running pair when S = 1 (the
// block owns the row; chunks follow each other on the stream), else stored as a partial for
// merge_partials_kernel — and, for the target, dot_y.
__global__ void forward_epilogue_kernel(const float* __restrict__ T, RowArgs a,
                                        float* __restrict__ part_m, float* __restrict__ part_s,
                                        float* __restrict__ run_m, float* __restrict__ run_s,
                                        float* __restrict__ dot_out) {
  __shared__ float shm[kThreads], shs[kThreads];
  const int64_t i = blockIdx.x;
  int64_t j0, j1;
  split_range(a.nc, &j0, &j1);
  const int64_t tl = a.target[i] - a.n0;
  const float s = a.scale[i];
  const bool hard = a.tau != nullptr;
  const float tau = hard ? a.tau[i] : 0.f, t = hard ? *a.hard_t : 0.f;
  float m = epi::neg_inf<float>(), sum = 0.f;
  for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
    int64_t argk;
    const float d = column_dot(T, a, i, j, &argk);
    if (j == tl) {
      dot_out[i] = d;  // exactly one thread of one chunk sees a row's target
      continue;
    }
    const bool f = epi::is_filtered(d, a.thr, a.filter);  // d' = 0 (insightface)
    const float dm = f ? 0.f : epi::modulate(d, t, epi::is_hard(d, tau, hard));
    const float z = epi::logit(dm, s, a.bias ? a.bias[j] : 0.f);
    epi::lse_merge(m, sum, z, 1.f);
  }
  block_lse(m, sum, shm, shs);
  if (threadIdx.x != 0) return;
  if (gridDim.y == 1) {
    epi::lse_merge(run_m[i], run_s[i], m, sum);
  } else {
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

// Backward: DD (B × nc·K, c_t) = ∂L/∂d at each row's argmax sub-center (0 elsewhere), times inv
// when `scale_dd` (see the file comment); DD may be T itself (fp32: each thread reads its cells
// before writing them). P (B × nc) = the softmax weights when a bias gradient is needed.
// Σ g·d' for ∂scale: added to gS[i] when S = 1, else a per-split partial.
template <typename c_t>
__global__ void backward_epilogue_kernel(const float* T, RowArgs a, const float* __restrict__ grad_lse,
                                         const float* __restrict__ grad_dot,
                                         const float* __restrict__ lse_neg, bool scale_dd, c_t* DD,
                                         float* __restrict__ P, float* __restrict__ part_gs,
                                         float* __restrict__ gS) {
  __shared__ float sh[kThreads];
  const int64_t i = blockIdx.x;
  int64_t j0, j1;
  split_range(a.nc, &j0, &j1);
  const int64_t tl = a.target[i] - a.n0;
  const float s = a.scale[i], gl = grad_lse[i], lse = lse_neg[i], gd = grad_dot[i];
  const bool hard = a.tau != nullptr;
  const float tau = hard ? a.tau[i] : 0.f, t = hard ? *a.hard_t : 0.f;
  float gsum = 0.f;
  for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
    int64_t argk;
    const float d = column_dot(T, a, i, j, &argk);
    const bool h = epi::is_hard(d, tau, hard);
    const bool f = epi::is_filtered(d, a.thr, a.filter);  // d' = 0 with slope 0 (insightface)
    const float dm = f ? 0.f : epi::modulate(d, t, h);
    const float z = epi::logit(dm, s, a.bias ? a.bias[j] : 0.f);
    const float p = j == tl ? 0.f : epi::softmax_grad(z, lse, gl);
    gsum += p * dm;
    if (P) P[i * a.nc + j] = p;
    float dd = p * s * (f ? 0.f : epi::modulate_grad(d, t, h)) + (j == tl ? gd : 0.f);
    if (scale_dd && a.inv) dd *= a.inv[j * a.K + argk];
    c_t* cell = DD + (i * a.nc + j) * a.K;
    for (int64_t k = 0; k < a.K; ++k) cell[k] = static_cast<c_t>(k == argk ? dd : 0.f);
  }
  gsum = block_sum(gsum, sh);
  if (threadIdx.x != 0) return;
  if (gridDim.y == 1)
    gS[i] += gsum;
  else
    part_gs[i * gridDim.y + blockIdx.y] = gsum;
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

// topk helper: d (normalised sub-center max) with the excluded column set to −inf, T → Dm (B × nc).
__global__ void topk_reduce_kernel(const float* __restrict__ T, RowArgs a, int64_t B,
                                   float* __restrict__ Dm) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= B * a.nc) return;
  const int64_t i = idx / a.nc, j = idx % a.nc;
  int64_t argk;
  const float d = column_dot(T, a, i, j, &argk);
  Dm[idx] = (a.target[i] - a.n0 == j) ? epi::neg_inf<float>() : d;
}

}  // namespace cuda
}  // namespace marginops
