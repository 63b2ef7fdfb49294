// SIMD building blocks the kernel families share: which instruction-set paths a build has,
// bf16 <-> float32 conversions (one element, eight lanes, sixteen lanes), a vectorisable exp,
// and horizontal sums. No torch here. Every vector helper computes the same arithmetic as its
// scalar counterpart, lane by lane.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// Built with -march=native: each path exists only where the CPU has its instructions, and
// every kernel also has a portable loop.
//   KESTREL_AVX2         AVX2 + FMA: eight-lane helpers, the FMA linear and the decoder stack.
//   KESTREL_AVX512_BF16  AVX-512F + BF16: sixteen-lane helpers, vdpbf16ps.
//   KESTREL_AVX2_ONLY    AVX2 + FMA without AVX512_BF16: eight lanes where the above takes 16.
//   KESTREL_AMX          AMX tiles with bf16 (only with KESTREL_AVX512_BF16): the AMX linear.
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define KESTREL_AVX2
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define KESTREL_AVX512_BF16
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define KESTREL_AMX
#endif
#endif
#if defined(KESTREL_AVX2) && !defined(KESTREL_AVX512_BF16)
#define KESTREL_AVX2_ONLY
#endif

namespace kestrel {

// ---- One element ----------------------------------------------------------------------------

// Kernels work on raw element types: float, or uint16_t holding bf16 bits. Conversions on the
// raw bits vectorize where c10::BFloat16's operators keep gcc from it; float32 -> bf16 rounds
// to nearest even, as torch does.
inline float f32(float x) { return x; }
inline float f32(uint16_t bf16) {
  const uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename R>
inline R from_f32(float x);
template <>
inline float from_f32<float>(float x) { return x; }
template <>
inline uint16_t from_f32<uint16_t>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  return x != x ? uint16_t{0x7FC0} : rounded;
}

// Rounds a float32 intermediate to the model dtype and back, as an eager op producing a
// tensor of that dtype would.
template <typename R>
inline float rounded(float x) { return f32(from_f32<R>(x)); }

// exp with about 1 ulp of float32 error, in plain arithmetic so loops over it vectorize
// (std::exp does not): Cody-Waite reduction to [-ln2/2, ln2/2] and Cephes' polynomial, whose
// coefficients (highest power first) the vector versions below share.
constexpr float kExpPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline float vexp(float x) {
  x = std::min(std::max(x, -87.3f), 88.7f);
  // n = round(x / ln2) by the 1.5 * 2^23 trick (std::floor would not vectorize).
  const float n = (x * 1.44269504f + 12582912.f) - 12582912.f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = kExpPoly[0];
  for (int i = 1; i < 6; ++i) p = p * r + kExpPoly[i];
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// ---- Sixteen lanes (AVX-512) ----------------------------------------------------------------

#ifdef KESTREL_AVX512_BF16
// Sixteen lanes at a time for bf16 rows, where gcc leaves the scalar loops unvectorized or
// nearly so (3-4x slower on prefill-sized steps). Same arithmetic as the scalar versions.
inline __m512 load16(const uint16_t* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }  // nearest even
inline void store16(uint16_t* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(v)); }
inline __m512 rounded16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(v)), 16));
}

inline __m512 vexp16(__m512 x) {  // vexp, lane by lane
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 magic = _mm512_set1_ps(12582912.f);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504f), magic), magic);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}
#endif

// ---- Eight lanes (AVX2) ---------------------------------------------------------------------

#ifdef KESTREL_AVX2
// Eight lanes at a time: the FMA linear, and bf16 rows on CPUs with AVX2 but not AVX-512
// (KESTREL_AVX2_ONLY), where gcc leaves the scalar loops unvectorized. Same arithmetic as the
// scalar versions.
inline __m256 load8(const uint16_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
// bf16 bits of each lane, in the low half of its 32 bits: rounded to nearest even, NaN kept
// quiet, as from_f32 does.
inline __m256i bf16_bits8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}
inline void store8(uint16_t* p, __m256 v) {
  const __m256i bits = bf16_bits8(v);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
inline __m256 rounded8(__m256 v) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(v), 16)); }
// Sixteen bf16 widen to float32 in two ops, in an order of their own: a shift gives the even
// elements (0, 2, .., 14), a mask the odd ones.
inline __m256i load_raw16(const uint16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256 even8(__m256i raw) { return _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16)); }
inline __m256 odd8(__m256i raw) {
  return _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

inline __m256 vexp8(__m256 x) {  // vexp, lane by lane
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
  const __m256 magic = _mm256_set1_ps(12582912.f);
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504f), magic), magic);
  const __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x));
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#endif

// ---- Horizontal sums ------------------------------------------------------------------------

#ifdef KESTREL_AVX2
// The sum of v's eight lanes: (0 + 4) + (2 + 6), plus (1 + 5) + (3 + 7).
inline float sum_lanes8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Lane i of the result holds the sum of v[i]'s eight lanes.
inline __m256 sum_lanes8x8(const __m256* v) {
  const __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // ab: [v0..v3 summed over lanes 0-3 | over lanes 4-7]; cd likewise for v4..v7.
  return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}
#endif

#ifdef KESTREL_AVX512_BF16
// Lane i of the result holds the sum of v[i]'s sixteen lanes: one transpose-and-add tree
// instead of sixteen horizontal reductions.
inline __m512 sum_lanes16(const __m512* v) {
  __m512 pairs[8], quads[4];
  for (int j = 0; j < 8; ++j) {  // per 128-bit quarter: [v2j, v2j+1, v2j, v2j+1] partial sums
    pairs[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
  }
  for (int j = 0; j < 4; ++j) {  // per quarter: [v4j, v4j+1, v4j+2, v4j+3] partial sums
    const __m512d a = _mm512_castps_pd(pairs[2 * j]), b = _mm512_castps_pd(pairs[2 * j + 1]);
    quads[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // Quarter j of the result: the four quarters of quads[j] added up.
  const auto fold = [](__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
  };
  return fold(fold(quads[0], quads[1]), fold(quads[2], quads[3]));
}
#endif

}  // namespace kestrel
