// Decode attention that reads the KV pool's pages in place (app/engine/models/attention.py says why
// it exists and what it replaces). One call per layer and step, for every row of the batch:
//
//   out[b, h] = sum_t softmax_t(scale * q[b, h] . k[b, g, t]) * v[b, g, t],  t < lengths[b],
//   g = h / (heads / kv_heads), k/v of position t at pool[table[b, t / page], 0 or 1, g, t % page].
//
// Invariance: each (row, head) is computed alone, by one thread, in one fixed order whatever the
// batch holds or how many threads run (threads split the (row, head) pairs, never a reduction):
// - each score: a 16-lane FMA chain over the head dimension in order, summed across lanes by one
//   fixed sequence, times scale;
// - the maximum (exact in any order), then exp(score - max) per key (scalar expf);
// - the denominator: the weights added one key after another, in key order;
// - the output: a 16-lane FMA chain of weight x value over the keys in order, divided by the
//   denominator.
// So a row's bits depend on its own query, keys and length alone. The pool is fp32 or bf16 (bf16
// widened exactly); q and the output are fp32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"

namespace {

using textgen::lanes;

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <typename T>
void attend(const float* q, const T* pool, const int64_t* tables, const int64_t* lengths, float* out, int64_t B,
            int64_t heads, int64_t kv_heads, int64_t page, int64_t D, int64_t pages_per_row, float scale) {
  const int64_t group = heads / kv_heads;
  const int64_t chunks = (D + 15) / 16;
  // Strides of the pool [pages, 2, kv_heads, page, D].
  const int64_t s_token = D, s_head = page * D, s_kind = kv_heads * page * D, s_page = 2 * s_kind;
  int64_t longest = 1;
  for (int64_t b = 0; b < B; ++b) longest = std::max(longest, lengths[b]);
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, longest * D * 2));
  at::parallel_for(0, B * heads, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> weights(longest);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / heads, h = i % heads, g = h / group, L = lengths[b];
      const float* qh = q + (b * heads + h) * D;
      const int64_t* table = tables + b * pages_per_row;
      __m512 qv[8];  // D <= 128
      for (int64_t c = 0; c < chunks; ++c) qv[c] = load16(qh + 16 * c, lanes(D - 16 * c));
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < L; ++t) {
        const T* k = pool + table[t / page] * s_page + g * s_head + (t % page) * s_token;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; ++c) acc = _mm512_fmadd_ps(qv[c], load16(k + 16 * c, lanes(D - 16 * c)), acc);
        const float s = _mm512_reduce_add_ps(acc) * scale;
        weights[t] = s;
        top = std::max(top, s);
      }
      float denominator = 0.0f;
      for (int64_t t = 0; t < L; ++t) {
        weights[t] = std::exp(weights[t] - top);
        denominator += weights[t];
      }
      __m512 o[8];
      for (int64_t c = 0; c < chunks; ++c) o[c] = _mm512_setzero_ps();
      for (int64_t t = 0; t < L; ++t) {
        const T* v = pool + table[t / page] * s_page + s_kind + g * s_head + (t % page) * s_token;
        const __m512 w = _mm512_set1_ps(weights[t]);
        for (int64_t c = 0; c < chunks; ++c) o[c] = _mm512_fmadd_ps(w, load16(v + 16 * c, lanes(D - 16 * c)), o[c]);
      }
      const __m512 d = _mm512_set1_ps(denominator);
      float* oh = out + (b * heads + h) * D;
      for (int64_t c = 0; c < chunks; ++c) _mm512_mask_storeu_ps(oh + 16 * c, lanes(D - 16 * c), _mm512_div_ps(o[c], d));
    }
  });
}

}  // namespace

// q [B, heads, D] fp32; pool [pages, 2, kv_heads, page, D] fp32 or bf16 (one layer of the KV pool);
// tables [B, P] int64 (row b's pages, P * page >= lengths[b]); lengths [B] int64 (>= 1).
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor pool, torch::Tensor tables, torch::Tensor lengths,
                                     double scale) {
  TORCH_CHECK(q.dim() == 3 && pool.dim() == 5 && tables.dim() == 2 && lengths.dim() == 1, "paged_decode_attention: shapes");
  TORCH_CHECK(q.scalar_type() == at::kFloat && tables.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong,
              "paged_decode_attention: q fp32, tables and lengths int64");
  TORCH_CHECK(pool.is_contiguous() && !pool.is_cuda(), "paged_decode_attention: a contiguous CPU pool");
  const int64_t B = q.size(0), heads = q.size(1), D = q.size(2), kv_heads = pool.size(2), page = pool.size(3);
  TORCH_CHECK(pool.size(4) == D && D <= 128 && heads % kv_heads == 0, "paged_decode_attention: head sizes");
  TORCH_CHECK(tables.size(0) == B && lengths.size(0) == B, "paged_decode_attention: one table and length per row");
  q = q.contiguous();
  tables = tables.contiguous();
  lengths = lengths.contiguous();
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(len[b] >= 1 && len[b] <= tables.size(1) * page, "paged_decode_attention: a length past its pages");
  auto out = torch::empty({B, heads, D}, q.options());
  if (B == 0) return out;
  if (pool.scalar_type() == at::kFloat) {
    attend<float>(q.data_ptr<float>(), pool.data_ptr<float>(), tables.data_ptr<int64_t>(), len, out.data_ptr<float>(), B,
                  heads, kv_heads, page, D, tables.size(1), static_cast<float>(scale));
  } else {
    TORCH_CHECK(pool.scalar_type() == at::kBFloat16, "paged_decode_attention: an fp32 or bf16 pool");
    attend<at::BFloat16>(q.data_ptr<float>(), pool.data_ptr<at::BFloat16>(), tables.data_ptr<int64_t>(), len,
                         out.data_ptr<float>(), B, heads, kv_heads, page, D, tables.size(1), static_cast<float>(scale));
  }
  return out;
}

// Store k, v [N, kv_heads, D] (the pool's dtype) at (pages[n], offsets[n]) of pool [pages, 2, kv_heads, page, D].
void paged_write(torch::Tensor pool, torch::Tensor k, torch::Tensor v, torch::Tensor pages, torch::Tensor offsets) {
  TORCH_CHECK(pool.dim() == 5 && k.dim() == 3 && v.sizes() == k.sizes() && pages.numel() == k.size(0) &&
                  offsets.numel() == k.size(0),
              "paged_write: shapes");
  TORCH_CHECK(pool.is_contiguous() && k.scalar_type() == pool.scalar_type() && v.scalar_type() == pool.scalar_type() &&
                  pages.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong && !pool.is_cuda(),
              "paged_write: a contiguous CPU pool, k and v in its dtype, int64 slots");
  k = k.contiguous();
  v = v.contiguous();
  pages = pages.contiguous();
  offsets = offsets.contiguous();
  const int64_t N = k.size(0), kv_heads = pool.size(2), page = pool.size(3), D = pool.size(4);
  TORCH_CHECK(k.size(1) == kv_heads && k.size(2) == D, "paged_write: k [N, kv_heads, head_dim]");
  const int64_t bytes = D * pool.element_size(), s_head = page * bytes, s_kind = kv_heads * s_head, s_page = 2 * s_kind;
  char* base = static_cast<char*>(pool.data_ptr());
  const char* ks = static_cast<const char*>(k.data_ptr());
  const char* vs = static_cast<const char*>(v.data_ptr());
  const int64_t* pg = pages.data_ptr<int64_t>();
  const int64_t* of = offsets.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(pg[n] > 0 && pg[n] < pool.size(0) && of[n] >= 0 && of[n] < page, "paged_write: a slot outside the pool");
    char* slot = base + pg[n] * s_page + of[n] * bytes;
    for (int64_t h = 0; h < kv_heads; ++h) {
      std::memcpy(slot + h * s_head, ks + (n * kv_heads + h) * bytes, bytes);
      std::memcpy(slot + s_kind + h * s_head, vs + (n * kv_heads + h) * bytes, bytes);
    }
  }
}

void register_paged_attention(pybind11::module& m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over KV pool pages, row-invariant");
  m.def("paged_write", &paged_write, "store new keys/values in KV pool pages");
}
