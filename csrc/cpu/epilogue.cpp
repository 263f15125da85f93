// CPU kernels of the linear epilogue out = residual + layer_scale * act(y + bias) and its
// backward: rows in parallel, SIMD within a row, math in acc_t. Rows are walked in tiles of
// kTile values so that the converted copies of bfloat16 / float16 rows stay in L1.
#include <torch/library.h>

#include "cpu_kernels.h"
#include "incubation_math.h"
#include "incubation_ops.h"

namespace incubation {
namespace cpu {
namespace {

using namespace incubation::math;

constexpr int64_t kTile = 512;

template <typename Fn>
inline void for_each_tile(int64_t n, const Fn& fn) {
  for (int64_t c0 = 0; c0 < n; c0 += kTile) fn(c0, std::min(kTile, n - c0));
}

// res_t: the residual's and out's type, y's scalar_t or float (a float residual stream under
// autocast, onto a bfloat16 / float16 GEMM output)
template <typename scalar_t, bool kGelu, typename res_t = scalar_t>
void epilogue_fwd_kernel(const scalar_t* y, const OptTensor& bias, const OptTensor& scale, const res_t* residual,
                         int64_t rows, int64_t n, res_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const auto b = vector_as_acc<scalar_t>(bias, n, acc_t(0));
  const auto s = vector_as_acc<scalar_t>(scale, n, acc_t(1));
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(2 * kTile);
    for (int64_t r = begin; r < end; ++r) {
      for_each_tile(n, [&](int64_t c0, int64_t m) {
        const scalar_t* y_tile = y + r * n + c0;
        res_t* out_tile = out + r * n + c0;
        const acc_t* ya = row_as_acc(y_tile, scratch.data(), m);
        const acc_t* ra = residual != nullptr ? row_as_acc(residual + r * n + c0, scratch.data() + kTile, m) : nullptr;
        const acc_t *bt = b.data() + c0, *st = s.data() + c0;
        acc_t* o = out_row_as_acc(out_tile, scratch.data());
        vec_loop<acc_t>(m, [&](int64_t i, auto c) {
          Vec z = load(ya, i, c) + load(bt, i, c);
          if constexpr (kGelu) z = gelu(z);
          Vec v = z * load(st, i, c);
          if (ra != nullptr) v = v + load(ra, i, c);
          store(o, i, c, v);
        });
        finish_row(o, out_tile, m);
      });
    }
  });
}

// dy = grad * layer_scale * act'(y + bias); column sums dbias = sum dy, dscale = sum grad * act(y + bias)
template <typename scalar_t, bool kGelu>
at::Tensor epilogue_bwd_kernel(const scalar_t* grad, const scalar_t* y, const OptTensor& bias,
                               const OptTensor& scale, bool bias_sum, bool scale_sum, int64_t rows, int64_t n,
                               scalar_t* dy) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const auto b = vector_as_acc<scalar_t>(bias, n, acc_t(0));
  const auto s = vector_as_acc<scalar_t>(scale, n, acc_t(1));
  return rows_with_column_sums<acc_t>(rows, 2 * n, [&](int64_t begin, int64_t end, acc_t* partial) {
    std::vector<acc_t> scratch(3 * kTile);
    for (int64_t r = begin; r < end; ++r) {
      for_each_tile(n, [&](int64_t c0, int64_t m) {
        const acc_t* ga = row_as_acc(grad + r * n + c0, scratch.data(), m);
        const acc_t* ya = row_as_acc(y + r * n + c0, scratch.data() + kTile, m);
        acc_t* d = out_row_as_acc(dy + r * n + c0, scratch.data() + 2 * kTile);
        const acc_t *bt = b.data() + c0, *st = s.data() + c0;
        acc_t *dbias = partial + c0, *dscale = partial + n + c0;
        vec_loop<acc_t>(m, [&](int64_t i, auto c) {
          Vec g = load(ga, i, c);
          Vec z = load(ya, i, c) + load(bt, i, c);
          Vec dz = g * load(st, i, c);
          if constexpr (kGelu) dz = dz * gelu_grad(z);
          store(d, i, c, dz);
          if (bias_sum) store(dbias, i, c, load(dbias, i, c) + dz);
          if (scale_sum) {
            Vec act = z;
            if constexpr (kGelu) act = gelu(z);
            store(dscale, i, c, at::vec::fmadd(g, act, load(dscale, i, c)));
          }
        });
        finish_row(d, dy + r * n + c0, m);
      });
    }
  });
}

at::Tensor linear_epilogue_fwd_cpu(const at::Tensor& y, const OptTensor& bias, const OptTensor& scale,
                                   const OptTensor& residual, bool gelu) {
  constexpr const char* op = "incubation::linear_epilogue_fwd";
  const int64_t n = check_epilogue(op, y, bias, scale);
  if (residual.has_value()) check_residual(op, *residual, "y", y);
  const int64_t rows = y.numel() / n;
  if (is_mixed_residual(y, residual)) {   // out in the residual's float32
    auto out = at::empty(y.sizes(), residual->options());
    AT_DISPATCH_REDUCED_FLOATING_TYPES(y.scalar_type(), "linear_epilogue_fwd", [&] {
      auto kernel = gelu ? epilogue_fwd_kernel<scalar_t, true, float> : epilogue_fwd_kernel<scalar_t, false, float>;
      kernel(y.const_data_ptr<scalar_t>(), bias, scale, residual->const_data_ptr<float>(), rows, n,
             out.data_ptr<float>());
    });
    return out;
  }
  auto out = at::empty(y.sizes(), y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "linear_epilogue_fwd", [&] {
    const scalar_t* res = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
    auto kernel = gelu ? epilogue_fwd_kernel<scalar_t, true> : epilogue_fwd_kernel<scalar_t, false>;
    kernel(y.const_data_ptr<scalar_t>(), bias, scale, res, rows, n, out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_epilogue_bwd_cpu(const at::Tensor& grad, const at::Tensor& y,
                                                                      const OptTensor& bias, const OptTensor& scale,
                                                                      bool gelu, bool bias_grad, bool scale_grad) {
  constexpr const char* op = "incubation::linear_epilogue_bwd";
  const int64_t n = check_epilogue(op, y, bias, scale);
  check_same_shape(op, "grad", grad, "y", y);
  TORCH_CHECK(!bias_grad || bias.has_value(), op, ": bias_grad=True needs a bias");
  TORCH_CHECK(!scale_grad || scale.has_value(), op, ": scale_grad=True needs a layer_scale");
  const int64_t rows = y.numel() / n;
  auto dy = at::empty(y.sizes(), y.options());
  at::Tensor sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "linear_epilogue_bwd", [&] {
    auto kernel = gelu ? epilogue_bwd_kernel<scalar_t, true> : epilogue_bwd_kernel<scalar_t, false>;
    sums = kernel(grad.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), bias, scale, bias_grad, scale_grad,
                  rows, n, dy.data_ptr<scalar_t>());
  });
  auto dbias = bias_grad ? column_sum(sums, 0, n, y) : not_requested(y);
  auto dscale = scale_grad ? column_sum(sums, 1, n, y) : not_requested(y);
  return {dy, dbias, dscale};
}

}  // namespace

TORCH_LIBRARY_IMPL(incubation, CPU, m) {
  m.impl("linear_epilogue_fwd", &linear_epilogue_fwd_cpu);
  m.impl("linear_epilogue_bwd", &linear_epilogue_bwd_cpu);
}

}  // namespace cpu
}  // namespace incubation
