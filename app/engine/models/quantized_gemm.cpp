// Row-invariant weight-only GEMMs for TEXTGEN_QUANTIZE (app/engine/models/quantize.py says why they
// exist: PyTorch's weight-only kernels were measured slower at 1 and at 32 rows). AVX-512.
//
//   int8: y = act((x @ q.T) * scale + bias), q [N, K] int8, scale [N] (one per output);
//   int4: y = act(x @ w.T + bias), w[n, k] = q[n, k] * s[n, g] + o[n, g] with g = k / 32 (a group),
//         q in 0..15 packed two per byte: byte i of a group's 16 holds k = 32g + i (low nibble) and
//         k = 32g + 16 + i (high nibble); s and o as [N, 2, K / 32] fp32 (a row's scales, then its
//         offsets).
//
// x [M, K] and y are fp32. Invariance: every y[m, n] comes from one fixed chain of operations for
// every M, tile shape and thread count (threads split the outputs, never k):
// - int8: one 16-lane accumulator FMA'd chunk by chunk (16 inputs) in k order (a last partial chunk
//   masked, its missing lanes zero), summed across lanes by one fixed sequence, then scaled;
// - int4, factored as sum_g s[g] * (x_g . q_g) + o . xs with xs[g] the sum of x over group g: per
//   group a 16-lane product of its two chunks (mul, then FMA) scaled into one accumulator by an FMA,
//   summed across lanes at the end, plus the 16-lane dot of o and xs (xs computed once per row).
//   Factored because dequantizing each weight (q * s + o, two broadcasts per chunk) made the kernel
//   compute-bound at 1 row: 1.5x slower than int8 per weight, and the factored form 1.35x faster
//   than that (GPT-2-124M's shapes, 1 row, 2 threads, 2026-12-06);
// then biased and activated. The weights are widened to fp32 in registers (exact: int8 values, int4
// levels 0..15), per chunk for few rows (each byte read once per block of kRows activation rows, the
// next tile's bytes prefetched), or once per block of outputs into a buffer for more rows (widening
// per tile was the bottleneck there: 2x slower than aten). Either way the values multiplied are the
// same, so both give the same bits.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdlib>
#include <vector>

#include "kernels.h"

namespace {

using textgen::grain;
using textgen::lanes;

constexpr int kRows = 4;  // activation rows per register tile (outputs per tile: the loader's kCols)
constexpr int64_t kGroup = 32;

// The activation fused after the bias, one scalar per output. Fused because PyTorch's vectorized
// SiLU and tanh-GELU give an element other bits in a row tail than in the vector body (measured:
// 172-wide rows, 24 of 71 rows differed alone vs batched), which broke batch invariance on
// stories260k's MLP; one scalar formula per element cannot depend on the row count.
enum Activation : int64_t { kNone = 0, kSilu = 1, kGeluTanh = 2, kGelu = 3 };

inline float activate(float v, int64_t act) {
  switch (act) {
    case kSilu: return v / (1.0f + std::exp(-v));
    case kGeluTanh: return 0.5f * v * (1.0f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    case kGelu: return 0.5f * v * (1.0f + std::erf(v * 0.7071067811865476f));
    default: return v;
  }
}

// Weight loaders: `chunk(c, k, m)` is row c's fp32 weights k..k+15 (lanes past m zero);
// `load<C>(k, m, w)` fills w with C rows' chunks, prefetching the next tile's bytes as far ahead as
// this one is consumed (streams of C short rows defeat the hardware prefetcher: the LM head read
// 12 GB/s without, 40 with, measured).
struct Int8Rows {
  static constexpr bool kGrouped = false;
  static constexpr int kCols = 6;  // 4 x 6 accumulators
  const int8_t* q;  // the block's first row
  int64_t K;
  inline __m512 chunk(int c, int64_t k, __mmask16 m) const {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q + c * K + k)));
  }
  template <int C>
  inline void load(int64_t k, __mmask16 m, __m512* w) const {
    _mm_prefetch(reinterpret_cast<const char*>(q + C * K + k * C), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(q + C * K + k * C + 64), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) w[c] = chunk(c, k, m);
  }
};

// int4 rows' levels q (0..15 as floats) and their groups' scales; `chunk` of k = 32g + 16h is
// group g's half h.
struct Int4Rows {
  static constexpr bool kGrouped = true;
  static constexpr int kCols = 4;  // 4 x 4 accumulators + 2 x 4 level vectors + 4 scales: 28 registers
  const uint8_t* q;  // the block's first row: K / 2 bytes a row
  const float* so;   // its [2, G] scales and offsets
  int64_t K;
  inline __m512 chunk(int c, int64_t k, __mmask16) const {
    __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c * (K / 2) + k / kGroup * 16));
    if (k % kGroup) raw = _mm_srli_epi16(raw, 4);  // the group's second 16: high nibbles
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, _mm_set1_epi8(0x0F))));
  }
  inline float scale(int c, int64_t g) const { return so[c * 2 * (K / kGroup) + g]; }
  // Group k / 32's two halves for C rows: the 16 bytes widened once, then split into nibbles (one
  // widening per group instead of two).
  template <int C>
  inline void load_group(int64_t k, __m512* w0, __m512* w1) const {
    _mm_prefetch(reinterpret_cast<const char*>(q + C * (K / 2) + k / 2 * C), _MM_HINT_T0);
    const __m512i low = _mm512_set1_epi32(0x0F);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c * (K / 2) + k / 2)));
      w0[c] = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, low));
      w1[c] = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
    }
  }
};

// C rows widened once into an fp32 buffer [C, K16] (K16: K rounded up to 16, zero padded); scales,
// where the rows have them, from the rows they were widened from.
template <class Base>
struct WidenedRows {
  static constexpr bool kGrouped = Base::kGrouped;
  const float* buf;
  int64_t K16;
  const Base& base;
  inline float scale(int c, int64_t g) const {
    if constexpr (kGrouped) return base.scale(c, g);
    return 1.0f;
  }
  template <int C>
  inline void load(int64_t k, __mmask16, __m512* w) const {
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) w[c] = _mm512_load_ps(buf + c * K16 + k);
  }
  template <int C>
  inline void load_group(int64_t k, __m512* w0, __m512* w1) const {
    load<C>(k, 0xFFFF, w0);
    load<C>(k + 16, 0xFFFF, w1);
  }
};

struct Epilogue {
  const float* scale;  // per output (int8) or null
  const float* bias;   // per output or null
  int64_t act;
  // int4: the block's first row's offsets (stride `o_stride` a row), each activation row's group
  // sums xs (stride G16 a row, zero past G) and G; null o for int8.
  const float* o = nullptr;
  int64_t o_stride = 0;
  const float* xs = nullptr;
  int64_t G = 0, G16 = 0;
  inline float operator()(float dot, int r, int c) const {
    if (scale) dot *= scale[c];
    if (o) {
      __m512 off = _mm512_setzero_ps();
      for (int64_t j = 0; j < G; j += 16) {
        const __mmask16 m = lanes(G - j);
        off = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, o + c * o_stride + j), _mm512_maskz_loadu_ps(m, xs + r * G16 + j), off);
      }
      dot += _mm512_reduce_add_ps(off);
    }
    return activate(bias ? dot + bias[c] : dot, act);
  }
  // The same for activation rows from `r0` on.
  inline Epilogue rows_from(int64_t r0) const {
    Epilogue e = *this;
    if (xs) e.xs = xs + r0 * G16;
    return e;
  }
};

template <int R, int C, class Rows>
inline void tile(const float* x, const Rows& rows, const Epilogue& e, float* y, int64_t K, int64_t N) {
  __m512 acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  if constexpr (Rows::kGrouped) {  // int4: acc += s[g] * (x0 . q0 + x1 . q1), group by group
    for (int64_t k = 0; k < K; k += kGroup) {
      __m512 w0[C], w1[C], sc[C];
      rows.template load_group<C>(k, w0, w1);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) sc[c] = _mm512_set1_ps(rows.scale(c, k / kGroup));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 x0 = _mm512_loadu_ps(x + r * K + k), x1 = _mm512_loadu_ps(x + r * K + k + 16);
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c)
          acc[r][c] = _mm512_fmadd_ps(_mm512_fmadd_ps(x1, w1[c], _mm512_mul_ps(x0, w0[c])), sc[c], acc[r][c]);
      }
    }
  } else {  // int8: acc += x . q, chunk by chunk
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 m = lanes(K - k);
      __m512 w[C];
      rows.template load<C>(k, m, w);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 xv = _mm512_maskz_loadu_ps(m, x + r * K + k);
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, w[c], acc[r][c]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) y[r * N + c] = e(_mm512_reduce_add_ps(acc[r][c]), r, c);
}

template <int C, class Rows>
inline void column(const float* x, const Rows& rows, const Epilogue& e, float* y, int64_t M, int64_t K, int64_t N) {
  int64_t r = 0;
  for (; r + kRows <= M; r += kRows) tile<kRows, C>(x + r * K, rows, e.rows_from(r), y + r * N, K, N);
  switch (M - r) {
    case 3: tile<3, C>(x + r * K, rows, e.rows_from(r), y + r * N, K, N); break;
    case 2: tile<2, C>(x + r * K, rows, e.rows_from(r), y + r * N, K, N); break;
    case 1: tile<1, C>(x + r * K, rows, e.rows_from(r), y + r * N, K, N); break;
    default: break;
  }
}

template <int C, class Rows>
inline void block(const float* x, const Rows& rows, float* buf, const Epilogue& e, float* y, int64_t M, int64_t K,
                  int64_t N) {
  if (!buf) return column<C>(x, rows, e, y, M, K, N);
  const int64_t K16 = (K + 15) / 16 * 16;
  for (int c = 0; c < C; ++c)
    for (int64_t k = 0; k < K16; k += 16) _mm512_store_ps(buf + c * K16 + k, rows.chunk(c, k, lanes(K - k)));
  column<C>(x, WidenedRows<Rows>{buf, K16, rows}, e, y, M, K, N);
}

// `rows_at(n)` and `epilogue_at(n)`: the loader and the epilogue of the outputs from n on.
template <class RowsAt, class EpilogueAt>
void gemm(const float* x, RowsAt rows_at, EpilogueAt epilogue_at, float* y, int64_t M, int64_t K, int64_t N) {
  constexpr int kCols = decltype(rows_at(0))::kCols;
  const int64_t blocks = (N + kCols - 1) / kCols;
  at::parallel_for(0, blocks, grain(kCols, M, K), [&](int64_t b0, int64_t b1) {
    float* buf = nullptr;
    if (M > kRows) {
      buf = static_cast<float*>(std::aligned_alloc(64, kCols * ((K + 15) / 16 * 16) * sizeof(float)));
      TORCH_CHECK(buf != nullptr, "quantized_gemm: out of memory");
    }
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * kCols;
      const Epilogue e = epilogue_at(n);
      const auto rows = rows_at(n);
      switch (std::min<int64_t>(kCols, N - n)) {
        case 6:
          if constexpr (kCols >= 6) block<6>(x, rows, buf, e, y + n, M, K, N);
          break;
        case 5:
          if constexpr (kCols >= 5) block<5>(x, rows, buf, e, y + n, M, K, N);
          break;
        case 4: block<4>(x, rows, buf, e, y + n, M, K, N); break;
        case 3: block<3>(x, rows, buf, e, y + n, M, K, N); break;
        case 2: block<2>(x, rows, buf, e, y + n, M, K, N); break;
        default: block<1>(x, rows, buf, e, y + n, M, K, N); break;
      }
    }
    std::free(buf);
  });
}

// Checks shared by both entry points; returns x contiguous, `bias_out` the bias (undefined: none).
torch::Tensor prepare(torch::Tensor x, int64_t K, const c10::optional<torch::Tensor>& bias, int64_t N,
                      torch::Tensor& bias_out, int64_t activation) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == at::kFloat && !x.is_cuda(),
              "quantized_gemm: x [M, K] fp32 on CPU");
  TORCH_CHECK(activation >= 0 && activation <= 3, "quantized_gemm: activation 0-3");
  if (bias.has_value() && bias->defined()) {
    bias_out = bias->contiguous();
    TORCH_CHECK(bias_out.scalar_type() == at::kFloat && bias_out.numel() == N, "quantized_gemm: bias [N] fp32");
  }
  return x.contiguous();
}

}  // namespace

// activation: 0 none, 1 SiLU, 2 tanh-GELU, 3 erf-GELU (applied after the bias).
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                          int64_t activation) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous() && !q.is_cuda(),
              "int8_linear: q [N, K] int8, contiguous, CPU");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == q.size(0),
              "int8_linear: scale [N] fp32");
  const int64_t K = q.size(1), N = q.size(0);
  torch::Tensor bc;
  x = prepare(x, K, bias, N, bc, activation);
  auto y = torch::empty({x.size(0), N}, x.options());
  if (x.size(0) == 0) return y;
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = bc.defined() ? bc.data_ptr<float>() : nullptr;
  gemm(x.data_ptr<float>(), [&](int64_t n) { return Int8Rows{qp + n * K, K}; },
       [&](int64_t n) { return Epilogue{sp + n, bp ? bp + n : nullptr, activation}; }, y.data_ptr<float>(), x.size(0),
       K, N);
  return y;
}

// q [N, K / 2] uint8 (the layout above), groups [N, 2, K / 32] fp32 (scales, then offsets); K % 32 == 0.
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor q, torch::Tensor groups, c10::optional<torch::Tensor> bias,
                          int64_t activation) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous() && !q.is_cuda(),
              "int4_linear: q [N, K / 2] uint8, contiguous, CPU");
  const int64_t K = q.size(1) * 2, N = q.size(0);
  TORCH_CHECK(K % kGroup == 0, "int4_linear: K a multiple of 32");
  TORCH_CHECK(groups.scalar_type() == at::kFloat && groups.is_contiguous() && groups.numel() == N * (K / kGroup) * 2,
              "int4_linear: groups [N, 2, K / 32] fp32");
  torch::Tensor bc;
  x = prepare(x, K, bias, N, bc, activation);
  auto y = torch::empty({x.size(0), N}, x.options());
  if (x.size(0) == 0) return y;
  const int64_t M = x.size(0), G = K / kGroup, G16 = (G + 15) / 16 * 16;
  const float* xp = x.data_ptr<float>();
  // xs[m, g]: the sum of row m's inputs over group g, in one fixed order (the two chunks added, then
  // summed across lanes); zero past G, so the epilogue's masked dot reads whole zeros.
  std::vector<float> xs(M * G16, 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = xp + m * K + g * kGroup;
      xs[m * G16 + g] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_loadu_ps(xg), _mm512_loadu_ps(xg + 16)));
    }
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* so = groups.data_ptr<float>();
  const float* bp = bc.defined() ? bc.data_ptr<float>() : nullptr;
  gemm(xp, [&](int64_t n) { return Int4Rows{qp + n * (K / 2), so + n * 2 * G, K}; },
       [&](int64_t n) {
         return Epilogue{nullptr, bp ? bp + n : nullptr, activation, so + n * 2 * G + G, 2 * G, xs.data(), G, G16};
       },
       y.data_ptr<float>(), M, K, N);
  return y;
}

void register_quantized_gemm(pybind11::module& m) {
  m.def("int8_linear", &int8_linear, "y = act((x @ q.T) * scale + bias), int8 weights, row-invariant");
  m.def("int4_linear", &int4_linear, "y = act(x @ w.T + bias), int4 weights in groups of 32, row-invariant");
}
