// CPU op margin_loss (+ margin_loss_backward): the whole loss of the fixed-margin families in one
// call each way — normalise the embeddings, the core op (margin_lse.cpp), the target logit
// s·ψ(c_y), the per-row cross-entropy softplus(lse_neg − s·ψ) and the reduction.
//
// Why: the same loss built in Python (marginops/functional.py) runs ~25 B-sized PyTorch ops and as
// many autograd nodes around the core op: ~0.4 ms per training step with warm caches and ~0.6 ms
// with cold ones, as long as the three GEMMs at B = 64, C = 10K, D = 128 in bf16. Here they are a
// few loops over B values. The autograd is at the end of this file; marginops/ops/cpp_loss.py
// routes the eager cpp backend here. The Python pipeline stays the reference (tests compare the
// two; x̂ may differ from it in the last bit: the norm is summed in another order, in double).
//
// Steps, each one of the ops marginops/functional.py runs:
//   x̂ = x / where(‖x‖ = 0, ∞, max(‖x‖, 1e-12))                          (normalize_rows)
//   (lse_neg, c_y) = margin_lse(x̂, W, s, target_col = labels)            (forward_cpu; its fixed
//                    shift (row_kernels.h) where s <= 75 and no filtering: one pass per row, and
//                    the backward reads kept exps, not dots — no exp, no max in the backward)
//   row_i = softplus(lse_neg_i − s·ψ(c_y,i)) = logaddexp(·, 0), 0 on ignored rows (label −1)
//   loss = mean over non-ignored rows (0 if none) | sum | the (B,) rows
// ψ is marginops/margins.py's:
//   arc:  cos(θ + m) = c̃·cos m − √((1 − c̃)(1 + c̃))·sin m,  c̃ = clamp(c, −1 + 1e-7, 1 − 1e-7),
//         where the angle policy allows it (fallback: c > cos(π − m), else c − m·sin m;
//         always ("none"); easy: c > 0, else c);   no arc: ψ = c
//   ψ −= offset;   straight_through: value c + (ψ − c), derivative 1.
// NormFace: no arc, offset 0; CosFace: no arc, offset m; ArcFace: arc m; the combined margin with
// m1 = 1: arc m2, offset m3.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "clones.h"
#include "margin_lse.h"

namespace marginops {
namespace cpu {

using at::Tensor;

enum Policy : int64_t { kFallback = 0, kAlways = 1, kEasy = 2 };  // margins.py: fallback, none, easy
enum Reduction : int64_t { kMean = 0, kSum = 1, kRows = 2 };      // "mean", "sum", "none"

// ψ and its backward in the acc dtype T, with the autograd semantics of margins.py: a branch of
// torch.where not taken, and a clamped c̃, pass exactly 0 (not 0 · NaN).
template <typename T>
struct Psi {
  bool arc, straight_through;
  int64_t policy;
  T cos_m, sin_m, m_sin_m, threshold, offset, lo, hi;

  Psi(bool arc_, double margin, double offset_, int64_t policy_, bool straight_through_)
      : arc(arc_), straight_through(straight_through_), policy(policy_) {
    const T m = static_cast<T>(margin);
    cos_m = std::cos(m);
    sin_m = std::sin(m);
    m_sin_m = m * sin_m;
    threshold = std::cos(static_cast<T>(M_PI) - m);
    offset = static_cast<T>(offset_);
    lo = static_cast<T>(-1.0 + 1e-7);  // margins.default_eps, rounded as Python rounds it
    hi = static_cast<T>(1.0 - 1e-7);
  }
  bool on_arc(T c) const {
    return policy == kAlways || (policy == kFallback ? c > threshold : c > T(0));
  }
  T value(T c) const {
    T psi = c;
    if (arc) {
      const T cc = c < lo ? lo : (c > hi ? hi : c);  // NaN stays NaN
      psi = on_arc(c) ? cc * cos_m - std::sqrt((T(1) - cc) * (T(1) + cc)) * sin_m
                      : (policy == kFallback ? c - m_sin_m : c);
    }
    psi = psi - offset;
    return straight_through ? c + (psi - c) : psi;
  }
  // ∂L/∂c from g = ∂L/∂ψ:  d cos(θ+m)/dc̃ = cos m + sin m · c̃ / √((1 − c̃)(1 + c̃)).
  T grad(T c, T g) const {
    if (!arc || straight_through || !on_arc(c)) return g;
    if (!(c >= lo && c <= hi)) return T(0);  // clamped (or NaN): torch.clamp passes nothing
    return g * cos_m + g * sin_m * c / std::sqrt((T(1) - c) * (T(1) + c));
  }
};

// torch.logaddexp(x, 0) (its CPU formula) and its derivative 1 / (1 + e^−x).
template <typename T>
inline T softplus_exact(T x) {
  return std::max(x, T(0)) + std::log1p(std::exp(-std::abs(x)));  // max keeps a NaN x
}

// The embeddings in the acc dtype, their norms (B,), the labels as target columns (class n is
// column n), and the scale as the core op takes it (B,).
struct Prepared {
  at::ScalarType acc;
  Tensor x, norms, labels, scale;
};

inline Prepared prepare_loss(const Tensor& embeddings, const Tensor& labels, double scale) {
  TORCH_CHECK(embeddings.dim() == 2, "marginops: margin_loss: embeddings must be (B, D)");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == embeddings.size(0),
              "marginops: margin_loss: labels must be (B,)");
  Prepared p;
  p.acc = embeddings.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  p.x = embeddings.detach().to(p.acc).contiguous();
  p.labels = labels.detach().to(at::kLong).contiguous();
  p.scale = at::full({p.x.size(0)}, scale, p.x.options());
  return p;
}

// The normalisation's row reductions in double: Σ x_e² and Σ g_e·(x_e / den), vectorised (clones.h;
// the simd reduction sums in another order than a plain loop: x̂ may differ in the last bit).
#define MO_DEFINE_ROW_REDUCTIONS(T)                                                               \
  MO_CPU_CLONES double row_sum_squares_f64(const T* x, int64_t n) {                               \
    double ss = 0;                                                                                \
    _Pragma("omp simd reduction(+ : ss)") for (int64_t e = 0; e < n; ++e) ss +=                   \
        double(x[e]) * double(x[e]);                                                              \
    return ss;                                                                                    \
  }                                                                                               \
  MO_CPU_CLONES double row_dot_scaled_f64(const T* g, const T* x, T den, int64_t n) {            \
    double dot = 0;                                                                               \
    _Pragma("omp simd reduction(+ : dot)") for (int64_t e = 0; e < n; ++e) dot +=                 \
        double(g[e]) * (x[e] / den);                                                              \
    return dot;                                                                                   \
  }
MO_DEFINE_ROW_REDUCTIONS(float)
MO_DEFINE_ROW_REDUCTIONS(double)
#undef MO_DEFINE_ROW_REDUCTIONS

// normalize_rows' denominator: ∞ for a zero row (x̂ = 0, no gradient), else max(‖x‖, 1e-12).
template <typename T>
inline T denominator(T norm) {
  return norm == T(0) ? std::numeric_limits<T>::infinity() : std::max(norm, T(1e-12));
}

// margin_loss: (loss, x̂, ‖x‖ (B,), lse_neg, c_y, kept), kept = an empty (0, 0) tensor or the
// (B + 1, C) block its backward reads: B rows of exps exp(s·d − σ) (the fixed shift of
// row_kernels.h; the dots where it does not apply) and the weight rows' squared norms.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> margin_loss_cpu(
    const Tensor& embeddings, const Tensor& weight, const Tensor& labels, double scale, bool arc,
    double margin, double offset, int64_t angle_policy, bool straight_through,
    double filter_threshold, int64_t reduction, bool keep) {
  TORCH_CHECK(angle_policy >= kFallback && angle_policy <= kEasy,
              "marginops: margin_loss: angle_policy must be 0 (fallback), 1 (none) or 2 (easy)");
  TORCH_CHECK(reduction >= kMean && reduction <= kRows,
              "marginops: margin_loss: reduction must be 0 (mean), 1 (sum) or 2 (none)");
  Prepared p = prepare_loss(embeddings, labels, scale);
  const int64_t B = p.x.size(0), D = p.x.size(1);
  p.norms = at::empty({B}, p.x.options());
  Tensor x_hat_acc = at::empty({B, D}, p.x.options());
  AT_DISPATCH_FLOATING_TYPES(p.acc, "margin_loss_normalize", [&] {
    const scalar_t* x = p.x.data_ptr<scalar_t>();
    scalar_t* xh = x_hat_acc.data_ptr<scalar_t>();
    scalar_t* n = p.norms.data_ptr<scalar_t>();
    for (int64_t i = 0; i < B; ++i) {
      const double ss = row_sum_squares_f64(x + i * D, D);  // fp32 rows: in double
      n[i] = static_cast<scalar_t>(std::sqrt(ss));
      const scalar_t den = denominator(n[i]);
      for (int64_t e = 0; e < D; ++e) xh[i * D + e] = x[i * D + e] / den;
    }
  });
  Tensor x_hat = x_hat_acc.to(embeddings.scalar_type());
  auto [lse, dot, dots] = forward_cpu(x_hat, weight, p.scale, std::nullopt, p.labels, std::nullopt,
                                      std::nullopt, std::nullopt, true, 1, filter_threshold, keep,
                                      /*fixed_shift=*/true);
  Tensor loss = reduction == kRows ? at::empty({B}, p.x.options()) : at::empty({}, p.x.options());
  AT_DISPATCH_FLOATING_TYPES(p.acc, "margin_loss", [&] {
    const Psi<scalar_t> psi(arc, margin, offset, angle_policy, straight_through);
    const scalar_t s = static_cast<scalar_t>(scale);
    const int64_t* y = p.labels.data_ptr<int64_t>();
    const scalar_t* ln = lse.data_ptr<scalar_t>();
    const scalar_t* c = dot.data_ptr<scalar_t>();
    scalar_t* out = loss.data_ptr<scalar_t>();
    double total = 0;
    int64_t valid = 0;
    for (int64_t i = 0; i < B; ++i) {
      const scalar_t row =
          y[i] >= 0 ? softplus_exact(ln[i] - s * psi.value(c[i])) : scalar_t(0);
      if (reduction == kRows) out[i] = row;
      total += row;
      valid += y[i] >= 0;
    }
    if (reduction == kSum) out[0] = static_cast<scalar_t>(total);
    if (reduction == kMean) out[0] = static_cast<scalar_t>(total / std::max<int64_t>(valid, 1));
  });
  return {loss, x_hat, p.norms, lse, dot, dots};
}

// margin_loss_backward: (∂L/∂embeddings, ∂L/∂weight) from ∂L/∂loss and the forward's outputs.
std::tuple<Tensor, Tensor> margin_loss_backward_cpu(
    const Tensor& grad_loss, const Tensor& embeddings, const Tensor& x_hat, const Tensor& norms,
    const Tensor& lse_neg, const Tensor& dot_y, const Tensor& dots, const Tensor& weight,
    const Tensor& labels, double scale, bool arc, double margin, double offset,
    int64_t angle_policy, bool straight_through, double filter_threshold, int64_t reduction) {
  Prepared p = prepare_loss(embeddings, labels, scale);
  const int64_t B = p.x.size(0), D = p.x.size(1);
  TORCH_CHECK(grad_loss.numel() == (reduction == kRows ? B : 1),
              "marginops: margin_loss_backward: grad_loss must have the loss's shape");
  Tensor g_loss = grad_loss.detach().to(p.acc).contiguous();
  Tensor ln = lse_neg.detach().to(p.acc).contiguous(), c_y = dot_y.detach().to(p.acc).contiguous();
  Tensor nrm = norms.detach().to(p.acc).contiguous();
  Tensor grad_lse = at::empty({B}, p.x.options()), grad_dot = at::empty({B}, p.x.options());
  AT_DISPATCH_FLOATING_TYPES(p.acc, "margin_loss_backward", [&] {
    const Psi<scalar_t> psi(arc, margin, offset, angle_policy, straight_through);
    const scalar_t s = static_cast<scalar_t>(scale);
    const int64_t* y = p.labels.data_ptr<int64_t>();
    const scalar_t* gv = g_loss.data_ptr<scalar_t>();
    int64_t valid = 0;
    for (int64_t i = 0; i < B; ++i) valid += y[i] >= 0;
    // ∂L/∂row_i: the reduction's backward (mean: ÷ the non-ignored count, as the forward did)
    const scalar_t g_all = reduction == kMean ? gv[0] / scalar_t(std::max<int64_t>(valid, 1))
                                              : gv[0];
    const scalar_t* lp = ln.data_ptr<scalar_t>();
    const scalar_t* c = c_y.data_ptr<scalar_t>();
    scalar_t* gl = grad_lse.data_ptr<scalar_t>();
    scalar_t* gd = grad_dot.data_ptr<scalar_t>();
    for (int64_t i = 0; i < B; ++i) {
      const scalar_t g_row = reduction == kRows ? gv[i] : g_all;
      const scalar_t gi = y[i] >= 0 ? g_row : scalar_t(0);  // torch.where: ignored rows get 0
      const scalar_t x = lp[i] - s * psi.value(c[i]);
      const scalar_t gx = gi / (scalar_t(1) + std::exp(-x));  // ∂ logaddexp(x, 0) / ∂x
      gl[i] = gx;
      gd[i] = psi.grad(c[i], -gx * s);  // x = lse − s·ψ
    }
  });
  std::optional<Tensor> kept;
  if (dots.numel() > 0) kept = dots;
  auto [g_hat, grad_weight, g_scale, g_bias] = backward_cpu(
      grad_lse, grad_dot, ln, kept, x_hat, weight, p.scale, std::nullopt, p.labels, std::nullopt,
      std::nullopt, std::nullopt, true, 1, filter_threshold, /*fixed_shift=*/true);
  // normalize_rows' backward, autograd's formulas: x̂ = x / den, den = where(‖x‖ = 0, ∞,
  // max(‖x‖, 1e-12)):  ∂x = g / den + x · (∂den / ‖x‖),  ∂den = −Σ_e g_e·(x_e / den) / den where
  // 1e-12 <= ‖x‖ (0 on zero rows and below the clamp).
  Tensor g = g_hat.to(p.acc).contiguous();
  Tensor g_x = at::empty({B, D}, p.x.options());
  AT_DISPATCH_FLOATING_TYPES(p.acc, "margin_loss_normalize_backward", [&] {
    const scalar_t* x = p.x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* n = nrm.data_ptr<scalar_t>();
    scalar_t* out = g_x.data_ptr<scalar_t>();
    for (int64_t i = 0; i < B; ++i) {
      const scalar_t den = denominator(n[i]);
      const double dot_gx = row_dot_scaled_f64(gp + i * D, x + i * D, den, D);
      const scalar_t g_den = n[i] >= scalar_t(1e-12) ? static_cast<scalar_t>(-dot_gx) / den
                                                     : scalar_t(0);
      const scalar_t g_norm = n[i] == scalar_t(0) ? scalar_t(0) : g_den / n[i];
      for (int64_t e = 0; e < D; ++e) out[i * D + e] = gp[i * D + e] / den + x[i * D + e] * g_norm;
    }
  });
  return {g_x.to(embeddings.scalar_type()), grad_weight};
}

// Autograd, in C++: the op serves eager calls only (marginops/ops/cpp_loss.py), where a Python
// autograd wrapper (torch.library.register_autograd) would cost ~60 µs per step of its own.
class MarginLoss : public torch::autograd::Function<MarginLoss> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const Tensor& embeddings, const Tensor& weight,
      const Tensor& labels, double scale, bool arc, double margin, double offset,
      int64_t angle_policy, bool straight_through, double filter_threshold, int64_t reduction,
      bool keep) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("marginops::margin_loss", "")
                         .typed<decltype(margin_loss_cpu)>();
    auto [loss, x_hat, norms, lse, dot, dots] =
        op.call(embeddings, weight, labels, scale, arc, margin, offset, angle_policy,
                straight_through, filter_threshold, reduction, keep);
    ctx->save_for_backward({embeddings, weight, labels, x_hat, norms, lse, dot, dots});
    ctx->saved_data["params"] = c10::ivalue::Tuple::create(
        {scale, arc, margin, offset, angle_policy, straight_through, filter_threshold,
         reduction});
    ctx->mark_non_differentiable({x_hat, norms, lse, dot, dots});
    ctx->set_materialize_grads(false);
    return {loss, x_hat, norms, lse, dot, dots};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list out(12);
    if (!grads[0].defined()) return out;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("marginops::margin_loss_backward", "")
                         .typed<decltype(margin_loss_backward_cpu)>();
    const auto saved = ctx->get_saved_variables();
    const auto params = ctx->saved_data["params"].toTuple()->elements();
    auto [grad_embeddings, grad_weight] =
        op.call(grads[0].contiguous(), saved[0], saved[3], saved[4], saved[5], saved[6], saved[7],
                saved[1], saved[2], params[0].toDouble(), params[1].toBool(),
                params[2].toDouble(), params[3].toDouble(), params[4].toInt(),
                params[5].toBool(), params[6].toDouble(), params[7].toInt());
    if (ctx->needs_input_grad(0)) out[0] = grad_embeddings;
    if (ctx->needs_input_grad(1)) out[1] = grad_weight;
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> margin_loss_autograd(
    const Tensor& embeddings, const Tensor& weight, const Tensor& labels, double scale, bool arc,
    double margin, double offset, int64_t angle_policy, bool straight_through,
    double filter_threshold, int64_t reduction, bool keep) {
  auto out = MarginLoss::apply(embeddings, weight, labels, scale, arc, margin, offset,
                               angle_policy, straight_through, filter_threshold, reduction, keep);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

TORCH_LIBRARY_FRAGMENT(marginops, m) {
  // The fixed-margin families' loss (above). keep: keep the dots for the backward (3 GEMMs, not 4).
  m.def(
      "margin_loss(Tensor embeddings, Tensor weight, Tensor labels, float scale, bool arc, "
      "float margin, float offset, int angle_policy, bool straight_through, "
      "float filter_threshold, int reduction, bool keep) "
      "-> (Tensor loss, Tensor x_hat, Tensor norms, Tensor lse_neg, Tensor dot_y, Tensor dots)");
  m.def(
      "margin_loss_backward(Tensor grad_loss, Tensor embeddings, Tensor x_hat, Tensor norms, "
      "Tensor lse_neg, Tensor dot_y, Tensor dots, Tensor weight, Tensor labels, float scale, "
      "bool arc, float margin, float offset, int angle_policy, bool straight_through, "
      "float filter_threshold, int reduction) -> (Tensor grad_embeddings, Tensor grad_weight)");
}

TORCH_LIBRARY_IMPL(marginops, CPU, m) {
  m.impl("margin_loss", &margin_loss_cpu);
  m.impl("margin_loss_backward", &margin_loss_backward_cpu);
}

TORCH_LIBRARY_IMPL(marginops, Autograd, m) {
  m.impl("margin_loss", &margin_loss_autograd);
}

}  // namespace cpu
}  // namespace marginops
