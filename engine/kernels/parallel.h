// A range split over the threads in chunks handed out as they finish, with less per call than
// at::parallel_for.
//
// A decode step runs ~150 parallel loops of a few microseconds each (SmolLM2 at one sequence:
// 121 linears of 10-60 us), where at::parallel_for's guards and bookkeeping around its OpenMP
// region show: with the bare region the linears' step medians went 8.22/9.55/8.24/8.62 ->
// 7.83/9.17/8.19/7.88 ms (alternating runs, together with in-kernel widening of bf16 inputs).
//
// Chunks, not one even share per thread: on 2 cores the server's event-loop thread and the
// engine's Python take a core from a kernel thread now and then, and with even shares the other
// thread then waited at the region's end. Handing out 8 chunks per thread took SmolLM2 Q4_1's
// served TPOT (one stream) from 9.5 / 9.6 / 9.2 to 8.6 / 8.5 / 8.0 ms in alternating runs; the
// bare engine loop, with no third thread, did not change.

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace kestrel {

constexpr int64_t kChunksPerThread = 8;

// fn(begin, end) over [0, count) in chunks of at least `grain`, each to the first thread free;
// inline (one call) inside another parallel region, or where count <= grain. Threads as
// at::parallel_for uses. fn must not throw (at::parallel_for carries exceptions out of the
// region; this does not), and its result must not depend on how the range is cut.
template <typename Fn>
void parallel_ranges(int64_t count, int64_t grain, const Fn& fn) {
  if (count <= 0) return;
  const int threads = at::get_num_threads();
  if (count <= grain || threads <= 1 || at::in_parallel_region()) {
    fn(int64_t{0}, count);
    return;
  }
#if defined(_OPENMP)
  const int64_t used = std::min<int64_t>(threads, (count + grain - 1) / grain);
  const int64_t chunk = std::max(grain, (count + used * kChunksPerThread - 1) / (used * kChunksPerThread));
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(static_cast<int>(used))
  {
    for (int64_t begin = next.fetch_add(chunk, std::memory_order_relaxed); begin < count;
         begin = next.fetch_add(chunk, std::memory_order_relaxed))
      fn(begin, std::min(count, begin + chunk));
  }
#else
  at::parallel_for(0, count, grain, fn);
#endif
}

}  // namespace kestrel
