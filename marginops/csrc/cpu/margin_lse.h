// The CPU entry points of margin_lse.cpp that margin_loss.cpp builds on (contract: the docstring
// of marginops/ops/__init__.py). keep: also return the B × N·K dots; kept: those dots, read by
// the backward instead of recomputed (nullopt: recompute). fixed_shift (margin_loss): where
// fixed_shift_allowed (tiles.h), one-pass sums with a shift known in advance, and the exps kept
// instead of the dots (row_kernels.h); both directions must be given the same inputs.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace marginops {
namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& features, const at::Tensor& weight, const at::Tensor& scale,
    const std::optional<at::Tensor>& bias, const at::Tensor& target_col,
    const std::optional<at::Tensor>& class_index, const std::optional<at::Tensor>& hard_tau,
    const std::optional<at::Tensor>& hard_t, bool normalize_weight, int64_t subcenters,
    double filter_threshold, bool keep, bool fixed_shift);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_lse, const at::Tensor& grad_dot, const at::Tensor& lse_neg,
    const std::optional<at::Tensor>& kept, const at::Tensor& features, const at::Tensor& weight,
    const at::Tensor& scale, const std::optional<at::Tensor>& bias, const at::Tensor& target_col,
    const std::optional<at::Tensor>& class_index, const std::optional<at::Tensor>& hard_tau,
    const std::optional<at::Tensor>& hard_t, bool normalize_weight, int64_t subcenters,
    double filter_threshold, bool fixed_shift);

}  // namespace cpu
}  // namespace marginops
