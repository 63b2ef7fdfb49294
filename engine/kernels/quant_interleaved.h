// Blocks of 4-bit (Q4_0, Q4_1, Q4_K), 5-bit (Q5_0, Q5_1), 6-bit (Q6_K) and 8-bit values (Q8_0)
// interleaved 16 outputs at a time, and the linear over them on 16-bit activations, for
// quant_ops.cpp (CPUs with AVX-512 BW and VL, or AVX2, FMA and F16C).
//
// Why. The float kernels are bound by compute at one row (SmolLM2's Q4_1 linears read their
// weights at 11-16 GB/s on two cores, Qwen2.5's Q4_K and Q6_K ones at 13-16, where the memory
// gives 30), and int8 activations, as llama.cpp and quant_dot.h have them, cost SmolLM2 a
// third of its greedy agreement with bf16 (60.1 -> 40.6%, benchmarks/quality.py). Here x is
// quantized per 32 elements to 16 bits in two signed bytes, p = 256 hi + lo with |p| <= 32512,
// d_x = max|x| / 32512 (rounding error ~1/65000 of a unit's largest value; perplexity 22.954
// float, 22.956 here), and every product still goes through an integer dot of 4 bytes (vpdpbusd,
// or vpmaddubsw + vpmaddwd): a unit's integer dot is
//     I = 256 sum_k q_k hi_k + sum_k q_k lo_k - offset sum_k p_k
// exact in int32, and exact as a float too (|I| < 2^24; Q6_K has one per half unit: 16 * 32 * 32512)
// but for Q8_0's and Q5_1's (up to 127 or 31 times 32 * 32512, rounded once to the nearest float).
//
// Layout. Outputs in groups of 16 (out_features must be a multiple of 16); a group holds its
// units (32 input columns each) one after another, each unit's values as the 16 outputs' bytes
// interleaved by words:
//     words[i][16]   uint32: words[i][o] = bytes 4i .. 4i + 3 of output o's values (4 words of
//                    two nibbles a byte for the 4- and 5-bit types and Q6_K's low bits, 8 for Q8_0)
// then the fifth or top bits and the scales (Layout below: the file's bytes, but for Q4_K's 4
// more a row per 256 columns). Loaded as vectors (one for the 16 outputs with AVX-512, two with
// AVX2), they yield per lane o elements 4i .. 4i + 3 and 16 + 4i .. 16 + 4i + 3 of output o
// (unit_values), which meet 4 bytes of x broadcast to every lane: the lanes are outputs, and
// nothing is summed across lanes.
//
// Summation order, the same whatever the batch, the tile, the thread count and the vector width:
// per (output, row), one float accumulator, from zero, adding unit after unit (Q6_K: half unit
// after half unit) by FMA
//     float(I) * (d * d_x)     where w = d q + m (Q4_1, Q5_1, Q4_K), or w = d (q - offset) (the others)
//     then m * (d_x * float(sum_k p_k))
// then the bias.

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "quant_blocks.h"

#if (defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)) || \
    (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#define KESTREL_QUANT_INTERLEAVED 1

#include <immintrin.h>

namespace kestrel_quant {
namespace interleaved {

constexpr int kOutputs = 16;                // outputs per group
constexpr int64_t kInterleavedBase = 2000;  // the layout's type id: this + the GGML id

template <typename Q>
constexpr bool kBlockUnits = std::is_same_v<Q, Q4_0Block> || std::is_same_v<Q, Q4_1Block> ||
                             std::is_same_v<Q, Q5_0Block> || std::is_same_v<Q, Q5_1Block> ||
                             std::is_same_v<Q, Q8_0Block>;  // a unit is a block
template <typename Q>
constexpr bool kInterleavable = kBlockUnits<Q> || std::is_same_v<Q, Q4_KBlock> || std::is_same_v<Q, Q6_KBlock>;

// The vectors: a group's 16 outputs are one AVX-512 vector or two AVX2 ones (its parts), a lane
// an output. Lanes (quant_blocks.h) does the float side, Bytes the integer one.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
using Lanes = Avx512Lanes;
struct Bytes {
  using I = __m512i;
  static KQ_INLINE I load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static KQ_INLINE I set8(char b) { return _mm512_set1_epi8(b); }
  static KQ_INLINE I set16(short h) { return _mm512_set1_epi16(h); }
  static KQ_INLINE I set32(int32_t w) { return _mm512_set1_epi32(w); }
  static KQ_INLINE I zero() { return _mm512_setzero_si512(); }
  static KQ_INLINE I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static KQ_INLINE I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static KQ_INLINE I xor_(I a, I b) { return _mm512_xor_si512(a, b); }
  template <int S>
  static KQ_INLINE I srl16(I a) { return _mm512_srli_epi16(a, S); }
  template <int S>
  static KQ_INLINE I shl16(I a) { return _mm512_slli_epi16(a, S); }
  template <int S>
  static KQ_INLINE I shl32(I a) { return _mm512_slli_epi32(a, S); }
  static KQ_INLINE I add16(I a, I b) { return _mm512_add_epi16(a, b); }
  static KQ_INLINE I add32(I a, I b) { return _mm512_add_epi32(a, b); }
  static KQ_INLINE I maddubs(I u, I v) { return _mm512_maddubs_epi16(u, v); }
  static KQ_INLINE I madd(I a, I b) { return _mm512_madd_epi16(a, b); }
  static KQ_INLINE I set64(int64_t q) { return _mm512_set1_epi64(q); }
  static KQ_INLINE I widen_low(I a) { return _mm512_cvtepi8_epi16(_mm512_castsi512_si256(a)); }  // bytes to int16
  static KQ_INLINE I widen_high(I a) { return _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(a, 1)); }
  // int32 pairs to their sums: a's pair l to lane l, b's to lane 8 + l
  static KQ_INLINE I pair_sums(I a, I b) {
    const I even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const I odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    return _mm512_add_epi32(_mm512_permutex2var_epi32(a, even, b), _mm512_permutex2var_epi32(a, odd, b));
  }
#if defined(__AVX512VNNI__)
#define KESTREL_INTERLEAVED_VNNI 1
  static constexpr bool kVnni = true;
  static KQ_INLINE I dpbusd(I acc, I u, I v) { return _mm512_dpbusd_epi32(acc, u, v); }
#else
  static constexpr bool kVnni = false;
  static KQ_INLINE I dpbusd(I acc, I, I) { return acc; }
#endif
};
#else
using Lanes = Avx2Lanes;
struct Bytes {
  using I = __m256i;
  static KQ_INLINE I load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static KQ_INLINE I set8(char b) { return _mm256_set1_epi8(b); }
  static KQ_INLINE I set16(short h) { return _mm256_set1_epi16(h); }
  static KQ_INLINE I set32(int32_t w) { return _mm256_set1_epi32(w); }
  static KQ_INLINE I zero() { return _mm256_setzero_si256(); }
  static KQ_INLINE I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static KQ_INLINE I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static KQ_INLINE I xor_(I a, I b) { return _mm256_xor_si256(a, b); }
  template <int S>
  static KQ_INLINE I srl16(I a) { return _mm256_srli_epi16(a, S); }
  template <int S>
  static KQ_INLINE I shl16(I a) { return _mm256_slli_epi16(a, S); }
  template <int S>
  static KQ_INLINE I shl32(I a) { return _mm256_slli_epi32(a, S); }
  static KQ_INLINE I add16(I a, I b) { return _mm256_add_epi16(a, b); }
  static KQ_INLINE I add32(I a, I b) { return _mm256_add_epi32(a, b); }
  static KQ_INLINE I maddubs(I u, I v) { return _mm256_maddubs_epi16(u, v); }
  static KQ_INLINE I madd(I a, I b) { return _mm256_madd_epi16(a, b); }
  static KQ_INLINE I set64(int64_t q) { return _mm256_set1_epi64x(q); }
  static KQ_INLINE I widen_low(I a) { return _mm256_cvtepi8_epi16(_mm256_castsi256_si128(a)); }  // bytes to int16
  static KQ_INLINE I widen_high(I a) { return _mm256_cvtepi8_epi16(_mm256_extracti128_si256(a, 1)); }
  // int32 pairs to their sums: a's pair l to lane l, b's to lane 4 + l
  static KQ_INLINE I pair_sums(I a, I b) { return _mm256_permute4x64_epi64(_mm256_hadd_epi32(a, b), 0xD8); }
#if defined(__AVXVNNI__)
#define KESTREL_INTERLEAVED_VNNI 1
  static constexpr bool kVnni = true;
  static KQ_INLINE I dpbusd(I acc, I u, I v) { return _mm256_dpbusd_avx_epi32(acc, u, v); }
#else
  static constexpr bool kVnni = false;
  static KQ_INLINE I dpbusd(I acc, I, I) { return acc; }
#endif
};
#endif
using F = Lanes::F;
using I = Bytes::I;
constexpr int kParts = kOutputs / Lanes::N;  // vectors per group

// A unit's 16 outputs' bytes interleaved by 4-byte words: words[i][o] = bytes 4i .. 4i + 3 of
// output o's (nibbles as in Q4_0 / Q4_1 blocks, byte k: element k low, 16 + k high; or Q8_0's
// 32 values), and back.
KQ_INLINE void put_words(const uint8_t* bytes, int count, int o, uint8_t* words) {
  for (int i = 0; i < count / 4; ++i) std::memcpy(words + 4 * (kOutputs * i + o), bytes + 4 * i, 4);
}
KQ_INLINE void get_words(const uint8_t* words, int count, int o, uint8_t* bytes) {
  for (int i = 0; i < count / 4; ++i) std::memcpy(bytes + 4 * i, words + 4 * (kOutputs * i + o), 4);
}

// Where a group's units are, for block type Q, and what each unit's weights are, per output lane:
//   w = d * q + m (Q4_1, Q5_1, Q4_K: kMin), or w = d * (q - kOffset) (Q4_0: 8, Q5_0: 16,
//   Q8_0: 128, Q6_K: 32; Q8_0's signed values are stored as they are and made unsigned (+128)
//   when loaded).
// Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0: a unit is a block: its words, then (Q5_0, Q5_1) tops[16],
// one word an output of the fifth bits (byte k, bit i: element 4i + k's, bit 4 + i: element
// 16 + 4i + k's), then d[16] (and m[16]): the file's bytes.
// scales() loads the part starting at output lane0; unpack_row gives an output's rows of blocks
// back as the file has them.
template <typename Q>
struct Layout {
  static_assert(kBlockUnits<Q>);
  static constexpr bool kMin = std::is_same_v<Q, Q4_1Block> || std::is_same_v<Q, Q5_1Block>;
  static constexpr bool kFifthBits = std::is_same_v<Q, Q5_0Block> || std::is_same_v<Q, Q5_1Block>;
  static constexpr int kOffset = kMin ? 0 : std::is_same_v<Q, Q8_0Block> ? 128 : kFifthBits ? 16 : 8;
  static constexpr int kHalves = 1;
  static constexpr int kValues = std::is_same_v<Q, Q8_0Block> ? 32 : 16;  // bytes of values a block
  static constexpr int kQs = Q::kBytes - kValues;                           // where they start
  static constexpr int64_t kUnitBytes = kOutputs * Q::kBytes;
  static constexpr int kTops = kOutputs * kValues;                        // where the fifth bits start
  static constexpr int kD = kTops + (kFifthBits ? 4 * kOutputs : 0), kM = kD + 32;  // the scales, minimums
  static int64_t group_bytes(int64_t in_features) { return in_features / 32 * kUnitBytes; }
  static const uint8_t* words(const uint8_t* group, int64_t u) { return group + u * kUnitBytes; }
  static KQ_INLINE void scales(const uint8_t* group, int64_t u, int, int lane0, F& d, F& m) {
    d = Lanes::half(group + u * kUnitBytes + kD + 2 * lane0);
    if constexpr (kMin) m = Lanes::half(group + u * kUnitBytes + kM + 2 * lane0);
  }
  // Element e's fifth bit: its bit in an output's tops word.
  static constexpr int top_bit(int e) { return 8 * (e % 4) + 4 * (e / 16) + e % 16 / 4; }
  // Output group g's 16 rows of blocks (row_bytes apart) into the layout at out.
  static void pack_group(const uint8_t* rows, int64_t row_bytes, int64_t in_features, uint8_t* out) {
    for (int64_t u = 0; u < in_features / 32; ++u, out += kUnitBytes) {
      for (int o = 0; o < kOutputs; ++o) {
        const uint8_t* block = rows + o * row_bytes + u * Q::kBytes;
        put_words(block + kQs, kValues, o, out);
        if constexpr (kFifthBits) {
          const uint32_t qh = load_u32(block + Q::kQh);
          uint32_t tops = 0;
          for (int e = 0; e < 32; ++e) tops |= (qh >> e & 1u) << top_bit(e);
          std::memcpy(out + kTops + 4 * o, &tops, 4);
        }
        std::memcpy(out + kD + 2 * o, block, 2);
        if constexpr (kMin) std::memcpy(out + kM + 2 * o, block + 2, 2);
      }
    }
  }
  static void unpack_row(const uint8_t* group, int o, int64_t in_features, uint8_t* row) {
    for (int64_t u = 0; u < in_features / 32; ++u, group += kUnitBytes, row += Q::kBytes) {
      get_words(group, kValues, o, row + kQs);
      if constexpr (kFifthBits) {
        const uint32_t tops = load_u32(group + kTops + 4 * o);
        uint32_t qh = 0;
        for (int e = 0; e < 32; ++e) qh |= (tops >> top_bit(e) & 1u) << e;
        std::memcpy(row + Q::kQh, &qh, 4);
      }
      std::memcpy(row, group + kD + 2 * o, 2);
      if constexpr (kMin) std::memcpy(row + 2, group + kM + 2 * o, 2);
    }
  }
};

// Q4_K: a super-block (8 units) is the units' words, in Q4_1's nibble order, then d[16],
// dmin[16], and the 6-bit scales and mins as bytes, sc[8][16] and m[8][16]: 4 bytes a row more
// than the file's 144. Unit j's weights are (d * sc_j) q - dmin * m_j (d * sc_j exact in float).
template <>
struct Layout<Q4_KBlock> {
  static constexpr bool kMin = true, kFifthBits = false;
  static constexpr int kOffset = 0;
  static constexpr int kHalves = 1;
  static constexpr int64_t kSuperBytes = 8 * 256 + 2 * 32 + 2 * 128;
  static constexpr int kD = 8 * 256, kDMin = kD + 32, kSc = kDMin + 32, kM = kSc + 128;
  static int64_t group_bytes(int64_t in_features) { return in_features / 256 * kSuperBytes; }
  static const uint8_t* words(const uint8_t* group, int64_t u) { return group + u / 8 * kSuperBytes + u % 8 * 256; }
  static KQ_INLINE void scales(const uint8_t* group, int64_t u, int, int lane0, F& d, F& m) {
    const uint8_t* super = group + u / 8 * kSuperBytes;
    d = Lanes::mul(Lanes::half(super + kD + 2 * lane0), Lanes::cvt(Lanes::u8(super + kSc + 16 * (u % 8) + lane0)));
    m = Lanes::mul(Lanes::half(super + kDMin + 2 * lane0),
                   Lanes::sub(Lanes::zero(), Lanes::cvt(Lanes::u8(super + kM + 16 * (u % 8) + lane0))));
  }
  static void pack_group(const uint8_t* rows, int64_t row_bytes, int64_t in_features, uint8_t* out) {
    for (int64_t s = 0; s < in_features / 256; ++s, out += kSuperBytes) {
      for (int o = 0; o < kOutputs; ++o) {
        const uint8_t* block = rows + o * row_bytes + s * Q4_KBlock::kBytes;
        const uint8_t* qs = block + 16;
        for (int j = 0; j < 8; ++j) {
          uint8_t nibbles[16];  // unit j: the low (j even) or high nibbles of bytes 32 (j / 2) ..
          for (int k = 0; k < 16; ++k) {
            const int lo = (qs[32 * (j / 2) + k] >> (4 * (j % 2))) & 15, hi = (qs[32 * (j / 2) + 16 + k] >> (4 * (j % 2))) & 15;
            nibbles[k] = static_cast<uint8_t>(lo | hi << 4);
          }
          put_words(nibbles, 16, o, out + 256 * j);
          int sc, mn;
          k4_scale_min(block + 4, j, sc, mn);
          out[kSc + 16 * j + o] = static_cast<uint8_t>(sc);
          out[kM + 16 * j + o] = static_cast<uint8_t>(mn);
        }
        std::memcpy(out + kD + 2 * o, block, 2);
        std::memcpy(out + kDMin + 2 * o, block + 2, 2);
      }
    }
  }
  static void unpack_row(const uint8_t* group, int o, int64_t in_features, uint8_t* row) {
    for (int64_t s = 0; s < in_features / 256; ++s, group += kSuperBytes, row += Q4_KBlock::kBytes) {
      std::memcpy(row, group + kD + 2 * o, 2);
      std::memcpy(row + 2, group + kDMin + 2 * o, 2);
      uint8_t* scales = row + 4;  // k4_scale_min's packing of the 8 scales and mins, inverted
      for (int j = 0; j < 4; ++j) {
        const int sc = group[kSc + 16 * j + o], mn = group[kM + 16 * j + o];
        const int sc_hi = group[kSc + 16 * (j + 4) + o], mn_hi = group[kM + 16 * (j + 4) + o];
        scales[j] = static_cast<uint8_t>(sc | (sc_hi >> 4) << 6);
        scales[j + 4] = static_cast<uint8_t>(mn | (mn_hi >> 4) << 6);
        scales[j + 8] = static_cast<uint8_t>((sc_hi & 15) | (mn_hi & 15) << 4);
      }
      uint8_t* qs = row + 16;
      std::memset(qs, 0, 128);
      for (int j = 0; j < 8; ++j) {
        uint8_t nibbles[16];
        get_words(group + 256 * j, 16, o, nibbles);
        for (int k = 0; k < 16; ++k) {
          qs[32 * (j / 2) + k] |= static_cast<uint8_t>((nibbles[k] & 15) << (4 * (j % 2)));
          qs[32 * (j / 2) + 16 + k] |= static_cast<uint8_t>((nibbles[k] >> 4) << (4 * (j % 2)));
        }
      }
    }
  }
};

// Q6_K: a super-block (8 units) is, per unit, the words of the 6-bit values' low nibbles (in
// Q4_1's order) and then high[2][16] words of their top two bits (word w, byte k: bits 0-1, 2-3,
// 4-5, 6-7 the tops of elements 4w + k, 16 + 4w + k, 8 + 4w + k, 24 + 4w + k), 384 bytes; then
// d[16] and the signed scales sc[16][16], one per 16 elements: the file's 16 x 210 bytes. Each
// half unit (elements 0 .. 15, 16 .. 31) has its own scale, so it has its own integer dot:
// w = (d * sc) (q - 32).
template <>
struct Layout<Q6_KBlock> {
  static constexpr bool kMin = false, kFifthBits = false;
  static constexpr int kOffset = 32;
  static constexpr int kHalves = 2;
  static constexpr int64_t kUnitBytes = 256 + 128, kSuperBytes = 8 * kUnitBytes + 32 + 256;
  static constexpr int kD = 8 * kUnitBytes, kSc = kD + 32;
  static int64_t group_bytes(int64_t in_features) { return in_features / 256 * kSuperBytes; }
  static const uint8_t* words(const uint8_t* group, int64_t u) { return group + u / 8 * kSuperBytes + u % 8 * kUnitBytes; }
  static KQ_INLINE void scales(const uint8_t* group, int64_t u, int half, int lane0, F& d, F&) {
    const uint8_t* super = group + u / 8 * kSuperBytes;
    d = Lanes::mul(Lanes::half(super + kD + 2 * lane0), Lanes::cvt(Lanes::i8(super + kSc + 16 * (2 * (u % 8) + half) + lane0)));
  }
  // Element e's 6-bit value in a file block (ggml's order: 128 elements per ql[64] / qh[32] half).
  static int value(const uint8_t* block, int e) {
    const uint8_t *ql = block + 64 * (e / 128), *qh = block + 128 + 32 * (e / 128);
    const int t = e % 128 / 32, l = e % 32;  // quarter and position
    const int low = (ql[l + 32 * (t % 2)] >> (4 * (t / 2))) & 15;
    return low | ((qh[l] >> (2 * t)) & 3) << 4;
  }
  static void pack_group(const uint8_t* rows, int64_t row_bytes, int64_t in_features, uint8_t* out) {
    for (int64_t s = 0; s < in_features / 256; ++s, out += kSuperBytes) {
      for (int o = 0; o < kOutputs; ++o) {
        const uint8_t* block = rows + o * row_bytes + s * Q6_KBlock::kBytes;
        for (int j = 0; j < 8; ++j) {
          int q[32];
          for (int k = 0; k < 32; ++k) q[k] = value(block, 32 * j + k);
          uint8_t nibbles[16], tops[8];
          for (int k = 0; k < 16; ++k) nibbles[k] = static_cast<uint8_t>((q[k] & 15) | (q[16 + k] & 15) << 4);
          for (int w = 0; w < 2; ++w) {
            for (int k = 0; k < 4; ++k) {
              const int e = 4 * w + k;
              tops[4 * w + k] = static_cast<uint8_t>(q[e] >> 4 | (q[16 + e] >> 4) << 2 | (q[8 + e] >> 4) << 4 | (q[24 + e] >> 4) << 6);
            }
          }
          uint8_t* unit = out + kUnitBytes * j;
          put_words(nibbles, 16, o, unit);
          put_words(tops, 8, o, unit + 256);
        }
        std::memcpy(out + kD + 2 * o, block + 208, 2);
        for (int g = 0; g < 16; ++g) out[kSc + 16 * g + o] = block[192 + g];
      }
    }
  }
  static void unpack_row(const uint8_t* group, int o, int64_t in_features, uint8_t* row) {
    for (int64_t s = 0; s < in_features / 256; ++s, group += kSuperBytes, row += Q6_KBlock::kBytes) {
      std::memset(row, 0, 192);
      for (int j = 0; j < 8; ++j) {
        uint8_t nibbles[16], tops[8];
        get_words(group + kUnitBytes * j, 16, o, nibbles);
        get_words(group + kUnitBytes * j + 256, 8, o, tops);
        for (int k = 0; k < 32; ++k) {  // element k of the unit: its nibble, and where its top is
          const int low = k < 16 ? nibbles[k] & 15 : nibbles[k - 16] >> 4;
          const int w = k % 8 / 4, field = (k % 16 >= 8 ? 2 : 0) + (k >= 16 ? 1 : 0);
          const int q = low | ((tops[4 * w + k % 4] >> (2 * field)) & 3) << 4;
          const int e = 32 * j + k, t = e % 128 / 32, l = e % 32;  // ggml's order, as value() reads it
          row[64 * (e / 128) + l + 32 * (t % 2)] |= static_cast<uint8_t>((q & 15) << (4 * (t / 2)));
          row[128 + 32 * (e / 128) + l] |= static_cast<uint8_t>((q >> 4) << (2 * t));
        }
      }
      for (int g = 0; g < 16; ++g) row[192 + g] = group[kSc + 16 * g + o];
      std::memcpy(row + 208, group + kD + 2 * o, 2);
    }
  }
};

// ---- Activations --------------------------------------------------------------------------------

// One unit of a row of x: its 16-bit values' two digits in element order, d_x, d_x * sum(p) and
// -sum(p) over elements 0 .. 15 and 16 .. 31.
struct alignas(16) XUnit {
  int8_t hi[32], lo[32];
  float d, d_sum;
  int32_t minus_halves[2];
#if !defined(KESTREL_INTERLEAVED_VNNI)
  int16_t p[32];  // the values themselves, for Q8_0's products without VNNI
#endif
};

// The unit's scale and digits from its 32 values' max |x|; p (32 int32) from the vectors' values
// times 32512 / max|x|, rounded to nearest even: |p| <= 32512, hi = round(p / 256) in
// [-127, 127], lo = p - 256 hi in [-128, 127].
KQ_INLINE void set_scale(float max_abs, XUnit& unit) {
  unit.d = max_abs / 32512.0f;
  unit.d_sum = unit.d * -static_cast<float>(unit.minus_halves[0] + unit.minus_halves[1]);
}
KQ_INLINE float inverse_scale(float max_abs) { return max_abs > 0.0f ? 32512.0f / max_abs : 0.0f; }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
KQ_INLINE __m256i to_bytes(__m512i a, __m512i b) {  // 32 int32 in [-128, 127] to bytes, in order
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm512_cvtepi32_epi8(a)), _mm512_cvtepi32_epi8(b), 1);
}

// Row x ([K] floats, K a multiple of 32) into its units.
inline void quantize_row(const float* x, int64_t K, XUnit* out) {
  for (int64_t u = 0; u < K / 32; ++u) {
    const __m512 v0 = _mm512_loadu_ps(x + 32 * u), v1 = _mm512_loadu_ps(x + 32 * u + 16);
    const float max_abs = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const __m512 inverse = _mm512_set1_ps(inverse_scale(max_abs));
    const __m512i p0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inverse));
    const __m512i p1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inverse));
    const __m512i h0 = _mm512_srai_epi32(_mm512_add_epi32(p0, _mm512_set1_epi32(128)), 8);
    const __m512i h1 = _mm512_srai_epi32(_mm512_add_epi32(p1, _mm512_set1_epi32(128)), 8);
    const __m512i l0 = _mm512_sub_epi32(p0, _mm512_slli_epi32(h0, 8));
    const __m512i l1 = _mm512_sub_epi32(p1, _mm512_slli_epi32(h1, 8));
    XUnit& unit = out[u];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(unit.hi), to_bytes(h0, h1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(unit.lo), to_bytes(l0, l1));
#if !defined(KESTREL_INTERLEAVED_VNNI)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(unit.p), _mm512_cvtepi32_epi16(p0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(unit.p + 16), _mm512_cvtepi32_epi16(p1));
#endif
    unit.minus_halves[0] = -_mm512_reduce_add_epi32(p0);  // exact
    unit.minus_halves[1] = -_mm512_reduce_add_epi32(p1);
    set_scale(max_abs, unit);
  }
}
#else
KQ_INLINE __m256i to_bytes(const __m256i* v) {  // 32 int32 in [-128, 127] (4 vectors) to bytes, in order
  // packs work within 128-bit halves: words of elements 0-3, 8-11, 16-19, 24-27 | 4-7, 12-15, ..
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

KQ_INLINE int32_t sum8(__m256i a) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

inline void quantize_row(const float* x, int64_t K, XUnit* out) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t u = 0; u < K / 32; ++u) {
    __m256 v[4];
    __m256 max4 = _mm256_setzero_ps();
    for (int k = 0; k < 4; ++k) {
      v[k] = _mm256_loadu_ps(x + 32 * u + 8 * k);
      max4 = _mm256_max_ps(max4, _mm256_andnot_ps(sign, v[k]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(max4), _mm256_extractf128_ps(max4, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    const float max_abs = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    const __m256 inverse = _mm256_set1_ps(inverse_scale(max_abs));
    __m256i h[4], l[4], p[4];
    for (int k = 0; k < 4; ++k) {
      p[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], inverse));
      h[k] = _mm256_srai_epi32(_mm256_add_epi32(p[k], _mm256_set1_epi32(128)), 8);
      l[k] = _mm256_sub_epi32(p[k], _mm256_slli_epi32(h[k], 8));
    }
    XUnit& unit = out[u];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(unit.hi), to_bytes(h));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(unit.lo), to_bytes(l));
#if !defined(KESTREL_INTERLEAVED_VNNI)
    for (int k = 0; k < 2; ++k) {  // packs work within 128-bit halves: 0-3, 8-11 | 4-7, 12-15
      const __m256i values = _mm256_permute4x64_epi64(_mm256_packs_epi32(p[2 * k], p[2 * k + 1]), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(unit.p + 16 * k), values);
    }
#endif
    unit.minus_halves[0] = -sum8(_mm256_add_epi32(p[0], p[1]));  // exact
    unit.minus_halves[1] = -sum8(_mm256_add_epi32(p[2], p[3]));
    set_scale(max_abs, unit);
  }
}
#endif

// ---- The linear ---------------------------------------------------------------------------------

KQ_INLINE I broadcast4(const int8_t* p) {  // 4 bytes at p in every lane
  int32_t word;
  std::memcpy(&word, p, 4);
  return Bytes::set32(word);
}

// How type Q's values and a row's x make a unit's integer dot, per lane (an output), in steps
// of 4 elements: into int32 by vpdpbusd (VNNI), else by vpmaddubsw, which sums pairs into int16
// and saturates at 32767.
//   4-, 5- and 6-bit values (up to 15, 31, 63): without VNNI, the pairs add up in int16 for
//     kFlushWords words (a pair is at most 2 * 63 * 128) and then go into int32, the two digits
//     in one: a third fewer instructions than taking each pair to int32.
//   Q8_0: with VNNI, its values + 128 (unsigned) as the others; without, its signed values
//     widened to int16 meet x's p in int16 pairs by vpmaddwd (kMadd), the two halves of the lanes
//     in two sums (hi, lo), each lane a pair of int32 until `combine`: 7 times fewer instructions
//     than the digits in vpmaddubsw, which would have to split q + 128 for its saturation.
template <typename Q>
struct Products {
  static constexpr bool kMadd = std::is_same_v<Q, Q8_0Block> && !Bytes::kVnni;
  static constexpr bool kInt16 = !Bytes::kVnni && !kMadd;
  static constexpr int kOffset = kMadd ? 0 : Layout<Q>::kOffset;
  static constexpr int kMaxValue = std::is_same_v<Q, Q6_KBlock> ? 63 : Layout<Q>::kFifthBits ? 31 : 15;
  static constexpr int kPerWord = Layout<Q>::kHalves == 1 ? 2 : 1;  // words of a step in one sum
  static constexpr int kFlushWords = kInt16 ? std::min(4, 32767 / (2 * kMaxValue * 128) / kPerWord) : 4;
  static_assert(4 % kFlushWords == 0);
  struct Values {  // a word's values, per lane: as unsigned bytes (a), or widened to int16 (a, b)
    I a, b;
  };
  struct Xs {  // 4 elements of x in every lane: the digits hi (a) and lo (b), or p as int16 (a)
    I a, b;
  };
  static KQ_INLINE Values values(I w) {  // w as unit_values loads it
    if constexpr (kMadd) return {Bytes::widen_low(w), Bytes::widen_high(w)};
    else if constexpr (std::is_same_v<Q, Q8_0Block>) return {Bytes::xor_(w, Bytes::set8(static_cast<char>(0x80))), w};
    else return {w, w};
  }
  static KQ_INLINE Xs xs(const XUnit& xu, int e0) {  // elements e0 .. e0 + 3
#if !defined(KESTREL_INTERLEAVED_VNNI)
    if constexpr (kMadd) {
      int64_t four;
      std::memcpy(&four, xu.p + e0, 8);
      return {Bytes::set64(four), Bytes::zero()};
    }
#endif
    return {broadcast4(xu.hi + e0), broadcast4(xu.lo + e0)};
  }
  static KQ_INLINE void add(I& hi, I& lo, const Values& w, const Xs& x) {
    if constexpr (kMadd) {
      hi = Bytes::add32(hi, Bytes::madd(w.a, x.a));
      lo = Bytes::add32(lo, Bytes::madd(w.b, x.a));
    } else if constexpr (Bytes::kVnni) {
      hi = Bytes::dpbusd(hi, w.a, x.a);
      lo = Bytes::dpbusd(lo, w.a, x.b);
    } else {
      hi = Bytes::add16(hi, Bytes::maddubs(w.a, x.a));
      lo = Bytes::add16(lo, Bytes::maddubs(w.a, x.b));
    }
    // NOTE: the sums stay chains. gcc would otherwise reassociate them into trees whose leaves,
    // every product of a unit, it computes first: AVX2's 16 registers spill (tile<Q4_1, 1, 1>
    // kept 37 vectors on the stack). ("v": any vector register, AVX-512's upper 16 too.)
    if constexpr (!Bytes::kVnni) asm("" : "+v"(hi), "+v"(lo));
  }
  static KQ_INLINE I combine(I hi, I lo) {  // the int32 dots of the sums since the last flush
    if constexpr (kMadd) return Bytes::pair_sums(hi, lo);
    else if constexpr (kInt16) return Bytes::add32(Bytes::madd(hi, Bytes::set16(256)), Bytes::madd(lo, Bytes::set16(1)));
    else return Bytes::add32(lo, Bytes::shl32<8>(hi));
  }
};

// Per lane, the values of word W of unit u (elements 4W .. 4W + 3 in `low`, 16 + 4W .. in
// `high`), for the part of the group starting at output lane0 (Q8_0's as signed bytes).
template <typename Q, int W>
KQ_INLINE void unit_values(const uint8_t* group, int64_t u, int lane0, I& low, I& high) {
  using L = Layout<Q>;
  const I nibble = Bytes::set8(0x0F);
  const uint8_t* words = L::words(group, u) + 4 * lane0;
  if constexpr (std::is_same_v<Q, Q8_0Block>) {  // elements 4W .. in word W, 16 + 4W .. in word 4 + W; signed
    low = Bytes::load(words + 64 * W);
    high = Bytes::load(words + 64 * (4 + W));
    return;
  }
  const I w = Bytes::load(words + 64 * W);
  low = Bytes::and_(w, nibble);
  high = Bytes::and_(Bytes::srl16<4>(w), nibble);
  if constexpr (L::kFifthBits) {  // bit W of each byte of the tops (bit 4 + W) to bit 4
    const I tops = Bytes::load(words + L::kTops), five = Bytes::set8(0x10);
    low = Bytes::or_(low, Bytes::and_(Bytes::shl16<4 - W>(tops), five));
    high = Bytes::or_(high, Bytes::and_(Bytes::srl16<W>(tops), five));
  }
  if constexpr (std::is_same_v<Q, Q6_KBlock>) {  // the top two bits, as bits 4-5 of each byte
    const I tops = Bytes::load(words + 256 + 64 * (W % 2)), two = Bytes::set8(0x30);
    if constexpr (W < 2) {
      low = Bytes::or_(low, Bytes::and_(Bytes::shl16<4>(tops), two));
      high = Bytes::or_(high, Bytes::and_(Bytes::shl16<2>(tops), two));
    } else {
      low = Bytes::or_(low, Bytes::and_(tops, two));
      high = Bytes::or_(high, Bytes::and_(Bytes::srl16<2>(tops), two));
    }
  }
}

// acc[v * MR + r] += the sums over `units` units of the outputs of vector v (part v % kParts of
// output group groups[v / kParts]) against rows x[r] (each a row's first unit), in the order
// above; the halves of a unit (H 2) in order.
template <typename Q, int NB, int MR>
void tile(const uint8_t* const* groups, int64_t units, const XUnit* const* x, F* acc) {
  using L = Layout<Q>;
  using P = Products<Q>;
  constexpr int H = L::kHalves, NV = NB * kParts;
  for (int64_t u = 0; u < units; ++u) {
    I dot[H][NV * MR];             // the unit's integer dots, [half][v * MR + r]
    I hi[H][NV * MR], lo[H][NV * MR];  // the digits' sums since the last flush into dot
    unroll<MR>([&](auto r) KQ_INLINE_LAMBDA {
      const int32_t* minus = x[r][u].minus_halves;
      unroll<H>([&](auto h) KQ_INLINE_LAMBDA {
        I base = Bytes::zero();  // -offset * sum(p)
        if constexpr (P::kOffset > 0) {
          const int32_t minus_sum = H == 2 ? minus[h] : minus[0] + minus[1];
          base = Bytes::set32(minus_sum * P::kOffset);
        }
        unroll<NV>([&](auto v) KQ_INLINE_LAMBDA {
          dot[h][v * MR + r] = base;
          hi[h][v * MR + r] = lo[h][v * MR + r] = Bytes::zero();
        });
      });
    });
    unroll<4>([&](auto i) KQ_INLINE_LAMBDA {
      typename P::Values low[NV], high[NV];
      unroll<NV>([&](auto v) KQ_INLINE_LAMBDA {
        I l, h;
        unit_values<Q, i>(groups[v / kParts], u, v % kParts * Lanes::N, l, h);
        low[v] = P::values(l);
        high[v] = P::values(h);
      });
      unroll<MR>([&](auto r) KQ_INLINE_LAMBDA {
        const typename P::Xs xl = P::xs(x[r][u], 4 * i), xh = P::xs(x[r][u], 16 + 4 * i);
        unroll<NV>([&](auto v) KQ_INLINE_LAMBDA {
          const int j = v * MR + r;
          P::add(hi[0][j], lo[0][j], low[v], xl);
          P::add(hi[H - 1][j], lo[H - 1][j], high[v], xh);
        });
      });
      if constexpr ((i + 1) % P::kFlushWords == 0) {
        unroll<H>([&](auto h) KQ_INLINE_LAMBDA {
          unroll<NV * MR>([&](auto j) KQ_INLINE_LAMBDA {
            dot[h][j] = Bytes::add32(dot[h][j], P::combine(hi[h][j], lo[h][j]));
            hi[h][j] = lo[h][j] = Bytes::zero();
          });
        });
      }
    });
    unroll<NV>([&](auto v) KQ_INLINE_LAMBDA {
      unroll<H>([&](auto h) KQ_INLINE_LAMBDA {
        F d_w, m_w;
        L::scales(groups[v / kParts], u, h, v % kParts * Lanes::N, d_w, m_w);
        unroll<MR>([&](auto r) KQ_INLINE_LAMBDA {
          const XUnit& xu = x[r][u];
          const int j = v * MR + r;
          F& a = acc[j];
          a = Lanes::fma(Lanes::cvt(dot[h][j]), Lanes::mul(d_w, Lanes::set1(xu.d)), a);
          if constexpr (L::kMin) a = Lanes::fma(m_w, Lanes::set1(xu.d_sum), a);
        });
      });
    });
  }
}

}  // namespace interleaved
}  // namespace kestrel_quant
#endif  // KESTREL_QUANT_INTERLEAVED
