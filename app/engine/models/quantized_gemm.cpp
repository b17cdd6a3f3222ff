// Row-invariant weight-only GEMMs for TEXTGEN_QUANTIZE (app/engine/models/quantize.py says why they
// exist: PyTorch's weight-only kernels were measured slower at 1 and at 32 rows). AVX-512 + VNNI.
//
//   int8: y = act((x @ q.T) * scale + bias), q int8, scale [N] (one per output);
//   int4: y = act(x @ w.T + bias), w[n, k] = (q[n, k] - 8) * s[n, g] + z[n, g] with g = k / 32 (a
//         group), q in 0..15, s and z bf16 [N, 2, K / 32] (a row's scales, then its zeros), as
//         torchao's int4 weight-only scheme and aten's int4 kernel store them.
// The bytes of q are laid out by blocks of 16 groups (Int8Rows, Int4Rows; quantize.py packs them).
//
// x [M, K] and y are fp32. How: each activation row is first rounded to 16-bit integers per group of
// 32 inputs, by itself (x ~ xq * dx[g], dx[g] = max|x_g| / 32767: a relative error below 2^-16 of
// the group's largest input, finer than the bf16 that aten's weight-only kernels round activations
// to, and far below the weights' own rounding). Then, per block of 16 groups, the integer dots
// xq . q of all 16 groups at once, one group per 32-bit lane (`_mm512_dpwssd_epi32`: 32 exact
// products an instruction), converted to fp32 once per block and scaled per lane (int8: by dx;
// int4: by dx then s, plus z times the group's fp32 sum of x) into one 16-lane accumulator.
// Why integers: with fp32 activations every weight cost a widen, a convert and an FMA per row (int4
// also a nibble split and two scale products), and the kernels were compute-bound: int4 read 16 GB/s
// of weights in the 1-row decode step against DRAM's ~30, and int8 at 32 rows was slower than the
// fp32 GEMM. The integer form takes about 1 instruction per 32 weights per row (GPT-2-124M's int4
// layers at 1 row, one thread, hot cache: 4.2 -> 2.2 ms; measurements in docs/performance.md).
//
// Invariance: every y[m, n] comes from one fixed chain of operations for every M, tile shape and
// thread count: a row's quantization depends on the row alone, the integer dots are exact, the fp32
// steps run block by block in k order and one fixed lane sum ends them, then scale (int8), bias and
// activation; threads split the outputs, never k.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdlib>
#include <vector>

#include "kernels.h"

namespace {

using textgen::activate16;
using textgen::grain;
using textgen::lanes;

constexpr int kRows = 3;         // activation rows per register tile
constexpr int kCols = 4;         // outputs per register tile
constexpr int64_t kGroup = 32;   // inputs per activation scale (and per int4 weight scale)
constexpr int64_t kBlock = 16;   // groups per block: one per 32-bit lane
constexpr int64_t kRowBlockBytes = 256 * 1024;  // quantized activations a thread's tiles sweep at once

// Activations: each row of x rounded to 16-bit integers per group of 32 inputs, x ~ xq * dx[g] with
// dx[g] = max|x_g| / 32767, and laid out for `_mm512_dpwssd_epi32` with one group per 32-bit lane:
// per block of 16 groups, 16 steps of 32 words, word 2j + e of step t = group j's input k = 2t + e
// (zero past the row's groups and past K). A last block of exactly 8 groups (GPT-2's 768 inputs,
// Llama-7B's 11008) is folded: 8 steps, lanes j and j + 8 both group j's (k = 2t + e and 16 + 2t + e),
// so its lanes are not half empty. Per block, in its 16 lanes: `corr` = -8 * the group's sum of xq
// (int4 levels q stand for q - 8), `dx`, and `xs` = the group's fp32 sum of x (times int4's zeros);
// a folded group's corr and xs in lane j only, its dx in both.
struct Acts {
  const int16_t* xq;    // [M, B, 16, 32]
  const int32_t* corr;  // [M, B, 16]
  const float* dx;      // [M, B, 16]
  const float* xs;      // [M, B, 16]
  int64_t B;
  inline Acts row(int64_t r) const { return {xq + r * B * 512, corr + r * B * 16, dx + r * B * 16, xs + r * B * 16, B}; }
};

// Whether block b of a row of G groups is a folded one (see Acts).
inline bool folded(int64_t b, int64_t G) { return G - b * kBlock == 8; }

// Row x [K] into its slices of the buffers (zeroed by the caller). Depends on this row alone.
void quantize_row(const float* x, int64_t K, int16_t* xq, int32_t* corr, float* dx, float* xs) {
  const int64_t G = (K + kGroup - 1) / kGroup;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t b = g / kBlock, j = g % kBlock;
    const __m512 lo = _mm512_maskz_loadu_ps(lanes(K - g * kGroup), x + g * kGroup);
    const __m512 hi = _mm512_maskz_loadu_ps(lanes(K - g * kGroup - 16), x + g * kGroup + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
    // Rounded to nearest (even); |x * inv| <= 32767 up to rounding, and saturated all the same.
    alignas(64) int16_t v[32];
    _mm256_store_si256(reinterpret_cast<__m256i*>(v), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(lo, inv))));
    _mm256_store_si256(reinterpret_cast<__m256i*>(v + 16),
                       _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(hi, inv))));
    int32_t sum = 0;
    for (int k = 0; k < 32; ++k) sum += v[k];
    int16_t* block = xq + b * 512;
    if (folded(b, G)) {
      for (int t = 0; t < 8; ++t)
        for (int e = 0; e < 2; ++e) {
          block[t * 32 + 2 * j + e] = v[2 * t + e];
          block[t * 32 + 2 * (j + 8) + e] = v[16 + 2 * t + e];
        }
      dx[b * 16 + j + 8] = amax / 32767.0f;
    } else {
      for (int t = 0; t < 16; ++t)
        for (int e = 0; e < 2; ++e) block[t * 32 + 2 * j + e] = v[2 * t + e];
    }
    corr[b * 16 + j] = -8 * sum;
    dx[b * 16 + j] = amax / 32767.0f;
    xs[b * 16 + j] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
  }
}

// Weight loaders, both laid out by blocks of 16 groups (the last block holds the W groups left) so
// that step t's 32 words match the activations' (word 2j + e: group j's k = 2t + e):
// `load<C>(b, W, s, w0, w1)` gives C outputs' words of steps 2s and 2s + 1 of block b, prefetching
// as far into the next tile's bytes as this tile has read (streams of C short rows defeat the
// hardware prefetcher: the LM head read 12 GB/s without, 40 with, measured).
//
// int8: a block is 16 steps of 2W bytes, byte 2j + e of step t = group j's k = 2t + e (a folded
// block: 8 steps of 32 bytes, bytes 2j + e and 2(j + 8) + e group j's k = 2t + e and 16 + 2t + e).
struct Int8Rows {
  static constexpr bool kInt4 = false;
  const int8_t* q;  // the tile's first output: K32 bytes a row (K rounded up to 32, zero padded)
  int64_t K32;
  template <int C>
  inline void load(int64_t b, int64_t W, int s, __m512i* w0, __m512i* w1) const {
    const int64_t at = b * 512 + s * 4 * W;  // steps 2s and 2s + 1: 4W bytes from here
    const __mmask32 m = W == 16 ? 0xFFFFFFFFu : (1u << (2 * W)) - 1;
#pragma GCC unroll 4
    for (int line = 0; line < C; ++line)  // 64 bytes an output read here, as many ahead
      _mm_prefetch(reinterpret_cast<const char*>(q + C * K32 + at * C + line * 64), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int o = 0; o < C; ++o) {
      w0[o] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, q + o * K32 + at));
      w1[o] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, q + o * K32 + at + 2 * W));
    }
  }
};

// int4: levels q in 0..15; a block is 8 chunks of 2W bytes, byte 2j + e of chunk s holding group j's
// k = 4s + e (low nibble, step 2s) and 4s + 2 + e (high nibble, step 2s + 1) (a folded block: 4
// chunks of 32 bytes, byte 2(j + 8) + e holding group j's k + 16). Scales and zeros bf16 [2, G] a
// row: w = (q - 8) * scale + zero.
struct Int4Rows {
  static constexpr bool kInt4 = true;
  const uint8_t* q;    // the tile's first output: K / 2 bytes a row
  const uint16_t* sz;  // its [2, G]
  int64_t K, G;
  template <int C>
  inline void load(int64_t b, int64_t W, int s, __m512i* w0, __m512i* w1) const {
    const int64_t at = b * 256 + s * 2 * W;
    const __mmask32 m = W == 16 ? 0xFFFFFFFFu : (1u << (2 * W)) - 1;
    _mm_prefetch(reinterpret_cast<const char*>(q + C * (K / 2) + at * C), _MM_HINT_T0);
    if (C > 2) _mm_prefetch(reinterpret_cast<const char*>(q + C * (K / 2) + at * C + 64), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int o = 0; o < C; ++o) {
      const __m512i w = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(m, q + o * (K / 2) + at));
      w0[o] = _mm512_and_si512(w, _mm512_set1_epi16(0x0F));
      w1[o] = _mm512_srli_epi16(w, 4);
    }
  }
  // Output o's scales (`half` 0) or zeros (1) of block b as fp32 lanes (zero past W; a folded
  // block's 8 twice).
  inline __m512 group_values(int o, int half, int64_t b, int64_t W) const {
    const __m256i v = _mm256_maskz_loadu_epi16(lanes(W), sz + o * 2 * G + half * G + b * 16);
    __m512i f = _mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16);
    if (W == 8) f = _mm512_permutexvar_epi32(_mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 7, 6, 5, 4, 3, 2, 1, 0), f);
    return _mm512_castsi512_ps(f);
  }
};

// What finishes output c of a tile: the scale (int8), the bias, then the activation, which `tile`
// applies to its R x C outputs together in one vector (activate16: an element's bits depend on its
// value alone, so a row's outputs are the same in every tile shape). Fused because PyTorch's
// vectorized SiLU and tanh-GELU give an element other bits in a row's tail than in the vector body
// (measured: 172-wide rows, 24 of 71 rows differed alone vs batched on stories260k's MLP).
struct Epilogue {
  const float* scale;  // per output (int8) or null
  const float* bias;   // per output or null
  int64_t act;
  inline float operator()(float dot, int c) const {
    if (scale) dot *= scale[c];
    return bias ? dot + bias[c] : dot;
  }
};

// R activation rows x C outputs. Per block of 16 groups: exact int32 dots per group in lanes (int4
// starting from corr), then into one fp32 accumulator: int8 acc += dot * dx; int4
// acc = (dot * dx) * s + acc, then + z * xs. Blocks in k order; one lane sum at the end.
template <int R, int C, class Rows>
inline void tile(const Acts& x, const Rows& rows, const Epilogue& e, float* y, int64_t G, int64_t N) {
  __m512 acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t b = 0; b < x.B; ++b) {
    const int64_t W = std::min<int64_t>(kBlock, G - b * kBlock);
    const bool fold = folded(b, G);  // then 8 steps over 16 full lanes, loaded as a whole block's
    const int64_t lanes_w = fold ? kBlock : W;
    __m512i dot[R][C];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512i start = Rows::kInt4 ? _mm512_loadu_si512(x.row(r).corr + b * 16) : _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) dot[r][c] = start;
    }
    for (int s = 0; s < (fold ? 4 : 8); ++s) {
      __m512i w0[C], w1[C];
      rows.template load<C>(b, lanes_w, s, w0, w1);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const int16_t* xq = x.row(r).xq + b * 512 + s * 64;
        const __m512i x0 = _mm512_loadu_si512(xq), x1 = _mm512_loadu_si512(xq + 32);
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) dot[r][c] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(dot[r][c], w0[c], x0), w1[c], x1);
      }
    }
    if constexpr (Rows::kInt4) {
      __m512 sc[C], z[C];
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) sc[c] = rows.group_values(c, 0, b, W), z[c] = rows.group_values(c, 1, b, W);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 dx = _mm512_loadu_ps(x.row(r).dx + b * 16), xs = _mm512_loadu_ps(x.row(r).xs + b * 16);
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c)
          acc[r][c] =
              _mm512_fmadd_ps(z[c], xs, _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot[r][c]), dx), sc[c], acc[r][c]));
      }
    } else {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 dx = _mm512_loadu_ps(x.row(r).dx + b * 16);
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][c]), dx, acc[r][c]);
      }
    }
  }
  static_assert(R * C <= 16, "a tile's outputs are activated in one vector");
  alignas(64) float out[16] = {};
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) out[r * C + c] = e(_mm512_reduce_add_ps(acc[r][c]), c);
  _mm512_store_ps(out, activate16(_mm512_load_ps(out), e.act));
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) y[r * N + c] = out[r * C + c];
}

template <int C, class Rows>
inline void column(const Acts& x, const Rows& rows, const Epilogue& e, float* y, int64_t M, int64_t G, int64_t N) {
  int64_t r = 0;
  for (; r + kRows <= M; r += kRows) tile<kRows, C>(x.row(r), rows, e, y + r * N, G, N);
  switch (M - r) {
    case 3: tile<3, C>(x.row(r), rows, e, y + r * N, G, N); break;
    case 2: tile<2, C>(x.row(r), rows, e, y + r * N, G, N); break;
    case 1: tile<1, C>(x.row(r), rows, e, y + r * N, G, N); break;
    default: break;
  }
}

// y [M, N] = the GEMM of x [M, K] fp32 with the weights `rows_at(n)` loads (outputs n on), each output
// finished by `epilogue_at(n)`. Threads split the outputs, never the inputs.
template <class RowsAt, class EpilogueAt>
void gemm(const float* x, RowsAt rows_at, EpilogueAt epilogue_at, float* y, int64_t M, int64_t K, int64_t N) {
  const int64_t G = (K + kGroup - 1) / kGroup, B = (G + kBlock - 1) / kBlock;
  // Each row's activations quantized once, by the row alone (so a row's bits cannot depend on M).
  std::vector<int16_t> xq(M * B * 512, 0);
  std::vector<int32_t> corr(M * B * 16, 0);
  std::vector<float> dx(M * B * 16, 0.0f), xs(M * B * 16, 0.0f);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      quantize_row(x + m * K, K, xq.data() + m * B * 512, corr.data() + m * B * 16, dx.data() + m * B * 16,
                   xs.data() + m * B * 16);
  });
  const Acts acts{xq.data(), corr.data(), dx.data(), xs.data(), B};
  const int64_t tiles = (N + kCols - 1) / kCols;
  // Rows go in blocks whose activations stay in L2 while a thread's tiles sweep them: a prefill's
  // rows all at once were re-read from L3 for every tile.
  const int64_t block = std::max<int64_t>(kRows, kRowBlockBytes / (B * 512 * 2) / kRows * kRows);
  at::parallel_for(0, tiles, grain(kCols, M, K), [&](int64_t t0, int64_t t1) {
    for (int64_t m0 = 0; m0 < M; m0 += block) {
      const int64_t mb = std::min(block, M - m0);
      const Acts part = acts.row(m0);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n = t * kCols;
        const auto rows = rows_at(n);
        const Epilogue e = epilogue_at(n);
        float* out = y + m0 * N + n;
        switch (std::min<int64_t>(kCols, N - n)) {
          case 4: column<4>(part, rows, e, out, mb, G, N); break;
          case 3: column<3>(part, rows, e, out, mb, G, N); break;
          case 2: column<2>(part, rows, e, out, mb, G, N); break;
          default: column<1>(part, rows, e, out, mb, G, N); break;
        }
      }
    }
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
// x [M, K] fp32; q [N, K32] int8 (K32: K rounded up to 32, laid out as Int8Rows); scale [N] fp32.
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                          int64_t activation) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous() && !q.is_cuda() && q.size(1) % kGroup == 0,
              "int8_linear: q [N, K32] int8, K32 a multiple of 32, contiguous, CPU");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == q.size(0),
              "int8_linear: scale [N] fp32");
  const int64_t K32 = q.size(1), N = q.size(0), K = x.dim() == 2 ? x.size(1) : -1;
  TORCH_CHECK(K > K32 - kGroup && K <= K32, "int8_linear: x [M, K] with K rounded up to 32 = q.size(1)");
  torch::Tensor bc;
  x = prepare(x, K, bias, N, bc, activation);
  auto y = torch::empty({x.size(0), N}, x.options());
  if (x.size(0) == 0) return y;
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = bc.defined() ? bc.data_ptr<float>() : nullptr;
  gemm(x.data_ptr<float>(), [&](int64_t n) { return Int8Rows{qp + n * K32, K32}; },
       [&](int64_t n) { return Epilogue{sp + n, bp ? bp + n : nullptr, activation}; }, y.data_ptr<float>(), x.size(0),
       K, N);
  return y;
}

// x [M, K] fp32, K % 32 == 0; q [N, K / 2] uint8 (laid out as Int4Rows); sz [N, 2, K / 32] bf16.
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor q, torch::Tensor sz, c10::optional<torch::Tensor> bias,
                          int64_t activation) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous() && !q.is_cuda(),
              "int4_linear: q [N, K / 2] uint8, contiguous, CPU");
  const int64_t K = q.size(1) * 2, N = q.size(0), G = K / kGroup;
  TORCH_CHECK(K % kGroup == 0, "int4_linear: K a multiple of 32");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.numel() == N * G * 2,
              "int4_linear: sz [N, 2, K / 32] bf16");
  torch::Tensor bc;
  x = prepare(x, K, bias, N, bc, activation);
  auto y = torch::empty({x.size(0), N}, x.options());
  if (x.size(0) == 0) return y;
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const uint16_t* szp = reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>());
  const float* bp = bc.defined() ? bc.data_ptr<float>() : nullptr;
  gemm(x.data_ptr<float>(), [&](int64_t n) { return Int4Rows{qp + n * (K / 2), szp + n * 2 * G, K, G}; },
       [&](int64_t n) { return Epilogue{nullptr, bp ? bp + n : nullptr, activation}; }, y.data_ptr<float>(),
       x.size(0), K, N);
  return y;
}

void register_quantized_gemm(pybind11::module& m) {
  m.def("int8_linear", &int8_linear, "y = act((x @ q.T) * scale + bias), int8 weights, row-invariant");
  m.def("int4_linear", &int4_linear, "y = act(x @ w.T + bias), int4 weights in groups of 32, row-invariant");
}
