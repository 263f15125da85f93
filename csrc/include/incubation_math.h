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

// ------------------------------------------------------------------------------------
// A row's standardisation, exact in its set-up for every finite row: the statistics are
// those of v = x * scale - shift, where
//   - shift is the row's first value (times scale), so that data far from zero
//     (1000 + 0.01 N) keeps its digits in v: x - shift is exact where x is near shift;
//   - scale is 1, or, where the squares overflow (1e20 in float), the power of two that
//     brings the row's largest magnitude to about 1 (overflow_scale).
// Then xhat = (v - mean_v) * rstd_v, mean(x) = (shift + mean_v) / scale and
// rstd(x) = rstd_v * scale, the statistics saved for the backward.
// ------------------------------------------------------------------------------------
template <typename T>
INCUBATION_HOST_DEVICE inline T scaled_shifted(T x, T scale, T shift) {
  return x * scale - shift;
}

// 2^-k with k >= 0 that brings max_abs to [0.5, 1) (below 4 at the top of float's range)
INCUBATION_HOST_DEVICE inline float overflow_scale(float max_abs) {
  int exponent = 0;
  ::frexpf(max_abs, &exponent);   // max_abs = f * 2^exponent, 0.5 <= f < 1
  return ::ldexpf(1.f, exponent < 0 ? 0 : -(exponent > 126 ? 126 : exponent));   // a normal float
}

INCUBATION_HOST_DEVICE inline double overflow_scale(double max_abs) {
  int exponent = 0;
  ::frexp(max_abs, &exponent);
  return ::ldexp(1.0, exponent < 0 ? 0 : -(exponent > 1022 ? 1022 : exponent));
}

template <typename T>
struct RowNorm {
  T scale, shift;   // v = x * scale - shift
  T mean, rstd;     // of v: xhat = (v - mean) * rstd
};

// rstd as torch.nn.functional.layer_norm: 1 / sqrt(biased variance + eps), with eps scaled as v
template <typename T>
INCUBATION_HOST_DEVICE inline RowNorm<T> row_norm(const Welford<T, T>& w, T scale, T shift, T eps) {
  return {scale, shift, w.mean, T(1) / sqrt_(w.m2 / w.count + eps * scale * scale)};
}

template <typename T>
INCUBATION_HOST_DEVICE inline T row_mean(const RowNorm<T>& r) { return (r.shift + r.mean) / r.scale; }

template <typename T>
INCUBATION_HOST_DEVICE inline T row_rstd(const RowNorm<T>& r) { return r.rstd * r.scale; }

// V: T, or SIMD lanes of T (then every argument but x broadcast)
template <typename V>
INCUBATION_HOST_DEVICE inline V standardize(V x, V scale, V shift, V mean, V rstd) {
  return (scaled_shifted(x, scale, shift) - mean) * rstd;
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
