// A row-invariant fp32 GEMM for the compact forward (app/engine/models/invariant_gemm.py says why
// it exists: no library kernel measured close). y = x @ w + bias, x [M, K], w [K, N] (the weight
// stored input-major, as GPT-2's Conv1D stores it), AVX-512.
//
// Invariance: every output y[m, n] is bias[n] (or 0) followed by one FMA per k, in k order, whatever
// M is, wherever the row sits, and however many threads run (threads split the outputs, never k).
// Two loop orders serve different row counts, and both apply exactly that chain, so a row's bits are
// the same for M = 1 and M = 1000:
// - few rows (< kTileRows): stream w row by row (axpy form), the partial sums kept in y: each weight
//   byte is read once, sequentially (the GEMV case, at the memory-bandwidth floor);
// - more rows: copy a 64-wide column tile of w into a contiguous buffer once, then run register
//   tiles of up to 6 rows x 64 columns over it (the weight is read from memory once per step).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

namespace {

constexpr int64_t kTileRows = 4;
// Multiply-adds a thread must have before a GEMM is split across threads: a small GEMM (stories260k's
// 64-wide layers) costs less than waking the other thread, which on a busy machine may wait for a core.
constexpr int64_t kMinWorkPerThread = 1 << 16;

inline int64_t grain(int64_t columns_per_unit, int64_t M, int64_t K) {
  return std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, columns_per_unit * M * K));
}

inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

// y[r, c0:c1] = fma chain of x[r, k0 + j] * w[k0 + j, c0:c1] for j < KB, onto y's values.
template <int KB>
inline void axpy_block(const float* x, int64_t K, int64_t rows, const float* w, int64_t N, float* y,
                       int64_t k0, int64_t c0, int64_t c1) {
  for (int64_t r = 0; r < rows; ++r) {
    __m512 xb[KB];
    for (int j = 0; j < KB; ++j) xb[j] = _mm512_set1_ps(x[r * K + k0 + j]);
    float* yr = y + r * N;
    for (int64_t n = c0; n < c1; n += 16) {
      const __mmask16 m = lanes(c1 - n);
      __m512 acc = _mm512_maskz_loadu_ps(m, yr + n);
      for (int j = 0; j < KB; ++j) acc = _mm512_fmadd_ps(xb[j], _mm512_maskz_loadu_ps(m, w + (k0 + j) * N + n), acc);
      _mm512_mask_storeu_ps(yr + n, m, acc);
    }
  }
}

template <int R>
inline void tile(const float* x, int64_t K, const float* wt, const float* bias, float* y, int64_t N, int64_t n,
                 const __mmask16* mk) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j)
      acc[r][j] = bias ? _mm512_maskz_loadu_ps(mk[j], bias + n + 16 * j) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = wt + k * 64;
    const __m512 w0 = _mm512_load_ps(wk), w1 = _mm512_load_ps(wk + 16);
    const __m512 w2 = _mm512_load_ps(wk + 32), w3 = _mm512_load_ps(wk + 48);
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * K + k]);
      acc[r][0] = _mm512_fmadd_ps(xb, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xb, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(xb, w2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(xb, w3, acc[r][3]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) _mm512_mask_storeu_ps(y + r * N + n + 16 * j, mk[j], acc[r][j]);
}

void few_rows(const float* x, const float* w, const float* b, float* y, int64_t M, int64_t K, int64_t N) {
  for (int64_t r = 0; r < M; ++r) {
    if (b) std::copy(b, b + N, y + r * N); else std::fill(y + r * N, y + (r + 1) * N, 0.0f);
  }
  at::parallel_for(0, (N + 15) / 16, std::max<int64_t>(4, grain(16, M, K)), [&](int64_t v0, int64_t v1) {
    const int64_t c0 = v0 * 16, c1 = std::min(N, v1 * 16);
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) axpy_block<4>(x, K, M, w, N, y, k, c0, c1);
    for (; k < K; ++k) axpy_block<1>(x, K, M, w, N, y, k, c0, c1);
  });
}

void many_rows(const float* x, const float* w, const float* b, float* y, int64_t M, int64_t K, int64_t N) {
  at::parallel_for(0, (N + 63) / 64, grain(64, M, K), [&](int64_t t0, int64_t t1) {
    float* buf = static_cast<float*>(std::aligned_alloc(64, K * 64 * sizeof(float)));
    TORCH_CHECK(buf != nullptr, "invariant_gemm: out of memory");
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t * 64, left = N - n;
      const __mmask16 mk[4] = {lanes(left), lanes(left - 16), lanes(left - 32), lanes(left - 48)};
      for (int64_t k = 0; k < K; ++k)
        for (int j = 0; j < 4; ++j)
          _mm512_store_ps(buf + k * 64 + 16 * j, _mm512_maskz_loadu_ps(mk[j], w + k * N + n + 16 * j));
      int64_t r = 0;
      for (; r + 6 <= M; r += 6) tile<6>(x + r * K, K, buf, b, y + r * N, N, n, mk);
      switch (M - r) {
        case 5: tile<5>(x + r * K, K, buf, b, y + r * N, N, n, mk); break;
        case 4: tile<4>(x + r * K, K, buf, b, y + r * N, N, n, mk); break;
        case 3: tile<3>(x + r * K, K, buf, b, y + r * N, N, n, mk); break;
        case 2: tile<2>(x + r * K, K, buf, b, y + r * N, N, n, mk); break;
        case 1: tile<1>(x + r * K, K, buf, b, y + r * N, N, n, mk); break;
        default: break;
      }
    }
    std::free(buf);
  });
}


// ---- int8 weight-only: y = (x @ q.T) * scale + bias, x [M, K] fp32, q [N, K] int8 (one row per output),
// scale [N] fp32. Every y[m, n] is one 16-lane accumulator, FMA'd chunk by chunk in k order (the
// last chunk masked, its missing lanes zero), summed across lanes by one fixed sequence, then
// scaled and biased: the same chain for every M, tile shape and thread count. The int8 weight is
// widened to fp32 in registers (exact), so each weight byte is read once per block of kInt8Rows
// activation rows. PyTorch's `_weight_int8pack_mm` does the same widening but is compute-bound at
// ~6 GB/s of weights per core here and rounds activations to bf16 (measured, invariant_gemm.py).

constexpr int kInt8Rows = 4;   // activation rows per register tile
constexpr int kInt8Cols = 6;   // weight rows (outputs) per register tile: 4 x 6 accumulators

inline __m512 widen(const int8_t* q, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q)));
}

// Weights straight from the int8 rows, widened per chunk (few activation rows: each byte is used
// once or a few times, so widening is cheaper than a copy), prefetching the next tile's rows.
struct Int8Rows {
  const int8_t* q;
  int64_t K;
  template <int C>
  inline void load(int64_t k, __mmask16 m, __m512* w) const {
    // The next tile's weights, as far ahead as this one is consumed (streams of C short rows defeat
    // the hardware prefetcher: 12 GB/s without, 40 with, measured).
    _mm_prefetch(reinterpret_cast<const char*>(q + C * K + k * C), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(q + C * K + k * C + 64), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) w[c] = widen(q + c * K + k, m);
  }
};

// The same C rows widened once into an fp32 buffer [C, K16] (K16 = K rounded up to 16, zero
// padded), for many activation rows: widening per tile was the bottleneck (2x slower than aten).
struct WidenedRows {
  const float* buf;
  int64_t K16;
  template <int C>
  inline void load(int64_t k, __mmask16, __m512* w) const {
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) w[c] = _mm512_load_ps(buf + c * K16 + k);
  }
};

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

template <int R, int C, class Rows>
inline void int8_tile(const float* x, const Rows& rows, const float* scale, const float* bias, float* y, int64_t K,
                      int64_t N, int64_t act) {
  __m512 acc[R][C];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
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
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const float dot = _mm512_reduce_add_ps(acc[r][c]) * scale[c];
      y[r * N + c] = activate(bias ? dot + bias[c] : dot, act);
    }
}

template <int C, class Rows>
inline void int8_column(const float* x, const Rows& rows, const float* scale, const float* bias, float* y, int64_t M,
                        int64_t K, int64_t N, int64_t act) {
  int64_t r = 0;
  for (; r + kInt8Rows <= M; r += kInt8Rows) int8_tile<kInt8Rows, C>(x + r * K, rows, scale, bias, y + r * N, K, N, act);
  switch (M - r) {
    case 3: int8_tile<3, C>(x + r * K, rows, scale, bias, y + r * N, K, N, act); break;
    case 2: int8_tile<2, C>(x + r * K, rows, scale, bias, y + r * N, K, N, act); break;
    case 1: int8_tile<1, C>(x + r * K, rows, scale, bias, y + r * N, K, N, act); break;
    default: break;
  }
}

template <int C>
inline void int8_block(const float* x, const int8_t* q, float* buf, const float* scale, const float* bias, float* y,
                       int64_t M, int64_t K, int64_t N, int64_t act) {
  if (!buf) return int8_column<C>(x, Int8Rows{q, K}, scale, bias, y, M, K, N, act);
  const int64_t K16 = (K + 15) / 16 * 16;
  for (int c = 0; c < C; ++c)
    for (int64_t k = 0; k < K16; k += 16) _mm512_store_ps(buf + c * K16 + k, widen(q + c * K + k, lanes(K - k)));
  int8_column<C>(x, WidenedRows{buf, K16}, scale, bias, y, M, K, N, act);
}

void int8_gemm(const float* x, const int8_t* q, const float* scale, const float* bias, float* y, int64_t M, int64_t K,
               int64_t N, int64_t act) {
  const int64_t blocks = (N + kInt8Cols - 1) / kInt8Cols;
  at::parallel_for(0, blocks, grain(kInt8Cols, M, K), [&](int64_t b0, int64_t b1) {
    float* buf = nullptr;
    if (M > kInt8Rows) {
      buf = static_cast<float*>(std::aligned_alloc(64, kInt8Cols * ((K + 15) / 16 * 16) * sizeof(float)));
      TORCH_CHECK(buf != nullptr, "int8_linear: out of memory");
    }
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * kInt8Cols;
      const float* bn = bias ? bias + n : nullptr;
      const int8_t* qn = q + n * K;
      switch (std::min<int64_t>(kInt8Cols, N - n)) {
        case 6: int8_block<6>(x, qn, buf, scale + n, bn, y + n, M, K, N, act); break;
        case 5: int8_block<5>(x, qn, buf, scale + n, bn, y + n, M, K, N, act); break;
        case 4: int8_block<4>(x, qn, buf, scale + n, bn, y + n, M, K, N, act); break;
        case 3: int8_block<3>(x, qn, buf, scale + n, bn, y + n, M, K, N, act); break;
        case 2: int8_block<2>(x, qn, buf, scale + n, bn, y + n, M, K, N, act); break;
        default: int8_block<1>(x, qn, buf, scale + n, bn, y + n, M, K, N, act); break;
      }
    }
    std::free(buf);
  });
}

}  // namespace

torch::Tensor kn_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(0), "invariant_gemm: x [M, K], w [K, N]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "invariant_gemm: fp32 only");
  TORCH_CHECK(w.is_contiguous() && !x.is_cuda() && !w.is_cuda(), "invariant_gemm: contiguous CPU weight");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(1);
  torch::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    bc = bias->contiguous();
    TORCH_CHECK(bc.scalar_type() == at::kFloat && bc.numel() == N, "invariant_gemm: bias [N] fp32");
  }
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  const float* b = bc.defined() ? bc.data_ptr<float>() : nullptr;
  (M < kTileRows ? few_rows : many_rows)(x.data_ptr<float>(), w.data_ptr<float>(), b, y.data_ptr<float>(), M, K, N);
  return y;
}

// activation: 0 none, 1 SiLU, 2 tanh-GELU, 3 erf-GELU (applied after the bias).
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                          int64_t activation) {
  TORCH_CHECK(activation >= 0 && activation <= 3, "int8_linear: activation 0-3");
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1), "int8_linear: x [M, K], q [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat,
              "int8_linear: x fp32, q int8, scale fp32");
  TORCH_CHECK(q.is_contiguous() && scale.is_contiguous() && scale.numel() == q.size(0) && !x.is_cuda() && !q.is_cuda(),
              "int8_linear: contiguous CPU q [N, K] and scale [N]");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  torch::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    bc = bias->contiguous();
    TORCH_CHECK(bc.scalar_type() == at::kFloat && bc.numel() == N, "int8_linear: bias [N] fp32");
  }
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  int8_gemm(x.data_ptr<float>(), q.data_ptr<int8_t>(), scale.data_ptr<float>(), bc.defined() ? bc.data_ptr<float>() : nullptr,
            y.data_ptr<float>(), M, K, N, activation);
  return y;
}

void register_paged_attention(pybind11::module& m);  // paged_attention.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_paged_attention(m);
  m.def("kn_linear", &kn_linear, "y = x @ w + bias, row-invariant");
  m.def("int8_linear", &int8_linear, "y = (x @ q.T) * scale + bias, int8 weights, row-invariant");
}
