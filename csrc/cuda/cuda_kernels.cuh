// Helpers of the CUDA kernels: 16-byte packs, warp reductions, launch sizes, dtype dispatch.
// Kernels load and store T (float, float16, bfloat16) and compute in float.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include <cstdint>
#include <initializer_list>

#include "incubation_math.h"
#include "incubation_ops.h"

#define INCUBATION_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace incubation {
namespace cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// values of T moved by one 16-byte load
template <typename T>
constexpr int kPack = 16 / sizeof(T);

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& pack) {
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

// N copies of `fill` when p is null (absent weight, bias, layer scale)
template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack_or(const T* p, float fill) {
  if (p != nullptr) return load_pack<N>(p);
  Pack<T, N> pack;
#pragma unroll
  for (int i = 0; i < N; ++i) pack.v[i] = T(fill);
  return pack;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// True when rows of n values can move in 16-byte packs: n a multiple of the pack and
// every pointer (null = absent) aligned to 16 bytes.
template <typename T>
inline bool packs_fit(int64_t n, std::initializer_list<const void*> pointers) {
  if (n % kPack<T> != 0) return false;
  for (const void* p : pointers)
    if (p != nullptr && reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// (c10 headers only: ATen/cuda/CUDAContext.h needs the cuBLAS / cuSPARSE headers at build time)
inline int64_t sm_count() {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return count;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
inline const T* ptr_or_null(const OptTensor& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

}  // namespace cuda
}  // namespace incubation
