// Helpers of the CPU kernels: rows converted to the accumulation type, SIMD loops with
// tails, and parallel column sums. Kernels compute in acc_t = at::opmath_type<scalar_t>
// (float for float/bfloat16/float16, double for double).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/zeros.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "incubation_ops.h"

namespace incubation {
namespace cpu {

using at::vec::Vectorized;

// rows per parallel task: enough work (~16k values) to pay for a task
inline int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, 16384 / width); }

// body(i, count) for every SIMD vector of acc_t starting at i. count is a compile-time
// constant (all lanes) in the main loop, and a run-time value < lanes for the tail, so
// that the main loop compiles without tail branches: bodies are generic lambdas.
template <typename acc_t>
using AllLanes = std::integral_constant<int64_t, Vectorized<acc_t>::size()>;

template <typename acc_t, typename Body>
inline void vec_loop(int64_t n, const Body& body) {
  constexpr int64_t lanes = Vectorized<acc_t>::size();
  int64_t i = 0;
  for (; i + lanes <= n; i += lanes) body(i, AllLanes<acc_t>{});
  if (i < n) body(i, n - i);
}

template <typename acc_t, typename Count>
inline Vectorized<acc_t> load(const acc_t* p, int64_t i, Count count) {
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<Count, AllLanes<acc_t>>) return Vec::loadu(p + i);
  else return Vec::loadu(p + i, count);
}

template <typename acc_t, typename Count>
inline void store(acc_t* p, int64_t i, Count count, const Vectorized<acc_t>& v) {
  if constexpr (std::is_same_v<Count, AllLanes<acc_t>>) v.store(p + i);
  else v.store(p + i, count);
}

// lanes past `count` set to zero, so that a tail does not pollute a row sum
template <typename acc_t, typename Count>
inline Vectorized<acc_t> head(const Vectorized<acc_t>& v, Count count) {
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<Count, AllLanes<acc_t>>) return v;
  else return Vec::set(Vec(acc_t(0)), v, count);
}

template <typename acc_t>
inline acc_t lane_sum(const Vectorized<acc_t>& v) {
  acc_t values[Vectorized<acc_t>::size()];
  v.store(values);
  acc_t sum = 0;
  for (auto value : values) sum += value;
  return sum;
}

template <typename scalar_t>
constexpr bool needs_conversion() { return !std::is_same_v<scalar_t, at::opmath_type<scalar_t>>; }

// A row of scalar_t seen as acc_t: the row itself when the types agree, else a converted
// copy in `scratch`.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline const acc_t* row_as_acc(const scalar_t* src, acc_t* scratch, int64_t n) {
  if constexpr (!needs_conversion<scalar_t>()) {
    return src;
  } else {
    using Low = Vectorized<scalar_t>;
    int64_t i = 0;
    for (; i + Low::size() <= n; i += Low::size()) {
      auto lo_hi = at::vec::convert_to_float<scalar_t>(Low::loadu(src + i));
      std::get<0>(lo_hi).store(scratch + i);
      std::get<1>(lo_hi).store(scratch + i + Vectorized<float>::size());
    }
    for (; i < n; ++i) scratch[i] = static_cast<float>(src[i]);
    return scratch;
  }
}

// Where a kernel writes an output row of scalar_t in acc_t: the row itself when the types
// agree, else `scratch`, to be rounded into the row by finish_row.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline acc_t* out_row_as_acc(scalar_t* dst, acc_t* scratch) {
  if constexpr (!needs_conversion<scalar_t>()) return dst;
  else return scratch;
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void finish_row(const acc_t* src, scalar_t* dst, int64_t n) {
  if constexpr (needs_conversion<scalar_t>()) {
    using F = Vectorized<float>;
    int64_t i = 0;
    for (; i + 2 * F::size() <= n; i += 2 * F::size())
      at::vec::convert_from_float<scalar_t>(F::loadu(src + i), F::loadu(src + i + F::size())).store(dst + i);
    for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

// An optional per-feature vector as n acc_t values (`fill` when absent).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline std::vector<acc_t> vector_as_acc(const OptTensor& t, int64_t n, acc_t fill) {
  std::vector<acc_t> out(n, fill);
  if (t.has_value()) {
    const scalar_t* src = t->const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<acc_t>(src[i]);
  }
  return out;
}

// Runs fn(row_begin, row_end, partial) on contiguous chunks of rows in parallel; each chunk
// adds its column sums into its own zeroed `partial` of `width` values. Returns the sum of
// the partials (acc dtype), always in the same order for a given number of threads.
template <typename acc_t, typename Fn>
inline at::Tensor rows_with_column_sums(int64_t rows, int64_t width, const Fn& fn) {
  int64_t chunks = std::min<int64_t>(at::get_num_threads(), (rows + grain_rows(width) - 1) / grain_rows(width));
  chunks = std::max<int64_t>(chunks, 1);
  at::Tensor partial = at::zeros({chunks, width}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* p = partial.data_ptr<acc_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) fn(c * rows / chunks, (c + 1) * rows / chunks, p + c * width);
  });
  return partial.sum(0);
}

}  // namespace cpu
}  // namespace incubation
