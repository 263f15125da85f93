// Schemas of the incubation::* operators and the Python module incubation._C.
//
// The dispatcher picks the kernel by device: CPU kernels are registered in csrc/cpu/,
// CUDA kernels in csrc/cuda/. Fake (meta) kernels and autograd formulas are registered
// from Python in incubation/extension.py.
//
// Optional outputs (weight / bias gradients that were not asked for) come back as empty
// tensors of shape (0,).
#include <pybind11/pybind11.h>  // the module only; torch/extension.h would add the whole C++ frontend (~18 s of compile)
#include <torch/library.h>

TORCH_LIBRARY(incubation, m) {
  m.set_python_module("incubation.extension");
  // LayerNorm over the last dimension -> (out, mean, rstd); statistics are float32
  // (float64 for float64 inputs), one per row.
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  // summed = x + residual in the residual's dtype (x half + residual float32 under autocast gives
  // float32, as eager's promotion; else x's dtype), out = LayerNorm(summed) in that dtype
  //   -> (out, summed, mean, rstd)
  m.def("add_layer_norm_fwd(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients of LayerNorm(input) -> (grad_input, grad_weight, grad_bias); grad_input also
  // adds grad_input_extra, the gradient that reached `input` directly (add_layer_norm's summed).
  m.def("layer_norm_bwd(Tensor grad_out, Tensor? grad_input_extra, Tensor input, Tensor mean, Tensor rstd,"
        " Tensor? weight, bool weight_grad, bool bias_grad) -> (Tensor, Tensor, Tensor)");
  // Epilogue of a linear layer whose GEMM gave y = x @ W^T:
  //   out = residual + layer_scale * act(y + bias), act = exact GELU or identity
  m.def("linear_epilogue_fwd(Tensor y, Tensor? bias, Tensor? layer_scale, Tensor? residual, bool gelu) -> Tensor");
  // -> (grad_y, grad_bias, grad_layer_scale); the residual's gradient is grad itself
  m.def("linear_epilogue_bwd(Tensor grad, Tensor y, Tensor? bias, Tensor? layer_scale, bool gelu,"
        " bool bias_grad, bool scale_grad) -> (Tensor, Tensor, Tensor)");
  // softmax(q k^T * scale) v for (B, H, N, D) q and (B, H, Nk, D) k, v, read through their
  // strides (the last one 1) -> (out, lse): out (B, H, N, D) with (B, N, H, D) memory, lse the
  // rows' log-sum-exp of the scaled scores (float32; float64 for float64), NaN for a query
  // holding NaN or inf (its output row is NaN). CPU only.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  // -> (grad_q, grad_k, grad_v), each with (B, N, H, D) memory
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale)"
        " -> (Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "incubation's compiled kernels; the operators live in torch.ops.incubation";
#if defined(INCUBATION_WITH_CUDA)
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
