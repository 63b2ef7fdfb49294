// GGUF block layouts and their decoding into float32 lanes, for quant_ops.cpp.
//
// Each block type is a struct with its GGML type id, elements and bytes per block, and
// decode<L, R>(block, emit), which calls emit(v, w) for v = 0 .. kBlock / L::N - 1 in order, w
// holding the block's elements v * L::N .. (v + 1) * L::N - 1 as float32 lanes. With
// R = Rounding::kReference the values equal the gguf package's numpy reference
// (gguf.quants.dequantize) to the bit: the same float32 operations in the same order, with
// opaque() keeping the compiler from fusing a multiply and an add into one FMA (gcc does that
// even to intrinsics at -O3 -march=native); kFused lets it (see Rounding). A new type is one
// more struct here and one more case in with_block_type().
//
// L is the lane set: Avx512Lanes (16 lanes), Avx2Lanes (8) or ScalarLanes (8, plain C++). Every
// decoder needs L::N to divide 16 (no vector straddles two halves of a nibble row, or two
// scale groups of 16 elements). Where L::kLookup (AVX-512), the 4- and 5-bit types compute a
// block's 16 or 32 possible values once, by the reference's formula, and look each element up
// with vpermps, instead of converting and scaling every element; Q4_K and Q6_K have AVX-512
// decoders of their own. Every path yields the same values.

#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if (defined(__AVX512F__) && defined(__AVX512BW__)) || (defined(__AVX2__) && defined(__FMA__)) || defined(__F16C__)
#include <immintrin.h>
#endif

#if defined(__GNUC__)
#define KQ_INLINE inline __attribute__((always_inline))
#define KQ_INLINE_LAMBDA __attribute__((always_inline))  // after a lambda's parameters
#else
#define KQ_INLINE inline
#define KQ_INLINE_LAMBDA
#endif

namespace kestrel_quant {

// ---- Scalars ------------------------------------------------------------------------------

// The value computed, hidden from the optimizer, so that `opaque(a * b) + c` rounds the product
// before the add as numpy does, instead of becoming one fused multiply-add.
template <typename T>
KQ_INLINE T opaque(T v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+v"(v));
#elif defined(__GNUC__) && defined(__aarch64__)
  asm("" : "+w"(v));
#else
  volatile T keep = v;
  v = keep;
#endif
  return v;
}

KQ_INLINE uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

KQ_INLINE uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

KQ_INLINE float bits_to_f32(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// IEEE half -> float32, exact (subnormals, infinities and NaN payloads kept).
KQ_INLINE float half_to_f32(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  if (exponent == 0x1F) return bits_to_f32(sign | 0x7F800000u | (mantissa << 13));
  if (exponent != 0) return bits_to_f32(sign | ((exponent + 112) << 23) | (mantissa << 13));
  if (mantissa == 0) return bits_to_f32(sign);
  uint32_t shift = 0;  // subnormal: mantissa * 2^-24, renormalised
  while (!(mantissa & 0x400u)) {
    mantissa <<= 1;
    ++shift;
  }
  return bits_to_f32(sign | ((113 - shift) << 23) | ((mantissa & 0x3FFu) << 13));
#endif
}

KQ_INLINE float load_half(const uint8_t* p) { return half_to_f32(load_u16(p)); }

// p as a pointer to V (for unaligned vector loads)
template <typename V>
KQ_INLINE const V* as(const void* p) {
  return reinterpret_cast<const V*>(p);
}

// Calls fn(std::integral_constant<int, i>{}) for i = 0 .. N - 1: loops over accumulators with
// compile-time indices, so that they stay in registers.
template <int... I, typename Fn>
KQ_INLINE void unroll_impl(std::integer_sequence<int, I...>, Fn&& fn) {
  (fn(std::integral_constant<int, I>{}), ...);
}
template <int N, typename Fn>
KQ_INLINE void unroll(Fn&& fn) {
  unroll_impl(std::make_integer_sequence<int, N>{}, fn);
}

// ---- Lane sets ------------------------------------------------------------------------------
// F: float32 lanes, I: int32 lanes. u8 / i8 widen N bytes; bits32(word, first) gives lane l
// the bit first + l of word.

#if defined(__AVX512F__) && defined(__AVX512BW__)
struct Avx512Lanes {
  static constexpr int N = 16;
  using F = __m512;
  using I = __m512i;
  // Tables of 16 or 32 floats looked up by 32-bit index lanes (decoders assume N == 16 here).
  static constexpr bool kLookup = true;
  static KQ_INLINE F iota(int first) {
    return _mm512_add_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_ps(first));
  }
  static KQ_INLINE F lookup16(F table, I index) { return _mm512_permutexvar_ps(index, table); }  // low 4 bits
  static KQ_INLINE F lookup32(F low, F high, I index) { return _mm512_permutex2var_ps(low, index, high); }  // low 5 bits
  // Lanes whose bit is set in the 16 bits at mask get bit 4 of their index set. (The mask is
  // loaded straight into a mask register: gcc would route it through a general one, a shuffle-
  // port uop per call.)
  static KQ_INLINE I set_bit4(I index, const uint8_t* mask) {
    __mmask16 k;
    asm("kmovw %1, %0" : "=k"(k) : "m"(*reinterpret_cast<const uint16_t*>(mask)));
    return _mm512_mask_or_epi32(index, k, index, _mm512_set1_epi32(16));
  }
  // Halves at p broadcast to every lane: one (d) or two adjacent ones (d, m).
  static KQ_INLINE F half1(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(load_u16(p)))); }
  static KQ_INLINE void half2(const uint8_t* p, F& a, F& b) {
    const F both = _mm512_cvtph_ps(_mm256_set1_epi32(static_cast<int>(load_u32(p))));  // a, b, a, b, ..
    a = _mm512_moveldup_ps(both);
    b = _mm512_movehdup_ps(both);
  }
  static KQ_INLINE I u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(as<__m128i>(p))); }
  static KQ_INLINE I i8(const uint8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128(as<__m128i>(p))); }
  static KQ_INLINE I and_(I a, int m) { return _mm512_and_si512(a, _mm512_set1_epi32(m)); }
  static KQ_INLINE I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static KQ_INLINE I srl(I a, int s) { return _mm512_srli_epi32(a, s); }
  static KQ_INLINE I shl(I a, int s) { return _mm512_slli_epi32(a, s); }
  static KQ_INLINE I sub(I a, int b) { return _mm512_sub_epi32(a, _mm512_set1_epi32(b)); }
  static KQ_INLINE I bits32(uint32_t word, int first) {
    const __m512i shifts = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(first));
    return and_(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(word)), shifts), 1);
  }
  static KQ_INLINE F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  static KQ_INLINE F set1(float a) { return _mm512_set1_ps(a); }
  static KQ_INLINE F zero() { return _mm512_setzero_ps(); }
  static KQ_INLINE F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static KQ_INLINE F add(F a, F b) { return _mm512_add_ps(a, b); }
  static KQ_INLINE F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static KQ_INLINE F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static KQ_INLINE F loadf(const float* p) { return _mm512_loadu_ps(p); }
  static KQ_INLINE void storef(float* p, F a) { _mm512_storeu_ps(p, a); }
  static KQ_INLINE F half(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(as<__m256i>(p))); }
  static KQ_INLINE F bf16(const uint8_t* p) {
    const __m256i raw = _mm256_loadu_si256(as<__m256i>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  // sum() of kSumGroup vectors at once, to the bit: the same lanes added at each level, with
  // the vectors transposed along the way (45 instructions instead of 128).
  static constexpr int kSumGroup = 16;
  template <typename Get>  // get(i) is vector i, i a std::integral_constant (no array escapes)
  static KQ_INLINE void sum_group(Get&& get, float* out) {
    F s[8], r[4], v[2];
    unroll<8>([&](auto p) {  // [a_2p lanes i + i+8 | a_2p+1 the same]
      const F a = get(std::integral_constant<int, 2 * p>{}), b = get(std::integral_constant<int, 2 * p + 1>{});
      s[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    });
    unroll<4>([&](auto q) {  // 128-bit chunk c: a_4q+c's lanes i + i+4
      const F a = s[2 * q], b = s[2 * q + 1];
      r[q] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
    });
    unroll<2>([&](auto t) {  // chunk c: lanes i + i+2 of a_8t+c, then of a_8t+4+c
      const F a = r[2 * t], b = r[2 * t + 1];
      v[t] = _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));
    });
    const F w = _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], 0x88), _mm512_shuffle_ps(v[0], v[1], 0xDD));  // lane 4c + k: a_4k+c
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), w));
  }
  // Fixed order: halves of 8, then 4, 2, 1.
  static KQ_INLINE float sum(F a) {
    const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
    const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(a), high);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
};
#endif

#if defined(__AVX2__) && defined(__FMA__)
struct Avx2Lanes {
  static constexpr int N = 8;
  static constexpr bool kLookup = false;
  using F = __m256;
  using I = __m256i;
  static KQ_INLINE F half1(const uint8_t* p) { return set1(load_half(p)); }
  static KQ_INLINE void half2(const uint8_t* p, F& a, F& b) {
    a = set1(load_half(p));
    b = set1(load_half(p + 2));
  }
  static KQ_INLINE I u8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(as<__m128i>(p))); }
  static KQ_INLINE I i8(const uint8_t* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64(as<__m128i>(p))); }
  static KQ_INLINE I and_(I a, int m) { return _mm256_and_si256(a, _mm256_set1_epi32(m)); }
  static KQ_INLINE I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static KQ_INLINE I srl(I a, int s) { return _mm256_srli_epi32(a, s); }
  static KQ_INLINE I shl(I a, int s) { return _mm256_slli_epi32(a, s); }
  static KQ_INLINE I sub(I a, int b) { return _mm256_sub_epi32(a, _mm256_set1_epi32(b)); }
  static KQ_INLINE I bits32(uint32_t word, int first) {
    const __m256i shifts = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(first));
    return and_(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts), 1);
  }
  static KQ_INLINE F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static KQ_INLINE F set1(float a) { return _mm256_set1_ps(a); }
  static KQ_INLINE F zero() { return _mm256_setzero_ps(); }
  static KQ_INLINE F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static KQ_INLINE F add(F a, F b) { return _mm256_add_ps(a, b); }
  static KQ_INLINE F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static KQ_INLINE F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static KQ_INLINE F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static KQ_INLINE void storef(float* p, F a) { _mm256_storeu_ps(p, a); }
  static KQ_INLINE F half(const uint8_t* p) {
#if defined(__F16C__)
    return _mm256_cvtph_ps(_mm_loadu_si128(as<__m128i>(p)));
#else
    alignas(32) float v[N];
    for (int l = 0; l < N; ++l) v[l] = load_half(p + 2 * l);
    return _mm256_load_ps(v);
#endif
  }
  static KQ_INLINE F bf16(const uint8_t* p) {
    const __m128i raw = _mm_loadu_si128(as<__m128i>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
  // sum() of kSumGroup vectors at once, to the bit (see Avx512Lanes::sum_group).
  static constexpr int kSumGroup = 8;
  template <typename Get>
  static KQ_INLINE void sum_group(Get&& get, float* out) {
    F s[4], r[2];
    unroll<4>([&](auto p) {  // [a_2p lanes i + i+4 | a_2p+1 the same]
      const F a = get(std::integral_constant<int, 2 * p>{}), b = get(std::integral_constant<int, 2 * p + 1>{});
      s[p] = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
    });
    unroll<2>([&](auto q) {  // low half: lanes i + i+2 of a_4q, a_4q+2; high half: of a_4q+1, a_4q+3
      r[q] = _mm256_add_ps(_mm256_shuffle_ps(s[2 * q], s[2 * q + 1], 0x44), _mm256_shuffle_ps(s[2 * q], s[2 * q + 1], 0xEE));
    });
    // a0 a2 a4 a6 a1 a3 a5 a7
    const F w = _mm256_add_ps(_mm256_shuffle_ps(r[0], r[1], 0x88), _mm256_shuffle_ps(r[0], r[1], 0xDD));
    _mm256_storeu_ps(out, _mm256_permutevar8x32_ps(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
  // Fixed order: halves of 4, then 2, 1.
  static KQ_INLINE float sum(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
};
#endif

// Plain C++ with the same lane structure, for CPUs with neither (and to compile anywhere).
struct ScalarLanes {
  static constexpr int N = 8;
  static constexpr bool kLookup = false;
  struct F {
    float v[N];
  };
  struct I {
    int32_t v[N];
  };
  template <typename Op>
  static KQ_INLINE I map(I a, Op op) {
    for (int l = 0; l < N; ++l) a.v[l] = op(a.v[l]);
    return a;
  }
  template <typename Op>
  static KQ_INLINE F zip(F a, F b, Op op) {
    for (int l = 0; l < N; ++l) a.v[l] = op(a.v[l], b.v[l]);
    return a;
  }
  static KQ_INLINE F half1(const uint8_t* p) { return set1(load_half(p)); }
  static KQ_INLINE void half2(const uint8_t* p, F& a, F& b) {
    a = set1(load_half(p));
    b = set1(load_half(p + 2));
  }
  static KQ_INLINE I u8(const uint8_t* p) {
    I a;
    for (int l = 0; l < N; ++l) a.v[l] = p[l];
    return a;
  }
  static KQ_INLINE I i8(const uint8_t* p) {
    I a;
    for (int l = 0; l < N; ++l) a.v[l] = static_cast<int8_t>(p[l]);
    return a;
  }
  static KQ_INLINE I and_(I a, int m) { return map(a, [m](int32_t x) { return x & m; }); }
  static KQ_INLINE I or_(I a, I b) {
    for (int l = 0; l < N; ++l) a.v[l] |= b.v[l];
    return a;
  }
  static KQ_INLINE I srl(I a, int s) {
    return map(a, [s](int32_t x) { return static_cast<int32_t>(static_cast<uint32_t>(x) >> s); });
  }
  static KQ_INLINE I shl(I a, int s) {
    return map(a, [s](int32_t x) { return static_cast<int32_t>(static_cast<uint32_t>(x) << s); });
  }
  static KQ_INLINE I sub(I a, int b) { return map(a, [b](int32_t x) { return x - b; }); }
  static KQ_INLINE I bits32(uint32_t word, int first) {
    I a;
    for (int l = 0; l < N; ++l) a.v[l] = static_cast<int32_t>((word >> (first + l)) & 1u);
    return a;
  }
  static KQ_INLINE F cvt(I a) {
    F f;
    for (int l = 0; l < N; ++l) f.v[l] = static_cast<float>(a.v[l]);
    return f;
  }
  static KQ_INLINE F set1(float a) {
    F f;
    for (int l = 0; l < N; ++l) f.v[l] = a;
    return f;
  }
  static KQ_INLINE F zero() { return set1(0.f); }
  static KQ_INLINE F mul(F a, F b) { return zip(a, b, [](float x, float y) { return x * y; }); }
  static KQ_INLINE F add(F a, F b) { return zip(a, b, [](float x, float y) { return x + y; }); }
  static KQ_INLINE F sub(F a, F b) { return zip(a, b, [](float x, float y) { return x - y; }); }
  // a * b + c rounded once where the CPU has FMA, twice where it has not: one rule for every
  // caller either way, which is what keeps the two linear regimes identical.
  static KQ_INLINE F fma(F a, F b, F c) {
    for (int l = 0; l < N; ++l) {
#if defined(__FMA__)
      c.v[l] = __builtin_fmaf(a.v[l], b.v[l], c.v[l]);
#else
      c.v[l] = c.v[l] + opaque(a.v[l] * b.v[l]);
#endif
    }
    return c;
  }
  static KQ_INLINE F loadf(const float* p) {
    F f;
    std::memcpy(f.v, p, sizeof f.v);
    return f;
  }
  static KQ_INLINE void storef(float* p, F a) { std::memcpy(p, a.v, sizeof a.v); }
  static KQ_INLINE F half(const uint8_t* p) {
    F f;
    for (int l = 0; l < N; ++l) f.v[l] = load_half(p + 2 * l);
    return f;
  }
  static KQ_INLINE F bf16(const uint8_t* p) {
    F f;
    for (int l = 0; l < N; ++l) f.v[l] = bits_to_f32(static_cast<uint32_t>(load_u16(p + 2 * l)) << 16);
    return f;
  }
  static constexpr int kSumGroup = 1;
  template <typename Get>
  static KQ_INLINE void sum_group(Get&& get, float* out) { out[0] = sum(get(std::integral_constant<int, 0>{})); }
  static KQ_INLINE float sum(F a) {  // fixed order: halves of 4, then 2, 1
    for (int width = N / 2; width >= 1; width /= 2)
      for (int l = 0; l < width; ++l) a.v[l] += a.v[l + width];
    return a.v[0];
  }
};

// opaque() for lane vectors: the scalar lanes one by one.
template <typename L>
KQ_INLINE typename L::F opaque_lanes(typename L::F v) {
  if constexpr (std::is_same_v<L, ScalarLanes>) {
    for (int l = 0; l < L::N; ++l) v.v[l] = opaque(v.v[l]);
    return v;
  } else {
    return opaque(v);
  }
}

// How a decoder rounds a * q + m, for the types with an offset (Q4_1, Q5_1, Q4_K's tables):
// kReference as gguf's numpy does (the product, then the sum: quant_dequantize, to the bit), or
// kFused in one FMA, within half an ulp of it (the linears: Q4_1 decodes 8% faster, 4.0 cycles
// a block against 4.4, where the mul and add took 2 of 8 vector uops).
enum class Rounding { kReference, kFused };

template <typename L, Rounding R>
KQ_INLINE typename L::F mul_add(typename L::F a, typename L::F b, typename L::F c) {
  if constexpr (R == Rounding::kFused) {
    return L::fma(a, b, c);
  } else {
    return L::add(opaque_lanes<L>(L::mul(a, b)), c);
  }
}

// ---- Block types ------------------------------------------------------------------------------
//
// Byte layouts (offsets in bytes; d, m, dmin are IEEE halves; element i of the block):
//
//   Q4_0 [d 2][qs 16]               q = nibble, i < 16: qs[i] & 15, else qs[i - 16] >> 4
//   Q4_1 [d 2][m 2][qs 16]          as Q4_0
//   Q5_0 [d 2][qh 4][qs 16]         q = nibble | bit i of qh << 4
//   Q5_1 [d 2][m 2][qh 4][qs 16]    as Q5_0
//   Q8_0 [d 2][qs 32 int8]
//   Q2_K [scales 16][qs 64][d 2][dmin 2]
//   Q3_K [hmask 32][qs 64][scales 12][d 2]
//   Q4_K [d 2][dmin 2][scales 12][qs 128]
//   Q5_K [d 2][dmin 2][scales 12][qh 32][qs 128]
//   Q6_K [ql 128][qh 64][scales 16 int8][d 2]
//
// In the K-quants (256 elements), 2-bit fields are split as half = i / 128, shift 2j with
// j = (i % 128) / 32, byte l = i % 32: (qs[half * 32 + l] >> 2j) & 3; 4-bit ones as
// (qs[(i / 64) * 32 + i % 32] >> 4 * ((i % 64) / 32)) & 15; high bits of qh / hmask as
// (qh[i % 32] >> (i / 32)) & 1. Formulas follow gguf/quants.py's dequantize_blocks.

template <typename L>
using F_t = typename L::F;

// Q4_0 .. Q8_0 begin with kHalves IEEE half scales: d, or d and m. Their decoders read them
// through S: BlockScales converts the block's own; ConvertedScales reads floats converted ahead
// for many blocks at once (convert_halves), which on AVX-512 turns a conversion and two shuffles
// per block into broadcasts from memory. The values are the same.
template <typename L>
struct BlockScales {
  static KQ_INLINE F_t<L> d(const uint8_t* b) { return L::half1(b); }
  static KQ_INLINE void dm(const uint8_t* b, F_t<L>& d, F_t<L>& m) { L::half2(b, d, m); }
};
template <typename L>
struct ConvertedScales {
  const float* s;  // this block's kHalves floats
  KQ_INLINE F_t<L> d(const uint8_t*) const { return L::set1(s[0]); }
  KQ_INLINE void dm(const uint8_t*, F_t<L>& d, F_t<L>& m) const {
    d = L::set1(s[0]);
    m = L::set1(s[1]);
  }
};

// out[i] = in[i] as float32 for i < n, n a multiple of 8.
KQ_INLINE void convert_halves(const uint16_t* in, int n, float* out) {
#if defined(__F16C__)
  for (int i = 0; i < n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(as<__m128i>(in + i))));
#else
  for (int i = 0; i < n; ++i) out[i] = half_to_f32(in[i]);
#endif
}

// Q::kHalves, or 0 for the types without leading half scales.
template <typename Q, typename = void>
constexpr int kHalvesOf = 0;
template <typename Q>
constexpr int kHalvesOf<Q, std::void_t<decltype(Q::kHalves)>> = Q::kHalves;

struct F32Block {  // not quantized: the kernel's block is 32 elements
  static constexpr int kId = 0, kBlock = 32, kBytes = 128;
  static constexpr const char* kName = "F32";
  template <typename L, Rounding R = Rounding::kReference, typename Emit>
  static KQ_INLINE void decode(const uint8_t* b, Emit&& emit) {
    for (int v = 0; v < kBlock / L::N; ++v) emit(v, L::loadf(reinterpret_cast<const float*>(b) + v * L::N));
  }
};

struct F16Block {
  static constexpr int kId = 1, kBlock = 32, kBytes = 64;
  static constexpr const char* kName = "F16";
  template <typename L, Rounding R = Rounding::kReference, typename Emit>
  static KQ_INLINE void decode(const uint8_t* b, Emit&& emit) {
    for (int v = 0; v < kBlock / L::N; ++v) emit(v, L::half(b + 2 * v * L::N));
  }
};

struct BF16Block {
  static constexpr int kId = 30, kBlock = 32, kBytes = 64;
  static constexpr const char* kName = "BF16";
  template <typename L, Rounding R = Rounding::kReference, typename Emit>
  static KQ_INLINE void decode(const uint8_t* b, Emit&& emit) {
    for (int v = 0; v < kBlock / L::N; ++v) emit(v, L::bf16(b + 2 * v * L::N));
  }
};

// The nibble of element i (0..31) of a 16-byte nibble row, for lanes i .. i + N - 1.
template <typename L>
KQ_INLINE typename L::I nibbles32(const uint8_t* qs, int i) {
  const typename L::I q = L::u8(qs + i % 16);
  return i < 16 ? L::and_(q, 0xF) : L::srl(q, 4);
}

struct Q4_0Block {
  static constexpr int kId = 2, kBlock = 32, kBytes = 18;
  static constexpr int kHalves = 1;
  static constexpr const char* kName = "Q4_0";
  template <typename L, Rounding R = Rounding::kReference, typename Emit, typename S = BlockScales<L>>
  static KQ_INLINE void decode(const uint8_t* b, Emit&& emit, S scales = {}) {
    const F_t<L> d = scales.d(b);
    if constexpr (L::kLookup) {
      const F_t<L> table = L::mul(d, L::iota(-8));  // d * (q - 8), q = 0..15
      const auto raw = L::u8(b + 2);
      emit(0, L::lookup16(table, raw));
      emit(1, L::lookup16(table, L::srl(raw, 4)));
      return;
    }
    for (int v = 0; v < kBlock / L::N; ++v) emit(v, L::mul(d, L::cvt(L::sub(nibbles32<L>(b + 2, v * L::N), 8))));
  }
};

struct Q4_1Block {
  static constexpr int kId = 3, kBlock = 32, kBytes = 20;
  static constexpr int kHalves = 2;
  static constexpr const char* kName = "Q4_1";
  template <typename L, Rounding R = Rounding::kReference, typename Emit, typename S = BlockScales<L>>
  static KQ_INLINE void decode(const uint8_t* b, Emit&& emit, S scales = {}) {
    F_t<L> d, m;
    scales.dm(b, d, m);
    if constexpr (L::kLookup) {
      const F_t<L> table = mul_add<L, R>(d, L::iota(0), m);
      const auto raw = L::u8(b + 4);
      emit(0, L::lookup16(table, raw));
      emit(1, L::lookup16(table, L::srl(raw, 4)));
      return;
    }
    for (int v = 0; v < kBlock / L::N; ++v)
      emit(v, mul_add<L, R>(d, L::cvt(nibbles32<L>(b + 4, v * L::N)), m));
  }
};

struct Q5_0Block {
  static constexpr int kId = 6, kBlock = 32, kBytes = 22;
  static constexpr int kHalves = 1, kQh = 2;  // qh: the fifth bits
  static constexpr const char* kName = "Q5_0";
  template <typename L, Rounding R = Rounding::kReference, typename Emit, typename S = BlockScales<L>>
  static KQ_INLINE void decode(const uint8_t* b, Emit&& emit, S scales = {}) {
    const F_t<L> d = scales.d(b);
    const uint32_t qh = load_u32(b + kQh);
    if constexpr (L::kLookup) {
      const F_t<L> low = L::mul(d, L::iota(-16)), high = L::mul(d, L::iota(0));  // d * (q - 16), q = 0..31
      const auto raw = L::u8(b + 6);
      emit(0, L::lookup32(low, high, L::set_bit4(L::and_(raw, 0xF), b + kQh)));
      emit(1, L::lookup32(low, high, L::set_bit4(L::srl(raw, 4), b + kQh + 2)));
      return;
    }
    for (int v = 0; v < kBlock / L::N; ++v) {
      const int i = v * L::N;
      const auto q = L::or_(nibbles32<L>(b + 6, i), L::shl(L::bits32(qh, i), 4));
      emit(v, L::mul(d, L::cvt(L::sub(q, 16))));
    }
  }
};

struct Q5_1Block {
  static constexpr int kId = 7, kBlock = 32, kBytes = 24;
  static constexpr int kHalves = 2, kQh = 4;
  static constexpr const char* kName = "Q5_1";
  template <typename L, Rounding R = Rounding::kReference, typename Emit, typename S = BlockScales<L>>
  static KQ_INLINE void decode(const uint8_t* b, Emit&& emit, S scales = {}) {
    F_t<L> d, m;
    scales.dm(b, d, m);
    const uint32_t qh = load_u32(b + kQh);
    if constexpr (L::kLookup) {
      const F_t<L> low = mul_add<L, R>(d, L::iota(0), m), high = mul_add<L, R>(d, L::iota(16), m);
      const auto raw = L::u8(b + 8);
      emit(0, L::lookup32(low, high, L::set_bit4(L::and_(raw, 0xF), b + kQh)));
      emit(1, L::lookup32(low, high, L::set_bit4(L::srl(raw, 4), b + kQh + 2)));
      return;
    }
    for (int v = 0; v < kBlock / L::N; ++v) {
      const int i = v * L::N;
      const auto q = L::or_(nibbles32<L>(b + 8, i), L::shl(L::bits32(qh, i), 4));
      emit(v, mul_add<L, R>(d, L::cvt(q), m));
    }
  }
};

struct Q8_0Block {
  static constexpr int kId = 8, kBlock = 32, kBytes = 34;
  static constexpr int kHalves = 1;
  static constexpr const char* kName = "Q8_0";
  template <typename L, Rounding R = Rounding::kReference, typename Emit, typename S = BlockScales<L>>
  static KQ_INLINE void decode(const uint8_t* b, Emit&& emit, S scales = {}) {
    const F_t<L> d = scales.d(b);
    for (int v = 0; v < kBlock / L::N; ++v) emit(v, L::mul(L::cvt(L::i8(b + 2 + v * L::N)), d));
  }
};

// 2-bit field of element i in a K-quant's 64-byte qs (see the layout note above).
template <typename L>
KQ_INLINE typename L::I crumbs256(const uint8_t* qs, int i) {
  return L::and_(L::srl(L::u8(qs + (i / 128) * 32 + i % 32), 2 * ((i % 128) / 32)), 3);
}
// 4-bit field of element i in a K-quant's 128-byte qs.
template <typename L>
KQ_INLINE typename L::I nibbles256(const uint8_t* qs, int i) {
  const typename L::I q = L::u8(qs + (i / 64) * 32 + i % 32);
  return (i % 64) < 32 ? L::and_(q, 0xF) : L::srl(q, 4);
}
// High bit of element i from a 32-byte qh / hmask.
template <typename L>
KQ_INLINE typename L::I highbit256(const uint8_t* qh, int i) {
  return L::and_(L::srl(L::u8(qh + i % 32), i / 32), 1);
}

struct Q2_KBlock {
  static constexpr int kId = 10, kBlock = 256, kBytes = 84;
  static constexpr const char* kName = "Q2_K";
  template <typename L, Rounding R = Rounding::kReference, typename Emit>
  static KQ_INLINE void decode(const uint8_t* b, Emit&& emit) {
    const uint8_t* scales = b;
    const uint8_t* qs = b + 16;
    const float d = load_half(b + 80), dmin = load_half(b + 82);
    for (int v = 0; v < kBlock / L::N; ++v) {
      const int i = v * L::N, s = i / 16;
      const F_t<L> dl = L::set1(d * static_cast<float>(scales[s] & 0xF));
      const F_t<L> ml = L::set1(dmin * static_cast<float>(scales[s] >> 4));
      emit(v, L::sub(opaque_lanes<L>(L::mul(dl, L::cvt(crumbs256<L>(qs, i)))), ml));
    }
  }
};

struct Q3_KBlock {
  static constexpr int kId = 11, kBlock = 256, kBytes = 110;
  static constexpr const char* kName = "Q3_K";
  // The 6-bit scale of group s (16 elements): low 4 bits from bytes 0-7, high 2 from 8-11.
  static KQ_INLINE int scale(const uint8_t* scales, int s) {
    const int low = s < 8 ? scales[s] & 0xF : scales[s - 8] >> 4;
    const int high = (scales[8 + s % 4] >> (2 * (s / 4))) & 3;
    return (low | (high << 4)) - 32;
  }
  template <typename L, Rounding R = Rounding::kReference, typename Emit>
  static KQ_INLINE void decode(const uint8_t* b, Emit&& emit) {
    const uint8_t* hmask = b;
    const uint8_t* qs = b + 32;
    const uint8_t* scales = b + 96;
    const float d = load_half(b + 108);
    for (int v = 0; v < kBlock / L::N; ++v) {
      const int i = v * L::N;
      const F_t<L> dl = L::set1(d * static_cast<float>(scale(scales, i / 16)));
      // q = low 2 bits - 4 where the hmask bit is clear: (low | bit << 2) - 4.
      const auto q = L::sub(L::or_(crumbs256<L>(qs, i), L::shl(highbit256<L>(hmask, i), 2)), 4);
      emit(v, L::mul(dl, L::cvt(q)));
    }
  }
};

// The 6-bit scale and min of sub-block j (32 elements) of Q4_K / Q5_K:
//   bytes 0-3: scale j (low 6 bits), j < 4;  high 2 bits: scale j + 4's bits 4-5
//   bytes 4-7: min j (low 6 bits), j < 4;    high 2 bits: min j + 4's bits 4-5
//   bytes 8-11: scale j + 4 (low 4 bits), min j + 4 (high 4 bits)
KQ_INLINE void k4_scale_min(const uint8_t* scales, int j, int& sc, int& mn) {
  if (j < 4) {
    sc = scales[j] & 0x3F;
    mn = scales[j + 4] & 0x3F;
  } else {
    sc = (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 2) & 0x30);
    mn = (scales[j + 4] >> 4) | ((scales[j] >> 2) & 0x30);
  }
}

struct Q4_KBlock {
  static constexpr int kId = 12, kBlock = 256, kBytes = 144;
  static constexpr const char* kName = "Q4_K";
  template <typename L, Rounding R = Rounding::kReference, typename Emit>
  static KQ_INLINE void decode(const uint8_t* b, Emit&& emit) {
    const uint8_t* scales = b + 4;
    const uint8_t* qs = b + 16;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if constexpr (std::is_same_v<L, Avx512Lanes>) {
      // All 8 scales (lanes 0-7) and mins (8-15) at once, as k4_scale_min computes them:
      //   lanes 0-3, 8-11: a & 63;  lanes 4-7: (a & 15) | (c >> 6) << 4;  12-15: a >> 4 | (c >> 6) << 4
      const __m128i raw = _mm_loadu_si128(as<__m128i>(scales));
      const __m128i pick_a = _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11);
      const __m128i pick_c = _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7);  // -1: zero
      const __m512i a = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(raw, pick_a));
      const __m512i c = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(raw, pick_c));
      const __m512i shift = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4);
      const __m512i mask = _mm512_setr_epi32(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15);
      const __m512i low = _mm512_and_si512(_mm512_srlv_epi32(a, shift), mask);
      const __m512i six_bit = _mm512_or_si512(low, _mm512_slli_epi32(_mm512_srli_epi32(c, 6), 4));
      const __m512 d_dmin = _mm512_cvtph_ps(_mm256_set1_epi32(static_cast<int>(load_u32(b))));  // d, dmin, d, ..
      const __m512 scale = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1), d_dmin);
      const __m512 dd_dm = _mm512_mul_ps(scale, _mm512_cvtepi32_ps(six_bit));  // d * sc_j, then dmin * m_j
      alignas(64) float dd_dm_mem[16];
      _mm512_store_ps(dd_dm_mem, dd_dm);  // broadcasts from memory cost no shuffle
      for (int j = 0; j < 8; ++j) {
        const __m512 dd = _mm512_set1_ps(dd_dm_mem[j]);
        const __m512 dm = _mm512_set1_ps(dd_dm_mem[8 + j]);
        const __m512 table = R == Rounding::kFused ? _mm512_fmsub_ps(dd, L::iota(0), dm)
                                                   : L::sub(opaque(L::mul(dd, L::iota(0))), dm);
        for (int u = 0; u < 2; ++u) {
          const auto raw_q = L::u8(qs + (j / 2) * 32 + u * 16);
          emit(2 * j + u, L::lookup16(table, j % 2 ? L::srl(raw_q, 4) : raw_q));
        }
      }
      return;
    }
#endif
    const float d = load_half(b), dmin = load_half(b + 2);
    for (int j = 0; j < 8; ++j) {
      int sc, mn;
      k4_scale_min(scales, j, sc, mn);
      const F_t<L> dd = L::set1(d * static_cast<float>(sc)), dm = L::set1(dmin * static_cast<float>(mn));
      for (int u = 0; u < 32 / L::N; ++u) {
        const int i = j * 32 + u * L::N;
        emit(i / L::N, L::sub(opaque_lanes<L>(L::mul(dd, L::cvt(nibbles256<L>(qs, i)))), dm));
      }
    }
  }
};

struct Q5_KBlock {
  static constexpr int kId = 13, kBlock = 256, kBytes = 176;
  static constexpr const char* kName = "Q5_K";
  template <typename L, Rounding R = Rounding::kReference, typename Emit>
  static KQ_INLINE void decode(const uint8_t* b, Emit&& emit) {
    const float d = load_half(b), dmin = load_half(b + 2);
    const uint8_t* scales = b + 4;
    const uint8_t* qh = b + 16;
    const uint8_t* qs = b + 48;
    for (int j = 0; j < 8; ++j) {
      int sc, mn;
      k4_scale_min(scales, j, sc, mn);
      const F_t<L> dd = L::set1(d * static_cast<float>(sc)), dm = L::set1(dmin * static_cast<float>(mn));
      for (int u = 0; u < 32 / L::N; ++u) {
        const int i = j * 32 + u * L::N;
        const auto q = L::or_(nibbles256<L>(qs, i), L::shl(highbit256<L>(qh, i), 4));
        emit(i / L::N, L::sub(opaque_lanes<L>(L::mul(dd, L::cvt(q))), dm));
      }
    }
  }
};

struct Q6_KBlock {
  static constexpr int kId = 14, kBlock = 256, kBytes = 210;
  static constexpr const char* kName = "Q6_K";
  template <typename L, Rounding R = Rounding::kReference, typename Emit>
  static KQ_INLINE void decode(const uint8_t* b, Emit&& emit) {
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
    const float d = load_half(b + 208);
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if constexpr (std::is_same_v<L, Avx512Lanes>) {
      // 64 elements at a time in bytes: q - 32 for elements 64u .. 64u + 63 of half h is
      //   (ql[64h + l] >> 4u & 15) | (qh[32h + l % 32] >> (4u + 2 * (l / 32)) & 3) << 4, l = 0..63
      // d * scale of each group of 16, read back by broadcasts from memory (no shuffles)
      alignas(64) float dd[16];
      _mm512_store_ps(dd, _mm512_mul_ps(_mm512_set1_ps(d), L::cvt(L::i8(b + 192))));
      const __m512i low_mask = _mm512_set1_epi8(0x0F), crumb_mask = _mm512_set1_epi8(0x03);
      const __m512i offset = _mm512_set1_epi8(32);
      for (int h = 0; h < 2; ++h) {
        const __m512i low = _mm512_loadu_si512(ql + 64 * h);
        const __m512i high = _mm512_broadcast_i64x4(_mm256_loadu_si256(as<__m256i>(qh + 32 * h)));
        for (int u = 0; u < 2; ++u) {
          const __m512i nibbles = _mm512_and_si512(u ? _mm512_srli_epi16(low, 4) : low, low_mask);
          // words 0-15 (bytes 0-31) shift by 4u, words 16-31 by 4u + 2
          const __m512i shifts = _mm512_inserti64x4(_mm512_set1_epi16(static_cast<short>(4 * u)),
                                                    _mm256_set1_epi16(static_cast<short>(4 * u + 2)), 1);
          const __m512i crumbs = _mm512_and_si512(_mm512_srlv_epi16(high, shifts), crumb_mask);
          const __m512i q = _mm512_sub_epi8(_mm512_or_si512(nibbles, _mm512_slli_epi16(crumbs, 4)), offset);
          alignas(64) int8_t bytes[64];
          _mm512_store_si512(bytes, q);
          for (int t = 0; t < 4; ++t) {
            const int v = 8 * h + 4 * u + t;  // = group of 16, = scale index
            emit(v, _mm512_mul_ps(_mm512_set1_ps(dd[v]), L::cvt(L::i8(reinterpret_cast<const uint8_t*>(bytes) + 16 * t))));
          }
        }
      }
      return;
    }
#endif
    for (int v = 0; v < kBlock / L::N; ++v) {
      const int i = v * L::N;
      // low 4 bits: (ql[(i / 128) * 64 + i % 64] >> 4 * ((i % 128) / 64)) & 15
      const auto raw = L::u8(ql + (i / 128) * 64 + i % 64);
      const auto low = (i % 128) < 64 ? L::and_(raw, 0xF) : L::srl(raw, 4);
      const auto q = L::sub(L::or_(low, L::shl(crumbs256<L>(qh, i), 4)), 32);
      emit(v, L::mul(L::set1(d * static_cast<float>(scales[i / 16])), L::cvt(q)));
    }
  }
};

// Calls fn(Block{}) for the block type with GGML id `qtype`; false if there is none.
template <typename Fn>
bool with_block_type(int64_t qtype, Fn&& fn) {
  switch (qtype) {
    case F32Block::kId: fn(F32Block{}); return true;
    case F16Block::kId: fn(F16Block{}); return true;
    case BF16Block::kId: fn(BF16Block{}); return true;
    case Q4_0Block::kId: fn(Q4_0Block{}); return true;
    case Q4_1Block::kId: fn(Q4_1Block{}); return true;
    case Q5_0Block::kId: fn(Q5_0Block{}); return true;
    case Q5_1Block::kId: fn(Q5_1Block{}); return true;
    case Q8_0Block::kId: fn(Q8_0Block{}); return true;
    case Q2_KBlock::kId: fn(Q2_KBlock{}); return true;
    case Q3_KBlock::kId: fn(Q3_KBlock{}); return true;
    case Q4_KBlock::kId: fn(Q4_KBlock{}); return true;
    case Q5_KBlock::kId: fn(Q5_KBlock{}); return true;
    case Q6_KBlock::kId: fn(Q6_KBlock{}); return true;
    default: return false;
  }
}

// GGML's name for a type id, supported here or not (for error messages).
inline const char* ggml_type_name(int64_t qtype) {
  static const char* const names[] = {
      "F32",   "F16",    "Q4_0",    "Q4_1",   "Q4_2",  "Q4_3",   "Q5_0",  "Q5_1",  "Q8_0",  "Q8_1",  "Q2_K",
      "Q3_K",  "Q4_K",   "Q5_K",    "Q6_K",   "Q8_K",  "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S",
      "IQ2_S", "IQ4_XS", "I8",      "I16",    "I32",   "I64",    "F64",   "IQ1_M", "BF16",  "Q4_0_4_4", "Q4_0_4_8",
      "Q4_0_8_8", "TQ1_0", "TQ2_0", "IQ4_NL_4_4", "IQ4_NL_4_8", "IQ4_NL_8_8", "MXFP4", "NVFP4", "Q1_0"};
  constexpr int64_t count = sizeof names / sizeof names[0];
  return qtype >= 0 && qtype < count ? names[qtype] : "unknown";
}

}  // namespace kestrel_quant
