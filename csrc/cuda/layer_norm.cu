// CUDA kernels of (add +) LayerNorm forward and backward: one warp per row, 16-byte packs,
// Welford statistics and all sums in float.
#include <torch/library.h>

#include "cuda_kernels.cuh"

namespace incubation {
namespace cuda {
namespace {

using namespace incubation::math;

constexpr int kWarpsPerBlock = 4;
// the backward keeps each warp's column sums (2 x n floats) in 48 KiB of shared memory
constexpr int64_t kSharedBytes = 48 * 1024;
constexpr int64_t kMaxColumnSumFeatures = kSharedBytes / (2 * sizeof(float));

// A row's statistics from each lane's part, merged across the warp; every lane gets lane 0's
// result (merging in a different order may differ in the last bit between lanes).
__device__ __forceinline__ Welford<float> warp_welford(Welford<float> stats) {
#pragma unroll
  for (int step = kWarp / 2; step > 0; step /= 2) {
    Welford<float> other{__shfl_xor_sync(kFullMask, stats.mean, step), __shfl_xor_sync(kFullMask, stats.m2, step),
                         __shfl_xor_sync(kFullMask, stats.count, step)};
    stats = welford_merge(stats, other);
  }
  return {__shfl_sync(kFullMask, stats.mean, 0), __shfl_sync(kFullMask, stats.m2, 0),
          __shfl_sync(kFullMask, stats.count, 0)};
}

// The VEC values LayerNorm normalises at `at`: x's, or with a residual the summed ones (once
// the first pass has written them: the lane that reads them wrote them)
template <typename T, typename R, int VEC>
__device__ __forceinline__ void normalised_values(const T* x, const R* summed, int64_t at, float (&v)[VEC]) {
  if (summed != nullptr) {
    const Pack<R, VEC> sv = load_pack<VEC>(summed + at);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = static_cast<float>(sv.v[i]);
  } else {
    const Pack<T, VEC> xv = load_pack<VEC>(x + at);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = static_cast<float>(xv.v[i]);
  }
}

// The statistics of a row whose squares overflowed (huge values), again, scaled down: two more
// passes over the row, values(c, v) giving the VEC values at column c; sets `scale`.
template <int VEC, typename Values>
__device__ Welford<float> scaled_statistics(const Values& values, int lane, int n, float first, float& scale) {
  float top = 0.f;
  for (int c = lane * VEC; c < n; c += kWarp * VEC) {
    float v[VEC];
    values(c, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) top = fmaxf(top, fabsf(v[i]));
  }
  scale = overflow_scale(warp_max(top));
  Welford<float> stats{0.f, 0.f, 0.f};
  for (int c = lane * VEC; c < n; c += kWarp * VEC) {
    float v[VEC];
    values(c, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) welford_push(stats, scaled_shifted(v[i], scale, first * scale));
  }
  return warp_welford(stats);
}

// summed = x + residual (rounded to R); out = LayerNorm(summed or x); mean, rstd per row.
// R is T, or float for a float residual onto a bfloat16 / float16 x (autocast's residual
// stream): summed, out, weight and bias have R. The statistics are those of the row shifted
// by its first value, and scaled down where its squares overflow (incubation_math.h).
template <typename T, typename R, int VEC>
__global__ void layer_norm_fwd_kernel(const T* __restrict__ x, const R* __restrict__ residual,
                                      const R* __restrict__ weight, const R* __restrict__ bias, R* __restrict__ out,
                                      R* summed, float* __restrict__ mean, float* __restrict__ rstd,
                                      int64_t rows, int n, float eps) {
  const int lane = threadIdx.x % kWarp;
  const int warps_per_block = blockDim.x / kWarp;
  const int64_t warps = int64_t(gridDim.x) * warps_per_block;
  for (int64_t row = int64_t(blockIdx.x) * warps_per_block + threadIdx.x / kWarp; row < rows; row += warps) {
    const int64_t offset = row * n;
    auto values = [&](int c, float (&v)[VEC]) { normalised_values(x, summed, offset + c, v); };
    const float first = residual != nullptr
                            ? static_cast<float>(R(static_cast<float>(x[offset]) + static_cast<float>(residual[offset])))
                            : static_cast<float>(x[offset]);
    float scale = 1.f;
    Welford<float> stats{0.f, 0.f, 0.f};
    for (int c = lane * VEC; c < n; c += kWarp * VEC) {
      const Pack<T, VEC> xv = load_pack<VEC>(x + offset + c);
      float v[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[i] = static_cast<float>(xv.v[i]);
      if (residual != nullptr) {
        const Pack<R, VEC> rv = load_pack<VEC>(residual + offset + c);
        Pack<R, VEC> sv;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          sv.v[i] = R(v[i] + static_cast<float>(rv.v[i]));
          v[i] = static_cast<float>(sv.v[i]);   // the statistics of the rounded sum
        }
        store_pack(summed + offset + c, sv);
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) welford_push(stats, scaled_shifted(v[i], scale, first));
    }
    stats = warp_welford(stats);
    if (!isfinite(stats.m2)) stats = scaled_statistics<VEC>(values, lane, n, first, scale);
    const RowNorm<float> norm = row_norm(stats, scale, first * scale, eps);
    if (lane == 0) {
      mean[row] = row_mean(norm);
      rstd[row] = row_rstd(norm);
    }
    for (int c = lane * VEC; c < n; c += kWarp * VEC) {
      float v[VEC];
      values(c, v);
      const Pack<R, VEC> wv = load_pack_or<VEC>(weight == nullptr ? nullptr : weight + c, 1.f);
      const Pack<R, VEC> bv = load_pack_or<VEC>(bias == nullptr ? nullptr : bias + c, 0.f);
      Pack<R, VEC> ov;
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        ov.v[i] = R(standardize(v[i], norm.scale, norm.shift, norm.mean, norm.rstd) * static_cast<float>(wv.v[i]) +
                    static_cast<float>(bv.v[i]));
      store_pack(out + offset + c, ov);
    }
  }
}

// dx = LayerNorm backward (+ extra); per block column sums of dy * xhat and dy into
// partial[blockIdx.x] (2 x n floats), each warp accumulating its own copy in shared memory.
// Shared memory holds column pack * VEC + i at slot pack + i * (n / VEC), so that the lanes
// of a warp touch consecutive slots (no bank conflicts).
template <typename T, int VEC>
__global__ void layer_norm_bwd_kernel(const T* __restrict__ grad_out, const T* __restrict__ extra,
                                      const T* __restrict__ input, const float* __restrict__ mean,
                                      const float* __restrict__ rstd, const T* __restrict__ weight,
                                      T* __restrict__ dx, float* __restrict__ partial, int64_t rows, int n) {
  extern __shared__ float column_sums[];   // [warps_per_block][2 * n] when partial != null
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps_per_block = blockDim.x / kWarp;
  const int64_t warps = int64_t(gridDim.x) * warps_per_block;
  float* dw = column_sums + int64_t(warp) * 2 * n;
  float* db = dw + n;
  if (partial != nullptr) {
    for (int c = lane; c < 2 * n; c += kWarp) dw[c] = 0.f;
    __syncwarp();
  }
  const float inv_n = 1.f / float(n);
  const int packs = n / VEC;
  for (int64_t row = int64_t(blockIdx.x) * warps_per_block + warp; row < rows; row += warps) {
    const int64_t offset = row * n;
    const float mu = mean[row], rs = rstd[row];
    float sum_g = 0.f, sum_g_xhat = 0.f;
    for (int c = lane * VEC; c < n; c += kWarp * VEC) {
      const Pack<T, VEC> dyv = load_pack<VEC>(grad_out + offset + c);
      const Pack<T, VEC> xv = load_pack<VEC>(input + offset + c);
      const Pack<T, VEC> wv = load_pack_or<VEC>(weight == nullptr ? nullptr : weight + c, 1.f);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float g = static_cast<float>(dyv.v[i]) * static_cast<float>(wv.v[i]);
        sum_g += g;
        sum_g_xhat += g * layer_norm_xhat(static_cast<float>(xv.v[i]), mu, rs);
      }
    }
    const float mean_g = warp_sum(sum_g) * inv_n;
    const float mean_g_xhat = warp_sum(sum_g_xhat) * inv_n;
    for (int c = lane * VEC; c < n; c += kWarp * VEC) {
      const Pack<T, VEC> dyv = load_pack<VEC>(grad_out + offset + c);
      const Pack<T, VEC> xv = load_pack<VEC>(input + offset + c);
      const Pack<T, VEC> wv = load_pack_or<VEC>(weight == nullptr ? nullptr : weight + c, 1.f);
      const Pack<T, VEC> ev = load_pack_or<VEC>(extra == nullptr ? nullptr : extra + offset + c, 0.f);
      Pack<T, VEC> dxv;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float dy = static_cast<float>(dyv.v[i]);
        const float xhat = layer_norm_xhat(static_cast<float>(xv.v[i]), mu, rs);
        dxv.v[i] = T(layer_norm_input_grad(dy * static_cast<float>(wv.v[i]), xhat, rs, mean_g, mean_g_xhat) +
                     static_cast<float>(ev.v[i]));
        if (partial != nullptr) {   // columns c + i belong to this lane alone
          dw[c / VEC + i * packs] += dy * xhat;
          db[c / VEC + i * packs] += dy;
        }
      }
      store_pack(dx + offset + c, dxv);
    }
  }
  if (partial != nullptr) {
    __syncthreads();
    for (int t = threadIdx.x; t < 2 * n; t += blockDim.x) {
      float sum = 0.f;
      for (int w = 0; w < warps_per_block; ++w) sum += column_sums[int64_t(w) * 2 * n + t];
      const int half = t / n, slot = t % n;   // half 0: dw, 1: db
      partial[int64_t(blockIdx.x) * 2 * n + half * n + (slot % packs) * VEC + slot / packs] = sum;
    }
  }
}

// R: see layer_norm_fwd_kernel. A mixed pair moves packs of R's 16 bytes (4 values, so 8 bytes of T).
template <typename T, typename R = T>
void launch_layer_norm_fwd(const at::Tensor& x, const OptTensor& residual, const OptTensor& weight,
                           const OptTensor& bias, double eps, at::Tensor& out, at::Tensor& summed, at::Tensor& mean,
                           at::Tensor& rstd) {
  const int64_t n = x.size(-1), rows = x.numel() / n;
  if (rows == 0) return;
  const R* r = ptr_or_null<R>(residual);
  const R* w = ptr_or_null<R>(weight);
  const R* b = ptr_or_null<R>(bias);
  R* s = residual.has_value() ? summed.data_ptr<R>() : nullptr;
  const int64_t blocks = std::min(ceil_div(rows, kWarpsPerBlock), sm_count() * 16);
  const cudaStream_t stream = current_stream();
  constexpr int kVec = std::min(kPack<T>, kPack<R>);
  auto kernel = packs_fit<R>(n, {x.const_data_ptr(), r, w, b, out.const_data_ptr(), s}) && n % kVec == 0
                    ? layer_norm_fwd_kernel<T, R, kVec>
                    : layer_norm_fwd_kernel<T, R, 1>;
  kernel<<<blocks, kWarpsPerBlock * kWarp, 0, stream>>>(x.const_data_ptr<T>(), r, w, b, out.data_ptr<R>(), s,
                                                         mean.data_ptr<float>(), rstd.data_ptr<float>(), rows,
                                                         int(n), float(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(
    const char* op, const at::Tensor& x, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    double eps) {
  const int64_t n = check_layer_norm_fwd(op, x, residual, weight, bias, eps);
  TORCH_CHECK(n <= INT32_MAX, op, ": at most 2^31 - 1 features, got ", n);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [out, summed, mean, rstd] = layer_norm_outputs(x, residual);
  if (is_mixed_residual(x, residual)) {   // outputs in the residual's float32
    AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "add_layer_norm_fwd", [&] {
      launch_layer_norm_fwd<scalar_t, float>(x, residual, weight, bias, eps, out, summed, mean, rstd);
    });
    return {out, summed, mean, rstd};
  }
  INCUBATION_DISPATCH_CUDA_TYPES(x.scalar_type(), "layer_norm_fwd", [&] {
    launch_layer_norm_fwd<scalar_t>(x, residual, weight, bias, eps, out, summed, mean, rstd);
  });
  return {out, summed, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(const at::Tensor& x, const OptTensor& weight,
                                                                  const OptTensor& bias, double eps) {
  auto [out, summed, mean, rstd] = layer_norm_forward("incubation::layer_norm_fwd", x, std::nullopt, weight, bias, eps);
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd_cuda(
    const at::Tensor& x, const at::Tensor& residual, const OptTensor& weight, const OptTensor& bias, double eps) {
  return layer_norm_forward("incubation::add_layer_norm_fwd", x, residual, weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(
    const at::Tensor& grad_out, const OptTensor& grad_extra, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& rstd, const OptTensor& weight, bool weight_grad, bool bias_grad) {
  constexpr const char* op = "incubation::layer_norm_bwd";
  const int64_t n = check_layer_norm_bwd(op, grad_out, grad_extra, input, mean, rstd, weight);
  TORCH_CHECK(!weight_grad || weight.has_value(), op, ": weight_grad=True needs a weight");
  const bool column_sums = weight_grad || bias_grad;
  TORCH_CHECK(!column_sums || n <= kMaxColumnSumFeatures, op, ": weight and bias gradients on CUDA support at most ",
              kMaxColumnSumFeatures, " features, got ", n);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t rows = input.numel() / n;
  auto dx = at::empty(input.sizes(), input.options());
  const int warps_per_block =
      column_sums ? int(std::min<int64_t>(kWarpsPerBlock, kSharedBytes / (2 * n * int64_t(sizeof(float)))))
                  : kWarpsPerBlock;
  const size_t shared = column_sums ? size_t(warps_per_block) * 2 * n * sizeof(float) : 0;
  at::Tensor partial;
  INCUBATION_DISPATCH_CUDA_TYPES(input.scalar_type(), "layer_norm_bwd", [&] {
    using T = scalar_t;
    const T* e = ptr_or_null<T>(grad_extra);
    const T* w = ptr_or_null<T>(weight);
    auto kernel = packs_fit<T>(n, {grad_out.const_data_ptr(), e, input.const_data_ptr(), w, dx.const_data_ptr()})
                      ? layer_norm_bwd_kernel<T, kPack<T>>
                      : layer_norm_bwd_kernel<T, 1>;
    int blocks_per_sm = 1;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, warps_per_block * kWarp,
                                                                 shared));
    const int64_t blocks =
        std::max<int64_t>(1, std::min(ceil_div(rows, warps_per_block), sm_count() * std::max(blocks_per_sm, 1)));
    partial = column_sums ? at::empty({blocks, 2 * n}, input.options().dtype(at::kFloat)) : at::Tensor();
    if (rows > 0 || column_sums) {
      kernel<<<blocks, warps_per_block * kWarp, shared, current_stream()>>>(
          grad_out.const_data_ptr<T>(), e, input.const_data_ptr<T>(), mean.const_data_ptr<float>(),
          rstd.const_data_ptr<float>(), w, dx.data_ptr<T>(), column_sums ? partial.data_ptr<float>() : nullptr,
          rows, int(n));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  at::Tensor sums = column_sums ? partial.sum(0) : at::Tensor();
  auto dw = weight_grad ? column_sum(sums, 0, n, input) : not_requested(input);
  auto db = bias_grad ? column_sum(sums, 1, n, input) : not_requested(input);
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(incubation, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda);
}

}  // namespace cuda
}  // namespace incubation
