// Helpers shared by the CPU kernels of the compact forward (invariant_gemm.cpp, quantized_gemm.cpp,
// paged_attention.cpp), compiled together by app/engine/models/invariant_gemm.py.
#pragma once

#include <immintrin.h>

#include <algorithm>
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

}  // namespace textgen
