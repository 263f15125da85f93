// CPU kernels of attention, softmax(q k^T * scale) v, forward and backward, for the short
// sequences and small heads of a ViT on a CPU (a 28 px image: 17 tokens, heads of 16).
//
// One (batch, head) at a time, one query row at a time, nothing of size N x N kept: k (and v)
// are transposed once per head into acc_t scratch, so that a row of scores is D SIMD
// multiply-adds over the keys, and the weighted sums over the keys are SIMD over D. SDPA's
// CPU kernel tiles for long sequences, and at these sizes its tiles are mostly padding.
// The backward recomputes each row of probabilities from the saved log-sum-exp.
//
// Layouts: q, k, v and the output's gradient are read through their strides (the last one
// must be 1), so the ViT's views of its qkv projection are read in place. The output and the
// gradients are (B, N, H, D) in memory, returned as (B, H, N, D) views: the ViT's merge of
// the heads after attention is then a view.
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu_kernels.h"
#include "incubation_ops.h"

namespace incubation {
namespace cpu {
namespace {

// a (B, H, N, D) tensor read through its strides, rows of D contiguous values
template <typename scalar_t>
struct Rows {
  const scalar_t* data;
  int64_t sb, sh, sn;
  Rows(const at::Tensor& t)
      : data(t.const_data_ptr<scalar_t>()), sb(t.stride(0)), sh(t.stride(1)), sn(t.stride(2)) {}
  const scalar_t* row(int64_t b, int64_t h, int64_t i) const { return data + b * sb + h * sh + i * sn; }
};

// exp for softmax, of arguments <= 0 or -inf: ATen's inline polynomial for float (what SDPA's CPU
// kernel uses; Sleef's exp is a call per vector), Sleef's for double (float64 reference tests)
template <typename acc_t>
inline Vectorized<acc_t> softmax_exp(const Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) return x.exp_u20();
  else return x.exp();
}

template <typename acc_t>
constexpr int64_t padded(int64_t n) {
  constexpr int64_t lanes = Vectorized<acc_t>::size();
  return (n + lanes - 1) / lanes * lanes;
}

// dst[0:n) = (dst if accumulate, else 0) + sum_{r < m} w[r] * rows[r * stride + 0:n), n a whole number of
// vectors: blocks of up to 4 vectors held in registers, two partial sums each (even and odd r), so
// that the multiply-adds of one block form independent chains rather than one through memory
template <int kBlocks, typename acc_t>
inline void combine_block(const acc_t* w, const acc_t* rows, int64_t stride, int64_t m, acc_t* dst, bool accumulate) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t lanes = Vec::size();
  Vec even[kBlocks], odd[kBlocks];
  for (int b = 0; b < kBlocks; ++b) {
    even[b] = accumulate ? Vec::loadu(dst + b * lanes) : Vec(acc_t(0));
    odd[b] = Vec(acc_t(0));
  }
  int64_t r = 0;
  for (; r + 1 < m; r += 2) {
    const Vec w0(w[r]), w1(w[r + 1]);
    const acc_t *r0 = rows + r * stride, *r1 = r0 + stride;
    for (int b = 0; b < kBlocks; ++b) {
      even[b] = at::vec::fmadd(w0, Vec::loadu(r0 + b * lanes), even[b]);
      odd[b] = at::vec::fmadd(w1, Vec::loadu(r1 + b * lanes), odd[b]);
    }
  }
  if (r < m) {
    const Vec w0(w[r]);
    for (int b = 0; b < kBlocks; ++b) even[b] = at::vec::fmadd(w0, Vec::loadu(rows + r * stride + b * lanes), even[b]);
  }
  for (int b = 0; b < kBlocks; ++b) (even[b] + odd[b]).store(dst + b * lanes);
}

template <typename acc_t>
inline void combine_rows(const acc_t* w, const acc_t* rows, int64_t stride, int64_t m, int64_t n, acc_t* dst,
                         bool accumulate = false) {
  constexpr int64_t lanes = Vectorized<acc_t>::size();
  int64_t j = 0;
  for (; j + 4 * lanes <= n; j += 4 * lanes) combine_block<4>(w, rows + j, stride, m, dst + j, accumulate);
  switch ((n - j) / lanes) {
    case 3: combine_block<3>(w, rows + j, stride, m, dst + j, accumulate); break;
    case 2: combine_block<2>(w, rows + j, stride, m, dst + j, accumulate); break;
    case 1: combine_block<1>(w, rows + j, stride, m, dst + j, accumulate); break;
    default: break;
  }
}

// rows[j][0:n) += w[j] * x[0:n) for j < m (rows of `stride` values, n a whole number of vectors)
template <typename acc_t>
inline void add_outer(const acc_t* w, const acc_t* x, int64_t m, int64_t n, int64_t stride, acc_t* rows) {
  using Vec = Vectorized<acc_t>;
  for (int64_t j = 0; j < m; ++j) {
    const Vec wj(w[j]);
    acc_t* r = rows + j * stride;
    for (int64_t c = 0; c < n; c += Vec::size()) at::vec::fmadd(wj, Vec::loadu(x + c), Vec::loadu(r + c)).store(r + c);
  }
}

// Per thread: one head's keys and values in acc_t, as rows padded to whole vectors (d -> dp)
// and transposed (d, np) with the keys padded (nk -> np), the padding zero.
template <typename acc_t>
struct HeadScratch {
  int64_t nk, d, np, dp;
  std::vector<acc_t> kt, vt, k, v, q, qs, dout, o, scores, dscores, acc, dk, dv;
  HeadScratch(int64_t nk, int64_t d)
      : nk(nk), d(d), np(padded<acc_t>(nk)), dp(padded<acc_t>(d)), kt(d * np), vt(d * np), k(nk * dp), v(nk * dp),
        q(dp), qs(dp), dout(dp), o(dp), scores(np), dscores(np), acc(dp), dk(nk * dp), dv(nk * dp) {}

  template <typename scalar_t>
  void load_row(const scalar_t* src, acc_t* dst) const {
    for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<acc_t>(src[c]);
  }

  // head (b, h) of t -> `dense` rows, and `transposed` unless null
  template <typename scalar_t>
  void load(const Rows<scalar_t>& t, int64_t b, int64_t h, std::vector<acc_t>& dense, std::vector<acc_t>* transposed) {
    for (int64_t j = 0; j < nk; ++j) load_row(t.row(b, h, j), dense.data() + j * dp);
    if (transposed == nullptr) return;
    for (int64_t c = 0; c < d; ++c)
      for (int64_t j = 0; j < nk; ++j) (*transposed)[c * np + j] = dense[j * dp + c];
  }

  // dst[0:np) = row . (keys or values) (the padded keys' 0)
  void times(const std::vector<acc_t>& row, const std::vector<acc_t>& transposed, acc_t* dst) const {
    combine_rows(row.data(), transposed.data(), np, d, np, dst);
  }
};

// the largest of s[0:n), n a whole number of vectors; NaN if any is NaN
template <typename acc_t>
inline acc_t row_max(const acc_t* s, int64_t n) {
  using Vec = Vectorized<acc_t>;
  Vec top = Vec::loadu(s);
  for (int64_t j = Vec::size(); j < n; j += Vec::size()) top = at::vec::maximum(top, Vec::loadu(s + j));
  return at::vec::vec_reduce_all<acc_t>([](auto a, auto b) { return at::vec::maximum(a, b); }, top);
}

// s[j] <- exp(s[j] - shift) for j < n (a whole number of vectors), shift finite; returns their sum
template <typename acc_t>
inline acc_t exp_shifted(acc_t* s, int64_t n, acc_t shift) {
  using Vec = Vectorized<acc_t>;
  Vec total(acc_t(0));
  for (int64_t j = 0; j < n; j += Vec::size()) {
    Vec p = softmax_exp(Vec::loadu(s + j) - Vec(shift));
    p.store(s + j);
    total = total + p;
  }
  return lane_sum(total);
}

// a . b over n values, a whole number of vectors
template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  using Vec = Vectorized<acc_t>;
  Vec total(acc_t(0));
  for (int64_t c = 0; c < n; c += Vec::size()) total = at::vec::fmadd(Vec::loadu(a + c), Vec::loadu(b + c), total);
  return lane_sum(total);
}

// a tensor of like's (B, H, N, D) shape and dtype with (B, N, H, D) memory
at::Tensor heads_last(const at::Tensor& like) {
  return at::empty({like.size(0), like.size(2), like.size(1), like.size(3)}, like.options()).transpose(1, 2);
}

template <typename scalar_t>
void attention_fwd_kernel(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, double scale_,
                          at::Tensor& out_, at::Tensor& lse_) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q_.size(0), H = q_.size(1), N = q_.size(2), NK = k_.size(2), D = q_.size(3);
  const Rows<scalar_t> q(q_), k(k_), v(v_);
  scalar_t* out = out_.data_ptr<scalar_t>();   // (B, N, H, D)
  acc_t* lse = lse_.data_ptr<acc_t>();         // (B, H, N)
  const acc_t scale = static_cast<acc_t>(scale_);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    HeadScratch<acc_t> s(NK, D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      s.load(k, b, h, s.k, &s.kt);
      s.load(v, b, h, s.v, nullptr);
      for (int64_t i = 0; i < N; ++i) {
        s.load_row(q.row(b, h, i), s.q.data());
        for (int64_t c = 0; c < D; ++c) s.q[c] *= scale;
        s.times(s.q, s.kt, s.scores.data());
        std::fill(s.scores.begin() + NK, s.scores.end(), -std::numeric_limits<acc_t>::infinity());
        // A query holding NaN or inf makes every score non-finite (each has its NaN or inf times a
        // key), and so the maximum: such a row is NaN, as eager's. So are rows that a non-finite key
        // or value makes NaN, or an overflow infinite.
        const acc_t m = row_max(s.scores.data(), s.np);
        scalar_t* o = out + ((b * N + i) * H + h) * D;
        if (!std::isfinite(m)) {
          std::fill(o, o + D, static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN()));
          lse[bh * N + i] = std::numeric_limits<acc_t>::quiet_NaN();
          continue;
        }
        const acc_t total = exp_shifted(s.scores.data(), s.np, m);
        combine_rows(s.scores.data(), s.v.data(), s.dp, NK, s.dp, s.acc.data());
        const acc_t inv = acc_t(1) / total;
        for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(s.acc[c] * inv);
        lse[bh * N + i] = m + std::log(total);
      }
    }
  });
}

template <typename scalar_t>
void attention_bwd_kernel(const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                          const at::Tensor& out_, const at::Tensor& lse_, double scale_, at::Tensor& dq_,
                          at::Tensor& dk_, at::Tensor& dv_) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t B = q_.size(0), H = q_.size(1), N = q_.size(2), NK = k_.size(2), D = q_.size(3);
  const Rows<scalar_t> dout(dout_), q(q_), k(k_), v(v_), out(out_);
  const acc_t* lse = lse_.const_data_ptr<acc_t>();
  scalar_t *dq = dq_.data_ptr<scalar_t>(), *dk = dk_.data_ptr<scalar_t>(), *dv = dv_.data_ptr<scalar_t>();
  const acc_t scale = static_cast<acc_t>(scale_);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    HeadScratch<acc_t> s(NK, D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      s.load(k, b, h, s.k, &s.kt);
      s.load(v, b, h, s.v, &s.vt);
      std::fill(s.dk.begin(), s.dk.end(), acc_t(0));
      std::fill(s.dv.begin(), s.dv.end(), acc_t(0));
      for (int64_t i = 0; i < N; ++i) {
        s.load_row(q.row(b, h, i), s.q.data());
        s.load_row(dout.row(b, h, i), s.dout.data());
        s.load_row(out.row(b, h, i), s.o.data());
        for (int64_t c = 0; c < D; ++c) s.qs[c] = s.q[c] * scale;
        // p = exp(q k^T * scale - lse), dp = dout v^T, ds = p * (dp - dout . out) * scale
        const acc_t row_lse = lse[bh * N + i];
        s.times(s.qs, s.kt, s.scores.data());
        if (std::isfinite(row_lse)) {
          std::fill(s.scores.begin() + NK, s.scores.end(), -std::numeric_limits<acc_t>::infinity());
          exp_shifted(s.scores.data(), s.np, row_lse);
        } else {   // a NaN row of the forward: NaN gradients
          std::fill(s.scores.begin(), s.scores.begin() + NK, row_lse);
        }
        s.times(s.dout, s.vt, s.dscores.data());
        const Vec delta(dot(s.dout.data(), s.o.data(), s.dp)), vscale(scale);
        for (int64_t j = 0; j < s.np; j += Vec::size())
          (Vec::loadu(s.scores.data() + j) * (Vec::loadu(s.dscores.data() + j) - delta) * vscale)
              .store(s.dscores.data() + j);
        add_outer(s.scores.data(), s.dout.data(), NK, s.dp, s.dp, s.dv.data());     // dv += p^T dout
        add_outer(s.dscores.data(), s.q.data(), NK, s.dp, s.dp, s.dk.data());       // dk += ds^T q
        combine_rows(s.dscores.data(), s.k.data(), s.dp, NK, s.dp, s.acc.data());   // dq = ds k
        scalar_t* dqi = dq + ((b * N + i) * H + h) * D;
        for (int64_t c = 0; c < D; ++c) dqi[c] = static_cast<scalar_t>(s.acc[c]);
      }
      for (int64_t j = 0; j < NK; ++j) {
        scalar_t *dkj = dk + ((b * NK + j) * H + h) * D, *dvj = dv + ((b * NK + j) * H + h) * D;
        for (int64_t c = 0; c < D; ++c) {
          dkj[c] = static_cast<scalar_t>(s.dk[j * s.dp + c]);
          dvj[c] = static_cast<scalar_t>(s.dv[j * s.dp + c]);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     double scale) {
  check_attention("incubation::attention_fwd", q, k, v, scale);
  auto out = heads_last(q);
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(stats_dtype(q)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_fwd", [&] {
    attention_fwd_kernel<scalar_t>(q, k, v, scale, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                                                 const at::Tensor& k, const at::Tensor& v,
                                                                 const at::Tensor& out, const at::Tensor& lse,
                                                                 double scale) {
  constexpr const char* op = "incubation::attention_bwd";
  check_attention(op, q, k, v, scale);
  check_attention_saved(op, grad_out, out, lse, q);
  auto dq = heads_last(q), dk = heads_last(k), dv = heads_last(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_bwd", [&] {
    attention_bwd_kernel<scalar_t>(grad_out, q, k, v, out, lse, scale, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(incubation, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace cpu
}  // namespace incubation
