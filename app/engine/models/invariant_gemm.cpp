// A row-invariant fp32 GEMM for the compact forward (app/engine/models/invariant_gemm.py says why
// it exists: no library kernel measured close). y = act(x @ w + bias), x [M, K], w [K, N] (the weight
// stored input-major, as GPT-2's Conv1D stores it), AVX-512; act per element (kernels.h, activate16).
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

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>

namespace {

using textgen::activate16;
using textgen::activate_rows;
using textgen::grain;
using textgen::lanes;

constexpr int64_t kTileRows = 4;

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

// `next`, when given: the next column tile's weights in w (row stride N), brought into L2 while this
// tile computes, one row of 64 columns per k, so copying it into the buffer does not wait on DRAM.
template <int R>
inline void tile(const float* x, int64_t K, const float* wt, const float* bias, float* y, int64_t N, int64_t n,
                 const __mmask16* mk, int64_t act, const float* next) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j)
      acc[r][j] = bias ? _mm512_maskz_loadu_ps(mk[j], bias + n + 16 * j) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = wt + k * 64;
    if (next != nullptr)
      for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(next + k * N + 16 * j), _MM_HINT_T1);
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
    for (int j = 0; j < 4; ++j) _mm512_mask_storeu_ps(y + r * N + n + 16 * j, mk[j], activate16(acc[r][j], act));
}

void few_rows(const float* x, const float* w, const float* b, float* y, int64_t M, int64_t K, int64_t N, int64_t act) {
  for (int64_t r = 0; r < M; ++r) {
    if (b) std::copy(b, b + N, y + r * N); else std::fill(y + r * N, y + (r + 1) * N, 0.0f);
  }
  at::parallel_for(0, (N + 15) / 16, std::max<int64_t>(4, grain(16, M, K)), [&](int64_t v0, int64_t v1) {
    const int64_t c0 = v0 * 16, c1 = std::min(N, v1 * 16);
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) axpy_block<4>(x, K, M, w, N, y, k, c0, c1);
    for (; k < K; ++k) axpy_block<1>(x, K, M, w, N, y, k, c0, c1);
    activate_rows(y, M, N, c0, c1, act);
  });
}

void many_rows(const float* x, const float* w, const float* b, float* y, int64_t M, int64_t K, int64_t N, int64_t act) {
  at::parallel_for(0, (N + 63) / 64, grain(64, M, K), [&](int64_t t0, int64_t t1) {
    float* buf = static_cast<float*>(std::aligned_alloc(64, K * 64 * sizeof(float)));
    TORCH_CHECK(buf != nullptr, "invariant_gemm: out of memory");
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t * 64, left = N - n;
      const __mmask16 mk[4] = {lanes(left), lanes(left - 16), lanes(left - 32), lanes(left - 48)};
      for (int64_t k = 0; k < K; ++k)
        for (int j = 0; j < 4; ++j)
          _mm512_store_ps(buf + k * 64 + 16 * j, _mm512_maskz_loadu_ps(mk[j], w + k * N + n + 16 * j));
      // The first row tile brings the next column tile's weights into L2 (the strided copy above
      // otherwise waits on DRAM: at 32 rows it took about as long as the tile's FMAs).
      const float* next = t + 1 < t1 ? w + n + 64 : nullptr;
      int64_t r = 0;
      for (; r + 6 <= M; r += 6, next = nullptr) tile<6>(x + r * K, K, buf, b, y + r * N, N, n, mk, act, next);
      switch (M - r) {
        case 5: tile<5>(x + r * K, K, buf, b, y + r * N, N, n, mk, act, next); break;
        case 4: tile<4>(x + r * K, K, buf, b, y + r * N, N, n, mk, act, next); break;
        case 3: tile<3>(x + r * K, K, buf, b, y + r * N, N, n, mk, act, next); break;
        case 2: tile<2>(x + r * K, K, buf, b, y + r * N, N, n, mk, act, next); break;
        case 1: tile<1>(x + r * K, K, buf, b, y + r * N, N, n, mk, act, next); break;
        default: break;
      }
    }
    std::free(buf);
  });
}


}  // namespace

// activation: 0 none, 1 SiLU, 2 tanh-GELU, 3 erf-GELU (applied after the bias).
torch::Tensor kn_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias, int64_t activation) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(0), "invariant_gemm: x [M, K], w [K, N]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "invariant_gemm: fp32 only");
  TORCH_CHECK(w.is_contiguous() && !x.is_cuda() && !w.is_cuda(), "invariant_gemm: contiguous CPU weight");
  TORCH_CHECK(activation >= 0 && activation <= 3, "invariant_gemm: activation 0-3");
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
  (M < kTileRows ? few_rows : many_rows)(x.data_ptr<float>(), w.data_ptr<float>(), b, y.data_ptr<float>(), M, K, N,
                                          activation);
  return y;
}

// act(x) per element, x [M, N] fp32 (activation codes as kn_linear's): the activation of a GEMM
// that runs elsewhere (torchao's int8-dynamic layers), with the same per-element bits as ours.
torch::Tensor activation(torch::Tensor x, int64_t act) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && !x.is_cuda(), "activation: x [M, N] fp32 on CPU");
  TORCH_CHECK(act >= 0 && act <= 3, "activation: 0-3");
  auto y = x.clone(at::MemoryFormat::Contiguous);  // one copy, contiguous whatever x's strides
  textgen::activate_rows(y.data_ptr<float>(), y.size(0), y.size(1), 0, y.size(1), act);
  return y;
}

void register_quantized_gemm(pybind11::module& m);  // quantized_gemm.cpp
void register_paged_attention(pybind11::module& m);  // paged_attention.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_paged_attention(m);
  register_quantized_gemm(m);
  m.def("kn_linear", &kn_linear, "y = act(x @ w + bias), row-invariant");
  m.def("activation", &activation, "act(x) per element, invariant to shape");
}
