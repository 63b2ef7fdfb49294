// Attention straight from the paged cache (decodes, draft rows, prompt chunks).
//
// q: [num_rows, num_heads, head_dim] (rows may be strided); caches: [num_blocks, block_size,
// num_kv_heads, head_dim]; block_tables: [num_seqs, max_blocks]. Sequence s owns the rows
// [query_starts[s], query_starts[s + 1]), the newest tokens of its context_lens[s]: its last
// row sits at position context_lens[s] - 1, each row before it one position earlier, and a row
// attends to its own position and all before it. Decodes are one row, a draft's rows or a
// prompt chunk several. Scores, softmax and the weighted sum of values are float32 and each
// (row, head) is computed on its own in the same order of operations, so a row's result is
// the same whichever batch, chunk or step computes it.
//
// The step is cut into work items (plan_items), and those into tasks for the threads; a task
// runs four passes over its thread's float32 scratch: scores (q . k, scaled), softmax, values
// (the softmax-weighted sum of v), and the store of the result in the model dtype.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu_ops.h"

namespace kestrel {
namespace {

// ---- Reading the paged cache ------------------------------------------------------------------

// Positions whose keys and values an attention item loads ahead of computing on them: for
// SmolLM2, 768 KB, which stays in L2 until the value pass reads it.
constexpr int64_t kTouchWindow = 1024;

// One sequence's context in the paged cache: position p is row p % block_size of block
// table[p / block_size]; a row holds every kv head, head_dim elements each.
template <typename T>
struct PagedContext {
  const T* cache;
  const int64_t* table;
  int64_t block_size, row_stride, len;

  // Calls fn(first_position, rows, n) for each block in order; rows points at its first row.
  // Walking whole blocks keeps reads contiguous (block_size rows of every head) so the
  // hardware prefetcher streams them.
  template <typename Fn>
  void for_each_block(Fn&& fn) const {
    for (int64_t b = 0, p = 0; p < len; ++b, p += block_size) {
      fn(p, cache + table[b] * block_size * row_stride, std::min(block_size, len - p));
    }
  }

  // Loads every cache line of `width` elements of the rows at positions [position, position +
  // count). Their misses then overlap, many loads in flight, where the compute loops would meet
  // them a block at a time. Software prefetch did not help; these plain loads cut a
  // 16-sequence layer's attention from 220 to 175 us in situ (Sapphire Rapids).
  void touch(int64_t position, int64_t count, int64_t width) const {
    const int64_t end = std::min(len, position + count), row_bytes = row_stride * sizeof(T);
    // Rows of all kv heads lie back to back: a block is one run of bytes.
    const bool whole_rows = width == row_stride;
#ifdef KESTREL_AVX512_BF16
    __m512i sink = _mm512_setzero_si512();
#else
    uint64_t sink = 0;
#endif
    // A block's rows at a time (one division per block): as one run of bytes, or row by row.
    for (int64_t p = position; p < end;) {
      const int64_t block = p / block_size, first = p - block * block_size;
      const int64_t rows = std::min(block_size - first, end - p);
      const char* start =
          reinterpret_cast<const char*>(cache + table[block] * block_size * row_stride) + first * row_bytes;
      p += rows;
      const int64_t runs = whole_rows ? 1 : rows;
      const int64_t bytes = whole_rows ? rows * row_bytes : static_cast<int64_t>(width * sizeof(T));
      for (int64_t r = 0; r < runs; ++r, start += row_bytes) {
        for (int64_t off = 0; off < bytes; off += 64) {
#ifdef KESTREL_AVX512_BF16
          sink = _mm512_or_si512(sink, _mm512_loadu_si512(start + off));
#else
          sink |= *reinterpret_cast<const uint64_t*>(start + off);
#endif
        }
      }
    }
    static thread_local volatile int keep;  // the loads must not be optimised away
#ifdef KESTREL_AVX512_BF16
    keep = _mm512_reduce_or_epi32(sink);
#else
    keep = static_cast<int>(sink);
#endif
  }
};

// ---- Scores and weighted sums of one head, by instruction set -----------------------------------

// q . k in float32 for one head: q and k both head_dim elements.
template <typename T>
inline float dot(const T* q, const T* k, int64_t head_dim) {
#ifdef KESTREL_AVX512_BF16
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (head_dim % 32 == 0) {
      // vdpbf16ps: bf16 pairs multiplied exactly and summed in float32, 32 products per op.
      __m512 acc = _mm512_setzero_ps();
      for (int64_t d = 0; d < head_dim; d += 32) {
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + d), (__m512bh)_mm512_loadu_si512(k + d));
      }
      return _mm512_reduce_add_ps(acc);
    }
  }
#endif
  float sum = 0.f;
  #pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < head_dim; ++d) sum += f32(q[d]) * f32(k[d]);
  return sum;
}

// acc[d] += sum over rows i < n of w[i] * v_i[d], rows `stride` elements apart.
template <typename T>
inline void accumulate_rows(const float* w, const T* v, int64_t stride, int64_t n, int64_t head_dim,
                            float* acc) {
#ifdef KESTREL_AVX512_BF16
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (head_dim == 64) {
      __m512 a0 = _mm512_loadu_ps(acc), a1 = _mm512_loadu_ps(acc + 16);
      __m512 a2 = _mm512_loadu_ps(acc + 32), a3 = _mm512_loadu_ps(acc + 48);
      for (int64_t i = 0; i < n; ++i) {
        const T* row = v + i * stride;
        const __m512 wi = _mm512_set1_ps(w[i]);
        const auto widen = [&](int64_t d) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + d));
          return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
        };
        a0 = _mm512_fmadd_ps(wi, widen(0), a0);
        a1 = _mm512_fmadd_ps(wi, widen(16), a1);
        a2 = _mm512_fmadd_ps(wi, widen(32), a2);
        a3 = _mm512_fmadd_ps(wi, widen(48), a3);
      }
      _mm512_storeu_ps(acc, a0);
      _mm512_storeu_ps(acc + 16, a1);
      _mm512_storeu_ps(acc + 32, a2);
      _mm512_storeu_ps(acc + 48, a3);
      return;
    }
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    const T* row = v + i * stride;
    #pragma omp simd
    for (int64_t d = 0; d < head_dim; ++d) acc[d] += w[i] * f32(row[d]);
  }
}

#ifdef KESTREL_AVX512_BF16
// Scores of query row q (64 bf16) against the n <= 16 keys of a block, `stride` apart.
inline __m512 block_scores64(const uint16_t* q, const uint16_t* k, int64_t stride, int64_t n) {
  const __m512bh q0 = (__m512bh)_mm512_loadu_si512(q), q1 = (__m512bh)_mm512_loadu_si512(q + 32);
  __m512 dots[16];
  for (int64_t i = 0; i < 16; ++i) {
    dots[i] = _mm512_setzero_ps();
    if (i < n) {
      const uint16_t* ki = k + i * stride;
      dots[i] = _mm512_dpbf16_ps(dots[i], q0, (__m512bh)_mm512_loadu_si512(ki));
      dots[i] = _mm512_dpbf16_ps(dots[i], q1, (__m512bh)_mm512_loadu_si512(ki + 32));
    }
  }
  return sum_lanes16(dots);
}

// acc[g] (64 floats each, g < count <= 4) += sum over rows i < n of w[g][i] * v_i: each value
// row is widened once for every query head that shares it.
inline void accumulate_block64(const float* const* w, const uint16_t* v, int64_t stride, int64_t n,
                               float* const* acc, int64_t count) {
  __m512 a[4][4];
  for (int64_t g = 0; g < 4; ++g) {
    if (g < count) {
      for (int d = 0; d < 4; ++d) a[g][d] = _mm512_loadu_ps(acc[g] + 16 * d);
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t* row = v + i * stride;
    const __m512 v0 = load16(row), v1 = load16(row + 16), v2 = load16(row + 32), v3 = load16(row + 48);
    for (int64_t g = 0; g < 4; ++g) {
      if (g < count) {
        const __m512 wi = _mm512_set1_ps(w[g][i]);
        a[g][0] = _mm512_fmadd_ps(wi, v0, a[g][0]);
        a[g][1] = _mm512_fmadd_ps(wi, v1, a[g][1]);
        a[g][2] = _mm512_fmadd_ps(wi, v2, a[g][2]);
        a[g][3] = _mm512_fmadd_ps(wi, v3, a[g][3]);
      }
    }
  }
  for (int64_t g = 0; g < 4; ++g) {
    if (g < count) {
      for (int d = 0; d < 4; ++d) _mm512_storeu_ps(acc[g] + 16 * d, a[g][d]);
    }
  }
}
#endif

#ifdef KESTREL_AVX2_ONLY
// head_dim 64 in bf16 on AVX2: queries and accumulators are kept in the order even8 / odd8
// widen a row in, [4 chunks][8 even, 8 odd], and put back in place at the end.


// scores[i] = scale * q . k_i for the n keys of a block, `stride` apart; q in the split order.
inline void block_scores64_avx2(const float* q, const uint16_t* k, int64_t stride, int64_t n, float scale,
                                float* scores) {
  for (int64_t i0 = 0; i0 < n; i0 += 8) {
    __m256 dots[8];
    for (int i = 0; i < 8; ++i) dots[i] = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      const __m256 q_even = _mm256_loadu_ps(q + 16 * j), q_odd = _mm256_loadu_ps(q + 16 * j + 8);
      for (int i = 0; i < 8; ++i) {
        // Past the last key, repeat it (no branch, so the loops unroll); its lanes are not stored.
        const __m256i raw = load_raw16(k + std::min<int64_t>(i0 + i, n - 1) * stride + 16 * j);
        dots[i] = _mm256_fmadd_ps(even8(raw), q_even, dots[i]);
        dots[i] = _mm256_fmadd_ps(odd8(raw), q_odd, dots[i]);
      }
    }
    const __m256 sums = _mm256_mul_ps(sum_lanes8x8(dots), _mm256_set1_ps(scale));
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_maskstore_ps(scores + i0, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - i0)), lanes), sums);
  }
}

// acc (split order) += sum over rows i < n of w[i] * v_i.
inline void accumulate_block64_avx2(const float* w, const uint16_t* v, int64_t stride, int64_t n, float* acc) {
  __m256 a[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm256_loadu_ps(acc + 8 * j);
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t* row = v + i * stride;
    const __m256 wi = _mm256_set1_ps(w[i]);
    for (int j = 0; j < 4; ++j) {
      const __m256i raw = load_raw16(row + 16 * j);
      a[2 * j] = _mm256_fmadd_ps(wi, even8(raw), a[2 * j]);
      a[2 * j + 1] = _mm256_fmadd_ps(wi, odd8(raw), a[2 * j + 1]);
    }
  }
  for (int j = 0; j < 8; ++j) _mm256_storeu_ps(acc + 8 * j, a[j]);
}
#endif

// The first `len` scores of each of `rows` rows, `stride` apart, become their softmax.
inline void softmax_rows(float* scores, int64_t rows, int64_t len, int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = scores + r * stride;
    float mx = -INFINITY, sum = 0.f;
    int64_t start = 0;
#ifdef __AVX2__
    // gcc leaves the max loop scalar, a chain of vmaxss (an eighth of a one-sequence decode's
    // attention on Sapphire Rapids, 300 positions); the max is the same in any order.
    __m256 mx8 = _mm256_set1_ps(-INFINITY);
    for (int64_t p = 0; p + 8 <= len; p += 8) mx8 = _mm256_max_ps(mx8, _mm256_loadu_ps(row + p));
    for (int i = 0; i < 8; ++i) mx = std::max(mx, mx8[i]);
    for (int64_t p = len / 8 * 8; p < len; ++p) mx = std::max(mx, row[p]);
#else
    #pragma omp simd reduction(max : mx)
    for (int64_t p = 0; p < len; ++p) mx = std::max(mx, row[p]);
#endif
#ifdef KESTREL_AVX2_ONLY
    // gcc leaves vexp's loop scalar: it took a third of the attention time.
    __m256 sum8 = _mm256_setzero_ps();
    for (; start + 8 <= len; start += 8) {
      const __m256 e = vexp8(_mm256_sub_ps(_mm256_loadu_ps(row + start), _mm256_set1_ps(mx)));
      _mm256_storeu_ps(row + start, e);
      sum8 = _mm256_add_ps(sum8, e);
    }
    sum = sum_lanes8(sum8);
#endif
    #pragma omp simd reduction(+ : sum)
    for (int64_t p = start; p < len; ++p) {
      row[p] = vexp(row[p] - mx);
      sum += row[p];
    }
    const float inv = 1.f / sum;
    #pragma omp simd
    for (int64_t p = 0; p < len; ++p) row[p] *= inv;
  }
}

// ---- Work items -------------------------------------------------------------------------------

// A work item is a tile of consecutive rows of one sequence, which read each block of keys and
// values once for all of them, with all kv heads (contiguous reads); or one kv head of it when
// there are too few items to keep every thread busy. A tile's scores stay within about 256 KB
// (L2).
struct Item {
  int64_t seq, first_row, num_rows, len;  // len: the context of its last row
};

// The step's items, costliest first: with items handed out one at a time, no thread is left
// with a long one at the end.
std::vector<Item> plan_items(const int64_t* starts, const int64_t* lens, int64_t num_seqs, int64_t num_heads) {
  std::vector<Item> items;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t rows = starts[s + 1] - starts[s], earlier = lens[s] - rows;
    const int64_t tile = std::clamp<int64_t>(64 * 1024 / (num_heads * lens[s]), 1, 16);
    for (int64_t r = 0; r < rows; r += tile) {
      const int64_t n = std::min(tile, rows - r);
      items.push_back({s, r, n, earlier + r + n});
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.len * a.num_rows > b.len * b.num_rows; });
  return items;
}

// A task: one item, or one kv head's share of it (then `split` tasks per item), with everything
// its passes read. They index (query row, query head) pairs r = t * heads + h, t the item's t-th
// query row and h the h-th query head of the task; scores are [rows][len] and accumulators
// [rows][head_dim], float32.
template <typename T>
struct Task {
  const T* q;  // the task's query row 0, head 0
  T* out;  // likewise in the output
  int64_t q_row_stride, q_head_stride, out_row_stride;
  int64_t kv_heads, group, heads;  // kv heads, query heads per kv head, query heads = kv_heads * group
  int64_t rows;  // (query row, query head) pairs: num_rows * heads
  int64_t len;  // positions the task reads: the context of its last row
  int64_t base_len;  // row t sees base_len + t + 1 positions
  int64_t head_dim, block_size, row_stride;
  float scale;
  PagedContext<T> keys, values;  // from the task's first kv head

  const T* q_of(int64_t r) const { return q + (r / heads) * q_row_stride + (r % heads) * q_head_stride; }
  T* out_of(int64_t r) const { return out + (r / heads) * out_row_stride + (r % heads) * head_dim; }
  int64_t len_of(int64_t r) const { return base_len + r / heads + 1; }
  // The keys or values of row r's kv head in a block.
  const T* kv_of(const T* block, int64_t r) const { return block + ((r % heads) / group) * head_dim; }
};

// Whether bf16 rows with head_dim 64 keep queries and accumulators in the split order of
// even8 / odd8: [4 chunks][8 even, 8 odd] (AVX2 without AVX-512).
#ifdef KESTREL_AVX2_ONLY
template <typename T>
constexpr bool kSplitOrder = std::is_same_v<T, uint16_t>;
#else
template <typename T>
constexpr bool kSplitOrder = false;
#endif

// ---- The passes of one task -------------------------------------------------------------------

// Before the scores, where kSplitOrder: every query row widened to float32 in the split order.
template <typename T>
void split_queries(const Task<T>& task, std::vector<float>& q_split) {
#ifdef KESTREL_AVX2_ONLY
  if constexpr (kSplitOrder<T>) {
    q_split.resize(task.rows * 64);
    for (int64_t r = 0; r < task.rows; ++r) {
      for (int j = 0; j < 4; ++j) {
        const __m256i raw = load_raw16(task.q_of(r) + 16 * j);
        _mm256_storeu_ps(q_split.data() + r * 64 + 16 * j, even8(raw));
        _mm256_storeu_ps(q_split.data() + r * 64 + 16 * j + 8, odd8(raw));
      }
    }
  }
#endif
}

// Scores of one query row's heads, rows [r0, r0 + heads), against the first `seen` keys of the
// block that starts at position `first`.
template <typename T>
void score_block(const Task<T>& task, const float* q_split, int64_t r0, int64_t first, const T* block,
                 int64_t seen, float* scores) {
  const int64_t len = task.len, group = task.group, head_dim = task.head_dim;
#ifdef KESTREL_AVX512_BF16
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (head_dim == 64 && task.block_size == 16) {
      for (int64_t r = r0; r < r0 + task.heads; ++r) {
        const __m512 dots = block_scores64(task.q_of(r), task.kv_of(block, r), task.row_stride, seen);
        _mm512_mask_storeu_ps(scores + r * len + first, (__mmask16)((1u << seen) - 1),
                              _mm512_mul_ps(dots, _mm512_set1_ps(task.scale)));
      }
      return;
    }
  }
#endif
#ifdef KESTREL_AVX2_ONLY
  if constexpr (kSplitOrder<T>) {
    if (head_dim == 64) {
      for (int64_t r = r0; r < r0 + task.heads; ++r) {
        block_scores64_avx2(q_split + r * 64, task.kv_of(block, r), task.row_stride, seen, task.scale,
                            scores + r * len + first);
      }
      return;
    }
  }
#endif
  for (int64_t i = 0; i < seen; ++i) {
    for (int64_t h = 0; h < task.kv_heads; ++h) {
      const T* k = block + i * task.row_stride + h * head_dim;
      for (int64_t g = 0; g < group; ++g) {
        const int64_t r = r0 + h * group + g;
        scores[r * len + first + i] = dot(task.q_of(r), k, head_dim) * task.scale;
      }
    }
  }
}

// Pass 1: scores[r][p] = scale * q_r . k_p for each position p < len_of(r), block by block.
template <typename T>
void score_pass(const Task<T>& task, const float* q_split, float* scores) {
  const int64_t width = task.kv_heads * task.head_dim;
  task.keys.for_each_block([&](int64_t first, const T* block, int64_t n) {
    if (first % kTouchWindow == 0) {  // the V pass then finds its rows in L2
      task.keys.touch(first, kTouchWindow, width);
      task.values.touch(first, kTouchWindow, width);
    }
    // Row (t, head) sees the block's first min(n, its context - first) keys.
    for (int64_t r0 = 0; r0 < task.rows; r0 += task.heads) {
      const int64_t seen = std::min(n, task.len_of(r0) - first);
      if (seen > 0) score_block(task, q_split, r0, first, block, seen, scores);
    }
  });
}

// Pass 2: each row's scores become their softmax.
template <typename T>
void softmax_pass(const Task<T>& task, float* scores) {
  for (int64_t r0 = 0; r0 < task.rows; r0 += task.heads) {
    softmax_rows(scores + r0 * task.len, task.heads, task.len_of(r0), task.len);
  }
}

// acc[r] += the first `seen` values of the block that starts at position `first`, weighted by
// row r's softmax, for one query row's heads, rows [r0, r0 + heads).
template <typename T>
void accumulate_block(const Task<T>& task, const float* scores, int64_t r0, int64_t first, const T* block,
                      int64_t seen, float* acc) {
  const int64_t len = task.len, group = task.group, head_dim = task.head_dim;
#ifdef KESTREL_AVX512_BF16
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (head_dim == 64) {
      for (int64_t h = 0; h < task.kv_heads; ++h) {
        for (int64_t g0 = 0; g0 < group; g0 += 4) {  // query heads of this kv head, 4 at a time
          const int64_t count = std::min<int64_t>(4, group - g0);
          const float* w[4];
          float* a[4];
          for (int64_t g = 0; g < count; ++g) {
            w[g] = scores + (r0 + h * group + g0 + g) * len + first;
            a[g] = acc + (r0 + h * group + g0 + g) * head_dim;
          }
          accumulate_block64(w, block + h * head_dim, task.row_stride, seen, a, count);
        }
      }
      return;
    }
  }
#endif
#ifdef KESTREL_AVX2_ONLY
  if constexpr (kSplitOrder<T>) {
    if (head_dim == 64) {
      for (int64_t r = r0; r < r0 + task.heads; ++r) {
        accumulate_block64_avx2(scores + r * len + first, task.kv_of(block, r), task.row_stride, seen, acc + r * 64);
      }
      return;
    }
  }
#endif
  for (int64_t h = 0; h < task.kv_heads; ++h) {
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = r0 + h * group + g;
      accumulate_rows(scores + r * len + first, block + h * head_dim, task.row_stride, seen, head_dim,
                      acc + r * head_dim);
    }
  }
}

// Pass 3: acc[r] = sum over positions p < len_of(r) of softmax[r][p] * v_p, block by block.
template <typename T>
void value_pass(const Task<T>& task, const float* scores, float* acc) {
  task.values.for_each_block([&](int64_t first, const T* block, int64_t n) {
    for (int64_t r0 = 0; r0 < task.rows; r0 += task.heads) {
      const int64_t seen = std::min(n, task.len_of(r0) - first);
      if (seen > 0) accumulate_block(task, scores, r0, first, block, seen, acc);
    }
  });
}

// Pass 4: the accumulators rounded to T into the output, back in place from the split order.
template <typename T>
void store_pass(const Task<T>& task, const float* acc) {
  for (int64_t r = 0; r < task.rows; ++r) {
    T* o = task.out_of(r);
    const float* a = acc + r * task.head_dim;
    if (kSplitOrder<T> && task.head_dim == 64) {  // chunk j: 8 even elements, then 8 odd ones
      for (int64_t d = 0; d < 64; ++d) o[d] = from_f32<T>(a[d / 16 * 16 + (d % 2) * 8 + d % 16 / 2]);
    } else {
      for (int64_t d = 0; d < task.head_dim; ++d) o[d] = from_f32<T>(a[d]);
    }
  }
}

// Attention of every new token of a step (see the top of this file): the tasks spread over the
// threads, each through the passes above.
template <typename T>
void paged_attention_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& block_tables, const at::Tensor& query_starts,
                          const at::Tensor& context_lens, double scale, at::Tensor& out) {
  const int64_t num_seqs = block_tables.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_tables.size(1);
  const int64_t q_row_stride = q.stride(0), q_head_stride = q.stride(1);
  const int64_t row_stride = num_kv_heads * head_dim;
  const T* qp = ptr<T>(q);
  const T* kp = ptr<T>(k_cache);
  const T* vp = ptr<T>(v_cache);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* starts = query_starts.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  T* op = ptr<T>(out);
  const float sc = static_cast<float>(scale);

  const std::vector<Item> items = plan_items(starts, lens, num_seqs, num_heads);
  const int64_t split = static_cast<int64_t>(items.size()) < at::get_num_threads() ? num_kv_heads : 1;
  const int64_t kv_heads = num_kv_heads / split;
  const int64_t num_tasks = static_cast<int64_t>(items.size()) * split;

  #pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> scores, acc, q_split;
    #pragma omp for schedule(dynamic, 1)
    for (int64_t index = 0; index < num_tasks; ++index) {
      const Item& item = items[index / split];
      const int64_t kv_first = (index % split) * kv_heads, first_row = starts[item.seq] + item.first_row;
      const int64_t* table = tables + item.seq * max_blocks;
      const Task<T> task{
          .q = qp + first_row * q_row_stride + kv_first * group * q_head_stride,
          .out = op + (first_row * num_heads + kv_first * group) * head_dim,
          .q_row_stride = q_row_stride,
          .q_head_stride = q_head_stride,
          .out_row_stride = num_heads * head_dim,
          .kv_heads = kv_heads,
          .group = group,
          .heads = kv_heads * group,
          .rows = item.num_rows * kv_heads * group,
          .len = item.len,
          .base_len = item.len - item.num_rows,
          .head_dim = head_dim,
          .block_size = block_size,
          .row_stride = row_stride,
          .scale = sc,
          .keys = {kp + kv_first * head_dim, table, block_size, row_stride, item.len},
          .values = {vp + kv_first * head_dim, table, block_size, row_stride, item.len},
      };
      scores.resize(task.rows * task.len);
      acc.assign(task.rows * head_dim, 0.f);
      if (kSplitOrder<T> && head_dim == 64) split_queries(task, q_split);
      score_pass(task, q_split.data(), scores.data());
      softmax_pass(task, scores.data());
      value_pass(task, scores.data(), acc.data());
      store_pass(task, acc.data());
    }
  }
}

}  // namespace

// The step's sequences against a cache of `num_blocks` blocks: query rows, context lengths and
// block ids in range. The same for every layer, so a stack of layers checks them once.
void check_paged_batch(int64_t num_rows, int64_t num_blocks, int64_t block_size, const at::Tensor& block_tables,
                       const at::Tensor& query_starts, const at::Tensor& context_lens) {
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && query_starts.scalar_type() == at::kLong &&
              context_lens.scalar_type() == at::kLong && block_tables.is_contiguous() &&
              query_starts.is_contiguous() && context_lens.is_contiguous(),
              "block_tables, query_starts and context_lens must be contiguous int64");
  const int64_t num_seqs = block_tables.size(0);
  TORCH_CHECK(query_starts.numel() == num_seqs + 1 && context_lens.numel() == num_seqs,
              "one table and length per sequence, and one more query start");
  const int64_t* starts = query_starts.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t max_blocks = block_tables.size(1);
  TORCH_CHECK(starts[0] == 0 && starts[num_seqs] == num_rows, "query starts must run from 0 to the number of rows");
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t rows = starts[s + 1] - starts[s];
    TORCH_CHECK(rows >= 1 && rows <= lens[s], "sequence ", s, " has ", rows, " query rows and a context of ", lens[s]);
    TORCH_CHECK(lens[s] <= max_blocks * block_size, "context length ", lens[s], " does not fit its block table");
    for (int64_t b = 0; b < (lens[s] + block_size - 1) / block_size; ++b) {
      TORCH_CHECK(tables[s * max_blocks + b] >= 0 && tables[s * max_blocks + b] < num_blocks, "block id outside the cache");
    }
  }
}

// paged_attention for a batch that check_paged_batch has passed for caches shaped like these.
at::Tensor attend_paged(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& query_starts,
                        const at::Tensor& context_lens, double scale) {
  check_cpu_contiguous_rows(q, "q");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q must be [num_rows, num_heads, head_dim], caches 4-d");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0 && q.size(2) == k_cache.size(3), "head shapes do not match");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.sizes() == k_cache.sizes() &&
              v_cache.scalar_type() == k_cache.scalar_type(), "q and both caches must share a dtype and shape");
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  dispatch(q.scalar_type(), "paged_attention", [&](auto raw) {
    using scalar_t = decltype(raw);
    paged_attention_impl<scalar_t>(q, k_cache, v_cache, block_tables, query_starts, context_lens, scale, out);
  });
  return out;
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& query_starts,
                           const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(k_cache.dim() == 4, "caches must be 4-d");
  check_paged_batch(q.size(0), k_cache.size(0), k_cache.size(1), block_tables, query_starts, context_lens);
  return attend_paged(q, k_cache, v_cache, block_tables, query_starts, context_lens, scale);
}

}  // namespace kestrel
