// The math of the fused kernels, written once for the CPU and the CUDA kernels.
//
// Every function is a template over the value type T so that it runs on
//   - float / double scalars (CUDA threads, CPU tails),
//   - at::vec::Vectorized<float|double> lanes (CPU main loops),
// which is why the CPU tests exercise exactly the formulas the GPU runs.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define INCUBATION_HOST_DEVICE __host__ __device__
#else
#define INCUBATION_HOST_DEVICE
#include <ATen/cpu/vec/vec.h>
#endif

namespace incubation {
namespace math {

// ------------------------------------------------------------------------------------
// elementary functions: scalar overloads here, Vectorized ones for the CPU below, both
// visible before the templates that call them (templates look them up at definition).
// ------------------------------------------------------------------------------------
INCUBATION_HOST_DEVICE inline float erf_(float x) { return ::erff(x); }
INCUBATION_HOST_DEVICE inline double erf_(double x) { return ::erf(x); }
INCUBATION_HOST_DEVICE inline float exp_(float x) { return ::expf(x); }
INCUBATION_HOST_DEVICE inline double exp_(double x) { return ::exp(x); }
INCUBATION_HOST_DEVICE inline float sqrt_(float x) { return ::sqrtf(x); }
INCUBATION_HOST_DEVICE inline double sqrt_(double x) { return ::sqrt(x); }

#if !defined(__CUDACC__)
template <typename S>
inline at::vec::Vectorized<S> erf_(const at::vec::Vectorized<S>& x) { return x.erf(); }
template <typename S>
inline at::vec::Vectorized<S> exp_(const at::vec::Vectorized<S>& x) { return x.exp(); }
#endif

constexpr double kSqrtHalf = 0.70710678118654752440;     // 1 / sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1 / sqrt(2 pi)

// ------------------------------------------------------------------------------------
// exact (erf) GELU, as torch.nn.functional.gelu(approximate="none") and timm
// ------------------------------------------------------------------------------------
template <typename T>
INCUBATION_HOST_DEVICE inline T gelu(T x) {
  return T(0.5) * x * (T(1) + erf_(x * T(kSqrtHalf)));
}

// d/dx [x * Phi(x)] = Phi(x) + x * phi(x)
template <typename T>
INCUBATION_HOST_DEVICE inline T gelu_grad(T x) {
  T cdf = T(0.5) * (T(1) + erf_(x * T(kSqrtHalf)));
  T pdf = T(kInvSqrt2Pi) * exp_(T(-0.5) * x * x);
  return cdf + x * pdf;
}

// ------------------------------------------------------------------------------------
// Welford running mean / variance. T holds one or many (SIMD lanes) running statistics
// that share one count C; merge combines two partial statistics (Chan et al.).
// ------------------------------------------------------------------------------------
template <typename T, typename C = T>
struct Welford {
  T mean;
  T m2;     // sum of squared deviations from the mean
  C count;
};

template <typename T, typename C>
INCUBATION_HOST_DEVICE inline void welford_push(Welford<T, C>& w, T x) {
  w.count = w.count + C(1);
  T delta = x - w.mean;
  w.mean = w.mean + delta * T(C(1) / w.count);
  w.m2 = w.m2 + delta * (x - w.mean);
}

template <typename T>
INCUBATION_HOST_DEVICE inline Welford<T, T> welford_merge(const Welford<T, T>& a, const Welford<T, T>& b) {
  T count = a.count + b.count;
  if (count == T(0)) return a;
  T share_b = b.count / count;
  T delta = b.mean - a.mean;
  return {a.mean + delta * share_b, a.m2 + b.m2 + delta * delta * a.count * share_b, count};
}

// 1 / sqrt(biased variance + eps), as torch.nn.functional.layer_norm
template <typename T>
INCUBATION_HOST_DEVICE inline T welford_rstd(const Welford<T, T>& w, T eps) {
  return T(1) / sqrt_(w.m2 / w.count + eps);
}

// ------------------------------------------------------------------------------------
// LayerNorm. Forward: y = xhat * w + b with xhat = (x - mean) * rstd.
// Backward, with g = dy * w over a row of n values:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  dw = sum_rows dy * xhat,  db = sum_rows dy
// ------------------------------------------------------------------------------------
template <typename T>
INCUBATION_HOST_DEVICE inline T layer_norm_xhat(T x, T mean, T rstd) {
  return (x - mean) * rstd;
}

template <typename T>
INCUBATION_HOST_DEVICE inline T layer_norm_input_grad(T g, T xhat, T rstd, T mean_g, T mean_g_xhat) {
  return rstd * (g - mean_g - xhat * mean_g_xhat);
}

}  // namespace math
}  // namespace incubation
