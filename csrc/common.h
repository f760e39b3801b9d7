// Shared helpers for flowkern's C++ CPU kernels (csrc/segment_attention.cpp, csrc/key_attention_mass.cpp).
//
// - Run / key_runs: a batch row's key_ids as runs of equal ids, so per-segment sums and key masks become
//   loops over contiguous ranges (segments are long runs: system | image | user | generated).
// - gemm_nt / gemm_nn: fp32 row-major block GEMMs through ATen's addmm on from_blob views (whatever BLAS the
//   torch build uses; MKL in the official x86 wheels). Inside at::parallel_for they run single-threaded, which
//   is what the kernels want; blocks are large enough (64 x 256) that the per-call overhead is a few percent.
//   Products with <= kSmallRows rows (decode) use a streaming at::vec path instead of BLAS.
// - Vectorised row primitives on at::vec::Vectorized<float> (AVX2 when setup.py builds with -mavx2).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace flowkern {

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// ---------------------------------------------------------------------------------------------------------
// key runs

struct Run {
  int64_t begin;  // first key of the run
  int64_t end;    // one past its last key
  int32_t id;     // segment id, or < 0 for masked keys
};

// Runs of equal ids in ids[0, n); ids == nullptr means one run of segment 0 (every key real).
// TORCH_CHECKs that ids < num_segments.
inline std::vector<Run> key_runs(const int32_t* ids, int64_t n, int64_t num_segments) {
  std::vector<Run> runs;
  if (n == 0) return runs;
  if (ids == nullptr) {
    runs.push_back({0, n, 0});
    return runs;
  }
  int64_t begin = 0;
  for (int64_t j = 1; j <= n; ++j) {
    if (j == n || ids[j] != ids[begin]) {
      TORCH_CHECK(ids[begin] < num_segments, "flowkern: key id ", ids[begin], " >= num_segments ", num_segments);
      runs.push_back({begin, j, ids[begin] < 0 ? -1 : ids[begin]});
      begin = j;
    }
  }
  return runs;
}

// [first, last) = the span from the first to one past the last visible (id >= 0) key; first == last if none.
inline void visible_span(const std::vector<Run>& runs, int64_t& first, int64_t& last) {
  first = last = 0;
  bool any = false;
  for (const Run& r : runs) {
    if (r.id < 0) continue;
    if (!any) first = r.begin;
    last = r.end;
    any = true;
  }
}

// Index of the run that contains key j (runs cover [0, n) in order).
inline size_t run_at(const std::vector<Run>& runs, int64_t j) {
  auto it = std::upper_bound(runs.begin(), runs.end(), j, [](int64_t x, const Run& r) { return x < r.end; });
  return static_cast<size_t>(it - runs.begin());
}

// ---------------------------------------------------------------------------------------------------------
// block GEMMs (fp32, row-major, explicit leading dimensions)

namespace detail {
inline at::Tensor view2d(const float* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
}
}  // namespace detail

// Few-row products (decode: m = G query heads x 1 row) are memory-bound streams over K / V; BLAS would pack
// the whole K / V block for them, so these paths read each K / V row once instead.
constexpr int64_t kSmallRows = 4;  // measured: faster than BLAS up to 4 rows, slower at 8

namespace detail {
inline float dot(const float* a, const float* b, int64_t k) {
  Vec s0(0.f), s1(0.f);
  int64_t d = 0;
  for (; d + 2 * Vec::size() <= k; d += 2 * Vec::size()) {
    s0 = at::vec::fmadd(Vec::loadu(a + d), Vec::loadu(b + d), s0);
    s1 = at::vec::fmadd(Vec::loadu(a + d + Vec::size()), Vec::loadu(b + d + Vec::size()), s1);
  }
  if (d < k) {
    const int64_t c = std::min<int64_t>(Vec::size(), k - d);
    s0 = at::vec::fmadd(Vec::loadu(a + d, c), Vec::loadu(b + d, c), s0);
    d += c;
  }
  if (d < k) s1 = at::vec::fmadd(Vec::loadu(a + d, k - d), Vec::loadu(b + d, k - d), s1);
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, s0 + s1);
}

// C[m x n] = alpha * A B^T + beta * C, one pass over B's rows.
inline void gemm_nt_rows(int64_t m, int64_t n, int64_t k, float alpha, const float* A, int64_t lda,
                         const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  for (int64_t j = 0; j < n; ++j) {
    const float* b = B + j * ldb;
    for (int64_t r = 0; r < m; ++r) {
      const float x = alpha * dot(A + r * lda, b, k);
      float& c = C[r * ldc + j];
      c = beta == 0.f ? x : x + beta * c;
    }
  }
}

// C[m x n] = alpha * A B + C (beta must be 1), one pass over B's rows: C[r] += (alpha * A[r, j]) * B[j].
inline void gemm_nn_rows(int64_t m, int64_t n, int64_t k, float alpha, const float* A, int64_t lda,
                         const float* B, int64_t ldb, float* C, int64_t ldc) {
  for (int64_t j = 0; j < k; ++j) {
    const float* b = B + j * ldb;
    for (int64_t r = 0; r < m; ++r) {
      const float a = alpha * A[r * lda + j];
      if (a == 0.f) continue;
      float* c = C + r * ldc;
      const Vec va(a);
      int64_t d = 0;
      for (; d + Vec::size() <= n; d += Vec::size()) {
        at::vec::fmadd(va, Vec::loadu(b + d), Vec::loadu(c + d)).store(c + d);
      }
      if (d < n) at::vec::fmadd(va, Vec::loadu(b + d, n - d), Vec::loadu(c + d, n - d)).store(c + d, n - d);
    }
  }
}
}  // namespace detail

// C[m x n] = alpha * A[m x k] @ B[n x k]^T + beta * C   (beta = 0: C is not read)
inline void gemm_nt(int64_t m, int64_t n, int64_t k, float alpha, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float beta, float* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (m <= kSmallRows) return detail::gemm_nt_rows(m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
  at::Tensor c = detail::view2d(C, m, n, ldc);
  at::addmm_out(c, c, detail::view2d(A, m, k, lda), detail::view2d(B, n, k, ldb).t(), beta, alpha);
}

// C[m x n] = alpha * A[m x k] @ B[k x n] + beta * C   (beta = 0: C is not read)
inline void gemm_nn(int64_t m, int64_t n, int64_t k, float alpha, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float beta, float* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (m <= kSmallRows && beta == 1.f) return detail::gemm_nn_rows(m, n, k, alpha, A, lda, B, ldb, C, ldc);
  at::Tensor c = detail::view2d(C, m, n, ldc);
  at::addmm_out(c, c, detail::view2d(A, m, k, lda), detail::view2d(B, k, n, ldb), beta, alpha);
}

// ---------------------------------------------------------------------------------------------------------
// vectorised row primitives

// max(a, b) that propagates NaN (std::max(a, NaN) returns a; at::vec::maximum already propagates).
inline float max_nan(float a, float b) { return std::isnan(b) ? b : std::max(a, b); }

// Largest element of x[0, n); NaN if any element is NaN (the kernels' NaN policy relies on it).
inline float row_max(const float* x, int64_t n) {
  int64_t j = 0;
  float m = kNegInf;
  if (n >= Vec::size()) {
    Vec vm(kNegInf);
    for (; j + Vec::size() <= n; j += Vec::size()) vm = at::vec::maximum(vm, Vec::loadu(x + j));
    alignas(32) float buf[Vec::size()];
    vm.store(buf);
    for (int t = 0; t < Vec::size(); ++t) m = max_nan(m, buf[t]);
  }
  for (; j < n; ++j) m = max_nan(m, x[j]);
  return m;
}

// x[j] = exp(x[j] + shift) in place; returns the sum of the new values.
inline float exp_shift_sum(float* x, int64_t n, float shift) {
  const Vec vshift(shift);
  Vec s0(0.f), s1(0.f);
  int64_t j = 0;
  for (; j + 2 * Vec::size() <= n; j += 2 * Vec::size()) {
    Vec a = (Vec::loadu(x + j) + vshift).exp_u20();
    Vec b = (Vec::loadu(x + j + Vec::size()) + vshift).exp_u20();
    a.store(x + j);
    b.store(x + j + Vec::size());
    s0 = s0 + a;
    s1 = s1 + b;
  }
  for (; j < n; j += Vec::size()) {
    const int64_t c = std::min<int64_t>(Vec::size(), n - j);
    Vec a = (Vec::loadu(x + j, c) + vshift).exp_u20();
    if (c < Vec::size()) a = Vec::set(Vec(0.f), a, c);
    a.store(x + j, c);
    s0 = s0 + a;
  }
  return at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, s0 + s1);
}

// exp_u20 clamps its input, so it maps NaN to +inf; this one keeps NaN NaN (inputs that may be NaN only).
inline Vec exp_u20_nan(const Vec& x) { return Vec::blendv(x.exp_u20(), x, x.isnan()); }

// acc[j] += exp(x[j] + shift), NaN-propagating (key_attention_mass: x may hold NaN scores)
inline void exp_shift_accumulate(const float* x, float* acc, int64_t n, float shift) {
  const Vec vshift(shift);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    (Vec::loadu(acc + j) + exp_u20_nan(Vec::loadu(x + j) + vshift)).store(acc + j);
  }
  if (j < n) {
    const int64_t c = n - j;
    (Vec::loadu(acc + j, c) + exp_u20_nan(Vec::loadu(x + j, c) + vshift)).store(acc + j, c);
  }
}

inline void fill(float* x, int64_t n, float value) {
  if (n > 0) std::fill(x, x + n, value);
}

inline void scale_row(float* x, int64_t n, float a) {
  at::vec::map([a](Vec v) { return v * Vec(a); }, x, x, n);
}

// dst[j] = src[j] (float) for the element types flowkern accepts.
template <typename scalar_t>
inline void load_row(const scalar_t* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::memcpy(dst, src, sizeof(float) * n);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
  }
}

// dst[j] = src[j] * a, stored as scalar_t.
template <typename scalar_t>
inline void store_row_scaled(const float* src, scalar_t* dst, int64_t n, float a, float* tmp) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    at::vec::map([a](Vec v) { return v * Vec(a); }, dst, src, n);
  } else {
    at::vec::map([a](Vec v) { return v * Vec(a); }, tmp, src, n);
    at::vec::convert(tmp, dst, n);
  }
}

// fp32 copy of k/v for the kernels: reduced-precision inputs are converted once (O(Sk) memory); fp32 is used
// in place unless its row stride is unusable as a BLAS leading dimension.
inline at::Tensor as_fp32_rows(const at::Tensor& t) {
  at::Tensor f = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
  if (f.stride(3) != 1 || (f.size(2) > 1 && f.stride(2) < f.size(3))) f = f.contiguous();
  return f;
}

// Rows are visible-key limits: row i (of Sq, bottom-right aligned) sees keys j < key_end(i).
inline int64_t causal_key_end(int64_t i, int64_t sq, int64_t sk, bool causal) {
  if (!causal) return sk;
  return std::clamp<int64_t>(i + sk - sq + 1, 0, sk);
}

}  // namespace flowkern
