// Op schemas of the marginops C++/CUDA extension, and the Python module stub that loads them.
//
// The kernels live in csrc/cpu (CPU dispatch key) and csrc/cuda (CUDA dispatch key). Fake (meta)
// kernels and autograd are registered from Python (marginops/ops/cpp.py), the pytorch/extension-cpp
// recipe: the backward is itself a registered op, so torch.compile and opcheck see through both.
//
// The contract (shapes, dtypes, math) is the docstring of marginops/ops/__init__.py.
#include <Python.h>

#include <torch/library.h>

extern "C" {
// `import marginops._C` loads this shared object, which runs the TORCH_LIBRARY static
// initialisers below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      NULL,  // doc
      -1,    // per-interpreter state size
      NULL,  // methods
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(marginops, m) {
  // lse_neg_i = log Σ_{n≠target} exp(scale_i·d'_in + bias_n),  dot_y_i = d_{i,target}.
  // filter_threshold > 0: non-target d_in > filter_threshold count as d'_in = 0 with no gradient
  // (insightface's interclass filtering); 0 (the default) disables it.
  m.def(
      "margin_lse(Tensor features, Tensor weight, Tensor scale, Tensor? bias, Tensor target_col, "
      "Tensor? class_index, Tensor? hard_tau, Tensor? hard_t, bool normalize_weight, "
      "int subcenters, float filter_threshold=0.) -> (Tensor lse_neg, Tensor dot_y)");
  // -> (grad_features, grad_weight, grad_scale, grad_bias); grad_bias is empty when bias is None.
  m.def(
      "margin_lse_backward(Tensor grad_lse, Tensor grad_dot, Tensor lse_neg, Tensor features, "
      "Tensor weight, Tensor scale, Tensor? bias, Tensor target_col, Tensor? class_index, "
      "Tensor? hard_tau, Tensor? hard_t, bool normalize_weight, int subcenters, "
      "float filter_threshold=0.) "
      "-> (Tensor grad_features, Tensor grad_weight, Tensor grad_scale, Tensor grad_bias)");
  // CPU only: margin_lse that also returns the B × N·K dots d_ir (before the sub-center max), and
  // the backward that reads them instead of recomputing them (3 GEMMs instead of 4). Used by
  // marginops/ops/cpp.py when the dots fit its keep budget.
  m.def(
      "margin_lse_keep(Tensor features, Tensor weight, Tensor scale, Tensor? bias, "
      "Tensor target_col, Tensor? class_index, Tensor? hard_tau, Tensor? hard_t, "
      "bool normalize_weight, int subcenters, float filter_threshold=0.) "
      "-> (Tensor lse_neg, Tensor dot_y, Tensor dots)");
  m.def(
      "margin_lse_backward_kept(Tensor grad_lse, Tensor grad_dot, Tensor lse_neg, Tensor dots, "
      "Tensor features, Tensor weight, Tensor scale, Tensor? bias, Tensor target_col, "
      "Tensor? class_index, Tensor? hard_tau, Tensor? hard_t, bool normalize_weight, "
      "int subcenters, float filter_threshold=0.) "
      "-> (Tensor grad_features, Tensor grad_weight, Tensor grad_scale, Tensor grad_bias)");
  // marginops.optim's fused step (CPU, csrc/cpu/optim_step.cpp): torch.optim's SGD and AdamW
  // updates in one pass, in place; AdamW's step is the count after this step's increment.
  m.def(
      "sgd_step_(Tensor(a!) param, Tensor grad, Tensor(b!)? momentum_buffer, float lr, "
      "float weight_decay, float momentum, float dampening, bool nesterov, bool maximize, "
      "bool first_step) -> ()");
  m.def(
      "adamw_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "float lr, float weight_decay, float beta1, float beta2, float eps, float step, "
      "bool maximize) -> ()");
  // k largest d_in per row over n ≠ exclude_col_i; values descending, ties → lower column.
  m.def(
      "topk(Tensor features, Tensor weight, Tensor exclude_col, int k, bool normalize_weight, "
      "int subcenters) -> (Tensor values, Tensor columns)");
}
