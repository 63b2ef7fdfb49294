// Fused CPU kernels for a model step (decodes, draft rows and prompt chunks alike): the eager
// versions cost a few microseconds of dispatch per op, a gather copy of every sequence's keys
// and values per layer, and oneDNN's fixed cost per matmul call.
//
// Every kernel rounds to the model dtype at the same points as the eager torch code it
// replaces (which follows the reference implementation), so bf16 results match it bit for
// bit except for float32 summation order. Each output row depends only on its own inputs,
// never on the rest of the batch.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

// Built with -march=native: the AVX-512 bf16 paths exist only where the CPU has them; every
// kernel also has a portable loop.
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KESTREL_AVX2
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define KESTREL_AVX512_BF16
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define KESTREL_AMX
#endif
#endif

namespace {

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

// Calls fn(R{}) with R the raw element type of `dtype`.
template <typename Fn>
void dispatch(at::ScalarType dtype, const char* name, Fn&& fn) {
  if (dtype == at::kBFloat16) {
    fn(uint16_t{});
  } else if (dtype == at::kFloat) {
    fn(float{});
  } else {
    TORCH_CHECK(false, name, ": only float32 and bfloat16 are supported, got ", dtype);
  }
}

template <typename R>
R* ptr(const at::Tensor& t) { return reinterpret_cast<R*>(t.data_ptr()); }

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

#ifdef KESTREL_AVX2
// Eight lanes at a time: the linear kernel below, and for bf16 rows on CPUs with AVX2 but not
// AVX-512 (KESTREL_AVX2_ONLY), where gcc leaves the scalar loops unvectorized. Same arithmetic
// as the scalar versions.
#ifndef KESTREL_AVX512_BF16
#define KESTREL_AVX2_ONLY
#endif
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
inline float sum_lanes8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
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

void check_cpu_contiguous_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

// ---- RMSNorm, optionally adding the residual first --------------------------------------

template <typename T>
void rms_norm_rows(const T* x, T* residual, const T* weight, T* out, int64_t rows, int64_t
                   hidden, int64_t x_stride, double eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> h(hidden);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * x_stride;
      T* res = residual ? residual + r * hidden : nullptr;
      float sum_sq = 0.f;
      int64_t i = 0;
#ifdef KESTREL_AVX512_BF16
      if constexpr (std::is_same_v<T, uint16_t>) {
        __m512 acc = _mm512_setzero_ps();
        for (; i + 16 <= hidden; i += 16) {
          __m512 v = load16(xr + i);
          if (res) {
            v = rounded16(_mm512_add_ps(v, load16(res + i)));
            store16(res + i, v);
          }
          _mm512_storeu_ps(h.data() + i, v);
          acc = _mm512_fmadd_ps(v, v, acc);
        }
        sum_sq = _mm512_reduce_add_ps(acc);
      }
#endif
#ifdef KESTREL_AVX2_ONLY
      if constexpr (std::is_same_v<T, uint16_t>) {
        __m256 acc = _mm256_setzero_ps();
        for (; i + 8 <= hidden; i += 8) {
          __m256 v = load8(xr + i);
          if (res) {
            v = rounded8(_mm256_add_ps(v, load8(res + i)));
            store8(res + i, v);
          }
          _mm256_storeu_ps(h.data() + i, v);
          acc = _mm256_fmadd_ps(v, v, acc);
        }
        sum_sq = sum_lanes8(acc);
      }
#endif
      const int64_t vectorized = i;
      for (; i < hidden; ++i) {
        // residual + x, rounded like the eager bf16 add; the sum becomes the new residual.
        float v = res ? rounded<T>(f32(xr[i]) + f32(res[i])) : f32(xr[i]);
        h[i] = v;
        sum_sq += v * v;
      }
      if (res) {
        for (int64_t i = vectorized; i < hidden; ++i) res[i] = from_f32<T>(h[i]);
      }
      const float inv_rms = 1.f / std::sqrt(sum_sq / hidden + static_cast<float>(eps));
      T* o = out + r * hidden;
      i = 0;
#ifdef KESTREL_AVX512_BF16
      if constexpr (std::is_same_v<T, uint16_t>) {
        const __m512 scale = _mm512_set1_ps(inv_rms);
        for (; i + 16 <= hidden; i += 16) {
          store16(o + i, _mm512_mul_ps(load16(weight + i), rounded16(_mm512_mul_ps(_mm512_loadu_ps(h.data() + i), scale))));
        }
      }
#endif
#ifdef KESTREL_AVX2_ONLY
      if constexpr (std::is_same_v<T, uint16_t>) {
        const __m256 scale = _mm256_set1_ps(inv_rms);
        for (; i + 8 <= hidden; i += 8) {
          store8(o + i, _mm256_mul_ps(load8(weight + i), rounded8(_mm256_mul_ps(_mm256_loadu_ps(h.data() + i), scale))));
        }
      }
#endif
      for (; i < hidden; ++i) {
        o[i] = from_f32<T>(f32(weight[i]) * rounded<T>(h[i] * inv_rms));
      }
    }
  });
}

// out = weight * norm(x), or with a residual: residual += x (in place), out = weight * norm(residual).
at::Tensor rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                    const at::Tensor& weight, double eps) {
  check_cpu_contiguous_rows(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must be [num_tokens, hidden]");
  const int64_t rows = x.size(0), hidden = x.size(1);
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == hidden && weight.scalar_type() == x.scalar_type(),
              "weight must be a contiguous [hidden] tensor of x's dtype");
  if (residual) {
    TORCH_CHECK(residual->is_contiguous() && residual->sizes() == x.sizes() &&
                residual->scalar_type() == x.scalar_type(), "residual must be contiguous, shaped and typed like x");
  }
  auto out = at::empty({rows, hidden}, x.options());
  dispatch(x.scalar_type(), "rms_norm", [&](auto raw) {
    using scalar_t = decltype(raw);
    rms_norm_rows<scalar_t>(ptr<scalar_t>(x), residual ? ptr<scalar_t>(*residual) : nullptr,
                            ptr<scalar_t>(weight), ptr<scalar_t>(out), rows, hidden,
                            x.stride(0), eps);
  });
  return out;
}

// ---- SwiGLU: silu(gate) * up ----------------------------------------------------------------

template <typename T>
void silu_and_mul_rows(const T* in, T* out, int64_t rows, int64_t width, int64_t stride) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = in + r * stride;
      const T* up = gate + width;
      T* o = out + r * width;
      int64_t c = 0;
#ifdef KESTREL_AVX512_BF16
      if constexpr (std::is_same_v<T, uint16_t>) {
        for (; c + 16 <= width; c += 16) {
          const __m512 g = load16(gate + c);
          const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), vexp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
          store16(o + c, _mm512_mul_ps(rounded16(silu), load16(up + c)));
        }
      }
#endif
#ifdef KESTREL_AVX2_ONLY
      if constexpr (std::is_same_v<T, uint16_t>) {
        for (; c + 8 <= width; c += 8) {
          const __m256 g = load8(gate + c);
          const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), vexp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
          store8(o + c, _mm256_mul_ps(rounded8(silu), load8(up + c)));
        }
      }
#endif
      for (; c < width; ++c) {
        const float g = f32(gate[c]);
        o[c] = from_f32<T>(rounded<T>(g / (1.f + vexp(-g))) * f32(up[c]));
      }
    }
  });
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  check_cpu_contiguous_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up must be [num_tokens, 2 * intermediate]");
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2;
  auto out = at::empty({rows, width}, gate_up.options());
  dispatch(gate_up.scalar_type(), "silu_and_mul", [&](auto raw) {
    using scalar_t = decltype(raw);
    silu_and_mul_rows<scalar_t>(ptr<scalar_t>(gate_up), ptr<scalar_t>(out), rows, width,
                                gate_up.stride(0));
  });
  return out;
}

// ---- Rotary embedding of q and k in place, and k / v into the paged cache --------------------

// qkv: [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim], q heads then k then v.
// cos / sin: [max_position, head_dim] tables in the model dtype, sin signed for rotate_half.
void rotary_and_store(at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos,
                      const at::Tensor& sin, int64_t num_heads, int64_t num_kv_heads,
                      at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  check_cpu_contiguous_rows(qkv, "qkv");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "cos, sin and the caches must be contiguous");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slot_mapping.scalar_type() == at::kLong,
              "positions and slot_mapping must be int64");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&cos, &sin, &k_cache, &v_cache}) {
    TORCH_CHECK(t->scalar_type() == qkv.scalar_type(), "cos, sin and the caches must have qkv's dtype");
  }
  const int64_t tokens = qkv.size(0), head_dim = cos.size(1), half = head_dim / 2;
  TORCH_CHECK(qkv.size(1) == (num_heads + 2 * num_kv_heads) * head_dim, "qkv width does not match the heads");
  TORCH_CHECK(positions.numel() == tokens && slot_mapping.numel() == tokens, "one position and slot per token");
  const int64_t kv_width = num_kv_heads * head_dim, stride = qkv.stride(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.numel() / kv_width;
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos.size(0), "position ", pos[t], " outside the rotary table");
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "slot ", slots[t], " outside the cache");
  }
  dispatch(qkv.scalar_type(), "rotary_and_store", [&](auto raw) {
    using scalar_t = decltype(raw);
    scalar_t* base = ptr<scalar_t>(qkv);
    const scalar_t* cos_t = ptr<scalar_t>(cos);
    const scalar_t* sin_t = ptr<scalar_t>(sin);
    scalar_t* kc = ptr<scalar_t>(k_cache);
    scalar_t* vc = ptr<scalar_t>(v_cache);
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> x(head_dim);
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* c = cos_t + pos[t] * head_dim;
        const scalar_t* s = sin_t + pos[t] * head_dim;
        scalar_t* row = base + t * stride;
        for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
          scalar_t* v = row + h * head_dim;
#ifdef KESTREL_AVX512_BF16
          if constexpr (std::is_same_v<scalar_t, uint16_t>) {
            if (half % 16 == 0) {  // lanes i and i + half swap: whole vectors
              for (int64_t i = 0; i < half; i += 16) {
                const __m512 lo = load16(v + i), hi = load16(v + half + i);
                const __m512 rot_lo = _mm512_add_ps(rounded16(_mm512_mul_ps(lo, load16(c + i))),
                                                    rounded16(_mm512_mul_ps(hi, load16(s + i))));
                const __m512 rot_hi = _mm512_add_ps(rounded16(_mm512_mul_ps(hi, load16(c + half + i))),
                                                    rounded16(_mm512_mul_ps(lo, load16(s + half + i))));
                store16(v + i, rot_lo);
                store16(v + half + i, rot_hi);
              }
              continue;
            }
          }
#endif
          for (int64_t i = 0; i < head_dim; ++i) x[i] = f32(v[i]);
          for (int64_t i = 0; i < head_dim; ++i) {
            const float swapped = x[i < half ? i + half : i - half];
            v[i] = from_f32<scalar_t>(rounded<scalar_t>(x[i] * f32(c[i])) + rounded<scalar_t>(swapped * f32(s[i])));
          }
        }
        std::copy_n(row + num_heads * head_dim, kv_width, kc + slots[t] * kv_width);
        std::copy_n(row + num_heads * head_dim + kv_width, kv_width, vc + slots[t] * kv_width);
      }
    });
  });
}

// ---- Attention straight from the paged cache (decodes, draft rows, prompt chunks) -----------

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
    for (int64_t p = position; p < end;) {
      const int64_t rows = whole_rows ? std::min(block_size - p % block_size, end - p) : 1;  // within one block
      const char* start = reinterpret_cast<const char*>(cache + table[p / block_size] * block_size * row_stride) +
                          (p % block_size) * row_bytes;
      const int64_t bytes = whole_rows ? rows * row_bytes : width * sizeof(T);
      p += rows;
      for (int64_t off = 0; off < bytes; off += 64) {
#ifdef KESTREL_AVX512_BF16
        sink = _mm512_or_si512(sink, _mm512_loadu_si512(start + off));
#else
        sink |= *reinterpret_cast<const uint64_t*>(start + off);
#endif
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

// Lane i of the result holds the sum of v[i]'s eight lanes.
inline __m256 sum_lanes8x8(const __m256* v) {
  const __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // ab: [v0..v3 summed over lanes 0-3 | over lanes 4-7]; cd likewise for v4..v7.
  return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

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
#ifdef KESTREL_AVX2_ONLY
    // gcc leaves vexp's loop scalar: it took a third of the attention time.
    __m256 mx8 = _mm256_set1_ps(-INFINITY);
    for (int64_t p = 0; p + 8 <= len; p += 8) mx8 = _mm256_max_ps(mx8, _mm256_loadu_ps(row + p));
    for (int i = 0; i < 8; ++i) mx = std::max(mx, mx8[i]);
    for (int64_t p = len / 8 * 8; p < len; ++p) mx = std::max(mx, row[p]);
    __m256 sum8 = _mm256_setzero_ps();
    for (; start + 8 <= len; start += 8) {
      const __m256 e = vexp8(_mm256_sub_ps(_mm256_loadu_ps(row + start), _mm256_set1_ps(mx)));
      _mm256_storeu_ps(row + start, e);
      sum8 = _mm256_add_ps(sum8, e);
    }
    sum = sum_lanes8(sum8);
#else
    #pragma omp simd reduction(max : mx)
    for (int64_t p = 0; p < len; ++p) mx = std::max(mx, row[p]);
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

// Attention of every new token of a step, read straight from the paged cache.
// q: [num_rows, num_heads, head_dim] (rows may be strided); caches: [num_blocks, block_size,
// num_kv_heads, head_dim]; block_tables: [num_seqs, max_blocks]. Sequence s owns the rows
// [query_starts[s], query_starts[s + 1]), the newest tokens of its context_lens[s]: its last
// row sits at position context_lens[s] - 1, each row before it one position earlier, and a row
// attends to its own position and all before it. Decodes are one row, a draft's rows or a
// prompt chunk several. Scores, softmax and the weighted sum of values are float32 and each
// (row, head) is computed on its own in the same order of operations, so a row's result is
// the same whichever batch, chunk or step computes it.
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
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* starts = query_starts.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  T* op = ptr<T>(out);
  const float sc = static_cast<float>(scale);

  // A work item is a tile of consecutive rows of one sequence, which read each block of keys
  // and values once for all of them, with all kv heads (contiguous reads); or one kv head of
  // it when there are too few items to keep every thread busy. A tile's scores stay within
  // about 256 KB (L2).
  struct Item {
    int64_t seq, first_row, num_rows, len;  // len: the context of its last row
  };
  std::vector<Item> items;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t rows = starts[s + 1] - starts[s], earlier = lens[s] - rows;
    const int64_t tile = std::clamp<int64_t>(64 * 1024 / (num_heads * lens[s]), 1, 16);
    for (int64_t r = 0; r < rows; r += tile) {
      const int64_t n = std::min(tile, rows - r);
      items.push_back({s, r, n, earlier + r + n});
    }
  }
  // Costliest first: with items handed out one at a time, no thread is left with a long one at
  // the end.
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.len * a.num_rows > b.len * b.num_rows; });
  const int64_t split = static_cast<int64_t>(items.size()) < at::get_num_threads() ? num_kv_heads : 1;
  const int64_t heads_per_item = num_kv_heads / split;
  const int64_t num_items = static_cast<int64_t>(items.size()) * split;

  #pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> scores, acc, q_split;
    #pragma omp for schedule(dynamic, 1)
    for (int64_t index = 0; index < num_items; ++index) {
      const Item& item = items[index / split];
      const int64_t s = item.seq, kv_first = (index % split) * heads_per_item;
      // Row t of the tile has a context of base_len + t + 1 tokens; the tile reads len of them.
      const int64_t len = item.len, base_len = len - item.num_rows;
      const int64_t heads = heads_per_item * group;  // query heads per row
      const int64_t rows = item.num_rows * heads;  // (row, query head) pairs
      const T* q_first = qp + (starts[s] + item.first_row) * q_row_stride + kv_first * group * q_head_stride;
      auto q_of = [&](int64_t r) { return q_first + (r / heads) * q_row_stride + (r % heads) * q_head_stride; };
      auto len_of = [&](int64_t r) { return base_len + r / heads + 1; };
      const int64_t* table = tables + s * max_blocks;
      const PagedContext<T> keys{ptr<T>(k_cache) + kv_first * head_dim, table, block_size, row_stride, len};
      const PagedContext<T> values{ptr<T>(v_cache) + kv_first * head_dim, table, block_size, row_stride, len};
      scores.resize(rows * len);
      acc.assign(rows * head_dim, 0.f);
      const int64_t width = heads_per_item * head_dim;
#ifdef KESTREL_AVX2_ONLY
      constexpr bool split_order = std::is_same_v<T, uint16_t>;  // see even8 / odd8
      if constexpr (split_order) {
        if (head_dim == 64) {
          q_split.resize(rows * 64);
          for (int64_t r = 0; r < rows; ++r) {
            for (int j = 0; j < 4; ++j) {
              const __m256i raw = load_raw16(q_of(r) + 16 * j);
              _mm256_storeu_ps(q_split.data() + r * 64 + 16 * j, even8(raw));
              _mm256_storeu_ps(q_split.data() + r * 64 + 16 * j + 8, odd8(raw));
            }
          }
        }
      }
#else
      constexpr bool split_order = false;
#endif
      keys.for_each_block([&](int64_t first, const T* block, int64_t n) {
        if (first % kTouchWindow == 0) {  // the V pass then finds its rows in L2
          keys.touch(first, kTouchWindow, width);
          values.touch(first, kTouchWindow, width);
        }
        // Row (t, head) sees the block's first min(n, its context - first) keys.
        for (int64_t r0 = 0; r0 < rows; r0 += heads) {
          const int64_t seen = std::min(n, len_of(r0) - first);
          if (seen <= 0) continue;
#ifdef KESTREL_AVX512_BF16
          if constexpr (std::is_same_v<T, uint16_t>) {
            if (head_dim == 64 && block_size == 16) {
              for (int64_t r = r0; r < r0 + heads; ++r) {
                const __m512 dots = block_scores64(q_of(r), block + ((r % heads) / group) * head_dim, row_stride, seen);
                _mm512_mask_storeu_ps(scores.data() + r * len + first, (__mmask16)((1u << seen) - 1),
                                      _mm512_mul_ps(dots, _mm512_set1_ps(sc)));
              }
              continue;
            }
          }
#endif
#ifdef KESTREL_AVX2_ONLY
          if constexpr (split_order) {
            if (head_dim == 64) {
              for (int64_t r = r0; r < r0 + heads; ++r) {
                block_scores64_avx2(q_split.data() + r * 64, block + ((r % heads) / group) * head_dim, row_stride,
                                    seen, sc, scores.data() + r * len + first);
              }
              continue;
            }
          }
#endif
          for (int64_t i = 0; i < seen; ++i) {
            for (int64_t h = 0; h < heads_per_item; ++h) {
              const T* k = block + i * row_stride + h * head_dim;
              for (int64_t g = 0; g < group; ++g) {
                const int64_t r = r0 + h * group + g;
                scores[r * len + first + i] = dot(q_of(r), k, head_dim) * sc;
              }
            }
          }
        }
      });
      for (int64_t r0 = 0; r0 < rows; r0 += heads) softmax_rows(scores.data() + r0 * len, heads, len_of(r0), len);
      values.for_each_block([&](int64_t first, const T* block, int64_t n) {
        for (int64_t r0 = 0; r0 < rows; r0 += heads) {
          const int64_t seen = std::min(n, len_of(r0) - first);
          if (seen <= 0) continue;
#ifdef KESTREL_AVX512_BF16
          if constexpr (std::is_same_v<T, uint16_t>) {
            if (head_dim == 64) {
              for (int64_t h = 0; h < heads_per_item; ++h) {
                for (int64_t g0 = 0; g0 < group; g0 += 4) {  // query heads of this kv head, 4 at a time
                  const int64_t count = std::min<int64_t>(4, group - g0);
                  const float* w[4];
                  float* a[4];
                  for (int64_t g = 0; g < count; ++g) {
                    w[g] = scores.data() + (r0 + h * group + g0 + g) * len + first;
                    a[g] = acc.data() + (r0 + h * group + g0 + g) * head_dim;
                  }
                  accumulate_block64(w, block + h * head_dim, row_stride, seen, a, count);
                }
              }
              continue;
            }
          }
#endif
#ifdef KESTREL_AVX2_ONLY
          if constexpr (split_order) {
            if (head_dim == 64) {
              for (int64_t r = r0; r < r0 + heads; ++r) {
                accumulate_block64_avx2(scores.data() + r * len + first, block + ((r % heads) / group) * head_dim,
                                        row_stride, seen, acc.data() + r * 64);
              }
              continue;
            }
          }
#endif
          for (int64_t h = 0; h < heads_per_item; ++h) {
            for (int64_t g = 0; g < group; ++g) {
              const int64_t r = r0 + h * group + g;
              accumulate_rows(scores.data() + r * len + first, block + h * head_dim, row_stride, seen, head_dim,
                              acc.data() + r * head_dim);
            }
          }
        }
      });
      for (int64_t r = 0; r < rows; ++r) {
        T* o = op + ((starts[s] + item.first_row + r / heads) * num_heads + kv_first * group + r % heads) * head_dim;
        const float* a = acc.data() + r * head_dim;
        if (split_order && head_dim == 64) {  // chunk j: 8 even elements, then 8 odd ones
          for (int64_t d = 0; d < 64; ++d) o[d] = from_f32<T>(a[d / 16 * 16 + (d % 2) * 8 + d % 16 / 2]);
        } else {
          for (int64_t d = 0; d < head_dim; ++d) o[d] = from_f32<T>(a[d]);
        }
      }
    }
  }
}

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

#ifdef KESTREL_AVX2
// ---- Linear with AVX2 FMA, for CPUs without AVX-512 ------------------------------------------

// oneDNN refuses bf16 weights without AVX-512, and torch's own bf16 matmul takes 195 ms for
// SmolLM2's linears at 16 rows there (AMD EPYC, 2 cores). Here the bf16 weight is widened to
// float32 in registers and every output element sums x[k] * w[k] by FMA in float32 with k in
// order, whatever the row count or the tile shape that computes it: a row's result never
// depends on the rest of the batch.
//
// The weight is pre-packed in panels of 16 outputs, [N / 16][K][16] (see fma_panels in
// engine/kernels/__init__.py): lane 2j holds output j and lane 2j + 1 output 8 + j, so that
// even8 / odd8 of one 32-byte load give outputs 0-7 and 8-15.

inline void store_bf16x16(uint16_t* out, __m256 lo, __m256 hi) {  // outputs 0-7, 8-15
  // packus interleaves 128-bit lanes: [lo 0-3, hi 0-3, lo 4-7, hi 4-7]; the permute restores order.
  const __m256i packed = _mm256_packus_epi32(bf16_bits8(lo), bf16_bits8(hi));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute4x64_epi64(packed, 0xD8));
}

// MR rows of x (float32) times NP panels: 2 * MR * NP accumulators, all independent FMA chains.
// With `ahead`, each k also prefetches `ahead_step` bytes on from ahead + k * ahead_step (a
// template flag: a branch in the k loop made gcc spill the accumulators).
template <int MR, int NP, bool kPrefetch = false>
void fma_tile(const float* x, int64_t K, const uint16_t* w, int64_t panel_stride, const float* bias,
              uint16_t* out, int64_t out_stride, const char* ahead = nullptr, int64_t ahead_step = 0) {
  __m256 acc[MR][NP][2];
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < NP; ++p) acc[r][p][0] = acc[r][p][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if constexpr (kPrefetch) _mm_prefetch(ahead + k * ahead_step, _MM_HINT_T0);
    __m256 lo[NP], hi[NP];
    for (int p = 0; p < NP; ++p) {
      const __m256i v = load_raw16(w + p * panel_stride + k * 16);
      lo[p] = even8(v);
      hi[p] = odd8(v);
    }
    for (int r = 0; r < MR; ++r) {
      const __m256 xr = _mm256_broadcast_ss(x + r * K + k);
      for (int p = 0; p < NP; ++p) {
        acc[r][p][0] = _mm256_fmadd_ps(xr, lo[p], acc[r][p][0]);
        acc[r][p][1] = _mm256_fmadd_ps(xr, hi[p], acc[r][p][1]);
      }
    }
  }
  for (int p = 0; p < NP; ++p) {
    const __m256 b0 = bias ? _mm256_loadu_ps(bias + p * 16) : _mm256_setzero_ps();
    const __m256 b1 = bias ? _mm256_loadu_ps(bias + p * 16 + 8) : _mm256_setzero_ps();
    for (int r = 0; r < MR; ++r)
      store_bf16x16(out + r * out_stride + p * 16, _mm256_add_ps(acc[r][p][0], b0), _mm256_add_ps(acc[r][p][1], b1));
  }
}

// MR rows of x times panels [0, panels): fewer rows take more panels at once, to keep a dozen
// FMA chains in flight.
template <int MR>
void fma_rows(const float* x, int64_t K, const uint16_t* w, int64_t panels, const float* bias, uint16_t* out,
              int64_t out_stride) {
  constexpr int NP = MR >= 4 ? 1 : 6 / MR;  // 1 row: 6 panels, 2: 3, 3: 2
  const int64_t panel_stride = K * 16;
  int64_t p = 0;
  for (; p + NP <= panels; p += NP)
    fma_tile<MR, NP>(x, K, w + p * panel_stride, panel_stride, bias ? bias + p * 16 : nullptr, out + p * 16, out_stride);
  for (; p < panels; ++p)
    fma_tile<MR, 1>(x, K, w + p * panel_stride, panel_stride, bias ? bias + p * 16 : nullptr, out + p * 16, out_stride);
}

// out[M, N] = x[M, K] @ w^T + bias, bf16, with w in panels [N / 16, K, 16].
at::Tensor fma_linear(const at::Tensor& x, const at::Tensor& w_panels, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w_panels.scalar_type() == at::kBFloat16, "fma_linear: bf16 only");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && w_panels.dim() == 3 && w_panels.size(2) == 16 &&
              w_panels.is_contiguous(), "fma_linear: x [M, K] with unit column stride, w as [N/16, K, 16] panels");
  const int64_t M = x.size(0), K = x.size(1), panels = w_panels.size(0), N = panels * 16;
  TORCH_CHECK(w_panels.size(1) == K, "fma_linear: x has ", K, " columns, the weight ", w_panels.size(1));
  if (bias) TORCH_CHECK(bias->numel() == N && bias->scalar_type() == at::kBFloat16, "fma_linear: bias");
  auto out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  // x and bias widened to float32 once (exact), not at every use; torch's own conversion
  // took 8% of a prefill.
  at::Tensor x32 = at::empty({M, K}, x.options().dtype(at::kFloat));
  float* xp = x32.data_ptr<float>();
  const uint16_t* xin = ptr<uint16_t>(x);
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* src = xin + r * x.stride(0);
      float* dst = xp + r * K;
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) _mm256_storeu_ps(dst + k, load8(src + k));
      for (; k < K; ++k) dst[k] = f32(src[k]);
    }
  });
  const at::Tensor bias32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = bias ? bias32.data_ptr<float>() : nullptr;
  const uint16_t* wp = ptr<uint16_t>(w_panels);
  uint16_t* op = ptr<uint16_t>(out);
  // Rows go in blocks of about 128 KB of x, which stays in L2 while the weights pass it.
  const int64_t block_rows = std::max<int64_t>(6, 128 * 1024 / (K * 4) / 6 * 6);
  if (M < 6) {
    // A thread's share is whole groups of 6 panels (96 outputs), fewer rows taking more panels
    // per tile (fma_rows).
    constexpr int64_t kGroup = 6;
    #pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
    for (int64_t g = 0; g < (panels + kGroup - 1) / kGroup; ++g) {
      const int64_t p0 = g * kGroup, np = std::min(kGroup, panels - p0);
      const uint16_t* w = wp + p0 * K * 16;
      const float* b = bp ? bp + p0 * 16 : nullptr;
      uint16_t* o = op + p0 * 16;
      switch (M) {
        case 5: fma_rows<5>(xp, K, w, np, b, o, N); break;
        case 4: fma_rows<4>(xp, K, w, np, b, o, N); break;
        case 3: fma_rows<3>(xp, K, w, np, b, o, N); break;
        case 2: fma_rows<2>(xp, K, w, np, b, o, N); break;
        default: fma_rows<1>(xp, K, w, np, b, o, N);
      }
    }
    return out;
  }
  // A thread's share is whole panels. Each panel goes through every row tile of the block
  // (up to 6 rows each, evenly split) while in L1, and meanwhile the tiles prefetch the next
  // panel, spread over their k loops: without it the FMAs waited on the weights streaming
  // from memory (SmolLM2's 120 layer linears at 16 rows: median 36 -> 31 ms over 6
  // alternating runs, 64 rows 112 -> 93 ms).
  for (int64_t block = 0; block < M; block += block_rows) {
    const int64_t rows = std::min(M, block + block_rows) - block, tiles = (rows + 5) / 6;
    const int64_t step = 32 / tiles;  // a panel has 32 bytes per k: the tiles stay within the next one
    #pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
    for (int64_t p = 0; p < panels; ++p) {
      const uint16_t* w = wp + p * K * 16;
      const char* next = reinterpret_cast<const char*>(wp + std::min(p + 1, panels - 1) * K * 16);
      const float* b = bp ? bp + p * 16 : nullptr;
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t m = block + t * rows / tiles, mr = block + (t + 1) * rows / tiles - m;
        const float* xm = xp + m * K;
        uint16_t* o = op + m * N + p * 16;
        const char* ahead = next + t * K * step;
        switch (mr) {
          case 6: fma_tile<6, 1, true>(xm, K, w, 0, b, o, N, ahead, step); break;
          case 5: fma_tile<5, 1, true>(xm, K, w, 0, b, o, N, ahead, step); break;
          case 4: fma_tile<4, 1, true>(xm, K, w, 0, b, o, N, ahead, step); break;
          case 3: fma_tile<3, 1, true>(xm, K, w, 0, b, o, N, ahead, step); break;
          case 2: fma_tile<2, 1, true>(xm, K, w, 0, b, o, N, ahead, step); break;
          default: fma_tile<1, 1, true>(xm, K, w, 0, b, o, N, ahead, step);
        }
      }
    }
  }
  return out;
}

// ---- The decoder layers of a Llama / Qwen2 model in one call ---------------------------------

// Where every linear runs the FMA kernel, the whole stack of decoder layers runs here: the
// same kernels in the order the Python modules call them (engine/models/llama.py), so the
// result is the same to the bit, without a trip through Python and the dispatcher between
// them (about 300 per step; at one sequence they took a fifth of the step). Returns the final
// norm of the last layer's output plus the residual stream; `hidden` (the embeddings) becomes
// that residual stream, added to in place, as in the modules.
at::Tensor decoder_layers(const at::Tensor& hidden_in, const at::TensorList input_norms,
                          const at::TensorList post_norms, const at::TensorList qkv_weights,
                          const c10::List<c10::optional<at::Tensor>>& qkv_biases, const at::TensorList o_weights,
                          const at::TensorList gate_up_weights, const at::TensorList down_weights,
                          const at::Tensor& final_norm, double eps, int64_t num_heads, int64_t num_kv_heads,
                          const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                          const at::TensorList k_caches, const at::TensorList v_caches,
                          const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                          const at::Tensor& query_starts, const at::Tensor& context_lens, double scale) {
  const int64_t layers = static_cast<int64_t>(input_norms.size());
  TORCH_CHECK(layers >= 1 && post_norms.size() == input_norms.size() && qkv_weights.size() == input_norms.size() &&
              qkv_biases.size() == input_norms.size() && o_weights.size() == input_norms.size() &&
              gate_up_weights.size() == input_norms.size() && down_weights.size() == input_norms.size() &&
              k_caches.size() == input_norms.size() && v_caches.size() == input_norms.size(),
              "decoder_layers: one of each weight and cache per layer");
  const int64_t tokens = hidden_in.size(0), head_dim = k_caches[0].size(3);
  for (int64_t l = 0; l < layers; ++l) {
    TORCH_CHECK(k_caches[l].sizes() == k_caches[0].sizes(), "decoder_layers: every layer's cache shaped alike");
  }
  check_paged_batch(tokens, k_caches[0].size(0), k_caches[0].size(1), block_tables, query_starts, context_lens);
  const c10::optional<at::Tensor> none;
  at::Tensor residual = hidden_in;  // updated in place by each norm that adds it
  at::Tensor hidden = rms_norm(hidden_in, none, input_norms[0], eps);
  for (int64_t l = 0; l < layers; ++l) {
    if (l > 0) hidden = rms_norm(hidden, residual, input_norms[l], eps);
    at::Tensor qkv = fma_linear(hidden, qkv_weights[l], qkv_biases.get(l));
    at::Tensor k_cache = k_caches[l], v_cache = v_caches[l];
    rotary_and_store(qkv, positions, cos, sin, num_heads, num_kv_heads, k_cache, v_cache, slot_mapping);
    const at::Tensor q = qkv.view({tokens, -1, head_dim}).narrow(1, 0, num_heads);
    const at::Tensor attended = attend_paged(q, k_cache, v_cache, block_tables, query_starts, context_lens, scale);
    hidden = fma_linear(attended.view({tokens, num_heads * head_dim}), o_weights[l], none);
    hidden = rms_norm(hidden, residual, post_norms[l], eps);
    hidden = fma_linear(silu_and_mul(fma_linear(hidden, gate_up_weights[l], none)), down_weights[l], none);
  }
  return rms_norm(hidden, residual, final_norm, eps);
}
#endif

#ifdef KESTREL_AMX
// ---- Linear on AMX tiles --------------------------------------------------------------------

// oneDNN's packed linear pays a fixed cost per call that dominates when a step has a few rows
// (decoding); this one streams the weight through AMX tiles with none of it. It accumulates in
// the same order as oneDNN (checked bit for bit by the tests), so a row's result is the same
// whichever of the two computes it.

bool amx_permitted() {
  // Linux hands out the AMX register state only on request (once per process).
  constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool ok = syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  return ok;
}

struct TileConfig {  // the 64-byte layout ldtilecfg expects (palette 1)
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// out[M, N] = x[M, K] @ w^T + bias for any M, bf16, with w pre-packed by the caller into AMX
// B tiles: [N / 16][K / 32][16 k-pairs][16 outputs][2] (see engine/layers/linear.py). x rows are
// the A operand, read in place 16 at a time; each output element sums its k-pairs in order,
// the same whatever M is.
at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& w_tiles, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(amx_permitted(), "amx_linear: the OS does not grant this process AMX state");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w_tiles.scalar_type() == at::kBFloat16, "amx_linear: bf16 only");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && w_tiles.dim() == 5 && w_tiles.is_contiguous(),
              "amx_linear: x [M, K] with unit column stride, w as [N/16, K/32, 16, 16, 2] tiles");
  const int64_t M = x.size(0), K = x.size(1), n_tiles = w_tiles.size(0), k_tiles = w_tiles.size(1);
  const int64_t N = n_tiles * 16, x_stride = x.stride(0);
  TORCH_CHECK(K == k_tiles * 32, "amx_linear: x has ", K, " columns, the weight ", k_tiles * 32);
  if (bias) TORCH_CHECK(bias->is_contiguous() && bias->numel() == N && bias->scalar_type() == at::kBFloat16, "amx_linear: bias");
  auto out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  uint16_t* op = ptr<uint16_t>(out);
  const uint16_t* xp = ptr<uint16_t>(x);
  const uint16_t* wp = ptr<uint16_t>(w_tiles);
  const uint16_t* bp = bias ? ptr<uint16_t>(*bias) : nullptr;
  // The last, partial group of 16 rows is read from a zero-padded copy.
  const int64_t full_rows = M / 16 * 16, tail = M - full_rows;
  std::vector<uint16_t> padded(tail ? 16 * K : 0, 0);
  for (int64_t r = 0; r < tail; ++r) std::memcpy(padded.data() + r * K, xp + (full_rows + r) * x_stride, K * 2);
  const auto rows_at = [&](int64_t m0, int64_t& stride) -> const uint16_t* {
    if (m0 < full_rows) {
      stride = x_stride;
      return xp + m0 * x_stride;
    }
    stride = K;
    return padded.data();
  };
  // A pass multiplies 16 rows by four output tiles: one A tile meets four weight streams, which
  // keeps more of memory's bandwidth busy than one stream with software prefetch (10.5 vs 11.1
  // ms for SmolLM2's linears at 16 rows, and 16.9 vs 23 at 64). Each output element still sums
  // its k-pairs in order.
  const int64_t n_passes = (n_tiles + 3) / 4;
  // Rows in super-blocks that stay in L2 while every weight tile streams past them once.
  const int64_t block_rows = std::max<int64_t>(64, (256 * 1024 / (K * 2)) / 64 * 64);
  #pragma omp parallel num_threads(at::get_num_threads())
  {
    TileConfig config;  // tiles 0-3: C (16 rows x 16 outputs, float), 4: A (x), 5-7: B (weight)
    for (int t = 0; t < 8; ++t) {
      config.rows[t] = 16;
      config.colsb[t] = 64;
    }
    _tile_loadconfig(&config);
    alignas(64) float c[16 * 16];
    for (int64_t block = 0; block < M; block += block_rows) {
      const int64_t block_end = std::min(M, block + block_rows);
      #pragma omp for schedule(static)
      for (int64_t pass = 0; pass < n_passes; ++pass) {
        const int64_t nt0 = pass * 4, nn = std::min<int64_t>(4, n_tiles - nt0);
        const uint16_t* w = wp + nt0 * k_tiles * 512;  // output tile nt0 + j starts at j * k_tiles * 512
        const int64_t w_step = k_tiles * 512;
        for (int64_t m0 = block; m0 < block_end; m0 += 16) {
          int64_t stride;
          const uint16_t* a = rows_at(m0, stride);
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
          for (int64_t k = 0; k < k_tiles; ++k) {  // C tile j: output tile nt0 + j
            const uint16_t* wk = w + k * 512;
            _tile_loadd(4, a + k * 32, stride * 2);
            _tile_loadd(5, wk, 64);
            _tile_dpbf16ps(0, 4, 5);
            if (nn > 1) {
              _tile_loadd(6, wk + w_step, 64);
              _tile_dpbf16ps(1, 4, 6);
            }
            if (nn > 2) {
              _tile_loadd(7, wk + 2 * w_step, 64);
              _tile_dpbf16ps(2, 4, 7);
            }
            if (nn > 3) {
              _tile_loadd(5, wk + 3 * w_step, 64);
              _tile_dpbf16ps(3, 4, 5);
            }
          }
          for (int64_t j = 0; j < nn; ++j) {
            const int64_t nt = nt0 + j;
            switch (j) {  // tile numbers must be constants
              case 0: _tile_stored(0, c, 64); break;
              case 1: _tile_stored(1, c, 64); break;
              case 2: _tile_stored(2, c, 64); break;
              default: _tile_stored(3, c, 64);
            }
            const __m512 bias16 = bp ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + nt * 16))), 16))
                                     : _mm512_setzero_ps();
            for (int64_t r = 0; r < 16 && m0 + r < M; ++r) {
              __m512 v = _mm512_load_ps(c + r * 16);
              if (bp) v = _mm512_add_ps(v, bias16);
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(op + (m0 + r) * N + nt * 16),
                                  (__m256i)_mm512_cvtneps_pbh(v));
            }
          }
        }
      }
    }
    _tile_release();
  }
  return out;
}
#endif

}  // namespace

TORCH_LIBRARY(kestrel, m) {
  m.def("rms_norm(Tensor x, Tensor(a!)? residual, Tensor weight, float eps) -> Tensor");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def("rotary_and_store(Tensor(a!) qkv, Tensor positions, Tensor cos, Tensor sin, int num_heads, "
        "int num_kv_heads, Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor slot_mapping) -> ()");
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor query_starts, Tensor context_lens, float scale) -> Tensor");
#ifdef KESTREL_AVX2
  m.def("fma_linear(Tensor x, Tensor w_panels, Tensor? bias) -> Tensor");
  m.def("decoder_layers(Tensor(c!) hidden, Tensor[] input_norms, Tensor[] post_norms, Tensor[] qkv_weights, "
        "Tensor?[] qkv_biases, Tensor[] o_weights, Tensor[] gate_up_weights, Tensor[] down_weights, "
        "Tensor final_norm, float eps, int num_heads, int num_kv_heads, Tensor positions, Tensor cos, "
        "Tensor sin, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor slot_mapping, Tensor block_tables, "
        "Tensor query_starts, Tensor context_lens, float scale) -> Tensor");
#endif
#ifdef KESTREL_AMX
  m.def("amx_linear(Tensor x, Tensor w_tiles, Tensor? bias) -> Tensor");
#endif
}

TORCH_LIBRARY_IMPL(kestrel, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary_and_store", &rotary_and_store);
  m.impl("paged_attention", &paged_attention);
#ifdef KESTREL_AVX2
  m.impl("fma_linear", &fma_linear);
  m.impl("decoder_layers", &decoder_layers);
#endif
#ifdef KESTREL_AMX
  m.impl("amx_linear", &amx_linear);
#endif
}
