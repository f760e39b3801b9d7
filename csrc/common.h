// Shared helpers for flowkern's C++ CPU kernels (csrc/segment_attention.cpp, csrc/key_attention_mass.cpp).
//
// - Run / key_runs: a batch row's key_ids (and group ids) as runs of equal values, so per-segment sums and key
//   masks become loops over contiguous ranges (segments are long runs: system | image | user | generated).
// - RowRule / for_visible: the visibility rule of one query row (flowkern/ops.py, segment_attention):
//       visible(p, j) = key_ids[j] >= 0 and allowed[seg(p)] bit seg(j)
//                       and ((lo <= j < hi) or (group(p) != 0 and group(j) == group(p)))
//   with [lo, hi) the causal-and-window interval of a row at key position p: hi = p + 1 if causal else Sk,
//   lo = p - window + 1 if window else 0 (clamped to [0, Sk]). for_visible walks the runs of a key block and
//   hands out the visible pieces in increasing key order.
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
#include <optional>
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
  int32_t group;  // group id (0 = none, or no group_ids)
};

// Runs of equal (id, group) in [0, n); ids == nullptr means every key real, in segment 0; groups == nullptr means
// no groups. TORCH_CHECKs that -num_segments <= ids < num_segments (padded keys are -1 - segment).
inline std::vector<Run> key_runs(const int32_t* ids, const int32_t* groups, int64_t n, int64_t num_segments) {
  std::vector<Run> runs;
  if (n == 0) return runs;
  auto id_at = [&](int64_t j) { return ids == nullptr ? 0 : ids[j]; };
  auto group_at = [&](int64_t j) { return groups == nullptr ? 0 : groups[j]; };
  int64_t begin = 0;
  for (int64_t j = 1; j <= n; ++j) {
    if (j == n || id_at(j) != id_at(begin) || group_at(j) != group_at(begin)) {
      const int32_t id = id_at(begin);
      TORCH_CHECK(id < num_segments && id >= -num_segments, "flowkern: key id ", id, " outside [-", num_segments,
                  ", ", num_segments, ")");
      runs.push_back({begin, j, id < 0 ? -1 : id, group_at(begin)});
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
// visibility rules

// The kernel arguments of the visibility rules (raw pointers into contiguous int32 tensors, or null / 0 = off).
struct Visibility {
  const int32_t* allowed = nullptr;  // [nseg] bitmask per query segment
  int64_t window = 0;
  const int32_t* groups = nullptr;   // [B, Sk]
  const int32_t* span = nullptr;     // [B, 2, Sk]
};

// The rule of one query row (see the file-top comment); bits = -1 (all segments) when there is no table.
struct RowRule {
  int64_t lo = 0, hi = 0;
  int32_t bits = -1;
  int32_t group = 0;
};

// The rule of a row standing at key position p of batch row b, and [key_lo, key_hi): the keys its kernel visits
// (the span ops.py computed, or the causal-and-window interval, cut to the batch row's real keys [first, last)).
// A row whose table row is all false visits nothing. ids_b: key_ids of row b (may be null); p in [0, Sk) whenever
// a rule is on, else p may be negative (Sq > Sk, non-causal) and only the causal limit is used.
inline RowRule row_rule(const Visibility& vis, const int32_t* ids_b, int64_t b, int64_t p, int64_t sk, bool causal,
                        int64_t first, int64_t last, int64_t& key_lo, int64_t& key_hi) {
  RowRule r;
  r.hi = causal ? std::clamp<int64_t>(p + 1, 0, sk) : sk;
  r.lo = vis.window > 0 ? std::clamp<int64_t>(p - vis.window + 1, 0, sk) : 0;
  if (vis.allowed != nullptr) {
    const int32_t id = ids_b == nullptr ? 0 : ids_b[p];
    r.bits = vis.allowed[id >= 0 ? id : -1 - id];
  }
  if (vis.groups != nullptr) r.group = vis.groups[b * sk + p];
  if (vis.span != nullptr) {
    key_lo = vis.span[(b * 2) * sk + p];
    key_hi = vis.span[(b * 2 + 1) * sk + p];
  } else if (vis.groups != nullptr) {  // no span given: a group may reach anywhere
    key_lo = 0;
    key_hi = sk;
  } else {
    key_lo = r.lo;
    key_hi = r.hi;
  }
  key_lo = std::max(key_lo, first);
  key_hi = std::min(key_hi, last);
  if (r.bits == 0 || key_hi <= key_lo) key_lo = key_hi = 0;
  return r;
}

// Calls f(a, z, id) for each piece [a, z) of keys in [j0, jend) that the row sees (columns relative to j0,
// increasing, one run each), walking the runs from run0 = run_at(runs, j0) on.
template <typename F>
inline void for_visible(const std::vector<Run>& runs, size_t run0, int64_t j0, int64_t jend, const RowRule& rule,
                        F&& f) {
  const int64_t stop = rule.group != 0 ? jend : std::min(jend, rule.hi);
  for (size_t ri = run0; ri < runs.size() && runs[ri].begin < stop; ++ri) {
    const Run& run = runs[ri];
    if (run.id < 0 || !((rule.bits >> run.id) & 1)) continue;
    int64_t a = std::max(run.begin, j0), z = std::min(run.end, jend);
    if (rule.group == 0 || run.group != rule.group) {
      a = std::max(a, rule.lo);
      z = std::min(z, rule.hi);
    }
    if (a < z) f(a - j0, z - j0, run.id);
  }
}

// Whether any run in [j0, jend) holds a real key of a segment in `bits` (a key block a table lets be seen).
inline bool block_allowed(const std::vector<Run>& runs, size_t run0, int64_t jend, int32_t bits) {
  for (size_t ri = run0; ri < runs.size() && runs[ri].begin < jend; ++ri) {
    if (runs[ri].id >= 0 && ((bits >> runs[ri].id) & 1)) return true;
  }
  return false;
}

// Reads the optional visibility tensors (checked: int32, contiguous, the right sizes).
inline Visibility visibility_args(const char* op, const std::optional<at::Tensor>& allowed, int64_t window,
                                  const std::optional<at::Tensor>& groups, const std::optional<at::Tensor>& span,
                                  int64_t nseg, int64_t B, int64_t Sq, int64_t Sk, bool has_ids) {
  Visibility vis;
  auto check = [&](const std::optional<at::Tensor>& t, at::IntArrayRef sizes, const char* name) -> const int32_t* {
    if (!t.has_value()) return nullptr;
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->sizes() == sizes, op, ": ", name,
                " must be a contiguous int32 tensor of shape ", sizes, ", got ", t->sizes());
    return t->data_ptr<int32_t>();
  };
  TORCH_CHECK(window >= 0, op, ": window must be >= 0 (0 = none)");
  vis.window = window;
  vis.allowed = check(allowed, {nseg}, "allowed");
  vis.groups = check(groups, {B, Sk}, "group_ids");
  vis.span = check(span, {B, 2, Sk}, "span");
  TORCH_CHECK(vis.allowed == nullptr || has_ids, op, ": allowed needs key_ids");
  TORCH_CHECK((vis.allowed == nullptr && window == 0 && vis.groups == nullptr && vis.span == nullptr) || Sq <= Sk,
              op, ": allowed / window / group_ids / span need Sq <= Sk");
  return vis;
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

}  // namespace flowkern
