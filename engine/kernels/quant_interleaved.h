// The 4-bit blocks without a fifth bit (Q4_0, Q4_1) interleaved 16 outputs at a time, and the
// linear over them on 16-bit activations, for quant_ops.cpp (CPUs with AVX-512 BW and VL).
//
// Why. The float kernel is bound by compute at one row (SmolLM2's Q4_1 linears read their
// weights at ~14 GB/s on a core, while the memory gives 24), and int8 activations, as llama.cpp
// and quant_packed.h have them, cost SmolLM2 a third of its greedy agreement with bf16 (60.1 ->
// 40.6%, benchmarks/quality.py). Here x is quantized per 32 elements to 16 bits in two signed
// bytes, p = 256 hi + lo with |p| <= 32512, d_x = max|x| / 32512 (rounding error ~1/65000 of a
// unit's largest value; perplexity 22.954 float, 22.956 here), and every product still goes
// through vpdpbusd: a unit's integer dot is
//     I = 256 sum_k q_k hi_k + sum_k q_k lo_k - offset sum_k p_k
// exact in int32, and exact as a float too (|I| < 2^24).
//
// Layout. Outputs in groups of 16 (out_features must be a multiple of 16); a group holds its
// units (32 input columns each) one after another, each as the 16 outputs' blocks interleaved:
//     words[4][16]   uint32: words[i][o] = bytes 4i .. 4i + 3 of output o's qs (two nibbles each)
//     d[16]          the outputs' half scales
//     m[16]          (Q4_1) their half minimums
// the same bytes as the file's 16 blocks. One vector of words yields, per lane o, elements
// 4i .. 4i + 3 (low nibbles) and 16 + 4i .. 16 + 4i + 3 (high nibbles) of output o, which meet
// 4 bytes of x broadcast to every lane: the lanes are 16 outputs, and nothing is summed across
// lanes.
//
// Summation order, the same whatever the batch, the tile and the thread count: per (output, row),
// one float accumulator, from zero, adding unit after unit by FMA
//     float(I) * (d * d_x)             where w = d (q - 8) (Q4_0), or where w = d q + m (Q4_1)
//     then m * (d_x * float(sum_k p_k))
// then the bias.

#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "quant_blocks.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define KESTREL_QUANT_INTERLEAVED 1

#include <immintrin.h>

namespace kestrel_quant {
namespace interleaved {

constexpr int kOutputs = 16;               // outputs per group: the lanes of a vector
constexpr int64_t kInterleavedBase = 2000;  // the layout's type id: this + the GGML id

template <typename Q>
constexpr bool kInterleavable = std::is_same_v<Q, Q4_0Block> || std::is_same_v<Q, Q4_1Block>;

template <typename Q>
struct Unit {
  static constexpr bool kMin = std::is_same_v<Q, Q4_1Block>;
  static constexpr int kQs = Q::kBytes - 16;    // where a block's nibbles start
  static constexpr int64_t kBytes = kOutputs * Q::kBytes;
  static constexpr int kD = 256, kM = 256 + 32;  // where the unit's scales and minimums start
};

// Output group g's 16 rows of blocks (row_bytes apart) into the layout at out.
template <typename Q>
void pack_group(const uint8_t* rows, int64_t row_bytes, int64_t units, uint8_t* out) {
  using U = Unit<Q>;
  for (int64_t u = 0; u < units; ++u, out += U::kBytes) {
    for (int o = 0; o < kOutputs; ++o) {
      const uint8_t* block = rows + o * row_bytes + u * Q::kBytes;
      for (int i = 0; i < 4; ++i) std::memcpy(out + 4 * (kOutputs * i + o), block + U::kQs + 4 * i, 4);
      std::memcpy(out + U::kD + 2 * o, block, 2);
      if constexpr (U::kMin) std::memcpy(out + U::kM + 2 * o, block + 2, 2);
    }
  }
}

// ---- Activations --------------------------------------------------------------------------------

// One unit of a row of x: its 16-bit values' two digits in element order, d_x, d_x * sum(p) and
// -sum(p).
struct alignas(16) XUnit {
  int8_t hi[32], lo[32];
  float d, d_sum;
  int32_t minus_sum;
};

KQ_INLINE __m256i to_bytes(__m512i a, __m512i b) {  // 32 int32 in [-128, 127] to bytes, in order
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm512_cvtepi32_epi8(a)), _mm512_cvtepi32_epi8(b), 1);
}

// Row x ([K] floats, K a multiple of 32) into its units.
inline void quantize_row(const float* x, int64_t K, XUnit* out) {
  for (int64_t u = 0; u < K / 32; ++u) {
    const __m512 v0 = _mm512_loadu_ps(x + 32 * u), v1 = _mm512_loadu_ps(x + 32 * u + 16);
    const float max_abs = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const __m512 inverse = _mm512_set1_ps(max_abs > 0.0f ? 32512.0f / max_abs : 0.0f);
    const __m512i p0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inverse));  // |p| <= 32512, to nearest even
    const __m512i p1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inverse));
    // hi = round(p / 256) in [-127, 127], lo = p - 256 hi in [-128, 127]
    const __m512i h0 = _mm512_srai_epi32(_mm512_add_epi32(p0, _mm512_set1_epi32(128)), 8);
    const __m512i h1 = _mm512_srai_epi32(_mm512_add_epi32(p1, _mm512_set1_epi32(128)), 8);
    const __m512i l0 = _mm512_sub_epi32(p0, _mm512_slli_epi32(h0, 8));
    const __m512i l1 = _mm512_sub_epi32(p1, _mm512_slli_epi32(h1, 8));
    XUnit& unit = out[u];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(unit.hi), to_bytes(h0, h1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(unit.lo), to_bytes(l0, l1));
    const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(p0, p1));  // exact
    unit.d = max_abs / 32512.0f;
    unit.d_sum = unit.d * static_cast<float>(sum);
    unit.minus_sum = -sum;
  }
}

// ---- The linear ---------------------------------------------------------------------------------

KQ_INLINE __m512i broadcast4(const int8_t* p) {  // 4 bytes at p in every lane
  int32_t word;
  std::memcpy(&word, p, 4);
  return _mm512_set1_epi32(word);
}

// acc + per lane the dot of 4 unsigned bytes of u with 4 signed bytes of v
KQ_INLINE __m512i dot4(__m512i acc, __m512i u, __m512i v) {
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(acc, u, v);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, v), _mm512_set1_epi16(1)));
#endif
}

// acc[b * MR + r] += the sums over `units` units of output groups `groups[b]` against rows x[r]
// (each a row's first unit), in the order above.
template <typename Q, int NB, int MR>
void tile(const uint8_t* const* groups, int64_t units, const XUnit* const* x, __m512* acc) {
  using U = Unit<Q>;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int64_t u = 0; u < units; ++u) {
    __m512i hi[NB * MR], lo[NB * MR];  // the digits' dots, [b * MR + r]
    unroll<MR>([&](auto r) KQ_INLINE_LAMBDA {
      __m512i base = _mm512_setzero_si512();  // -offset * sum(p): the offset of Q4_0 is 8
      if constexpr (!U::kMin) base = _mm512_slli_epi32(_mm512_set1_epi32(x[r][u].minus_sum), 3);
      unroll<NB>([&](auto b) KQ_INLINE_LAMBDA {
        hi[b * MR + r] = _mm512_setzero_si512();
        lo[b * MR + r] = base;
      });
    });
    unroll<4>([&](auto i) KQ_INLINE_LAMBDA {
      __m512i low[NB], high[NB];
      unroll<NB>([&](auto b) KQ_INLINE_LAMBDA {
        const __m512i words = _mm512_loadu_si512(groups[b] + u * U::kBytes + 64 * i);
        low[b] = _mm512_and_si512(words, nibble);
        high[b] = _mm512_and_si512(_mm512_srli_epi16(words, 4), nibble);
      });
      unroll<MR>([&](auto r) KQ_INLINE_LAMBDA {
        const XUnit& xu = x[r][u];
        const __m512i hl = broadcast4(xu.hi + 4 * i), hh = broadcast4(xu.hi + 16 + 4 * i);
        const __m512i ll = broadcast4(xu.lo + 4 * i), lh = broadcast4(xu.lo + 16 + 4 * i);
        unroll<NB>([&](auto b) KQ_INLINE_LAMBDA {
          hi[b * MR + r] = dot4(dot4(hi[b * MR + r], low[b], hl), high[b], hh);
          lo[b * MR + r] = dot4(dot4(lo[b * MR + r], low[b], ll), high[b], lh);
        });
      });
    });
    unroll<NB>([&](auto b) KQ_INLINE_LAMBDA {
      const uint8_t* unit = groups[b] + u * U::kBytes;
      const __m512 d_w = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(unit + U::kD)));
      __m512 m_w;
      if constexpr (U::kMin) m_w = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(unit + U::kM)));
      unroll<MR>([&](auto r) KQ_INLINE_LAMBDA {
        const XUnit& xu = x[r][u];
        const __m512i dot = _mm512_add_epi32(lo[b * MR + r], _mm512_slli_epi32(hi[b * MR + r], 8));
        __m512& a = acc[b * MR + r];
        a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d_w, _mm512_set1_ps(xu.d)), a);
        if constexpr (U::kMin) a = _mm512_fmadd_ps(m_w, _mm512_set1_ps(xu.d_sum), a);
      });
    });
  }
}

}  // namespace interleaved
}  // namespace kestrel_quant
#endif  // KESTREL_QUANT_INTERLEAVED
