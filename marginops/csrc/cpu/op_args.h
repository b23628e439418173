// The CPU ops' arguments (margin_lse.cpp, the only file that includes this one): checks,
// contiguous copies in the kernels' types (prepare), the Problem the kernels read (make_problem),
// the (acc, weight) dtype dispatch and the GEMM plan of a call.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>
#include <optional>

#include "tiles.h"

namespace marginops {
namespace cpu {

inline at::ScalarType acc_type_of(const Tensor& features) {
  return features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool has_duplicates(const Tensor& class_index) {
  if (class_index.numel() < 2) return false;
  // A plain read of host memory (CPU tensors), not Tensor::item: no dispatcher-level sync op.
  Tensor s = std::get<0>(class_index.sort()).contiguous();
  const int64_t* v = s.data_ptr<int64_t>();
  for (int64_t i = 1; i < s.numel(); ++i)
    if (v[i] == v[i - 1]) return true;
  return false;
}

template <typename acc_t>
Problem<acc_t> make_problem(const Tensor& Facc, const Tensor& weight, const Tensor& scale,
                            const std::optional<Tensor>& bias, const Tensor& target_col,
                            const std::optional<Tensor>& class_index,
                            const std::optional<Tensor>& hard_tau,
                            const std::optional<Tensor>& hard_t, bool normalize_weight,
                            int64_t subcenters, double filter_threshold) {
  Problem<acc_t> P;
  P.B = Facc.size(0);
  P.D = Facc.size(1);
  P.K = subcenters;
  TORCH_CHECK(subcenters >= 1, "marginops: subcenters must be >= 1");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == P.D, "marginops: weight must be (R, D)");
  TORCH_CHECK(weight.size(0) % subcenters == 0, "marginops: weight rows must be C·subcenters");
  const int64_t C = weight.size(0) / subcenters;
  P.N = class_index.has_value() ? class_index->numel() : C;
  P.F = Facc.data_ptr<acc_t>();
  P.class_index = class_index.has_value() ? class_index->data_ptr<int64_t>() : nullptr;
  P.target = target_col.data_ptr<int64_t>();
  TORCH_CHECK(target_col.numel() == P.B, "marginops: target_col must be (B,)");
  TORCH_CHECK(scale.numel() == P.B, "marginops: scale must be (B,)");
  P.scale = scale.data_ptr<acc_t>();
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == C, "marginops: bias must be (C_local,)");
    P.bias = bias->data_ptr<acc_t>();
  }
  TORCH_CHECK(hard_tau.has_value() == hard_t.has_value(),
              "marginops: hard_tau and hard_t are given together");
  if (hard_tau.has_value()) {
    P.hard = true;
    P.tau = hard_tau->data_ptr<acc_t>();
    P.t = *hard_t->data_ptr<acc_t>();  // a host read of a CPU scalar, not Tensor::item
  }
  TORCH_CHECK(std::isfinite(filter_threshold),
              "marginops: filter_threshold must be finite (0 disables filtering)");
  P.filter = filter_threshold > 0;  // insightface: only a positive threshold filters
  P.thr = static_cast<acc_t>(filter_threshold);
  P.normalize = normalize_weight;
  return P;
}

// Contiguous copies in the types the kernels read.
struct Inputs {
  Tensor F, W, scale, target;
  std::optional<Tensor> bias, class_index, tau, t;
};

inline Inputs prepare(const Tensor& features, const Tensor& weight, const Tensor& scale,
                      const std::optional<Tensor>& bias, const Tensor& target_col,
                      const std::optional<Tensor>& class_index,
                      const std::optional<Tensor>& hard_tau, const std::optional<Tensor>& hard_t) {
  TORCH_CHECK(features.dim() == 2, "marginops: features must be (B, D)");
  const auto acc = acc_type_of(features);
  TORCH_CHECK(acc != at::kDouble || weight.scalar_type() == at::kDouble,
              "marginops: fp64 features need fp64 weight");
  TORCH_CHECK(weight.scalar_type() != at::kDouble || acc == at::kDouble,
              "marginops: fp64 weight needs fp64 features");
  // detach(): the kernels call ATen ops (mm_out) that must not see autograd-tracked inputs; the
  // op's autograd is the registered formula, not these internals.
  Inputs in;
  in.F = features.detach().to(acc).contiguous();
  in.W = weight.detach().contiguous();
  in.scale = scale.detach().to(acc).contiguous();
  in.target = target_col.detach().to(at::kLong).contiguous();
  if (bias.has_value()) in.bias = bias->detach().to(acc).contiguous();
  if (class_index.has_value()) in.class_index = class_index->to(at::kLong).contiguous();
  if (hard_tau.has_value()) in.tau = hard_tau->detach().to(acc).contiguous();
  if (hard_t.has_value()) in.t = hard_t->detach().to(acc).contiguous();
  return in;
}

// Calls f.template operator()<acc_t, w_t>() for the supported (acc, weight) dtype pairs.
template <typename Fn>
void dispatch_types(at::ScalarType acc, at::ScalarType wt, Fn&& f) {
  if (acc == at::kDouble) {
    f(double(0), double(0));
  } else if (wt == at::kFloat) {
    f(float(0), float(0));
  } else if (wt == at::kHalf) {
    f(float(0), at::Half(0));
  } else if (wt == at::kBFloat16) {
    f(float(0), at::BFloat16(0));
  } else {
    TORCH_CHECK(false, "marginops: unsupported weight dtype ", wt);
  }
}

// The GEMMs of a call (GemmPlan in tiles.h): bf16 features on the AVX512-BF16 units (the weight may
// be bf16 or fp32 master weights, converted per chunk); any other fp32-accumulated input on our
// AVX-512 fp32 kernel; fp64 (gradcheck) and CPUs without AVX-512 on ATen's GEMM. fp16 features
// run the fp32 kernel: no fp16 units on these CPUs. Knobs (benchmarking and testing, read per
// call): MARGINOPS_CPU_BF16_GEMM=0 and MARGINOPS_CPU_F32_GEMM=0 send those cases to ATen instead.
inline bool knob_on(const char* name) {
  const char* env = std::getenv(name);
  return !(env && env[0] == '0');
}

// topk keeps fp32 products for bf16 features too (allow_bf16 = false): its ranking is compared
// against fp32 dots. backward: the plan of a backward (the features pair-packed), recompute: one
// that also computes the dots again (the features as rows too).
inline GemmPlan gemm_plan(const Tensor& features, bool allow_bf16 = true, bool backward = false,
                          bool recompute = false) {
  if (features.scalar_type() == at::kDouble) return GemmPlan();
  if (allow_bf16 && features.scalar_type() == at::kBFloat16 && simd::bf16_available() &&
      knob_on("MARGINOPS_CPU_BF16_GEMM"))
    return GemmPlan::bf16(features, !backward || recompute, backward);
  if (simd::f32_available() && knob_on("MARGINOPS_CPU_F32_GEMM"))
    return GemmPlan(GemmPlan::kF32);
  return GemmPlan();
}

}  // namespace cpu
}  // namespace marginops
