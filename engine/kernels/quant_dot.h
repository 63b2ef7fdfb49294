// A linear layer over GGUF blocks by integer dot products, for quant_ops.cpp (CPUs with AVX2,
// FMA and F16C): the activations are quantized to int8, a scale per 32 columns, as llama.cpp
// does, and weights meet them in vpdpbusd (VNNI: 32 multiply-adds per instruction) or
// vpmaddubsw + vpmaddwd (AVX2). This approximates the float kernel: the error it adds is that of
// rounding x to int8, at most half a step d_x / 2 per element (test_quant_ops.py states the bound).
//
// Every weight unit of 32 elements (a Q4_0..Q8_0 block, or a K-quant's sub-block of 32) decodes to
//     w[k] = scale[k / 4] * q[k] + offset          k = 0 .. 31
// with q 32 small integers, scale 8 floats (one per 4 elements: Q6_K's two groups of 16 differ,
// every other type's 8 are equal) and offset one float (the min, or -zero_point * d). With x[k] ~
// d_x * p[k] (p int8, xs = d_x * sum(p)):
//     sum_k w[k] x[k] ~ d_x * sum_groups scale_group * dot(q, p over the group) + offset * xs
//
// Layout: units go in chunks of 8, and a chunk's 8 x 32 bytes are stored transposed by 4-byte
// words (vector i, lane j = bytes 4i .. 4i + 3 of unit j), weights and activations alike. Then 8
// vpdpbusd accumulate the whole integer dot of 8 units at once, one per lane, and the float work
// (convert, scale, add) is done once per 8 units instead of once per unit. vpdpbusd multiplies
// unsigned by signed bytes: activations are stored as p + 128 (unsigned), weights as signed bytes,
// and 128 * sum(q) (computed when decoding) is subtracted again. Where AVX2's vpmaddubsw would
// saturate on that (Q8_0's full int8 range), the signs move from weights to activations instead.
//
// Summation order, the same whatever the batch: per (output, row), one accumulator of 8 lanes,
// lane j adding, chunk after chunk (and group after group within Q6_K's chunks), the exact integer
// dot of unit j times scale * d_x by FMA; the lanes added in a fixed tree; then the offsets' dot
// over the units in order (8 lanes, fixed tree); then the bias.

#pragma once

#include <cstdint>
#include <cstring>

#include "quant_blocks.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KESTREL_QUANT_DOT 1

namespace kestrel_quant {
namespace dot {

// ---- Activations --------------------------------------------------------------------------------

constexpr int kChunk = 8;  // units per chunk

// Transposes 8 x 8 words: v[i] lane j <- v[j] lane i.
KQ_INLINE void transpose_words(__m256i v[8]) {
  __m256i t[8], u[8];
  for (int k = 0; k < 4; ++k) {
    t[2 * k] = _mm256_unpacklo_epi32(v[2 * k], v[2 * k + 1]);
    t[2 * k + 1] = _mm256_unpackhi_epi32(v[2 * k], v[2 * k + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // rows 4h .. 4h + 3: words 0-3 of each 128-bit half
    u[4 * h + 0] = _mm256_unpacklo_epi64(t[4 * h], t[4 * h + 2]);
    u[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h], t[4 * h + 2]);
    u[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
    u[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_permute2x128_si256(u[i], u[4 + i], 0x20);
    v[4 + i] = _mm256_permute2x128_si256(u[i], u[4 + i], 0x31);
  }
}

// Rows of x quantized, per row `chunks` chunks: bytes [chunks, 8, 32] (p + 128, transposed), and
// per unit d_x and xs = d_x * sum(p) (zero for the padding past K).
struct QuantizedRows {
  uint8_t* bytes;  // [M, chunks * 256]
  float* d;        // [M, chunks * 8]
  float* sums;     // [M, chunks * 8]
  int64_t chunks;
};

// 32 floats quantized: bytes p (in order), d and sum(p).
struct QuantizedUnit {
  __m256i bytes;
  float d;
  int sum;
};

// Quantizes 32 floats: d = max|x| / 127, p = x * (127 / max|x|) rounded to nearest even.
KQ_INLINE QuantizedUnit quantize_unit(const float* x) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4], amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  const float max_abs = _mm_cvtss_f32(m);
  const __m256 inverse = _mm256_set1_ps(max_abs > 0.0f ? 127.0f / max_abs : 0.0f);
  __m256i q[4];
  for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse));  // |q| <= 127
  // sum(p), exact in int32
  const __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  // int32 -> int8 in order: the packs work per 128-bit half, the permute puts the words back
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  return {_mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)), max_abs / 127.0f,
          _mm_cvtsi128_si32(t)};
}

// Row r of x ([K] floats, K a multiple of 32) into chunk layout.
KQ_INLINE void quantize_row(const float* x, int64_t K, const QuantizedRows& rows, int64_t r) {
  const int64_t units = K / 32;
  for (int64_t c = 0; c < rows.chunks; ++c) {
    __m256i v[kChunk];
    float* d = rows.d + (r * rows.chunks + c) * kChunk;
    float* sums = rows.sums + (r * rows.chunks + c) * kChunk;
    for (int j = 0; j < kChunk; ++j) {
      const int64_t unit = c * kChunk + j;
      if (unit < units) {
        const QuantizedUnit q = quantize_unit(x + unit * 32);
        v[j] = q.bytes;
        d[j] = q.d;
        sums[j] = q.d * static_cast<float>(q.sum);
      } else {
        v[j] = _mm256_setzero_si256();
        d[j] = sums[j] = 0.0f;
      }
    }
    transpose_words(v);
    uint8_t* out = rows.bytes + (r * rows.chunks + c) * kChunk * 32;
    for (int i = 0; i < kChunk; ++i)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32 * i), _mm256_xor_si256(v[i], _mm256_set1_epi8(-128)));
  }
}

// ---- Weight units -------------------------------------------------------------------------------
//
// A block type's units(block, q, scale, offset) writes its kBlock / 32 units: q 32 signed bytes
// each, scale 8 floats each, offset one float each. Traits: kGroups, the scales per unit (2:
// lanes 0-3 and 4-7 differ); kFullRange, q may reach -128 (else |q| <= 32); kHasOffset.
struct UnitTraits {
  static constexpr int kGroups = 1;
  static constexpr bool kFullRange = false, kHasOffset = true;
};

KQ_INLINE __m256i nibble_units(const uint8_t* qs16) {  // 16 bytes -> low nibbles, then high ones
  const __m128i raw = _mm_loadu_si128(as<__m128i>(qs16));
  const __m128i mask = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
}

// 0x10 in byte i where bit i of bits is set.
KQ_INLINE __m256i fifth_bits(uint32_t bits) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  return _mm256_maskz_mov_epi8(static_cast<__mmask32>(bits), _mm256_set1_epi8(0x10));
#else
  // byte i gets byte i / 8 of bits, then tests its bit i % 8
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)),
                                             _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                                              2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
#endif
}

KQ_INLINE void store_unit(uint8_t* q, float* scale, float* offset, __m256i values, float d, float off) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), values);
  _mm256_storeu_ps(scale, _mm256_set1_ps(d));
  *offset = off;
}

struct Q4_0Units : UnitTraits {
  static KQ_INLINE void units(const uint8_t* b, uint8_t* q, float* scale, float* offset) {
    const float d = load_half(b);
    store_unit(q, scale, offset, nibble_units(b + 2), d, -8.0f * d);
  }
};

struct Q4_1Units : UnitTraits {
  static KQ_INLINE void units(const uint8_t* b, uint8_t* q, float* scale, float* offset) {
    store_unit(q, scale, offset, nibble_units(b + 4), load_half(b), load_half(b + 2));
  }
};

struct Q5_0Units : UnitTraits {
  static KQ_INLINE void units(const uint8_t* b, uint8_t* q, float* scale, float* offset) {
    const float d = load_half(b);
    store_unit(q, scale, offset, _mm256_or_si256(nibble_units(b + 6), fifth_bits(load_u32(b + 2))), d, -16.0f * d);
  }
};

struct Q5_1Units : UnitTraits {
  static KQ_INLINE void units(const uint8_t* b, uint8_t* q, float* scale, float* offset) {
    const __m256i values = _mm256_or_si256(nibble_units(b + 8), fifth_bits(load_u32(b + 4)));
    store_unit(q, scale, offset, values, load_half(b), load_half(b + 2));
  }
};

struct Q8_0Units : UnitTraits {
  static constexpr bool kFullRange = true, kHasOffset = false;
  static KQ_INLINE void units(const uint8_t* b, uint8_t* q, float* scale, float* offset) {
    store_unit(q, scale, offset, _mm256_loadu_si256(as<__m256i>(b + 2)), load_half(b), 0.0f);
  }
};

// Q4_K / Q5_K: sub-block j is qs[(j / 2) * 32 ..][low nibbles for even j, high for odd j], with
// (Q5_K) bit j of qh[0 .. 31] as bit 4; w = d * sc_j * q - dmin * m_j.
template <bool kFifthBit>
struct KQuant45Units : UnitTraits {
  static KQ_INLINE void units(const uint8_t* b, uint8_t* q, float* scale, float* offset) {
    const float d = load_half(b), dmin = load_half(b + 2);
    const uint8_t* scales = b + 4;
    const uint8_t* qh = b + 16;
    const uint8_t* qs = b + (kFifthBit ? 48 : 16);
    const __m256i mask = _mm256_set1_epi8(0x0F);
    for (int j = 0; j < 8; ++j) {
      int sc, mn;
      k4_scale_min(scales, j, sc, mn);
      const __m256i raw = _mm256_loadu_si256(as<__m256i>(qs + (j / 2) * 32));
      __m256i values = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(raw, 4) : raw, mask);
      if constexpr (kFifthBit) {
        // bit j of each byte to bit 4 (16-bit shifts: the mask drops what crosses bytes)
        const __m256i high = _mm256_slli_epi16(_mm256_srli_epi16(_mm256_loadu_si256(as<__m256i>(qh)), j), 4);
        values = _mm256_or_si256(values, _mm256_and_si256(high, _mm256_set1_epi8(0x10)));
      }
      store_unit(q + 32 * j, scale + 8 * j, offset + j, values, d * static_cast<float>(sc),
                 -(dmin * static_cast<float>(mn)));
    }
  }
};

// Q6_K: sub-block j of 32 = half h = j / 4, part t = j % 4: low 4 bits from
// ql[64h + 32 (t % 2) ..] >> 4 (t / 2), high 2 from qh[32h ..] >> 2t; q - 32, signed. Its two
// groups of 16 have scales of their own (lanes 0-3 and 4-7).
struct Q6_KUnits : UnitTraits {
  static constexpr int kGroups = 2;
  static constexpr bool kHasOffset = false;
  static KQ_INLINE void units(const uint8_t* b, uint8_t* q, float* scale, float* offset) {
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
    const float d = load_half(b + 208);
    const __m256i low_mask = _mm256_set1_epi8(0x0F), crumb_mask = _mm256_set1_epi8(0x03), bias = _mm256_set1_epi8(32);
    for (int j = 0; j < 8; ++j) {
      const int h = j / 4, t = j % 4;
      const __m256i low_raw = _mm256_loadu_si256(as<__m256i>(ql + 64 * h + 32 * (t % 2)));
      const __m256i low = _mm256_and_si256(t / 2 ? _mm256_srli_epi16(low_raw, 4) : low_raw, low_mask);
      const __m256i high_raw = _mm256_loadu_si256(as<__m256i>(qh + 32 * h));
      const __m256i high = _mm256_and_si256(_mm256_srli_epi16(high_raw, 2 * t), crumb_mask);
      const __m256i values = _mm256_sub_epi8(_mm256_or_si256(low, _mm256_slli_epi16(high, 4)), bias);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * j), values);
      const __m128 first = _mm_set1_ps(d * static_cast<float>(scales[2 * j]));
      const __m128 second = _mm_set1_ps(d * static_cast<float>(scales[2 * j + 1]));
      _mm256_storeu_ps(scale + 8 * j, _mm256_set_m128(second, first));
      offset[j] = 0.0f;
    }
  }
};

// The units decoder of a block type, if it has one.
template <typename Q>
struct UnitsOf {
  using type = void;
};
template <> struct UnitsOf<Q4_0Block> { using type = Q4_0Units; };
template <> struct UnitsOf<Q4_1Block> { using type = Q4_1Units; };
template <> struct UnitsOf<Q5_0Block> { using type = Q5_0Units; };
template <> struct UnitsOf<Q5_1Block> { using type = Q5_1Units; };
template <> struct UnitsOf<Q8_0Block> { using type = Q8_0Units; };
template <> struct UnitsOf<Q4_KBlock> { using type = KQuant45Units<false>; };
template <> struct UnitsOf<Q5_KBlock> { using type = KQuant45Units<true>; };
template <> struct UnitsOf<Q6_KBlock> { using type = Q6_KUnits; };

// ---- Products -----------------------------------------------------------------------------------

// s + the sums of 4 products u[4l + i] * v[4l + i] in lane l (u unsigned, v signed bytes; AVX2's
// int16 pair sums never saturate where it is used: see kFullRange).
KQ_INLINE __m256i dot_add(__m256i s, __m256i u, __m256i v) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(s, u, v);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(s, u, v);
#else
  return _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(u, v), _mm256_set1_epi16(1)));
#endif
}

#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
constexpr bool kSaturates = false;
#else
constexpr bool kSaturates = true;  // vpmaddubsw: each pair of products must fit int16
#endif

// Fixed order: halves of 4, then 2, 1.
KQ_INLINE float sum8(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// sum over u < n (a multiple of 8) of a[u] * b[u]: lanes of 8 by FMA, then the fixed tree.
KQ_INLINE float dot_floats(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t u = 0; u < n; u += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + u), _mm256_loadu_ps(b + u), acc);
  return sum8(acc);
}

// A group of NO weight rows in chunk layout: per output and chunk, bytes [8, 32] (q, transposed),
// and per group of words (U::kGroups) 8 scales and 8 corrections (128 * sum(q) over the group's
// bytes, in int32); offsets per unit.
struct Panel {
  uint8_t* bytes;    // [NO, chunks, 256]
  float* scale;      // [NO, chunks, groups, 8]
  int32_t* correct;  // [NO, chunks, groups, 8]
  float* offset;     // [NO, chunks * 8]
  int64_t chunks;
};

// Decodes one weight row's units into output o of the panel. Q is the block type, U its units.
template <typename Q, typename U>
KQ_INLINE void decode_row(const uint8_t* row, int64_t K, const Panel& panel, int o) {
  constexpr int G = U::kGroups, per_block = Q::kBlock / 32;
  const int64_t units = K / 32;
  alignas(32) uint8_t q[kChunk * 32];
  alignas(32) float scale[kChunk * 8];
  for (int64_t c = 0; c < panel.chunks; ++c) {
    float* offset = panel.offset + (o * panel.chunks + c) * kChunk;
    for (int j = 0; j < kChunk; j += per_block) {
      const int64_t unit = c * kChunk + j;
      if (unit < units) {
        U::units(row + unit / per_block * Q::kBytes, q + 32 * j, scale + 8 * j, offset + j);
      } else {
        std::memset(q + 32 * j, 0, 32 * per_block);
        std::memset(scale + 8 * j, 0, sizeof(float) * 8 * per_block);
        for (int k = 0; k < per_block; ++k) offset[j + k] = 0.0f;
      }
    }
    __m256i v[kChunk];
    for (int j = 0; j < kChunk; ++j) v[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(q + 32 * j));
    transpose_words(v);
    const int64_t at = o * panel.chunks + c;
    for (int i = 0; i < kChunk; ++i)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(panel.bytes + at * 256 + 32 * i), v[i]);
    for (int g = 0; g < G; ++g) {
      __m256i sum = _mm256_setzero_si256();  // sum(q) of each unit over the group's words
      for (int i = g * kChunk / G; i < (g + 1) * kChunk / G; ++i)
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), v[i]),
                                                      _mm256_set1_epi16(1)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(panel.correct + (at * G + g) * 8), _mm256_slli_epi32(sum, 7));
      for (int j = 0; j < kChunk; ++j) panel.scale[(at * G + g) * 8 + j] = scale[8 * j + 4 * g];
    }
  }
}

// sums[r * NO + o] for MR rows of x (from row0) against the panel's NO outputs.
template <typename U, int NO, int MR>
KQ_INLINE void tile(const Panel& panel, const QuantizedRows& x, int64_t row0, float* sums) {
  constexpr int G = U::kGroups;
  constexpr bool kSignTrick = kSaturates && U::kFullRange;  // signs to x: |w| * sign(p, w)
  const int64_t chunks = panel.chunks;
  __m256 acc[NO * MR];
  unroll<NO * MR>([&](auto i) { acc[i] = _mm256_setzero_ps(); });
  for (int64_t c = 0; c < chunks; ++c) {
    for (int g = 0; g < G; ++g) {
      __m256i s[NO * MR];
      unroll<NO * MR>([&](auto i) { s[i] = _mm256_setzero_si256(); });
      for (int i = g * kChunk / G; i < (g + 1) * kChunk / G; ++i) {
        __m256i xv[MR];
        unroll<MR>([&](auto r) {
          xv[r] = _mm256_loadu_si256(as<__m256i>(x.bytes + ((row0 + r) * chunks + c) * 256 + 32 * i));
          if constexpr (kSignTrick) xv[r] = _mm256_xor_si256(xv[r], _mm256_set1_epi8(-128));  // p
        });
        unroll<NO>([&](auto o) {
          const __m256i w = _mm256_loadu_si256(as<__m256i>(panel.bytes + (o * chunks + c) * 256 + 32 * i));
          if constexpr (kSignTrick) {
            const __m256i magnitude = _mm256_sign_epi8(w, w);
            unroll<MR>([&](auto r) { s[o * MR + r] = dot_add(s[o * MR + r], magnitude, _mm256_sign_epi8(xv[r], w)); });
          } else {
            unroll<MR>([&](auto r) { s[o * MR + r] = dot_add(s[o * MR + r], xv[r], w); });
          }
        });
      }
      unroll<NO>([&](auto o) {
        const int64_t at = (o * chunks + c) * G + g;
        const __m256 scale = _mm256_loadu_ps(panel.scale + at * 8);
        const __m256i correct = _mm256_loadu_si256(as<__m256i>(panel.correct + at * 8));
        unroll<MR>([&](auto r) {
          const __m256 step = _mm256_mul_ps(scale, _mm256_loadu_ps(x.d + ((row0 + r) * chunks + c) * kChunk));
          const __m256i dot = kSignTrick ? s[o * MR + r] : _mm256_sub_epi32(s[o * MR + r], correct);
          acc[o * MR + r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), step, acc[o * MR + r]);
        });
      });
    }
  }
  unroll<NO>([&](auto o) {
    unroll<MR>([&](auto r) {
      float total = sum8(acc[o * MR + r]);
      if constexpr (U::kHasOffset)
        total += dot_floats(panel.offset + o * chunks * kChunk, x.sums + (row0 + r) * chunks * kChunk, chunks * kChunk);
      sums[r * NO + o] = total;
    });
  });
}

}  // namespace dot
}  // namespace kestrel_quant

#endif  // KESTREL_QUANT_DOT
