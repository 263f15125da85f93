// CUDA kernels of the linear epilogue out = residual + layer_scale * act(y + bias) and its
// backward: elementwise over 16-byte packs, column sums per block in float.
#include <torch/library.h>

#include "cuda_kernels.cuh"

namespace incubation {
namespace cuda {
namespace {

using namespace incubation::math;

constexpr int kThreads = 256;
// backward blocks: kColumnThreads packs of columns x kRowThreads rows
constexpr int kColumnThreads = 32;
constexpr int kRowThreads = 8;

// R: the residual's and out's type, T or float (a float residual stream under autocast onto a
// bfloat16 / float16 GEMM output)
template <typename T, int VEC, bool GELU, typename R = T>
__global__ void epilogue_fwd_kernel(const T* __restrict__ y, const T* __restrict__ bias, const T* __restrict__ scale,
                                    const R* __restrict__ residual, R* __restrict__ out, int64_t packs, int n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += stride) {
    const int64_t e = p * VEC;
    const int c = int(e % n);   // n % VEC == 0: a pack never crosses a row
    const Pack<T, VEC> yv = load_pack<VEC>(y + e);
    const Pack<T, VEC> bv = load_pack_or<VEC>(bias == nullptr ? nullptr : bias + c, 0.f);
    const Pack<T, VEC> sv = load_pack_or<VEC>(scale == nullptr ? nullptr : scale + c, 1.f);
    const Pack<R, VEC> rv = load_pack_or<VEC>(residual == nullptr ? nullptr : residual + e, 0.f);
    Pack<R, VEC> ov;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float z = static_cast<float>(yv.v[i]) + static_cast<float>(bv.v[i]);
      if (GELU) z = gelu(z);
      ov.v[i] = R(static_cast<float>(rv.v[i]) + z * static_cast<float>(sv.v[i]));
    }
    store_pack(out + e, ov);
  }
}

// dy = grad * scale * act'(y + bias). Thread (x, y) of a block owns the column pack
// blockIdx.x * kColumnThreads + x and rows blockIdx.y * kRowThreads + y + k * gridDim.y * kRowThreads;
// the block's column sums of dy and grad * act(y + bias) go to partial[blockIdx.y] (2 x n).
template <typename T, int VEC, bool GELU>
__global__ void epilogue_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ y, const T* __restrict__ bias,
                                    const T* __restrict__ scale, T* __restrict__ dy, float* __restrict__ partial,
                                    int64_t rows, int n, bool scale_sum) {
  __shared__ float sums[2][kRowThreads][kColumnThreads * VEC];
  const int c = (blockIdx.x * kColumnThreads + threadIdx.x) * VEC;
  float dbias[VEC], dscale[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) dbias[i] = dscale[i] = 0.f;
  if (c < n) {
    const Pack<T, VEC> bv = load_pack_or<VEC>(bias == nullptr ? nullptr : bias + c, 0.f);
    const Pack<T, VEC> sv = load_pack_or<VEC>(scale == nullptr ? nullptr : scale + c, 1.f);
    for (int64_t r = int64_t(blockIdx.y) * kRowThreads + threadIdx.y; r < rows; r += int64_t(gridDim.y) * kRowThreads) {
      const int64_t e = r * n + c;
      const Pack<T, VEC> gv = load_pack<VEC>(grad + e);
      const Pack<T, VEC> yv = load_pack<VEC>(y + e);
      Pack<T, VEC> dv;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float g = static_cast<float>(gv.v[i]);
        const float z = static_cast<float>(yv.v[i]) + static_cast<float>(bv.v[i]);
        float dz = g * static_cast<float>(sv.v[i]);
        if (GELU) dz *= gelu_grad(z);
        dv.v[i] = T(dz);
        dbias[i] += dz;
        if (scale_sum) dscale[i] += g * (GELU ? gelu(z) : z);
      }
      store_pack(dy + e, dv);
    }
  }
  if (partial == nullptr) return;   // uniform over the grid
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    sums[0][threadIdx.y][threadIdx.x * VEC + i] = dbias[i];
    sums[1][threadIdx.y][threadIdx.x * VEC + i] = dscale[i];
  }
  __syncthreads();
  if (threadIdx.y == 0 && c < n) {
    float* out = partial + int64_t(blockIdx.y) * 2 * n;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float sb = 0.f, ss = 0.f;
      for (int k = 0; k < kRowThreads; ++k) {
        sb += sums[0][k][threadIdx.x * VEC + i];
        ss += sums[1][k][threadIdx.x * VEC + i];
      }
      out[c + i] = sb;
      out[n + c + i] = ss;
    }
  }
}

template <typename T, int VEC, typename R = T>
auto epilogue_fwd_for(bool gelu) {
  return gelu ? epilogue_fwd_kernel<T, VEC, true, R> : epilogue_fwd_kernel<T, VEC, false, R>;
}

// out = residual (float) + layer_scale * act(y + bias) for a bfloat16 / float16 y: packs of
// 4 values (float's 16 bytes)
template <typename T>
void launch_mixed_epilogue_fwd(const at::Tensor& y, const OptTensor& bias, const OptTensor& scale,
                               const at::Tensor& residual, bool gelu, at::Tensor& out, int64_t n) {
  const T* b = ptr_or_null<T>(bias);
  const T* s = ptr_or_null<T>(scale);
  const float* r = residual.const_data_ptr<float>();
  const bool packed = packs_fit<float>(n, {y.const_data_ptr(), b, s, r, out.const_data_ptr()});
  const int vec = packed ? kPack<float> : 1;
  const int64_t packs = y.numel() / vec;
  const int64_t blocks = std::min(ceil_div(packs, kThreads), sm_count() * 32);
  auto kernel = packed ? epilogue_fwd_for<T, kPack<float>, float>(gelu) : epilogue_fwd_for<T, 1, float>(gelu);
  kernel<<<blocks, kThreads, 0, current_stream()>>>(y.const_data_ptr<T>(), b, s, r, out.data_ptr<float>(), packs,
                                                     int(n));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC>
auto epilogue_bwd_for(bool gelu) {
  return gelu ? epilogue_bwd_kernel<T, VEC, true> : epilogue_bwd_kernel<T, VEC, false>;
}

at::Tensor linear_epilogue_fwd_cuda(const at::Tensor& y, const OptTensor& bias, const OptTensor& scale,
                                    const OptTensor& residual, bool gelu) {
  constexpr const char* op = "incubation::linear_epilogue_fwd";
  const int64_t n = check_epilogue(op, y, bias, scale);
  if (residual.has_value()) check_residual(op, *residual, "y", y);
  TORCH_CHECK(n <= INT32_MAX, op, ": at most 2^31 - 1 features, got ", n);
  const c10::cuda::CUDAGuard guard(y.device());
  if (is_mixed_residual(y, residual)) {   // out in the residual's float32
    auto out = at::empty(y.sizes(), residual->options());
    if (y.numel() == 0) return out;
    AT_DISPATCH_REDUCED_FLOATING_TYPES(y.scalar_type(), "linear_epilogue_fwd", [&] {
      launch_mixed_epilogue_fwd<scalar_t>(y, bias, scale, *residual, gelu, out, n);
    });
    return out;
  }
  auto out = at::empty(y.sizes(), y.options());
  if (y.numel() == 0) return out;
  INCUBATION_DISPATCH_CUDA_TYPES(y.scalar_type(), "linear_epilogue_fwd", [&] {
    using T = scalar_t;
    const T* b = ptr_or_null<T>(bias);
    const T* s = ptr_or_null<T>(scale);
    const T* r = ptr_or_null<T>(residual);
    const bool packed = packs_fit<T>(n, {y.const_data_ptr(), b, s, r, out.const_data_ptr()});
    const int vec = packed ? kPack<T> : 1;
    const int64_t packs = y.numel() / vec;
    const int64_t blocks = std::min(ceil_div(packs, kThreads), sm_count() * 32);
    auto kernel = packed ? epilogue_fwd_for<T, kPack<T>>(gelu) : epilogue_fwd_for<T, 1>(gelu);
    kernel<<<blocks, kThreads, 0, current_stream()>>>(y.const_data_ptr<T>(), b, s, r,
                                                                       out.data_ptr<T>(), packs, int(n));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_epilogue_bwd_cuda(const at::Tensor& grad, const at::Tensor& y,
                                                                       const OptTensor& bias, const OptTensor& scale,
                                                                       bool gelu, bool bias_grad, bool scale_grad) {
  constexpr const char* op = "incubation::linear_epilogue_bwd";
  const int64_t n = check_epilogue(op, y, bias, scale);
  check_same_shape(op, "grad", grad, "y", y);
  TORCH_CHECK(!bias_grad || bias.has_value(), op, ": bias_grad=True needs a bias");
  TORCH_CHECK(!scale_grad || scale.has_value(), op, ": scale_grad=True needs a layer_scale");
  TORCH_CHECK(n <= INT32_MAX, op, ": at most 2^31 - 1 features, got ", n);
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t rows = y.numel() / n;
  const bool column_sums = bias_grad || scale_grad;
  auto dy = at::empty(y.sizes(), y.options());
  at::Tensor partial;
  INCUBATION_DISPATCH_CUDA_TYPES(y.scalar_type(), "linear_epilogue_bwd", [&] {
    using T = scalar_t;
    const T* b = ptr_or_null<T>(bias);
    const T* s = ptr_or_null<T>(scale);
    const bool packed = packs_fit<T>(n, {grad.const_data_ptr(), y.const_data_ptr(), b, s, dy.const_data_ptr()});
    const int vec = packed ? kPack<T> : 1;
    const int64_t column_blocks = ceil_div(n, int64_t(kColumnThreads) * vec);
    const int64_t row_blocks = std::max<int64_t>(
        1, std::min({ceil_div(rows, kRowThreads), ceil_div(sm_count() * 8, column_blocks), int64_t(65535)}));
    partial = column_sums ? at::empty({row_blocks, 2 * n}, y.options().dtype(at::kFloat)) : at::Tensor();
    if (rows == 0 && !column_sums) return;
    auto kernel = packed ? epilogue_bwd_for<T, kPack<T>>(gelu) : epilogue_bwd_for<T, 1>(gelu);
    const dim3 blocks(static_cast<unsigned>(column_blocks), static_cast<unsigned>(row_blocks));
    const dim3 threads(kColumnThreads, kRowThreads);
    kernel<<<blocks, threads, 0, current_stream()>>>(
        grad.const_data_ptr<T>(), y.const_data_ptr<T>(), b, s, dy.data_ptr<T>(),
        column_sums ? partial.data_ptr<float>() : nullptr, rows, int(n), scale_grad);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor sums = column_sums ? partial.sum(0) : at::Tensor();
  auto dbias = bias_grad ? column_sum(sums, 0, n, y) : not_requested(y);
  auto dscale = scale_grad ? column_sum(sums, 1, n, y) : not_requested(y);
  return {dy, dbias, dscale};
}

}  // namespace

TORCH_LIBRARY_IMPL(incubation, CUDA, m) {
  m.impl("linear_epilogue_fwd", &linear_epilogue_fwd_cuda);
  m.impl("linear_epilogue_bwd", &linear_epilogue_bwd_cuda);
}

}  // namespace cuda
}  // namespace incubation
