// The input checks that incubation_ops.h declares, and their helpers (see the header for why
// they live here and not inline).
#include "incubation_ops.h"

#include <cmath>

namespace incubation {

// dtypes the kernels are compiled for: float64 on the CPU only (exact reference tests)
static void check_dtype(const char* op, const char* name, const Tensor& t) {
  auto dtype = t.scalar_type();
  bool ok = dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf ||
            (dtype == at::kDouble && t.device().is_cpu());
  TORCH_CHECK(ok, op, ": ", name, " must be float32, bfloat16 or float16 (float64 on CPU only), got ",
              dtype, " on ", t.device());
}

static void check_contiguous(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous()), got shape ",
              t.sizes(), " with strides ", t.strides());
}

// `t` must live on ref's device, have ref's dtype and be contiguous
static void check_like(const char* op, const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has ", ref.scalar_type(), " (they must match)");
  check_contiguous(op, name, t);
}

void check_same_shape(const char* op, const char* name, const Tensor& t, const char* ref_name,
                             const Tensor& ref) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have ", ref_name, "'s shape ", ref.sizes(),
              ", got ", t.sizes());
  check_like(op, name, t, ref_name, ref);
}

// an optional per-feature vector of shape (n,)
static void check_vector(const char* op, const char* name, const OptTensor& t, int64_t n, const char* ref_name,
                         const Tensor& ref) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, op, ": ", name, " must have shape (", n, ",) to match ",
              ref_name, "'s last dimension, got ", t->sizes());
  check_like(op, name, *t, ref_name, ref);
}

// the main (rows, features) input: returns the number of features (last dimension)
static int64_t check_rows_input(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have at least one dimension, got a scalar");
  check_dtype(op, name, t);
  check_contiguous(op, name, t);
  TORCH_CHECK(t.size(-1) > 0, op, ": ", name, "'s last dimension must be non-empty, got shape ", t.sizes());
  return t.size(-1);
}

// mean / rstd saved by a LayerNorm forward: float32 (float64 for float64 inputs), one per row
static void check_row_stats(const char* op, const char* name, const Tensor& t, const Tensor& input) {
  auto want = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(), " but input is on ",
              input.device());
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must have dtype ", want, " for a ",
              input.scalar_type(), " input, got ", t.scalar_type());
  TORCH_CHECK(t.numel() * input.size(-1) == input.numel(), op, ": ", name, " must hold one value per row of input (",
              input.numel() / input.size(-1), "), got shape ", t.sizes());
  check_contiguous(op, name, t);
}

static void check_eps(const char* op, double eps) {
  TORCH_CHECK(eps > 0 && std::isfinite(eps), op, ": eps must be a positive finite number, got ", eps);
}

// residual has x's shape and x's dtype, or is a mixed residual (above)
void check_residual(const char* op, const Tensor& residual, const char* ref_name, const Tensor& ref) {
  if (is_mixed_residual(ref, residual)) {
    TORCH_CHECK(residual.sizes() == ref.sizes(), op, ": residual must have ", ref_name, "'s shape ", ref.sizes(),
                ", got ", residual.sizes());
    TORCH_CHECK(residual.device() == ref.device(), op, ": residual is on ", residual.device(), " but ", ref_name,
                " is on ", ref.device());
    check_contiguous(op, "residual", residual);
  } else {
    check_same_shape(op, "residual", residual, ref_name, ref);
  }
}

// ------------------------------------------------------------------------------------
// per-op validation, called first by the CPU and the CUDA implementation
// ------------------------------------------------------------------------------------
// weight and bias have the outputs' dtype: x's, or the residual's when it is a mixed one
int64_t check_layer_norm_fwd(const char* op, const Tensor& x, const OptTensor& residual,
                                    const OptTensor& weight, const OptTensor& bias, double eps) {
  int64_t n = check_rows_input(op, "x", x);
  if (residual.has_value()) check_residual(op, *residual, "x", x);
  const bool mixed = is_mixed_residual(x, residual);
  check_vector(op, "weight", weight, n, mixed ? "residual" : "x", mixed ? *residual : x);
  check_vector(op, "bias", bias, n, mixed ? "residual" : "x", mixed ? *residual : x);
  check_eps(op, eps);
  return n;
}

int64_t check_layer_norm_bwd(const char* op, const Tensor& grad_out, const OptTensor& grad_input,
                                    const Tensor& input, const Tensor& mean, const Tensor& rstd,
                                    const OptTensor& weight) {
  int64_t n = check_rows_input(op, "input", input);
  check_same_shape(op, "grad_out", grad_out, "input", input);
  if (grad_input.has_value()) check_same_shape(op, "grad_input", *grad_input, "input", input);
  check_row_stats(op, "mean", mean, input);
  check_row_stats(op, "rstd", rstd, input);
  check_vector(op, "weight", weight, n, "input", input);
  return n;
}

int64_t check_epilogue(const char* op, const Tensor& y, const OptTensor& bias, const OptTensor& scale) {
  int64_t n = check_rows_input(op, "y", y);
  check_vector(op, "bias", bias, n, "y", y);
  check_vector(op, "layer_scale", scale, n, "y", y);
  return n;
}

static void check_heads(const char* op, const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must have 4 dimensions (B, H, N, D), got shape ", t.sizes());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has ", ref.scalar_type(), " (they must match)");
  TORCH_CHECK(t.size(0) == ref.size(0) && t.size(1) == ref.size(1) && t.size(3) == ref.size(3), op, ": ", name,
              " ", t.sizes(), " and ", ref_name, " ", ref.sizes(), " must agree in batch, heads and head dim");
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) == 1 || t.numel() == 0, op, ": ", name,
              "'s last dimension must have stride 1, got strides ", t.strides());
}

void check_attention(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, double scale) {
  check_heads(op, "q", q, "q", q);
  check_dtype(op, "q", q);
  check_heads(op, "k", k, "q", q);
  check_heads(op, "v", v, "q", q);
  TORCH_CHECK(v.size(2) == k.size(2), op, ": k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(2) > 0 && q.size(3) > 0, op, ": keys and the head dim must be non-empty, got q ", q.sizes(),
              " and k ", k.sizes());
  TORCH_CHECK(scale > 0 && std::isfinite(scale), op, ": scale must be a positive finite number, got ", scale);
}

void check_attention_saved(const char* op, const Tensor& grad_out, const Tensor& out, const Tensor& lse,
                           const Tensor& q) {
  check_heads(op, "grad_out", grad_out, "q", q);
  check_heads(op, "out", out, "q", q);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op, ": grad_out ", grad_out.sizes(),
              " and out ", out.sizes(), " must have q's shape ", q.sizes());
  TORCH_CHECK(lse.device() == q.device() && lse.scalar_type() == stats_dtype(q), op, ": lse must be ",
              stats_dtype(q), " on ", q.device(), ", got ", lse.scalar_type(), " on ", lse.device());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              op, ": lse must have shape (B, H, N) = (", q.size(0), ", ", q.size(1), ", ", q.size(2), "), got ",
              lse.sizes());
  check_contiguous(op, "lse", lse);
}

}  // namespace incubation
