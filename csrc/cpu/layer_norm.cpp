// CPU kernels of (add +) LayerNorm forward and backward: rows in parallel (at::parallel_for),
// SIMD (at::vec::Vectorized) within a row, statistics and gradients in acc_t.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <iterator>

#include "cpu_kernels.h"
#include "incubation_ops.h"
#include "incubation_math.h"

namespace incubation {
namespace cpu {
namespace {

using namespace incubation::math;

// Mean and variance of v = x * scale - shift over a row, by Welford over SIMD lanes. Several
// independent lane sets hide the latency of the update chain; lanes are then merged, then
// the tail pushed.
template <typename acc_t>
Welford<acc_t> row_statistics(const acc_t* x, int64_t n, acc_t scale, acc_t shift) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t lanes = Vec::size();
  constexpr int sets = 4;
  const Vec vscale(scale), vshift(shift);
  auto v = [&](int64_t i) { return scaled_shifted(Vec::loadu(x + i), vscale, vshift); };
  Welford<Vec, acc_t> partial[sets];
  for (auto& w : partial) w = {Vec(acc_t(0)), Vec(acc_t(0)), acc_t(0)};
  int64_t i = 0;
  for (; i + sets * lanes <= n; i += sets * lanes)
    for (int s = 0; s < sets; ++s) welford_push(partial[s], v(i + s * lanes));
  for (; i + lanes <= n; i += lanes) welford_push(partial[0], v(i));

  Welford<acc_t> total{acc_t(0), acc_t(0), acc_t(0)};
  for (const auto& w : partial) {
    acc_t mean[lanes], m2[lanes];
    w.mean.store(mean);
    w.m2.store(m2);
    for (int64_t l = 0; l < lanes; ++l) total = welford_merge(total, Welford<acc_t>{mean[l], m2[l], w.count});
  }
  for (; i < n; ++i) welford_push(total, scaled_shifted(x[i], scale, shift));
  return total;
}

// the largest magnitude in a row
template <typename acc_t>
acc_t row_max_abs(const acc_t* x, int64_t n) {
  Vectorized<acc_t> top(acc_t(0));
  vec_loop<acc_t>(n, [&](int64_t i, auto c) { top = at::vec::maximum(top, load(x, i, c).abs()); });
  acc_t lanes[Vectorized<acc_t>::size()];
  top.store(lanes);
  return *std::max_element(std::begin(lanes), std::end(lanes));
}

// the row's standardisation (incubation_math.h): shifted by its first value, and scaled
// down only where its squares overflow (a second pass, for rows of huge values)
template <typename acc_t>
RowNorm<acc_t> row_norm_of(const acc_t* x, int64_t n, acc_t eps) {
  acc_t scale(1);
  auto stats = row_statistics(x, n, scale, x[0]);
  if (!std::isfinite(stats.m2)) {
    scale = overflow_scale(row_max_abs(x, n));
    stats = row_statistics(x, n, scale, x[0] * scale);
  }
  return row_norm(stats, scale, x[0] * scale, eps);
}

// out = LayerNorm(x [+ residual]); summed = x + residual rounded to res_t, and the
// statistics are taken of the rounded sum, the tensor the backward will see. res_t is x's
// scalar_t, or float for a float residual onto a bfloat16 / float16 x (autocast's residual
// stream); summed, out, weight and bias have res_t.
template <typename scalar_t, typename res_t = scalar_t>
void layer_norm_fwd_kernel(const scalar_t* x, const res_t* residual, const OptTensor& weight,
                           const OptTensor& bias, double eps, int64_t rows, int64_t n, res_t* out,
                           res_t* summed, at::opmath_type<res_t>* mean, at::opmath_type<res_t>* rstd) {
  using acc_t = at::opmath_type<res_t>;
  static_assert(std::is_same_v<acc_t, at::opmath_type<scalar_t>>, "x and the residual share their math type");
  using Vec = Vectorized<acc_t>;
  const auto w = vector_as_acc<res_t>(weight, n, acc_t(1));
  const auto b = vector_as_acc<res_t>(bias, n, acc_t(0));
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(2 * n);
    acc_t* buf0 = scratch.data();
    acc_t* buf1 = buf0 + n;
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* x_row = x + r * n;
      const acc_t* src;
      if (residual != nullptr) {
        const acc_t* xa = row_as_acc(x_row, buf0, n);
        const acc_t* ra = row_as_acc(residual + r * n, buf1, n);
        acc_t* sum = out_row_as_acc(summed + r * n, buf0);
        vec_loop<acc_t>(n, [&](int64_t i, auto c) { store(sum, i, c, load(xa, i, c) + load(ra, i, c)); });
        finish_row(sum, summed + r * n, n);
        src = row_as_acc(summed + r * n, buf0, n);
      } else if constexpr (std::is_same_v<scalar_t, res_t>) {
        src = row_as_acc(x_row, buf0, n);
      } else {
        TORCH_INTERNAL_ASSERT(false, "a mixed-dtype LayerNorm needs its residual");
      }
      const RowNorm<acc_t> norm = row_norm_of(src, n, acc_t(eps));
      mean[r] = row_mean(norm);
      rstd[r] = row_rstd(norm);
      const Vec scale(norm.scale), shift(norm.shift), mu(norm.mean), rs(norm.rstd);
      acc_t* o = out_row_as_acc(out + r * n, buf1);
      vec_loop<acc_t>(n, [&](int64_t i, auto c) {
        store(o, i, c, at::vec::fmadd(standardize(load(src, i, c), scale, shift, mu, rs), load(w.data(), i, c),
                                      load(b.data(), i, c)));
      });
      finish_row(o, out + r * n, n);
    }
  });
}

// dx = LayerNorm backward (+ grad_extra); column sums dw = sum dy * xhat, db = sum dy
template <typename scalar_t>
at::Tensor layer_norm_bwd_kernel(const scalar_t* grad_out, const scalar_t* grad_extra, const scalar_t* input,
                                 const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* rstd,
                                 const OptTensor& weight, bool column_sums, int64_t rows, int64_t n,
                                 scalar_t* dx) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const auto w = vector_as_acc<scalar_t>(weight, n, acc_t(1));
  return rows_with_column_sums<acc_t>(rows, 2 * n, [&](int64_t begin, int64_t end, acc_t* partial) {
    std::vector<acc_t> scratch(4 * n);
    acc_t *buf_x = scratch.data(), *buf_g = buf_x + n, *buf_e = buf_g + n, *buf_o = buf_e + n;
    acc_t *dw = partial, *db = partial + n;
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* xa = row_as_acc(input + r * n, buf_x, n);
      const acc_t* dya = row_as_acc(grad_out + r * n, buf_g, n);
      const Vec vmu(mean[r]), vrs(rstd[r]);
      Vec sum_g(acc_t(0)), sum_g_xhat(acc_t(0));
      vec_loop<acc_t>(n, [&](int64_t i, auto c) {
        Vec g = load(dya, i, c) * load(w.data(), i, c);
        Vec xhat = layer_norm_xhat(load(xa, i, c), vmu, vrs);
        sum_g = sum_g + head(g, c);
        sum_g_xhat = sum_g_xhat + head(g * xhat, c);
      });
      const Vec mean_g(lane_sum(sum_g) / acc_t(n)), mean_g_xhat(lane_sum(sum_g_xhat) / acc_t(n));
      const acc_t* extra = grad_extra != nullptr ? row_as_acc(grad_extra + r * n, buf_e, n) : nullptr;
      acc_t* d = out_row_as_acc(dx + r * n, buf_o);
      vec_loop<acc_t>(n, [&](int64_t i, auto c) {
        Vec dy = load(dya, i, c);
        Vec xhat = layer_norm_xhat(load(xa, i, c), vmu, vrs);
        Vec grad = layer_norm_input_grad(dy * load(w.data(), i, c), xhat, vrs, mean_g, mean_g_xhat);
        if (extra != nullptr) grad = grad + load(extra, i, c);
        store(d, i, c, grad);
        if (column_sums) {
          store(dw, i, c, at::vec::fmadd(dy, xhat, load(dw, i, c)));
          store(db, i, c, load(db, i, c) + dy);
        }
      });
      finish_row(d, dx + r * n, n);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(
    const char* op, const at::Tensor& x, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    double eps) {
  const int64_t n = check_layer_norm_fwd(op, x, residual, weight, bias, eps);
  const int64_t rows = x.numel() / n;
  auto [out, summed, mean, rstd] = layer_norm_outputs(x, residual);
  if (is_mixed_residual(x, residual)) {   // outputs in the residual's float32
    AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "add_layer_norm_fwd", [&] {
      layer_norm_fwd_kernel<scalar_t, float>(x.const_data_ptr<scalar_t>(), residual->const_data_ptr<float>(), weight,
                                             bias, eps, rows, n, out.data_ptr<float>(), summed.data_ptr<float>(),
                                             mean.data_ptr<float>(), rstd.data_ptr<float>());
    });
    return {out, summed, mean, rstd};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    layer_norm_fwd_kernel<scalar_t>(
        x.const_data_ptr<scalar_t>(),
        residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr, weight, bias, eps, rows, n,
        out.data_ptr<scalar_t>(), residual.has_value() ? summed.data_ptr<scalar_t>() : nullptr,
        mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>());
  });
  return {out, summed, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& x, const OptTensor& weight,
                                                                 const OptTensor& bias, double eps) {
  auto [out, summed, mean, rstd] = layer_norm_forward("incubation::layer_norm_fwd", x, std::nullopt, weight, bias, eps);
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd_cpu(
    const at::Tensor& x, const at::Tensor& residual, const OptTensor& weight, const OptTensor& bias, double eps) {
  return layer_norm_forward("incubation::add_layer_norm_fwd", x, residual, weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& grad_out, const OptTensor& grad_extra, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& rstd, const OptTensor& weight, bool weight_grad, bool bias_grad) {
  constexpr const char* op = "incubation::layer_norm_bwd";
  const int64_t n = check_layer_norm_bwd(op, grad_out, grad_extra, input, mean, rstd, weight);
  TORCH_CHECK(!weight_grad || weight.has_value(), op, ": weight_grad=True needs a weight");
  const int64_t rows = input.numel() / n;
  auto dx = at::empty(input.sizes(), input.options());
  at::Tensor sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "layer_norm_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sums = layer_norm_bwd_kernel<scalar_t>(
        grad_out.const_data_ptr<scalar_t>(),
        grad_extra.has_value() ? grad_extra->const_data_ptr<scalar_t>() : nullptr, input.const_data_ptr<scalar_t>(),
        mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), weight, weight_grad || bias_grad, rows, n,
        dx.data_ptr<scalar_t>());
  });
  auto dw = weight_grad ? column_sum(sums, 0, n, input) : not_requested(input);
  auto db = bias_grad ? column_sum(sums, 1, n, input) : not_requested(input);
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(incubation, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}

}  // namespace cpu
}  // namespace incubation
