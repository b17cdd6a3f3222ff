// Helpers shared by the CPU kernels of the compact forward (invariant_gemm.cpp, quantized_gemm.cpp,
// paged_attention.cpp), compiled together by app/engine/models/invariant_gemm.py.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>

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

// A 64-byte aligned scratch buffer of at least `floats` floats, one per thread, kept for the
// thread's life (torch's intra-op threads are a pool: no allocation per call or per chunk).
inline float* scratch(int64_t floats) {
  thread_local float* buffer = nullptr;
  thread_local int64_t capacity = 0;
  if (capacity < floats) {
    std::free(buffer);
    buffer = static_cast<float*>(std::aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64));
    if (buffer == nullptr) throw std::bad_alloc();
    capacity = floats;
  }
  return buffer;
}

// Multiply-adds a chunk of `parallel_chunks` aims at (~10-40 us of work here).
constexpr int64_t kChunkWork = 1 << 20;

// f(first, last) over [0, tasks) on torch's intra-op threads, in chunks taken from a shared counter
// rather than one fixed half per thread: these 2 cores also run the event loop and, in benchmarks,
// the clients, and a thread the OS preempts held up a static split's barrier for its whole half
// (a 7.5%-of-a-core busy loop beside the 32-row fp32 GEMMs slowed them 9-22%, measured 2026-12-06);
// with chunks the other thread takes over the rest. Which thread runs a task never changes a result
// (each output is computed by one task, in one fixed order). Tiny jobs (`work_per_task` multiply-
// adds each) run on the calling thread; chunks are small enough for 4 a thread at least.
template <class F>
inline void parallel_chunks(int64_t tasks, int64_t work_per_task, const F& f) {
  const int64_t work = std::max<int64_t>(1, work_per_task);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, tasks * work / kMinWorkPerThread));
  if (threads <= 1) {
    if (tasks > 0) f(0, tasks);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(kChunkWork / work, tasks / (4 * threads)));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t first; (first = next.fetch_add(chunk, std::memory_order_relaxed)) < tasks;)
      f(first, std::min<int64_t>(tasks, first + chunk));
  });
}

}  // namespace textgen
