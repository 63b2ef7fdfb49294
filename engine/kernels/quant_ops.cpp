// A linear layer over GGUF quantized weights, kept quantized in memory (about a quarter of the
// bf16 bytes at 4 bits), and the same blocks dequantized by rows for embedding lookups.
//
// quant_linear computes each output as the float32 sum over k of dequant(w[o, k]) * x[r, k],
// plus the bias, rounded once to x's dtype. Weight values are decoded as the gguf package's
// reference does (quant_blocks.h), but for d * q + m in one FMA where a type has an offset
// (within half an ulp; quant_dequantize keeps the reference's bits), then multiplied in float32
// by FMA.
//
// Summation order, the same whatever the batch (an output row never depends on the others, nor
// on the thread count): one accumulator of L::N lanes per (output, row), lane l summing the
// products at k = l, l + N, l + 2N, .. in order of k by FMA, then the lanes added in the fixed
// tree of L::sum (or of L::sum_group, the same tree for many accumulators at once), then the
// bias. Two regimes compute exactly that:
//
//   few rows (decode, M <= kDirectRows): a group of outputs' blocks is decoded in registers and
//     each vector goes straight into the FMAs of every row; each weight byte is read once, and
//     the groups ahead are prefetched.
//   many rows: a group of outputs is decoded once into a float32 scratch panel, which tiles of
//     rows then read, in passes of kPanelColumns columns (the accumulators kept in memory
//     between passes); decoding is amortised over the rows.
//
// Threads split the output groups (parallel.h); every output is summed by one thread.
// tests/engine/test_quant_ops.py checks the bits against gguf and across batches.
//
// With AVX-512 BW and VL, or AVX2, FMA and F16C, quant_pack repacks rows for integer dot
// products into the layout of quant_interleaved.h, which quant_linear then takes as type
// interleaved::kInterleavedBase (2000) + the GGML id: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and
// Q6_K, 16 outputs at a time; x is quantized to 16 bits, and the sum follows that header's order.
// quant_dequantize reads this layout too (an embedding tied to the output projection).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <type_traits>

#include "parallel.h"
#include "quant_blocks.h"
#include "quant_dot.h"
#include "quant_interleaved.h"

namespace {

using namespace kestrel_quant;

// Lanes, and the tile shapes per regime. Many rows: NO x MR accumulators, MR rows of x and
// one weight vector in registers (AVX-512: 28 of 32; measured against 4x6, 6x4 and 12x2 on
// Zen 4, AVX2: 15 of 16, against 3x3, 4x2, 4x3 and 8x2). Few rows: up to 16 accumulators
// next to the decoder's temporaries (AVX-512: 24, for up to 6 rows).
#if defined(__AVX512F__) && defined(__AVX512BW__)
using Lanes = Avx512Lanes;
constexpr int kPanelOutputs = 8, kTileRows = 3;
template <int MR>
constexpr int kDirectOutputs = 4;
constexpr int64_t kDirectRows = 6;  // 5 rows (a decode with 4 draft tokens): 105 us, in panels 142
#elif defined(__AVX2__) && defined(__FMA__)
using Lanes = Avx2Lanes;
constexpr int kPanelOutputs = 6, kTileRows = 2;
template <int MR>
constexpr int kDirectOutputs = MR <= 2 ? 4 : 2;
constexpr int64_t kDirectRows = 4;
#else
using Lanes = ScalarLanes;
constexpr int kPanelOutputs = 2, kTileRows = 2;
template <int MR>
constexpr int kDirectOutputs = 2;
constexpr int64_t kDirectRows = 4;
#endif
using F = Lanes::F;
// Both regimes decode alike (Rounding::kFused: see quant_blocks.h), so a row's result still
// does not depend on the batch; quant_dequantize keeps gguf's rounding.
constexpr Rounding kLinearRounding = Rounding::kFused;

// sums[i] = Lanes::sum(acc[i]) for i < COUNT, to the bit, in groups where that is cheaper.
template <int COUNT>
KQ_INLINE void sum_all(const F* acc, float* sums) {
  constexpr int G = Lanes::kSumGroup;
  // NOTE: every index into acc is a compile-time constant, or gcc keeps acc in memory.
  if constexpr (COUNT * 2 < G) {
    unroll<COUNT>([&](auto i) { sums[i] = Lanes::sum(acc[i]); });
  } else {
    unroll<(COUNT + G - 1) / G>([&](auto g) {
      auto get = [&](auto i) {
        if constexpr (g * G + i < COUNT) return acc[g * G + i];
        else return Lanes::zero();
      };
      if constexpr ((g + 1) * G <= COUNT) {
        Lanes::sum_group(get, sums + g * G);
      } else {
        float out[G];
        Lanes::sum_group(get, out);
        for (int i = 0; i < COUNT - g * G; ++i) sums[g * G + i] = out[i];
      }
    });
  }
}

// ---- Few rows: decode in registers -------------------------------------------------------------

// How far ahead of the weights being read the decode regime prefetches: whole groups, at least
// this many bytes. A group's NO rows lie next to each other and the groups follow each other,
// but each row is a stream of its own, too short for the hardware prefetcher (SmolLM2's: 360
// bytes). Prefetching the groups ahead in address order, a slice per block step, brought cold
// weights from 4-6 GB/s to 8-16 GB/s on one core (prefetching each row ahead of itself did not).
constexpr int64_t kPrefetchBytes = 4096;

// Prefetches base + offset, which may lie past the end of the weights (harmless).
KQ_INLINE void prefetch(const void* base, int64_t offset) {
#if defined(__GNUC__)
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(base) + offset));
#endif
}

// Blocks whose leading half scales (kHalves) direct_group converts at once, for all NO rows.
constexpr int kScaleChunk = 32;

// The kHalves scales of blocks b0 .. b0 + count - 1 of each row, as floats at
// out[(i * NO + o) * kHalves ..] for block b0 + i of row o.
template <typename Q, int NO>
KQ_INLINE void convert_scales(const uint8_t* const* rows, int64_t b0, int count, float* out) {
  constexpr int H = kHalvesOf<Q>, n = kScaleChunk * NO * H;
  alignas(32) uint16_t halves[n];
  for (int i = 0; i < count; ++i)
    for (int o = 0; o < NO; ++o)
      for (int h = 0; h < H; ++h) halves[(i * NO + o) * H + h] = load_u16(rows[o] + (b0 + i) * Q::kBytes + 2 * h);
  const int used = count * NO * H, converted = (used + 7) / 8 * 8;
  for (int i = used; i < converted; ++i) halves[i] = 0;  // converted in passing, never read
  convert_halves(halves, converted, out);
}

// sums[r * NO + o] = the sum for output o (weight row rows[o]) and x row r. Groups of rows are
// contiguous, one after the other (but for a short last group, where prefetching is harmless).
template <typename Q, int NO, int MR>
void direct_group(const uint8_t* const* rows, const float* x, int64_t K, float* sums) {
  F acc[MR * NO];  // [r * NO + o]
  unroll<MR * NO>([&](auto i) { acc[i] = Lanes::zero(); });
  const int64_t blocks = K / Q::kBlock, group_bytes = NO * blocks * Q::kBytes;
  const int64_t ahead = (kPrefetchBytes + group_bytes - 1) / group_bytes * group_bytes;
  auto block_step = [&](int64_t b, auto scales_of) {
    // the bytes of one block step (NO blocks' worth) of a group `ahead` on
    for (int line = 0; line < NO * Q::kBytes; line += 64) prefetch(rows[0], ahead + b * NO * Q::kBytes + line);
    const float* xb = x + b * Q::kBlock;
    unroll<NO>([&](auto o) {
      auto fma_rows = [&](int v, F w) {
        unroll<MR>([&](auto r) { acc[r * NO + o] = Lanes::fma(w, Lanes::loadf(xb + r * K + v * Lanes::N), acc[r * NO + o]); });
      };
      if constexpr (kHalvesOf<Q> > 0) {
        Q::template decode<Lanes, kLinearRounding>(rows[o] + b * Q::kBytes, fma_rows, scales_of(o));
      } else {
        Q::template decode<Lanes, kLinearRounding>(rows[o] + b * Q::kBytes, fma_rows);
      }
    });
  };
  if constexpr (kHalvesOf<Q> > 0) {
    alignas(64) float scales[kScaleChunk * NO * kHalvesOf<Q>];
    for (int64_t b0 = 0; b0 < blocks; b0 += kScaleChunk) {
      const int count = static_cast<int>(std::min<int64_t>(kScaleChunk, blocks - b0));
      convert_scales<Q, NO>(rows, b0, count, scales);
      for (int i = 0; i < count; ++i)
        block_step(b0 + i, [&](int o) { return ConvertedScales<Lanes>{scales + (i * NO + o) * kHalvesOf<Q>}; });
    }
  } else {
    for (int64_t b = 0; b < blocks; ++b) block_step(b, nullptr);
  }
  sum_all<MR * NO>(acc, sums);
}

// ---- Many rows: decode once into a panel -------------------------------------------------------

template <typename Q, Rounding R>
void decode_row(const uint8_t* row, int64_t K, float* dst) {
  for (int64_t b = 0; b < K / Q::kBlock; ++b)
    Q::template decode<Lanes, R>(row + b * Q::kBytes, [&](int v, F w) { Lanes::storef(dst + b * Q::kBlock + v * Lanes::N, w); });
}

// Columns [k0, k1) of the panel ([NO, K] float32) against MR rows of x: the accumulators start
// at zero (first) or from saved ([MR * NO, L::N] floats, as the previous columns left them), and
// end in saved or, after the last columns, summed into sums[r * NO + o]. Saving them in between
// changes no bit.
template <int NO, int MR>
void panel_tile(const float* panel, const float* x, int64_t K, int64_t k0, int64_t k1, float* saved, bool first,
                bool last, float* sums) {
  F acc[MR * NO];  // [r * NO + o]
  unroll<MR * NO>([&](auto i) { acc[i] = first ? Lanes::zero() : Lanes::loadf(saved + i * Lanes::N); });
  for (int64_t k = k0; k < k1; k += Lanes::N) {
    // x in registers, each weight vector loaded once for MR FMAs (NO * MR + MR + 1 registers;
    // opaque() keeps gcc from loading it again as an operand of each FMA, which made the tile
    // bound by loads)
    F xr[MR];
    unroll<MR>([&](auto r) { xr[r] = Lanes::loadf(x + r * K + k); });
    unroll<NO>([&](auto o) {
      const F w = opaque_lanes<Lanes>(Lanes::loadf(panel + o * K + k));
      unroll<MR>([&](auto r) { acc[r * NO + o] = Lanes::fma(w, xr[r], acc[r * NO + o]); });
    });
  }
  if (last) {
    sum_all<MR * NO>(acc, sums);
  } else {
    unroll<MR * NO>([&](auto i) { Lanes::storef(saved + i * Lanes::N, acc[i]); });
  }
}

template <int NO, int MR = kTileRows>
void panel_rows(int64_t rows, const float* panel, const float* x, int64_t K, int64_t k0, int64_t k1, float* saved,
                bool first, bool last, float* sums) {
  if constexpr (MR > 1) {
    if (rows < MR) return panel_rows<NO, MR - 1>(rows, panel, x, K, k0, k1, saved, first, last, sums);
  }
  panel_tile<NO, MR>(panel, x, K, k0, k1, saved, first, last, sums);
}

// ---- Both -----------------------------------------------------------------------------------

// Output groups of NO: the last group's missing outputs repeat its last real one (computed and
// dropped), so that every group runs the same code.
template <int NO>
void group_rows(const uint8_t* w, int64_t row_bytes, int64_t N, int64_t g, const uint8_t** rows) {
  for (int o = 0; o < NO; ++o) rows[o] = w + std::min(g * NO + o, N - 1) * row_bytes;
}

// out[r, o0 + o] = sums[r * NO + o] (+ bias), rounded once to R.
template <int NO, typename R>
void write_sums(const float* sums, int64_t rows, int64_t o0, int64_t N, const float* bias, R* out) {
  const int64_t valid = std::min<int64_t>(NO, N - o0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < valid; ++o) {
      const float s = sums[r * NO + o];
      out[r * N + o0 + o] = static_cast<R>(bias ? s + bias[o0 + o] : s);
    }
}

// Groups per parallel chunk: at least ~64K multiply-adds, below which a thread costs more than
// it saves.
int64_t grain(int64_t group_size, int64_t K, int64_t M) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, group_size * K * M));
}

template <typename Q, int MR, typename R>
void linear_direct(const float* x, int64_t K, const uint8_t* w, int64_t N, const float* bias, R* out) {
  constexpr int NO = kDirectOutputs<MR>;
  const int64_t row_bytes = K / Q::kBlock * Q::kBytes, groups = (N + NO - 1) / NO;
  kestrel::parallel_ranges(groups, grain(NO, K, MR), [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const uint8_t* rows[NO];
      float sums[MR * NO];
      group_rows<NO>(w, row_bytes, N, g, rows);
      direct_group<Q, NO, MR>(rows, x, K, sums);
      write_sums<NO>(sums, MR, g * NO, N, bias, out);
    }
  });
}

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

// count floats on cache lines of their own (count may be 0)
float* aligned_floats(int64_t count) {
  const size_t bytes = (static_cast<size_t>(count) * sizeof(float) + 63) / 64 * 64 + 64;
  float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
  TORCH_CHECK(p, "quant_linear: out of memory");
  return p;
}

// Columns per pass over the rows: the panel's slice (AVX-512: 8 x 512 floats, 16 KB) stays in
// L1 and the rows' slice (64 rows: 128 KB) in L2, where whole rows of Qwen's down projection
// (4864 columns, 1.2 MB at 64 rows) did not fit.
constexpr int64_t kPanelColumns = 512;

template <typename Q, typename R>
void linear_panels(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, const float* bias, R* out) {
  constexpr int NO = kPanelOutputs;
  const int64_t row_bytes = K / Q::kBlock * Q::kBytes, groups = (N + NO - 1) / NO;
  const int64_t tiles = (M + kTileRows - 1) / kTileRows, passes = (K + kPanelColumns - 1) / kPanelColumns;
  kestrel::parallel_ranges(groups, grain(NO, K, M), [&](int64_t begin, int64_t end) {
    // [NO, K] float32, and the accumulators between passes, [tiles, kTileRows * NO, L::N]
    const int64_t saved_floats = passes > 1 ? tiles * kTileRows * NO * Lanes::N : 0;
    std::unique_ptr<float, FreeDeleter> panel(aligned_floats(NO * K)), saved(aligned_floats(saved_floats));
    float sums[kTileRows * NO];
    const int64_t group_bytes = NO * row_bytes, steps = passes * tiles;
    for (int64_t g = begin; g < end; ++g) {
      const uint8_t* rows[NO];
      group_rows<NO>(w, row_bytes, N, g, rows);
      for (int o = 0; o < NO; ++o) decode_row<Q, kLinearRounding>(rows[o], K, panel.get() + o * K);
      for (int64_t p = 0; p < passes; ++p) {
        const int64_t k0 = p * kPanelColumns, k1 = std::min(K, k0 + kPanelColumns);
        for (int64_t t = 0; t < tiles; ++t) {  // tiles of rows as even as can be, none over kTileRows
          const int64_t m0 = t * M / tiles, m1 = (t + 1) * M / tiles, step = p * tiles + t;
          // the next group's weights, a slice per step
          for (int64_t off = step * group_bytes / steps; off < (step + 1) * group_bytes / steps; off += 64)
            prefetch(w, (g + 1) * group_bytes + off);
          const bool last = p == passes - 1;
          panel_rows<NO>(m1 - m0, panel.get(), x + m0 * K, K, k0, k1, saved.get() + t * kTileRows * NO * Lanes::N,
                         p == 0, last, sums);
          if (last) write_sums<NO>(sums, m1 - m0, g * NO, N, bias, out + m0 * N);
        }
      }
    }
  });
}

template <typename Q, typename R>
void linear(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, const float* bias, R* out) {
  switch (M) {
    case 1: return linear_direct<Q, 1>(x, K, w, N, bias, out);
    case 2: return linear_direct<Q, 2>(x, K, w, N, bias, out);
    case 3: return linear_direct<Q, 3>(x, K, w, N, bias, out);
    case 4: return linear_direct<Q, 4>(x, K, w, N, bias, out);
    case 5: if constexpr (kDirectRows >= 6) return linear_direct<Q, 5>(x, K, w, N, bias, out); break;
    case 6: if constexpr (kDirectRows >= 6) return linear_direct<Q, 6>(x, K, w, N, bias, out); break;
  }
  linear_panels<Q>(x, M, K, w, N, bias, out);
}
static_assert(kDirectRows == 4 || kDirectRows == 6, "linear() dispatches rows 1-4 or 1-6 to linear_direct");

// ---- Integer dot products (quant_dot.h) -----------------------------------------------------------

#if defined(KESTREL_QUANT_DOT)
// Outputs per group and rows per tile: NO * MR integer and as many float accumulators, next to
// MR rows of x (AVX-512VL: 29 of 32 vector registers; AVX2: 13 of 16).
#if defined(__AVX512VL__)
constexpr int kDotOutputs = 3, kDotRows = 4;
#else
constexpr int kDotOutputs = 2, kDotRows = 2;
#endif

template <typename Q>
constexpr bool has_dot_units = !std::is_void_v<typename dot::UnitsOf<Q>::type>;

template <typename U, int NO, int MR = kDotRows>
void dot_rows(int64_t rows, const dot::Panel& panel, const dot::QuantizedRows& x, int64_t row0, float* sums) {
  if constexpr (MR > 1) {
    if (rows < MR) return dot_rows<U, NO, MR - 1>(rows, panel, x, row0, sums);
  }
  dot::tile<U, NO, MR>(panel, x, row0, sums);
}

template <typename T>
struct AlignedBuffer {  // count T on cache lines of their own
  std::unique_ptr<float, FreeDeleter> memory;
  explicit AlignedBuffer(int64_t count) : memory(aligned_floats((count * sizeof(T) + 3) / 4)) {}
  T* get() const { return reinterpret_cast<T*>(memory.get()); }
};

template <typename Q, typename R>
void linear_dot(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, const float* bias, R* out) {
  using U = typename dot::UnitsOf<Q>::type;
  constexpr int NO = kDotOutputs, G = U::kGroups;
  const int64_t chunks = (K / 32 + dot::kChunk - 1) / dot::kChunk;
  const int64_t row_bytes = K / Q::kBlock * Q::kBytes, groups = (N + NO - 1) / NO;
  AlignedBuffer<uint8_t> x_bytes(M * chunks * 256);
  AlignedBuffer<float> x_d(M * chunks * dot::kChunk), x_sums(M * chunks * dot::kChunk);
  const dot::QuantizedRows xq{x_bytes.get(), x_d.get(), x_sums.get(), chunks};
  at::parallel_for(0, M, std::max<int64_t>(1, 8192 / K), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) dot::quantize_row(x + r * K, K, xq, r);
  });
  const int64_t group_bytes = NO * row_bytes;
  const int64_t ahead = (kPrefetchBytes + group_bytes - 1) / group_bytes * group_bytes;
  const int64_t tiles = (M + kDotRows - 1) / kDotRows;
  kestrel::parallel_ranges(groups, grain(NO, K, M), [&](int64_t begin, int64_t end) {
    AlignedBuffer<uint8_t> bytes(NO * chunks * 256);
    AlignedBuffer<float> scale(NO * chunks * G * 8), offset(NO * chunks * dot::kChunk);
    AlignedBuffer<int32_t> correct(NO * chunks * G * 8);
    const dot::Panel panel{bytes.get(), scale.get(), correct.get(), offset.get(), chunks};
    float sums[kDotRows * NO];
    for (int64_t g = begin; g < end; ++g) {
      const uint8_t* rows[NO];
      group_rows<NO>(w, row_bytes, N, g, rows);
      for (int o = 0; o < NO; ++o) {
        for (int64_t line = 0; line < row_bytes; line += 64) prefetch(rows[o], ahead + line);
        dot::decode_row<Q, U>(rows[o], K, panel, o);
      }
      for (int64_t t = 0; t < tiles; ++t) {  // tiles of rows as even as can be, none over kDotRows
        const int64_t m0 = t * M / tiles, m1 = (t + 1) * M / tiles;
        dot_rows<U, NO>(m1 - m0, panel, xq, m0, sums);
        write_sums<NO>(sums, m1 - m0, g * NO, N, bias, out + m0 * N);
      }
    }
  });
}
#endif

// ---- Interleaved blocks (quant_interleaved.h) -------------------------------------------------------

#if defined(KESTREL_QUANT_INTERLEAVED)
// Output groups (of 16) per tile and rows per tile, for few rows (up to kFewRows) and many.
// AVX-512: 2 * NB * MR integer and NB * MR float accumulators next to 2 * NB vectors of values
// (NB 2, MR 4: 28 of 32 registers). Q6_K, whose unit halves each have an integer dot, takes NB 2,
// MR 2 at any row count. One or two rows of the 4-bit types take 4 groups (more streams of
// weights in flight), of Q5_0, Q5_1 and Q8_0 one: the linears of one step in model order at one
// row, alternating builds, 4 groups against 1: SmolLM2's Q4_1 3.79 / 3.74 ms against 3.84 / 3.97,
// its Q8_0 head 1.51 / 0.96 against 0.69 / 0.80, Qwen2.5's Q5_0 10.3 / 10.1 against 7.1 / 7.3,
// its Q8_0 5.7 / 6.5 against 4.9 / 5.7.
// AVX2 (a group is two vectors, 16 registers): one group and one row, but for Q8_0's int16
// products (Products::kMadd), whose widened values two rows share. SmolLM2's gate_up (3072 x
// 576), hot, one thread, 16 rows: Q4_1 556-653 us at one row a tile, 733 at two; Q8_0 586 at two,
// 768 at one.
template <typename Q>
struct InterleavedTile {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  static constexpr bool kHalves = interleaved::Layout<Q>::kHalves == 2;
  static constexpr bool kFourBits = std::is_same_v<Q, Q4_0Block> || std::is_same_v<Q, Q4_1Block> || std::is_same_v<Q, Q4_KBlock>;
  static constexpr int kFewRows = 2, kFewGroups = kHalves ? 2 : kFourBits ? 4 : 1;
  static constexpr int kRows = kHalves ? 2 : 4, kGroups = 2;
#else
  static constexpr int kFewRows = 1, kFewGroups = 1;
  static constexpr int kRows = interleaved::Products<Q>::kMadd ? 2 : 1, kGroups = 1;
#endif
};
// Rows per pass over the weights: their x (80 bytes a unit: 128 rows of 1536 columns, 480 KB)
// stays in L2 while every output group meets it.
constexpr int64_t kInterleavedPassRows = 128;

template <typename Q, int NB, int MR>
void interleaved_rows(int64_t rows, const uint8_t* const* groups, int64_t units, const interleaved::XUnit* x,
                      int64_t r0, float* sums) {
  if constexpr (MR > 1) {
    if (rows < MR) return interleaved_rows<Q, NB, MR - 1>(rows, groups, units, x, r0, sums);
  }
  constexpr int NV = NB * interleaved::kParts;  // vectors of outputs
  F acc[NV * MR];
  unroll<NV * MR>([&](auto i) { acc[i] = Lanes::zero(); });
  const interleaved::XUnit* xs[MR];
  unroll<MR>([&](auto r) { xs[r] = x + (r0 + r) * units; });
  interleaved::tile<Q, NB, MR>(groups, units, xs, acc);
  unroll<NV>([&](auto v) { unroll<MR>([&](auto r) { Lanes::storef(sums + r * NB * 16 + v * Lanes::N, acc[v * MR + r]); }); });
}

// out = x @ dequant(w)^T + bias for M rows of x (quantized, xq): tiles of NB output groups (the
// last repeating its last group, computed and dropped) split among the threads, each meeting
// every tile of rows (as even as can be, none over MR) of a pass.
template <typename Q, int NB, int MR, typename R>
void interleaved_tiles(const interleaved::XUnit* xq, int64_t M, int64_t K, const uint8_t* w, int64_t N,
                       const float* bias, R* out) {
  constexpr int64_t NO = NB * interleaved::kOutputs;
  const int64_t units = K / 32, group_bytes = interleaved::Layout<Q>::group_bytes(K);
  const int64_t groups = N / interleaved::kOutputs, tiles = (groups + NB - 1) / NB;
  for (int64_t p0 = 0; p0 < M; p0 += kInterleavedPassRows) {
    const int64_t pass = std::min(kInterleavedPassRows, M - p0), row_tiles = (pass + MR - 1) / MR;
    kestrel::parallel_ranges(tiles, grain(NO, K, pass), [&](int64_t begin, int64_t end) {
      float sums[MR * NO];
      for (int64_t t = begin; t < end; ++t) {
        const uint8_t* tile_groups[NB];
        for (int b = 0; b < NB; ++b) tile_groups[b] = w + std::min(t * NB + b, groups - 1) * group_bytes;
        for (int64_t i = 0; i < row_tiles; ++i) {
          const int64_t m0 = p0 + i * pass / row_tiles, m1 = p0 + (i + 1) * pass / row_tiles;
          interleaved_rows<Q, NB, MR>(m1 - m0, tile_groups, units, xq, m0, sums);
          write_sums<NO>(sums, m1 - m0, t * NO, N, bias, out + m0 * N);
        }
      }
    });
  }
}

// The same for x as floats: its rows quantized to 16 bits first.
template <typename Q, typename R>
void linear_interleaved(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, const float* bias,
                        R* out) {
  const int64_t units = K / 32;
  AlignedBuffer<interleaved::XUnit> xq(M * units);
  kestrel::parallel_ranges(M, std::max<int64_t>(1, 8192 / K), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) interleaved::quantize_row(x + r * K, K, xq.get() + r * units);
  });
  using T = InterleavedTile<Q>;
  if (M <= T::kFewRows) {
    interleaved_tiles<Q, T::kFewGroups, T::kFewRows>(xq.get(), M, K, w, N, bias, out);
  } else {
    interleaved_tiles<Q, T::kGroups, T::kRows>(xq.get(), M, K, w, N, bias, out);
  }
}
#endif

// ---- Checks ---------------------------------------------------------------------------------

struct BlockShape {
  int block, bytes;
  const char* name;
  int64_t packed_row_bytes;  // in quant_interleaved.h's layout (0: as in the file)
  int64_t output_multiple;   // out_features must be a multiple of it
  int64_t row_bytes(int64_t in_features) const {
    return packed_row_bytes > 0 ? packed_row_bytes : in_features / block * bytes;
  }
};

#if defined(KESTREL_QUANT_INTERLEAVED)
// Runs fn(Q{}) where qtype is kInterleavedBase + the id of a block type Q the layout holds;
// false where it is none.
template <typename Fn>
bool with_interleaved_type(int64_t qtype, Fn&& fn) {
  bool known = false;
  if (qtype > interleaved::kInterleavedBase) {
    with_block_type(qtype - interleaved::kInterleavedBase, [&](auto q) {
      if constexpr (interleaved::kInterleavable<decltype(q)>) {
        fn(q);
        known = true;
      }
    });
  }
  return known;
}
#endif

BlockShape block_shape(const char* op, int64_t qtype, int64_t in_features) {
  BlockShape shape{0, 0, nullptr, 0, 1};
#if defined(KESTREL_QUANT_INTERLEAVED)
  const bool is_interleaved = with_interleaved_type(qtype, [&](auto q) {
    using Q = decltype(q);
    shape = {Q::kBlock, Q::kBytes, Q::kName, interleaved::Layout<Q>::group_bytes(in_features) / interleaved::kOutputs,
             interleaved::kOutputs};
  });
  if (is_interleaved) return shape;
#endif
  const bool known = with_block_type(qtype, [&](auto q) {
    using Q = decltype(q);
    shape = {Q::kBlock, Q::kBytes, Q::kName, 0, 1};
  });
  TORCH_CHECK(known, op, ": unsupported qtype ", qtype, " (", ggml_type_name(qtype), "); supported: F32, F16, BF16, ",
              "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K");
  return shape;
}

void check_output_multiple(const char* op, const at::Tensor& blocks, const BlockShape& shape) {
  TORCH_CHECK(blocks.size(0) % shape.output_multiple == 0, op, ": interleaved ", shape.name,
              " weights need out_features a multiple of ", shape.output_multiple, ", got ", blocks.size(0));
}

// Checks blocks against qtype and in_features (row bytes included).
BlockShape check_blocks(const char* op, const at::Tensor& blocks, int64_t qtype, int64_t in_features) {
  const BlockShape shape = block_shape(op, qtype, in_features);
  TORCH_CHECK(blocks.device().is_cpu(), op, ": blocks must be on the CPU");
  TORCH_CHECK(blocks.scalar_type() == at::kByte, op, ": blocks must be uint8, got ", blocks.scalar_type());
  TORCH_CHECK(blocks.dim() == 2, op, ": blocks must be 2-d [out_features, row_bytes], got ", blocks.dim(), "-d");
  TORCH_CHECK(blocks.is_contiguous(), op, ": blocks must be contiguous");
  TORCH_CHECK(in_features > 0 && in_features % shape.block == 0, op, ": in_features ", in_features,
              " is not a positive multiple of ", shape.name, "'s block size ", shape.block);
  check_output_multiple(op, blocks, shape);
  const int64_t row_bytes = shape.row_bytes(in_features);
  TORCH_CHECK(blocks.size(1) == row_bytes, op, ": blocks have ", blocks.size(1), " bytes per row, but ",
              shape.packed_row_bytes > 0 ? "interleaved " : "", shape.name, " with in_features ", in_features, " needs ",
              row_bytes);
  return shape;
}

template <typename Fn>
void with_output_type(at::ScalarType dtype, Fn&& fn) {
  if (dtype == at::kFloat) {
    fn(float{});
  } else {
    fn(c10::BFloat16{});
  }
}

// ---- Ops ------------------------------------------------------------------------------------

// Decode steps' activations (up to this many floats) are widened into a buffer the calling
// thread keeps: torch's own conversion, with its allocation, cost ~2 us a call, 121 calls a
// SmolLM2 step.
constexpr int64_t kReusedFloats = 65536;

// x as float32 (exact): x itself, or its bf16 values widened (by torch past kReusedFloats).
class FloatRows {
 public:
  explicit FloatRows(const at::Tensor& x) {
    if (x.scalar_type() == at::kFloat) {
      data_ = x.data_ptr<float>();
      return;
    }
    const int64_t n = x.numel();
    if (n > kReusedFloats) {
      owned_ = x.to(at::kFloat);
      data_ = owned_.data_ptr<float>();
      return;
    }
    thread_local std::unique_ptr<float[]> reused(new float[kReusedFloats]);
    const uint16_t* in = reinterpret_cast<const uint16_t*>(x.data_ptr());
    for (int64_t i = 0; i < n; ++i) reused[i] = bits_to_f32(static_cast<uint32_t>(in[i]) << 16);
    data_ = reused.get();
  }
  const float* data() const { return data_; }

 private:
  const float* data_ = nullptr;
  at::Tensor owned_;
};

// A linear's checked arguments: x and the bias in float32 (exact), and the output to fill.
struct LinearCall {
  FloatRows x32;      // [rows, in_features]
  int64_t rows, in_features;
  at::Tensor bias32;  // [out_features], or undefined
  at::Tensor out;     // [rows, out_features] in x's dtype
};

LinearCall check_linear(const char* op, const at::Tensor& x, const at::Tensor& blocks, int64_t qtype,
                        int64_t in_features, const c10::optional<at::Tensor>& bias) {
  check_blocks(op, blocks, qtype, in_features);
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, op, ": x must be [rows, in_features=", in_features, "], got ",
              x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  const int64_t N = blocks.size(0);
  LinearCall call{FloatRows(x), x.size(0), x.size(1), {}, {}};
  if (bias) {
    TORCH_CHECK(bias->device().is_cpu(), op, ": bias must be on the CPU");
    TORCH_CHECK(bias->scalar_type() == at::kFloat || bias->scalar_type() == x.scalar_type(), op,
                ": bias must be float32 or x's dtype (", x.scalar_type(), "), got ", bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be [out_features=", N, "], got ", bias->sizes());
    TORCH_CHECK(bias->is_contiguous(), op, ": bias must be contiguous");
    call.bias32 = bias->to(at::kFloat);
  }
  call.out = at::empty({x.size(0), N}, x.options());
  return call;
}

// Runs kernel(Q{}, R{}, x, M, K, w, N, bias, out) for the call's block and output types.
template <typename Kernel>
at::Tensor run_linear(const LinearCall& call, const at::Tensor& blocks, int64_t qtype, Kernel&& kernel) {
  const int64_t M = call.rows, K = call.in_features, N = blocks.size(0);
  if (M == 0 || N == 0) return call.out;
  const float* bp = call.bias32.defined() ? call.bias32.data_ptr<float>() : nullptr;
  with_block_type(qtype, [&](auto q) {
    with_output_type(call.out.scalar_type(), [&](auto r) {
      using R = decltype(r);
      kernel(q, r, call.x32.data(), M, K, blocks.data_ptr<uint8_t>(), N, bp,
             reinterpret_cast<R*>(call.out.data_ptr()));
    });
  });
  return call.out;
}

// out[M, N] = x[M, K] @ dequant(blocks)^T + bias, in x's dtype.
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype, int64_t in_features,
                        const c10::optional<at::Tensor>& bias) {
  const LinearCall call = check_linear("quant_linear", x, blocks, qtype, in_features, bias);
#if defined(KESTREL_QUANT_INTERLEAVED)
  if (qtype > interleaved::kInterleavedBase) {
    return run_linear(call, blocks, qtype - interleaved::kInterleavedBase, [](auto q, auto r, auto&&... args) {
      using Q = decltype(q);
      if constexpr (interleaved::kInterleavable<Q>) linear_interleaved<Q, decltype(r)>(args...);
    });
  }
#endif
  return run_linear(call, blocks, qtype, [](auto q, auto r, auto&&... args) {
    linear<decltype(q), decltype(r)>(args...);
  });
}

#if defined(KESTREL_QUANT_INTERLEAVED)
// blocks (of GGML type qtype - kInterleavedBase) in the layout of quant_interleaved.h, for
// quant_linear.
at::Tensor quant_pack(const at::Tensor& blocks, int64_t qtype, int64_t in_features) {
  constexpr const char* op = "quant_pack";
  constexpr int64_t base = interleaved::kInterleavedBase;
  const bool known = with_interleaved_type(qtype, [](auto) {});
  TORCH_CHECK(known, op, ": no interleaved layout ", qtype, " (", qtype > base ? ggml_type_name(qtype - base) : "unknown",
              "); the layouts: ", base, " + the id of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K or Q6_K");
  check_blocks(op, blocks, qtype - base, in_features);
  const BlockShape shape = block_shape(op, qtype, in_features);
  check_output_multiple(op, blocks, shape);
  const int64_t N = blocks.size(0), row_bytes = blocks.size(1);
  at::Tensor out = at::empty({N, shape.packed_row_bytes}, blocks.options());
  const uint8_t* in = blocks.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  with_interleaved_type(qtype, [&](auto q) {
    using Q = decltype(q);
    at::parallel_for(0, N / interleaved::kOutputs, 4, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const int64_t n = g * interleaved::kOutputs;
        interleaved::Layout<Q>::pack_group(in + n * row_bytes, row_bytes, in_features, o + n * shape.packed_row_bytes);
      }
    });
  });
  return out;
}
#endif

#if defined(KESTREL_QUANT_DOT)
// The same product by integer dot products on x quantized to int8 (quant_dot.h): Q4_0, Q4_1,
// Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K.
at::Tensor quant_dot_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype, int64_t in_features,
                            const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "quant_dot_linear";
  const LinearCall call = check_linear(op, x, blocks, qtype, in_features, bias);
  bool has_units = false;
  with_block_type(qtype, [&](auto q) { has_units = has_dot_units<decltype(q)>; });
  TORCH_CHECK(has_units, op, ": no integer kernel for ", ggml_type_name(qtype),
              "; supported: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K");
  return run_linear(call, blocks, qtype, [](auto q, auto r, auto&&... args) {
    using Q = decltype(q);
    if constexpr (has_dot_units<Q>) linear_dot<Q, decltype(r)>(args...);
  });
}
#endif

// Row `id` of interleaved blocks (rows row_bytes apart) as the file has it, in `file_row`.
template <typename Q>
const uint8_t* unpack_interleaved_row(const uint8_t* blocks, int64_t row_bytes, int64_t id, int64_t K, uint8_t* file_row) {
#if defined(KESTREL_QUANT_INTERLEAVED)
  if constexpr (interleaved::kInterleavable<Q>) {
    const int64_t group = id / interleaved::kOutputs;
    interleaved::Layout<Q>::unpack_row(blocks + group * interleaved::kOutputs * row_bytes,
                                       static_cast<int>(id % interleaved::kOutputs), K, file_row);
  }
#endif
  return file_row;
}

// The rows `row_ids` (all when None) of dequant(blocks), [n, in_features] in `dtype`.
at::Tensor quant_dequantize(const at::Tensor& blocks, int64_t qtype, int64_t in_features,
                            const c10::optional<at::Tensor>& row_ids, at::ScalarType dtype) {
  constexpr const char* op = "quant_dequantize";
  const BlockShape shape = check_blocks(op, blocks, qtype, in_features);
  const bool is_interleaved = shape.output_multiple > 1;  // its rows are given back as the file has them
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, op, ": dtype must be float32 or bfloat16, got ", dtype);
  const int64_t num_rows = blocks.size(0), K = in_features;
  at::Tensor ids;
  if (row_ids) {
    TORCH_CHECK(row_ids->device().is_cpu(), op, ": row_ids must be on the CPU");
    TORCH_CHECK(row_ids->scalar_type() == at::kLong || row_ids->scalar_type() == at::kInt, op,
                ": row_ids must be int64 or int32, got ", row_ids->scalar_type());
    ids = row_ids->reshape(-1).to(at::kLong).contiguous();  // [n]; checked in the loop below
  }
  const int64_t n = row_ids ? ids.numel() : num_rows;
  at::Tensor out = at::empty({n, K}, blocks.options().dtype(dtype));  // [n, in_features]
  if (n == 0) return out;
  const int64_t* idp = row_ids ? ids.data_ptr<int64_t>() : nullptr;
  const int64_t row_bytes = blocks.size(1);
  const uint8_t* wp = blocks.data_ptr<uint8_t>();
#if defined(KESTREL_QUANT_INTERLEAVED)
  const int64_t block_type = is_interleaved ? qtype - interleaved::kInterleavedBase : qtype;
#else
  const int64_t block_type = qtype;
#endif
  with_block_type(block_type, [&](auto q) {
    using Q = decltype(q);
    with_output_type(dtype, [&](auto r) {
      using R = decltype(r);
      R* op_out = reinterpret_cast<R*>(out.data_ptr());
      at::parallel_for(0, n, std::max<int64_t>(1, 16384 / K), [&](int64_t begin, int64_t end) {
        std::unique_ptr<float[]> row32(std::is_same_v<R, float> ? nullptr : new float[K]);
        std::unique_ptr<uint8_t[]> file_row(is_interleaved ? new uint8_t[K / Q::kBlock * Q::kBytes] : nullptr);
        for (int64_t i = begin; i < end; ++i) {
          const int64_t id = idp ? idp[i] : i;
          TORCH_CHECK(id >= 0 && id < num_rows, op, ": row id ", id, " is out of range for ", num_rows, " rows");
          const uint8_t* row = wp + id * row_bytes;
          if (is_interleaved) row = unpack_interleaved_row<Q>(wp, row_bytes, id, K, file_row.get());
          if constexpr (std::is_same_v<R, float>) {
            decode_row<Q, Rounding::kReference>(row, K, op_out + i * K);
          } else {
            decode_row<Q, Rounding::kReference>(row, K, row32.get());
            for (int64_t k = 0; k < K; ++k) op_out[i * K + k] = static_cast<R>(row32[k]);
          }
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kestrel, m) {
  m.def("quant_linear(Tensor x, Tensor blocks, int qtype, int in_features, Tensor? bias) -> Tensor");
  m.def("quant_dequantize(Tensor blocks, int qtype, int in_features, Tensor? row_ids, ScalarType dtype) -> Tensor");
#if defined(KESTREL_QUANT_DOT)
  m.def("quant_dot_linear(Tensor x, Tensor blocks, int qtype, int in_features, Tensor? bias) -> Tensor");
#endif
#if defined(KESTREL_QUANT_INTERLEAVED)
  m.def("quant_pack(Tensor blocks, int qtype, int in_features) -> Tensor");
#endif
}

TORCH_LIBRARY_IMPL(kestrel, CPU, m) {
  m.impl("quant_linear", &quant_linear);
  m.impl("quant_dequantize", &quant_dequantize);
#if defined(KESTREL_QUANT_DOT)
  m.impl("quant_dot_linear", &quant_dot_linear);
#endif
#if defined(KESTREL_QUANT_INTERLEAVED)
  m.impl("quant_pack", &quant_pack);
#endif
}
