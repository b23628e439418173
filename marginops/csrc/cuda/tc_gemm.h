// Tensor-core GEMMs and L2-sized chunking for the CUDA kernels of the core op (margin_lse.cu).
//
//   gemm_f32out  row-major C (fp32) = op(A)·op(B) + beta·C with A, B in the inputs' dtype, through
//                cublasGemmEx on torch's cuBLAS handle and current stream (capturable in a CUDA
//                graph: torch's handle carries its own per-stream workspace);
//   plan_chunks  how many classes one chunk holds, so that its fp32 logit tile stays in L2.
//
// Precision. bf16 / fp16 inputs: products on the tensor cores, fp32 accumulation and fp32 output
// (CUBLAS_COMPUTE_32F with 16-bit A/B: no 16-bit tile is ever written). fp32 inputs: TF32 tensor
// cores (CUBLAS_COMPUTE_32F_FAST_TF32) exactly when torch's own fp32 matmuls use them —
// `torch.backends.cuda.matmul.allow_tf32` / `torch.set_float32_matmul_precision("high" or
// "medium")`, read per call from at::globalContext().allowTF32CuBLAS() and not inside a
// NoTF32Guard — else IEEE fp32 (CUBLAS_COMPUTE_32F on a handle whose math mode torch has set to
// CUBLAS_DEFAULT_MATH). There is no 3×TF32 mode: cuBLAS offers none for sm_80/sm_90
// (CUBLAS_COMPUTE_32F_EMULATED_16BFX9 targets Blackwell), so "highest" costs the fp32 CUDA-core
// rate (67 TFLOP/s on an H100 against 495 for TF32), as it does for torch.mm.
//
// Alignment. cuBLAS takes any leading dimension and pointer: with D (or a chunk width) that is not
// a multiple of 8 elements (16 bytes of bf16) it picks kernels without 16-byte vector loads —
// slower, never wrong. Nothing is padded; tests/test_cuda_gpu.py runs D = 100 and D = 13.
//
// Linking: cublasGemmEx comes from libcublas, which libtorch_cuda (a dependency of this
// extension) loads; scripts/build_cuda_extension.sh imports the built library with RTLD_NOW, so a
// missing symbol fails the build check.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>

#include <algorithm>
#include <climits>
#include <cstdlib>

namespace marginops {
namespace cuda {

// TF32 for fp32 GEMMs: torch's switch for cuBLAS, as torch.mm reads it.
inline bool tf32_allowed() {
  return at::globalContext().allowTF32CuBLAS() && !at::NoTF32Guard::should_disable_tf32();
}

inline cudaDataType_t cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kHalf: return CUDA_R_16F;
    case at::kFloat: return CUDA_R_32F;
    default: TORCH_CHECK(false, "marginops: no tensor-core GEMM for dtype ", t);
  }
}

// Row-major C (m × n, row stride ldc, fp32) = op(A) · op(B) + beta · C, where op(A) is m × k —
// A stored m × k with row stride lda, or (ta) A stored k × m and transposed — and op(B) is k × n
// likewise (tb: B stored n × k). A and B are in `dtype`. cuBLAS is column-major: a row-major X
// is the column-major Xᵀ, so this computes Cᵀ = op(B)ᵀ · op(A)ᵀ with the operands swapped.
inline void gemm_f32out(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const void* A,
                        int64_t lda, const void* B, int64_t ldb, float beta, float* C, int64_t ldc,
                        at::ScalarType dtype, cudaStream_t stream) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // empty sum (D = 0): C = beta · C, and beta is 0 or 1 here
    if (beta == 0.f) C10_CUDA_CHECK(cudaMemsetAsync(C, 0, sizeof(float) * m * ldc, stream));
    return;
  }
  TORCH_CHECK(std::max({m, n, k, lda, ldb, ldc}) <= INT_MAX,
              "marginops: a GEMM dimension exceeds cuBLAS's 32-bit limit (m=", m, ", n=", n,
              ", k=", k, ")");
  const cudaDataType_t t = cuda_dtype(dtype);
  const cublasComputeType_t compute =
      dtype == at::kFloat && tf32_allowed() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  const float alpha = 1.f;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream
  TORCH_CUDABLAS_CHECK(cublasGemmEx(
      handle, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
      static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &alpha, B, t,
      static_cast<int>(ldb), A, t, static_cast<int>(lda), &beta, C, CUDA_R_32F,
      static_cast<int>(ldc), compute, CUBLAS_GEMM_DEFAULT));
}

// ------------------------------------------------------------------------------------------------
// Chunk size: the fp32 logit tile in L2
// ------------------------------------------------------------------------------------------------
//
// Each chunk of nc classes (nc·K weight rows) costs 2·B·nc·K·D FLOPs per GEMM and produces an fp32
// tile T (B × nc·K) that the epilogue reads right after the GEMM wrote it. Whether that tile is
// served by L2 or by HBM decides the speed: at D = 512 on an H100 (989 TFLOP/s bf16, 3.35 TB/s
// HBM), one GEMM spends 2·512 FLOPs per tile element = 1.0 ps, while an fp32 element written to
// and read back from HBM costs 8 bytes = 2.4 ps — 2.3× the GEMM. So the tile (plus, in the
// backward, the 16-bit DD tile and the bias-gradient tile P: `bytes_per_logit`) is sized to half
// the device's L2 (cudaDeviceProp::l2CacheSize, which torch caches per device: no driver call per
// op); the other half holds what the GEMMs stream — F (B × D) and the chunk's weight rows.
//
//   H100 (50 MiB L2, budget 25 MiB), B = 4096, D = 512, bf16, no bias: 4 + 2 = 6 bytes per logit
//   → 25 MiB / (4096 · 6) = 1066 → nc = 1024 (whole 128-column cuBLAS tiles): T = 16 MiB, DD =
//   8 MiB, F = 4 MiB, the weight chunk 1 MiB. Each GEMM is 2·4096·1024·512 = 4.3 GFLOP (4.3 µs)
//   against 16 MiB of tile read once by the epilogue (2.4 µs from L2 at the 7 TB/s
//   benchmarks/model.py assumes, 5.0 µs from HBM — and as much again to write it).
//   B = 1024: nc = 4224, 4.4 GFLOP and 16.5 MiB per chunk — the budget fixes the tile, so the
//   GEMM work per chunk, about 2·D·budget/bytes_per_logit, does not depend on B.
//
// The fp32 weight-gradient tile G (nc·K × D) is bounded by the same budget (at D = 512: 12800
// rows), so it too is read back from L2 by the normalisation-Jacobian kernel; this bound is what
// limits small batches (B = 64 would otherwise take 68K columns). Below 128 columns a cuBLAS GEMM
// wastes part of every output tile, so nc never goes under 128 (B > 34K at 6 bytes per logit and
// a 25 MiB budget then overflows the budget rather than the tile shrinking further).
//
// MARGINOPS_CUDA_TILE_KB (read per call; a test knob like the CPU's MARGINOPS_CPU_TILE_KB) sets
// the budget in KiB and drops the 128-column floor, so small problems span several chunks.
struct ChunkPlan {
  int64_t nc;      // classes per chunk (the last chunk may be narrower)
  int64_t splits;  // epilogue blocks per row of the tile
};

inline ChunkPlan plan_chunks(const c10::Device& dev, int64_t B, int64_t K, int64_t D, int64_t N,
                             int64_t bytes_per_logit) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(dev.index());
  int64_t budget = static_cast<int64_t>(prop->l2CacheSize) / 2;
  int64_t floor_nc = 128;
  if (const char* env = std::getenv("MARGINOPS_CUDA_TILE_KB")) {
    const int64_t kb = std::atoll(env);
    if (kb > 0) {
      budget = kb * 1024;
      floor_nc = 1;
    }
  }
  const int64_t rows = std::min(budget / std::max<int64_t>(1, B * bytes_per_logit),
                                budget / std::max<int64_t>(1, D * 4));
  int64_t nc = std::max(floor_nc, rows / std::max<int64_t>(1, K));
  if (nc >= 256) nc = nc / 128 * 128;
  nc = std::max<int64_t>(1, std::min(nc, std::max<int64_t>(N, 1)));
  // Epilogue grid (B, splits) of 256-thread blocks: rows are split only when B alone gives fewer
  // than 4 blocks per SM (half its 2048 threads; B = 1024 on 132 SMs does not split, which saves
  // the merge kernel's launch per chunk); a split keeps >= 256 columns.
  const int64_t want = (4 * prop->multiProcessorCount + B - 1) / std::max<int64_t>(1, B);
  const int64_t splits = std::clamp<int64_t>(want, 1, std::clamp<int64_t>(nc / 256, 1, 64));
  return {nc, splits};
}

}  // namespace cuda
}  // namespace marginops
