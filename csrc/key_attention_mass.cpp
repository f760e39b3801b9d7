/*
 * flowkern_cpu::key_attention_mass — the softmax probability each key receives from given query rows, in one
 * pass over the keys using those rows' log-sum-exp (docs/ops.md).
 *
 * Math (per batch b, query head h, kv head h / (Hq / Hkv); the Sq rows of q are the LAST Sq query positions,
 * so causal alignment is bottom-right; see flowkern/reference.py):
 *
 *     visible(i, j) = the rule of csrc/segment_attention.cpp (key_ids None: every key real, segment 0):
 *                     key_ids[b, j] >= 0 and allowed[seg(p)] bit seg(j) and
 *                     ( ((not causal or j <= p) and (window == 0 or p - j < window)) or same nonzero group ),
 *                     with p = i + (Sk - Sq)
 *     received[b, h, j] = (1 / Sq) * sum_{i : visible(i, j), lse[i] > -inf} exp(scale * <q[i], k[j]> - lse[i])
 *
 * lse is taken as given (float32 [B, Hq, Sq], from segment_attention); rows with lse = -inf add 0 but still
 * count in the 1 / Sq; rows with lse = NaN (segment_attention's NaN rows) add NaN to every key they see and
 * nothing to the others. Output float32 [B, Hq, Sk]; masked keys receive exactly 0.
 *
 * Algorithm: a work item is (batch b, kv head, block of BK keys); it owns the output columns of that block for
 * the G = Hq / Hkv query heads sharing the kv head, so no two threads write the same element. For the rows
 * (all G heads interleaved position-major, row r = i * G + g), taken BQ at a time starting at the first row
 * that causally sees the block:
 *     S = scale * Q_chunk K_blk^T                               (BLAS, fp32)
 *     recv[g, j] += exp(S[r, j] - lse[r])  over the row's visible keys   (at::vec, visible pieces of key runs)
 * then received = recv / Sq. Only rows whose key range (span[b, :, p] from ops.py, else the causal limit; empty
 * for an all-false table row) meets the key block enter the product, and a key block none of whose segments the
 * rows' table rows allow is skipped, so the work scales with the visible keys. Only one BQ x BK score block per
 * thread is ever held; k in fp16/bf16 is converted to fp32 once, q rows per chunk.
 */
#include <torch/library.h>

#include <cmath>

#include "common.h"

namespace flowkern {
namespace {

constexpr int64_t kBlockQ = 64;   // query rows per score block
constexpr int64_t kBlockK = 512;  // keys per work item

template <typename scalar_t>
void key_attention_mass_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                               const int32_t* ids_ptr, bool causal, float scale, const Visibility& vis,
                               int64_t nseg, at::Tensor& received) {
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Sk = k.size(2);
  const int64_t G = Hq / Hkv;
  const int64_t R = G * Sq;
  const int64_t nkb = (Sk + kBlockK - 1) / kBlockK;

  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  const float* k_ptr = k.data_ptr<float>();
  const float* lse_ptr = lse.data_ptr<float>();
  float* out_ptr = received.data_ptr<float>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const float inv_sq = Sq > 0 ? 1.f / static_cast<float>(Sq) : 0.f;

  // Runs of equal (key id, group) per batch row, the span [first, last) of its real keys, and per query
  // position i its rule and the keys [key_lo, key_hi) it may see (the same for every head).
  std::vector<std::vector<Run>> runs(B);
  std::vector<int64_t> span_first(B), span_last(B), pos_lo(B * Sq), pos_hi(B * Sq);
  std::vector<RowRule> pos_rule(B * Sq);
  for (int64_t b = 0; b < B; ++b) {
    const int32_t* ids_b = ids_ptr == nullptr ? nullptr : ids_ptr + b * Sk;
    runs[b] = key_runs(ids_b, vis.groups == nullptr ? nullptr : vis.groups + b * Sk, Sk, nseg);
    visible_span(runs[b], span_first[b], span_last[b]);
    for (int64_t i = 0; i < Sq; ++i) {
      pos_rule[b * Sq + i] = row_rule(vis, ids_b, b, i + Sk - Sq, Sk, causal, span_first[b], span_last[b],
                                      pos_lo[b * Sq + i], pos_hi[b * Sq + i]);
    }
  }

  at::parallel_for(0, B * Hkv * nkb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qbuf(kBlockQ * D), sbuf(kBlockQ * kBlockK), recv(G * kBlockK), row_lse(kBlockQ);

    for (int64_t item = begin; item < end; ++item) {
      const int64_t bkv = item / nkb, kb = item % nkb;
      const int64_t b = bkv / Hkv, kvh = bkv % Hkv;
      const int64_t j0 = kb * kBlockK, n = std::min(kBlockK, Sk - j0);
      const std::vector<Run>& brun = runs[b];
      fill(recv.data(), G * n, 0.f);

      // Without a span, rows see key j0 from position i_min on (causal); a span (window, groups) may reach
      // any row, which the per-row ranges below sort out. Blocks outside the real keys are skipped.
      const int64_t i_min = causal && vis.span == nullptr ? std::max<int64_t>(0, j0 - (Sk - Sq)) : 0;
      const bool any_key = j0 < span_last[b] && j0 + n > span_first[b];
      const size_t run0 = run_at(brun, j0);
      const float* kb_ptr = k_ptr + b * ks0 + kvh * ks1 + j0 * ks2;

      for (int64_t r0 = i_min * G; any_key && r0 < R; r0 += kBlockQ) {
        const int64_t rows = std::min(kBlockQ, R - r0);
        // rows [ra, rz) of the chunk hold every row whose range meets this key block
        int64_t ra = rows, rz = 0;
        int32_t bits = 0;
        for (int64_t rr = 0; rr < rows; ++rr) {
          const int64_t x = b * Sq + (r0 + rr) / G;
          if (pos_lo[x] < j0 + n && pos_hi[x] > j0) {
            ra = std::min(ra, rr);
            rz = rr + 1;
            bits |= pos_rule[x].bits;
          }
        }
        if (ra >= rz || (vis.allowed != nullptr && !block_allowed(brun, run0, j0 + n, bits))) continue;
        for (int64_t rr = ra; rr < rz; ++rr) {
          const int64_t r = r0 + rr, i = r / G, h = kvh * G + r % G;
          load_row(q_ptr + b * qs0 + h * qs1 + i * qs2, qbuf.data() + rr * D, D);
          row_lse[rr] = lse_ptr[(b * Hq + h) * Sq + i];
        }
        gemm_nt(rz - ra, n, D, scale, qbuf.data() + ra * D, D, kb_ptr, ks2, 0.f, sbuf.data() + ra * kBlockK,
                kBlockK);

        for (int64_t rr = ra; rr < rz; ++rr) {
          const float l = row_lse[rr];
          if (l == kNegInf) continue;  // row saw no key (lse = -inf)
          const float* s = sbuf.data() + rr * kBlockK;
          float* acc = recv.data() + ((r0 + rr) % G) * n;
          const bool poisoned = std::isnan(l);  // NaN lse (a NaN row): NaN to every key it sees
          for_visible(brun, run0, j0, j0 + n, pos_rule[b * Sq + (r0 + rr) / G], [&](int64_t a, int64_t z, int32_t) {
            if (poisoned) {
              fill(acc + a, z - a, kNaN);
            } else {
              exp_shift_accumulate(s + a, acc + a, z - a, -l);
            }
          });
        }
      }

      for (int64_t g = 0; g < G; ++g) {
        float* dst = out_ptr + (b * Hq + kvh * G + g) * Sk + j0;
        at::vec::map([inv_sq](Vec x) { return x * Vec(inv_sq); }, dst, recv.data() + g * n, n);
      }
    }
  });
}

at::Tensor key_attention_mass_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& lse_in,
                                  const std::optional<at::Tensor>& key_ids_in, bool causal, double scale,
                                  const std::optional<at::Tensor>& allowed, int64_t window,
                                  const std::optional<at::Tensor>& group_ids, const std::optional<at::Tensor>& span) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4, "key_attention_mass: q and k must be 4-D");
  TORCH_CHECK(q_in.scalar_type() == k_in.scalar_type(), "key_attention_mass: q and k must share a dtype");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat || q_in.scalar_type() == at::kHalf ||
                  q_in.scalar_type() == at::kBFloat16,
              "key_attention_mass: dtype must be float32, float16 or bfloat16");
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Sq = q_in.size(2), D = q_in.size(3);
  TORCH_CHECK(k_in.size(0) == B && k_in.size(3) == D, "key_attention_mass: k must be [B, Hkv, Sk, D]");
  const int64_t Hkv = k_in.size(1), Sk = k_in.size(2);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "key_attention_mass: Hq must be a multiple of Hkv");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 3 && lse_in.size(0) == B &&
                  lse_in.size(1) == Hq && lse_in.size(2) == Sq,
              "key_attention_mass: lse must be float32 [B, Hq, Sq]");
  at::Tensor key_ids;
  if (key_ids_in.has_value()) {
    key_ids = key_ids_in->contiguous();
    TORCH_CHECK(key_ids.scalar_type() == at::kInt && key_ids.dim() == 2 && key_ids.size(0) == B &&
                    key_ids.size(1) == Sk,
                "key_attention_mass: key_ids must be int32 [B, Sk]");
  }

  const int64_t nseg = allowed.has_value() ? allowed->numel() : std::numeric_limits<int32_t>::max();
  TORCH_CHECK(nseg <= 31 || !allowed.has_value(), "key_attention_mass: allowed has at most 31 segments");
  const Visibility vis = visibility_args("key_attention_mass", allowed, window, group_ids, span, nseg, B, Sq, Sk,
                                         key_ids.defined());

  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = as_fp32_rows(k_in);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor received = at::empty({B, Hq, Sk}, q_in.options().dtype(at::kFloat));
  if (received.numel() == 0) return received;

  const int32_t* ids_ptr = key_ids.defined() ? key_ids.data_ptr<int32_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "flowkern_key_attention_mass", [&] {
    key_attention_mass_kernel<scalar_t>(q, k, lse, ids_ptr, causal, static_cast<float>(scale), vis, nseg, received);
  });
  return received;
}

}  // namespace
}  // namespace flowkern

TORCH_LIBRARY_FRAGMENT(flowkern_cpu, m) {
  m.def(
      "key_attention_mass(Tensor q, Tensor k, Tensor lse, Tensor? key_ids, bool causal, float scale, "
      "Tensor? allowed, int window, Tensor? group_ids, Tensor? span) -> Tensor");
}

TORCH_LIBRARY_IMPL(flowkern_cpu, CPU, m) {
  m.impl("key_attention_mass", &flowkern::key_attention_mass_cpu);
}
