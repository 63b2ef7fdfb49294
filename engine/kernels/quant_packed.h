// Weights of the 32-element 4- and 5-bit types (Q4_0, Q4_1, Q5_0, Q5_1) repacked for integer dot
// products, and the linear over them, for quant_ops.cpp (CPUs with AVX-512 BW and VL). The float
// kernel decodes a Q5_0 block in ~6 cycles (one row), so Qwen2.5's Q5_0 linears ran at 9 GB/s a
// core with their weights in cache; here they run at 22 (4864 x 896 hot, 1 thread: 332 -> 129 us
// a call) and are bound by memory again. There is no AVX2 form: without mask registers, spreading
// the fifth bits over bytes made it slower than the float kernel (the same call, 552 -> 632 us).
//
// As llama.cpp does, the activations are quantized to int8, a scale per 32 columns
// (dot::quantize_unit), and the weights' 4- or 5-bit values q meet them in vpdpbusd (VNNI) or
// vpmaddubsw + vpmaddwd. The error added is that of rounding x to int8 (test_quant_ops.py states
// the bound).
//
// Layout. A row's blocks ("units") go in stripes of 16 (the last stripe may hold fewer, n), each
// stored as
//     words[4][n]   uint32: words[i][j] = bytes 4i .. 4i + 3 of unit j's qs (two nibbles each)
//     masks[4][2]   (5-bit types) ceil(n / 2) bytes each: bit 4j + b of masks[i][h] = bit
//                   16h + 4i + b of unit j's qh (the fifth bits of the elements those nibbles hold)
//     d[n]          the units' half scales
//     m[n]          (Q4_1, Q5_1) their half minimums
// as many bytes a unit as in the file (plus 4 in a 5-bit stripe of odd n). One 16-lane vector of
// words then yields, per lane j, unit j's elements 4i .. 4i + 3 (low nibbles, masks[i][0]) and
// 16 + 4i .. 16 + 4i + 3 (high nibbles, masks[i][1]): the integer dot of 16 units accumulates in
// 16 lanes, with no shuffle, and the float work is done once per 16 units.
//
// Summation order, the same whatever the batch and the thread count: per (output, row), 16 float
// lanes, lane j adding stripe after stripe, by FMA, for unit j of the stripe (x ~ d_x p),
//     float(I_j) * (d * d_x)       I_j = sum_k q_k p_k - offset * sum_k p_k (exact in int32)
// where w = d (q - offset) (offset 8 or 16), or where w = d q + m
//     float(I_j) * (d * d_x)       I_j = sum_k q_k p_k, then
//     m * (d_x * float(sum_k p_k));
// then the lanes added in the fixed tree of Avx512Lanes::sum; then the bias. Units past the row
// are zero in x and weigh nothing.

#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "quant_blocks.h"
#include "quant_dot.h"

#if defined(KESTREL_QUANT_DOT) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define KESTREL_QUANT_PACKED 1

namespace kestrel_quant {
namespace packed {

constexpr int kStripe = 16;  // units per stripe
constexpr int64_t kPackedBase = 1000;  // a packed layout's type id: kPackedBase + the GGML id

constexpr int mask_bytes(int n) { return (n + 1) / 2; }

// What a packable block type holds besides its nibbles: w = d (q - offset), or d q + m with a
// min; the fifth bits of q in qh where there are (at kQh). The nibbles are the last 16 bytes.
template <typename Q>
struct Packing {
  static constexpr bool kMin = std::is_same_v<Q, Q4_1Block> || std::is_same_v<Q, Q5_1Block>;
  static constexpr bool kFifthBits = std::is_same_v<Q, Q5_0Block> || std::is_same_v<Q, Q5_1Block>;
  static constexpr int kOffsetShift = kMin ? 0 : kFifthBits ? 4 : 3;  // offset 1 << shift: 16 or 8
  static constexpr int kQs = Q::kBytes - 16;
  static constexpr int64_t stripe_bytes(int n) { return 18 * n + (kMin ? 2 * n : 0) + (kFifthBits ? 8 * mask_bytes(n) : 0); }
};

template <typename Q>
constexpr bool kPackable = std::is_same_v<Q, Q4_0Block> || std::is_same_v<Q, Q4_1Block> ||
                           std::is_same_v<Q, Q5_0Block> || std::is_same_v<Q, Q5_1Block>;

struct RowShape {
  int64_t full;        // stripes of 16 units
  int tail;            // units in the last, shorter stripe (0: none)
  int64_t full_bytes;  // a full stripe's
  int64_t tail_bytes;
  int64_t stripes() const { return full + (tail > 0); }
  int64_t bytes() const { return full * full_bytes + tail_bytes; }
};

template <typename Q>
RowShape row_shape(int64_t in_features) {
  const int64_t units = in_features / 32;
  const int tail = static_cast<int>(units % kStripe);
  return {units / kStripe, tail, Packing<Q>::stripe_bytes(kStripe), tail > 0 ? Packing<Q>::stripe_bytes(tail) : 0};
}

// A stripe of n units: where its parts start (Byte: const uint8_t to read, uint8_t to write).
template <typename Q, typename Byte = const uint8_t>
struct StripeParts {
  Byte *words, *masks, *d, *m;
  KQ_INLINE StripeParts(Byte* stripe, int n) {
    words = stripe;
    masks = words + 16 * n;
    d = masks + (Packing<Q>::kFifthBits ? 8 * mask_bytes(n) : 0);
    m = d + 2 * n;
  }
};

// One row of blocks of type Q into the packed layout at out.
template <typename Q>
void pack_row(const uint8_t* row, const RowShape& shape, uint8_t* out) {
  using P = Packing<Q>;
  for (int64_t s = 0; s < shape.stripes(); ++s) {
    const int n = s < shape.full ? kStripe : shape.tail, mb = mask_bytes(n);
    const StripeParts<Q, uint8_t> parts(out, n);
    if constexpr (P::kFifthBits) std::memset(parts.masks, 0, 8 * mb);
    for (int j = 0; j < n; ++j) {
      const uint8_t* block = row + (s * kStripe + j) * Q::kBytes;
      for (int i = 0; i < 4; ++i) std::memcpy(parts.words + 4 * n * i + 4 * j, block + P::kQs + 4 * i, 4);
      if constexpr (P::kFifthBits) {
        const uint32_t qh = load_u32(block + Q::kQh);
        for (int i = 0; i < 4; ++i)
          for (int h = 0; h < 2; ++h)
            for (int b = 0; b < 4; ++b)
              if (qh >> (16 * h + 4 * i + b) & 1u) parts.masks[(2 * i + h) * mb + (4 * j + b) / 8] |= 1u << ((4 * j + b) % 8);
      }
      std::memcpy(parts.d + 2 * j, block, 2);
      if constexpr (P::kMin) std::memcpy(parts.m + 2 * j, block + 2, 2);
    }
    out += s < shape.full ? shape.full_bytes : shape.tail_bytes;
  }
}

// ---- Activations --------------------------------------------------------------------------------

// A row of x's stripe: per lane j (unit j), p bytes 4i .. 4i + 3 in low[i] and 16 + 4i .. in
// high[i], -sum(p), d_x and d_x * sum(p); zero past the row.
struct alignas(64) XStripe {
  uint8_t low[4][64], high[4][64];
  int32_t minus_sum[kStripe];
  float d[kStripe], d_sum[kStripe];
};

// Row x ([K] floats) into its stripes.
inline void quantize_row(const float* x, int64_t K, int64_t stripes, XStripe* out) {
  const int64_t units = K / 32;
  for (int64_t s = 0; s < stripes; ++s) {
    XStripe& stripe = out[s];
    for (int j = 0; j < kStripe; ++j) {
      const int64_t unit = s * kStripe + j;
      alignas(32) uint8_t p[32] = {};
      if (unit < units) {
        const dot::QuantizedUnit q = dot::quantize_unit(x + unit * 32);
        _mm256_store_si256(reinterpret_cast<__m256i*>(p), q.bytes);
        stripe.minus_sum[j] = -q.sum;
        stripe.d[j] = q.d;
        stripe.d_sum[j] = q.d * static_cast<float>(q.sum);
      } else {
        stripe.minus_sum[j] = 0;
        stripe.d[j] = stripe.d_sum[j] = 0.0f;
      }
      for (int i = 0; i < 4; ++i) {
        std::memcpy(stripe.low[i] + 4 * j, p + 4 * i, 4);
        std::memcpy(stripe.high[i] + 4 * j, p + 16 + 4 * i, 4);
      }
    }
  }
}

// ---- 16 lanes -----------------------------------------------------------------------------------

// The integer side of the 16 lanes; floats are Avx512Lanes'.
struct Wide {
  using I = __m512i;
  using F = Avx512Lanes::F;
  // n lanes of 4 bytes from p, the rest zero
  static KQ_INLINE I words(const uint8_t* p, int n) {
    return n == kStripe ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << n) - 1), p);
  }
  // 0x10 added to byte 4j + b where that bit of the mask at p (bytes of it) is set.
  static KQ_INLINE I fifth_bits(I v, const uint8_t* p, int bytes) {
    __mmask64 k;
    if (bytes == 8) {
      asm("kmovq %1, %0" : "=k"(k) : "m"(*reinterpret_cast<const uint64_t*>(p)));  // not through a general register
    } else {
      k = _cvtu64_mask64(_mm_cvtsi128_si64(_mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << bytes) - 1), p)));
    }
    return _mm512_mask_add_epi8(v, k, v, _mm512_set1_epi8(0x10));
  }
  static KQ_INLINE I low_nibbles(I v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
  static KQ_INLINE I high_nibbles(I v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F)); }
  // acc + per lane the dot of 4 unsigned bytes of u with 4 signed bytes at p
  static KQ_INLINE I dot(I acc, I u, const uint8_t* p) {
    const I v = _mm512_load_si512(p);
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(acc, u, v);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, v), _mm512_set1_epi16(1)));
#endif
  }
  static KQ_INLINE F halves(const uint8_t* p, int n) {
    const __m256i h = n == kStripe ? _mm256_loadu_si256(as<__m256i>(p))
                                   : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p);
    return _mm512_cvtph_ps(h);
  }
  static KQ_INLINE I loadi(const int32_t* p) { return _mm512_load_si512(p); }
  static KQ_INLINE I zero_i() { return _mm512_setzero_si512(); }
  template <int kShift>
  static KQ_INLINE I shl(I a) { return _mm512_slli_epi32(a, kShift); }
  // acc + float(dot) * (d_w * d_x)
  static KQ_INLINE F step(F acc, I dot, F d_w, F d_x) {
    return Avx512Lanes::fma(Avx512Lanes::cvt(dot), Avx512Lanes::mul(d_w, d_x), acc);
  }
};

// ---- The linear ---------------------------------------------------------------------------------

// acc[o * MR + r] += one stripe (n units, at `offset` in each weight row) of outputs rows[o]
// against rows x[r]. kFull: n == 16, known at compile time.
template <typename Q, int NO, int MR, bool kFull>
KQ_INLINE void stripe_step(const uint8_t* const* rows, int64_t offset, int n, const XStripe* const* x, Wide::F* acc) {
  using P = Packing<Q>;
  if constexpr (kFull) n = kStripe;
  const int mb = mask_bytes(n);
  Wide::I base[MR];  // -offset * sum(p)
  unroll<MR>([&](auto r) KQ_INLINE_LAMBDA {
    if constexpr (P::kOffsetShift > 0) base[r] = Wide::shl<P::kOffsetShift>(Wide::loadi(x[r]->minus_sum));
    else base[r] = Wide::zero_i();
  });
  unroll<NO>([&](auto o) KQ_INLINE_LAMBDA {
    const StripeParts<Q> parts(rows[o] + offset, n);
    Wide::I dots[MR];
    unroll<MR>([&](auto r) KQ_INLINE_LAMBDA { dots[r] = base[r]; });
    unroll<4>([&](auto i) KQ_INLINE_LAMBDA {
      const Wide::I words = Wide::words(parts.words + 4 * n * i, n);
      Wide::I low = Wide::low_nibbles(words), high = Wide::high_nibbles(words);
      if constexpr (P::kFifthBits) {
        low = Wide::fifth_bits(low, parts.masks + 2 * i * mb, mb);
        high = Wide::fifth_bits(high, parts.masks + (2 * i + 1) * mb, mb);
      }
      unroll<MR>([&](auto r) KQ_INLINE_LAMBDA { dots[r] = Wide::dot(Wide::dot(dots[r], low, x[r]->low[i]), high, x[r]->high[i]); });
    });
    const Wide::F d_w = Wide::halves(parts.d, n);
    unroll<MR>([&](auto r) KQ_INLINE_LAMBDA { acc[o * MR + r] = Wide::step(acc[o * MR + r], dots[r], d_w, Avx512Lanes::loadf(x[r]->d)); });
    if constexpr (P::kMin) {
      const Wide::F m_w = Wide::halves(parts.m, n);
      unroll<MR>([&](auto r) KQ_INLINE_LAMBDA { acc[o * MR + r] = Avx512Lanes::fma(m_w, Avx512Lanes::loadf(x[r]->d_sum), acc[o * MR + r]); });
    }
  });
}

}  // namespace packed
}  // namespace kestrel_quant
#endif  // KESTREL_QUANT_PACKED
