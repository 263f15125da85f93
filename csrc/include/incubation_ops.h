// What the CPU and CUDA implementations of the incubation::* operators share: input
// validation, so that a wrong call fails the same way on every device (a RuntimeError
// naming the op and the argument) before any kernel touches memory, and output helpers.
#pragma once

// the headers of what is used, not ATen/ATen.h (every op's declaration: seconds more per file)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>

namespace incubation {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

inline at::ScalarType stats_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// shape of the per-row statistics: x's shape without the last dimension
inline std::vector<int64_t> row_shape(const Tensor& x) {
  auto sizes = x.sizes();
  return std::vector<int64_t>(sizes.begin(), sizes.end() - 1);
}

inline const void* data_or_null(const OptTensor& t) { return t.has_value() ? t->const_data_ptr() : nullptr; }

// A float32 residual onto a bfloat16 / float16 x: the fp32 residual stream and the half-precision
// branch that autocast makes. The sum and what is computed from it are float32 then (as eager's
// type promotion), so the outputs take the residual's dtype.
inline bool is_mixed_residual(const Tensor& x, const OptTensor& residual) {
  return residual.has_value() && residual->scalar_type() != x.scalar_type() &&
         residual->scalar_type() == at::kFloat && (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16);
}

// Input validation, called first by the CPU and the CUDA implementation of each op. Defined
// once, in csrc/checks.cpp, which only the C++ compiler builds: nvcc's copies of these checks
// (inline here before) crashed on an H200 where a message streams shapes and strides, instead
// of raising.
//
// residual has x's shape and x's dtype, or is a mixed residual (above)
void check_residual(const char* op, const Tensor& residual, const char* ref_name, const Tensor& ref);
void check_same_shape(const char* op, const char* name, const Tensor& t, const char* ref_name, const Tensor& ref);
// weight and bias have the outputs' dtype: x's, or the residual's when it is a mixed one
int64_t check_layer_norm_fwd(const char* op, const Tensor& x, const OptTensor& residual, const OptTensor& weight,
                             const OptTensor& bias, double eps);
int64_t check_layer_norm_bwd(const char* op, const Tensor& grad_out, const OptTensor& grad_input, const Tensor& input,
                             const Tensor& mean, const Tensor& rstd, const OptTensor& weight);
int64_t check_epilogue(const char* op, const Tensor& y, const OptTensor& bias, const OptTensor& scale);
// q (B, H, N, D), k and v (B, H, Nk, D) of one dtype and device, last strides 1, Nk and D >= 1
void check_attention(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, double scale);
// grad_out and out shaped as q, lse (B, H, N) in stats_dtype(q), contiguous
void check_attention_saved(const char* op, const Tensor& grad_out, const Tensor& out, const Tensor& lse,
                           const Tensor& q);

// ------------------------------------------------------------------------------------
// outputs
// ------------------------------------------------------------------------------------
// part `index` (of `width` values) of the column sums, as a fresh tensor of like's dtype
inline at::Tensor column_sum(const at::Tensor& sums, int64_t index, int64_t width, const at::Tensor& like) {
  return sums.narrow(0, index * width, width).to(like.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
}

// an output that was not asked for
inline at::Tensor not_requested(const at::Tensor& like) { return at::empty({0}, like.options()); }

// (out, summed, mean, rstd) of (add +) LayerNorm: out and summed in x's dtype, or in a mixed
// residual's float32; summed only with a residual; the statistics in stats_dtype (float32 for
// a mixed residual)
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_outputs(const at::Tensor& x,
                                                                                     const OptTensor& residual) {
  const bool mixed = is_mixed_residual(x, residual);
  const auto options = mixed ? residual->options() : x.options();
  const auto stats = x.options().dtype(mixed ? at::kFloat : stats_dtype(x));
  return {at::empty(x.sizes(), options), residual.has_value() ? at::empty(x.sizes(), options) : not_requested(x),
          at::empty(row_shape(x), stats), at::empty(row_shape(x), stats)};
}

}  // namespace incubation
