// Helpers shared by the CPU kernels of the compact forward (invariant_gemm.cpp, quantized_gemm.cpp,
// paged_attention.cpp), compiled together by app/engine/models/invariant_gemm.py.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace textgen {

// Multiply-adds a thread must have before a GEMM is split across threads: a small GEMM (stories260k's
// 64-wide layers) costs less than waking the other thread, which on a busy machine may wait for a core.
constexpr int64_t kMinWorkPerThread = 1 << 16;

inline int64_t grain(int64_t columns_per_unit, int64_t M, int64_t K) {
  return std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, columns_per_unit * M * K));
}

// The first `left` of 16 lanes (all of them from 16 on, none at 0 or below).
inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

// The activation a GEMM applies after its bias, by the codes its Python callers pass
// (app/engine/models/activations.py, KERNEL_ACTIVATIONS).
enum Activation : int64_t { kNone = 0, kSilu = 1, kGeluTanh = 2, kGelu = 3 };

// e^x in 16 lanes: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two, so n ln2 is exact enough),
// e^r by its Taylor polynomial to degree 7 (truncation below 1e-8 relative), times 2^n (vscalefps).
// x is clamped to [-87, 88], where e^x is a normal float.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.4286068203094173e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// activation(v) in 16 lanes. Every lane runs the same instructions, so an element's bits depend on
// its value alone: never on its lane, its row's length or the row count (PyTorch's vectorized SiLU
// and tanh-GELU take a scalar path for a tensor's tail, whose bits differ: measured). SiLU is
// v / (1 + e^-v); tanh-GELU 0.5 v (1 + tanh(u / 2)) = v / (1 + e^-u), u = 2 sqrt(2 / pi) (v + 0.044715
// v^3); erf-GELU calls std::erf per lane (no model we benchmark uses it).
// Vectorized because one std::tanh per output cost more than the int8 GEMM that made it (GPT-2's
// MLP at 32 rows: 3.4 ms against 1.0 without, one thread).
inline __m512 activate16(__m512 v, int64_t act) {
  const __m512 one = _mm512_set1_ps(1.0f);
  switch (act) {
    case kSilu:
      return _mm512_div_ps(v, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), v))));
    case kGeluTanh: {
      const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
      const __m512 inner = _mm512_add_ps(v, _mm512_mul_ps(_mm512_set1_ps(0.044715f), cube));
      const __m512 minus_u = _mm512_mul_ps(_mm512_set1_ps(-1.5957691216057308f), inner);
      return _mm512_div_ps(v, _mm512_add_ps(one, exp16(minus_u)));
    }
    case kGelu: {
      alignas(64) float t[16];
      _mm512_store_ps(t, v);
      for (float& e : t) e = 0.5f * e * (1.0f + std::erf(e * 0.7071067811865476f));
      return _mm512_load_ps(t);
    }
    default:
      return v;
  }
}

// activation over y[r, n0:n1] for r < M (rows N apart), 16 outputs at a time.
inline void activate_rows(float* y, int64_t M, int64_t N, int64_t n0, int64_t n1, int64_t act) {
  if (act == kNone) return;
  for (int64_t r = 0; r < M; ++r)
    for (int64_t n = n0; n < n1; n += 16) {
      const __mmask16 m = lanes(n1 - n);
      _mm512_mask_storeu_ps(y + r * N + n, m, activate16(_mm512_maskz_loadu_ps(m, y + r * N + n), act));
    }
}

}  // namespace textgen
