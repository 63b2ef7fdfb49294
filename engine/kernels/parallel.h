// An even split of a range over the threads, with less per call than at::parallel_for.
//
// A decode step runs ~150 parallel loops of a few microseconds each (SmolLM2 at one sequence:
// 121 linears of 10-60 us), where at::parallel_for's guards and bookkeeping around its OpenMP
// region show: with the bare region the linears' step medians went 8.22/9.55/8.24/8.62 ->
// 7.83/9.17/8.19/7.88 ms (alternating runs, together with in-kernel widening of bf16 inputs).

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace kestrel {

// fn(begin, end) over an even split of [0, count) into one range per thread; inline (one call)
// inside another parallel region, or where count <= grain. Threads as at::parallel_for uses.
// fn must not throw (at::parallel_for carries exceptions out of the region; this does not).
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
#pragma omp parallel num_threads(static_cast<int>(used))
  {
    const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
    const int64_t begin = count * t / n, end = count * (t + 1) / n;
    if (begin < end) fn(begin, end);
  }
#else
  at::parallel_for(0, count, grain, fn);
#endif
}

}  // namespace kestrel
