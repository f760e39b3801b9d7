/*
 * flowkern_cpu::segment_attention — fused attention that also returns each query row's softmax mass per key
 * segment, on CPU, without materialising the Sq x Sk score matrix (docs/ops.md).
 *
 * Math (per batch b, query head h, kv head h / (Hq / Hkv), query row i, key j; see flowkern/reference.py):
 *
 *     p             = i + (Sk - Sq)                      (the key position row i stands at: bottom-right)
 *     seg(j)        = key_ids[b, j] if >= 0, else -1 - key_ids[b, j]      (key_ids < 0: padded key)
 *     visible(i, j) = key_ids[b, j] >= 0
 *                     and (allowed is None or bit seg(j) of allowed[seg(p)])          (segment table)
 *                     and ( ((not causal or j <= p) and (window == 0 or p - j < window))
 *                           or (group_ids given and group[b, p] != 0 and group[b, p] == group[b, j]) )
 *     s[i, j]       = scale * <q[i], k[j]>       for visible (i, j)
 *     lse[i]        = log sum_{visible j} exp(s[i, j])                  (-inf if row i sees no key;
 *                                                           NaN if any visible s[i, j] is NaN or +inf)
 *     p[i, j]       = exp(s[i, j] - lse[i])
 *     out[i]        = sum_j p[i, j] v[j]                                (0 if row i sees no key)
 *     mass[i, c]    = sum_{visible j : seg(j) = c} p[i, j]               (0 if row i sees no key)
 *
 * Outputs: out [B, Hq, Sq, D] in q's dtype, lse float32 [B, Hq, Sq], mass float32 [B, Hq, Sq, nseg] per head.
 *
 * Algorithm (FlashAttention-2 style online softmax, fp32 throughout):
 *   - A work item is (batch b, kv head, block of BQ "rows"). The rows of a kv head are the G = Hq / Hkv query
 *     heads that share it, interleaved position-major (row r = i * G + g), so GQA reads each K/V block once for
 *     all G heads, a decode step (Sq = 1) is one block of G rows, and a row block spans few query positions
 *     (tight causal bounds). Work items run under at::parallel_for; causal blocks are visited in a zig-zag
 *     order so the two halves of a head's blocks (cheap top, expensive bottom) mix across threads.
 *   - Per row we keep the running max m_i, the running sum l_i, the output accumulator acc[D] and a
 *     per-segment accumulator segacc[nseg]. For each key block [j0, j0 + n) of the row block's key range:
 *         S      = scale * Q_blk K_blk^T                              (BLAS, fp32)
 *         m_new  = max(m_i, max of S over the row's visible keys)
 *         acc, segacc, l_i *= exp(m_i - m_new)
 *         P      = exp(S - m_new) on visible keys, 0 elsewhere
 *         segacc[c] += sum of P over keys of segment c;  l_i += sum of P
 *         acc   += P V_blk                                            (BLAS, fp32)
 *     key_ids (and group ids) are pre-split into runs of equal values, so masking and the per-segment sums are
 *     loops over the visible pieces of contiguous runs (for_visible in common.h, vectorised with at::vec)
 *     instead of per-key scatters.
 *   - Block skipping: every row has a key range [key_lo, key_hi): span[b, :, p] from ops.py (the lowest / one
 *     past the highest key that causal, the window or the row's group can show) or the causal limit, cut to the
 *     batch row's real keys. A row block visits only the key blocks of the union of its rows' ranges, so a
 *     sliding window costs O(window) per row, not O(Sk); a row whose table row is all false has an empty range
 *     (a block of such rows visits nothing), and a key block none of whose segments the block's table rows
 *     allow is skipped. Work scales with the visible keys.
 *   - Finally out = acc / l_i, lse = m_i + log(l_i), mass = segacc / l_i; a row that saw no key (m_i = -inf,
 *     l_i = 0) gets out 0, lse -inf, mass 0.
 *   - Non-finite values propagate, as in SDPA (flowkern/ops.py, "NaN/inf policy"): the block max over a row's
 *     visible scores propagates NaN (row_max / max_nan); when it is NaN or +inf the row is marked poisoned
 *     (m_i = NaN), skips the rest of its work, and gets out, lse and mass NaN. A -inf score weighs 0. Scores at
 *     keys the row cannot see never enter the max or the sums. v enters only through P V: a non-finite v at a
 *     visible key makes the row's out non-finite; at a key the row cannot see, the zero weight can still
 *     multiply it inside a block's GEMM (0 * NaN = NaN), so such rows' out is unspecified (lse, mass unaffected),
 *     except that a row with no visible key always gets out 0.
 *   - Memory: per thread one BQ x BK score block plus BQ x D accumulators; fp16/bf16 K and V are converted to
 *     fp32 once (O(Sk) memory), fp32 q/k/v are read in place through their strides.
 */
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "common.h"

namespace flowkern {
namespace {

// Measured on a 2-core Zen 4 (fp32, D=128, S=2048): 64-128 x 256-512 are within ~2% of each other; 64 x 256
// keeps the score block (64 KiB) and a K/V block in L2 and wastes little work on the causal diagonal.
constexpr int64_t kBlockQ = 64;   // query rows per work item
constexpr int64_t kBlockK = 256;  // keys per inner block

template <typename scalar_t>
void segment_attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& key_ids, int64_t nseg, bool causal, float scale,
                              const Visibility& vis, at::Tensor& out, at::Tensor& lse, at::Tensor& mass) {
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Sk = k.size(2);
  const int64_t G = Hq / Hkv;
  const int64_t R = G * Sq;                           // rows per (batch, kv head)
  const int64_t nqb = (R + kBlockQ - 1) / kBlockQ;     // row blocks per (batch, kv head)

  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  const float* k_ptr = k.data_ptr<float>();
  const float* v_ptr = v.data_ptr<float>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  float* lse_ptr = lse.data_ptr<float>();
  float* mass_ptr = mass.data_ptr<float>();

  // Runs of equal (key id, group) per batch row and the span [first, last) holding its real keys.
  const int32_t* ids_ptr = key_ids.data_ptr<int32_t>();
  std::vector<std::vector<Run>> runs(B);
  std::vector<int64_t> span_first(B), span_last(B);
  for (int64_t b = 0; b < B; ++b) {
    runs[b] = key_runs(ids_ptr + b * Sk, vis.groups == nullptr ? nullptr : vis.groups + b * Sk, Sk, nseg);
    visible_span(runs[b], span_first[b], span_last[b]);
  }

  at::parallel_for(0, B * Hkv * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qbuf(kBlockQ * D), sbuf(kBlockQ * kBlockK), acc(kBlockQ * D), segacc(kBlockQ * nseg);
    std::vector<float> m_i(kBlockQ), l_i(kBlockQ), tmp(D);
    std::vector<int64_t> key_lo(kBlockQ), key_hi(kBlockQ);
    std::vector<RowRule> rule(kBlockQ);

    for (int64_t item = begin; item < end; ++item) {
      const int64_t bkv = item / nqb, t = item % nqb;
      const int64_t qb = (t % 2 == 0) ? t / 2 : nqb - 1 - t / 2;  // zig-zag: balances causal work
      const int64_t b = bkv / Hkv, kvh = bkv % Hkv;
      const int64_t r0 = qb * kBlockQ, rows = std::min(kBlockQ, R - r0);
      const std::vector<Run>& brun = runs[b];

      // Pack the block's query rows (fp32), their rules and the keys each visits; the block visits the key
      // blocks of [kmin, kmax), the union of its rows' ranges (none when every row's table row is all false).
      int64_t kmin = Sk, kmax = 0;
      for (int64_t rr = 0; rr < rows; ++rr) {
        const int64_t r = r0 + rr, i = r / G, h = kvh * G + r % G;
        load_row(q_ptr + b * qs0 + h * qs1 + i * qs2, qbuf.data() + rr * D, D);
        rule[rr] = row_rule(vis, ids_ptr + b * Sk, b, i + Sk - Sq, Sk, causal, span_first[b], span_last[b],
                            key_lo[rr], key_hi[rr]);
        if (key_lo[rr] < key_hi[rr]) {
          kmin = std::min(kmin, key_lo[rr]);
          kmax = std::max(kmax, key_hi[rr]);
        }
      }
      fill(m_i.data(), rows, kNegInf);
      fill(l_i.data(), rows, 0.f);
      fill(acc.data(), rows * D, 0.f);
      fill(segacc.data(), rows * nseg, 0.f);

      const float* kb = k_ptr + b * ks0 + kvh * ks1;
      const float* vb = v_ptr + b * vs0 + kvh * vs1;
      for (int64_t j0 = kmin; j0 < kmax; j0 += kBlockK) {
        const int64_t n = std::min(kBlockK, kmax - j0);
        // rows [ra, rz) hold every row whose range meets this key block; skip it when none does, or when the
        // table lets none of them see a key in it
        int64_t ra = rows, rz = 0;
        int32_t bits = 0;
        for (int64_t rr = 0; rr < rows; ++rr) {
          if (key_lo[rr] < j0 + n && key_hi[rr] > j0) {
            ra = std::min(ra, rr);
            rz = rr + 1;
            bits |= rule[rr].bits;
          }
        }
        const size_t run0 = run_at(brun, j0);
        if (ra >= rz || (vis.allowed != nullptr && !block_allowed(brun, run0, j0 + n, bits))) continue;
        float* S = sbuf.data();
        gemm_nt(rz - ra, n, D, scale, qbuf.data() + ra * D, D, kb + j0 * ks2, ks2, 0.f, S + ra * kBlockK,
                kBlockK);

        for (int64_t rr = ra; rr < rz; ++rr) {
          float* s = S + rr * kBlockK;
          if (std::isnan(m_i[rr])) {  // row already poisoned (see below): its outputs will be NaN
            fill(s, n, 0.f);
            continue;
          }

          float mx = kNegInf;  // NaN if any visible score is NaN
          for_visible(brun, run0, j0, j0 + n, rule[rr],
                      [&](int64_t a, int64_t z, int32_t) { mx = max_nan(mx, row_max(s + a, z - a)); });
          if (mx == kNegInf) {  // nothing visible in this block (or only -inf scores): contributes nothing
            fill(s, n, 0.f);
            continue;
          }
          if (!(mx < std::numeric_limits<float>::infinity())) {  // a visible score is NaN or +inf: softmax
            m_i[rr] = kNaN;                                       // undefined, the row gets NaN (SDPA's policy)
            fill(s, n, 0.f);
            continue;
          }
          const float m_new = std::max(m_i[rr], mx);
          if (m_new > m_i[rr] && m_i[rr] != kNegInf) {
            const float alpha = std::exp(m_i[rr] - m_new);
            scale_row(acc.data() + rr * D, D, alpha);
            for (int64_t c = 0; c < nseg; ++c) segacc[rr * nseg + c] *= alpha;
            l_i[rr] *= alpha;
          }
          m_i[rr] = m_new;

          // P = exp(S - m_new) on the visible pieces, 0 in the gaps between them
          float row_sum = 0.f;
          int64_t done = 0;
          for_visible(brun, run0, j0, j0 + n, rule[rr], [&](int64_t a, int64_t z, int32_t id) {
            fill(s + done, a - done, 0.f);
            const float part = exp_shift_sum(s + a, z - a, -m_new);
            segacc[rr * nseg + id] += part;
            row_sum += part;
            done = z;
          });
          l_i[rr] += row_sum;
          fill(s + done, n - done, 0.f);
        }
        gemm_nn(rz - ra, D, n, 1.f, S + ra * kBlockK, kBlockK, vb + j0 * vs2, vs2, 1.f, acc.data() + ra * D, D);
      }

      // out = acc / l, lse = m + log(l), mass = segacc / l; rows that saw no key get 0, -inf, 0; poisoned rows
      // (m = NaN) get NaN everywhere.
      for (int64_t rr = 0; rr < rows; ++rr) {
        const int64_t r = r0 + rr, i = r / G, h = kvh * G + r % G;
        const int64_t row = (b * Hq + h) * Sq + i;
        const bool poisoned = std::isnan(m_i[rr]);
        const bool alive = l_i[rr] > 0.f;
        const float inv = poisoned ? kNaN : alive ? 1.f / l_i[rr] : 0.f;
        if (!alive && !poisoned) fill(acc.data() + rr * D, D, 0.f);  // out 0 even if masked v held NaN
        store_row_scaled(acc.data() + rr * D, out_ptr + row * D, D, inv, tmp.data());
        lse_ptr[row] = poisoned ? kNaN : alive ? m_i[rr] + std::log(l_i[rr]) : kNegInf;
        for (int64_t c = 0; c < nseg; ++c) mass_ptr[row * nseg + c] = segacc[rr * nseg + c] * inv;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> segment_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                     const at::Tensor& v_in,
                                                                     const at::Tensor& key_ids_in,
                                                                     int64_t num_segments, bool causal,
                                                                     double scale,
                                                                     const std::optional<at::Tensor>& allowed,
                                                                     int64_t window,
                                                                     const std::optional<at::Tensor>& group_ids,
                                                                     const std::optional<at::Tensor>& span) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4, "segment_attention: q, k, v must be 4-D");
  TORCH_CHECK(q_in.scalar_type() == k_in.scalar_type() && q_in.scalar_type() == v_in.scalar_type(),
              "segment_attention: q, k, v must share a dtype");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat || q_in.scalar_type() == at::kHalf ||
                  q_in.scalar_type() == at::kBFloat16,
              "segment_attention: dtype must be float32, float16 or bfloat16");
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Sq = q_in.size(2), D = q_in.size(3);
  TORCH_CHECK(k_in.size(0) == B && k_in.size(3) == D && v_in.sizes() == k_in.sizes(),
              "segment_attention: k and v must be [B, Hkv, Sk, D] matching q");
  const int64_t Hkv = k_in.size(1), Sk = k_in.size(2);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "segment_attention: Hq must be a multiple of Hkv");
  TORCH_CHECK(key_ids_in.scalar_type() == at::kInt && key_ids_in.dim() == 2 && key_ids_in.size(0) == B &&
                  key_ids_in.size(1) == Sk,
              "segment_attention: key_ids must be int32 [B, Sk]");
  TORCH_CHECK(num_segments >= 1 && num_segments <= 8, "segment_attention: num_segments must be in 1..8");

  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = as_fp32_rows(k_in), v = as_fp32_rows(v_in);
  const at::Tensor key_ids = key_ids_in.contiguous();
  const Visibility vis = visibility_args("segment_attention", allowed, window, group_ids, span, num_segments, B, Sq,
                                         Sk, true);

  at::Tensor out = at::empty({B, Hq, Sq, D}, q_in.options());
  at::Tensor lse = at::empty({B, Hq, Sq}, q_in.options().dtype(at::kFloat));
  at::Tensor mass = at::empty({B, Hq, Sq, num_segments}, q_in.options().dtype(at::kFloat));
  if (lse.numel() == 0) return {out, lse, mass};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "flowkern_segment_attention", [&] {
    segment_attention_kernel<scalar_t>(q, k, v, key_ids, num_segments, causal, static_cast<float>(scale), vis,
                                       out, lse, mass);
  });
  return {out, lse, mass};
}

}  // namespace
}  // namespace flowkern

TORCH_LIBRARY_FRAGMENT(flowkern_cpu, m) {
  m.def(
      "segment_attention(Tensor q, Tensor k, Tensor v, Tensor key_ids, int num_segments, bool causal, "
      "float scale, Tensor? allowed, int window, Tensor? group_ids, Tensor? span) -> (Tensor out, Tensor lse, "
      "Tensor mass)");
}

TORCH_LIBRARY_IMPL(flowkern_cpu, CPU, m) {
  m.impl("segment_attention", &flowkern::segment_attention_cpu);
}
