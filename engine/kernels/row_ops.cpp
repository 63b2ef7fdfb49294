// Row by row kernels of a decoder layer: RMSNorm (with the residual add), SwiGLU, and rotary
// embedding with the store of k / v into the paged cache. Each rounds to the model dtype where
// the eager torch ops would (see cpu_ops.cpp).

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "cpu_ops.h"

namespace kestrel {

// ---- RMSNorm, optionally adding the residual first ------------------------------------------

namespace {

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

}  // namespace

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

namespace {

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

}  // namespace

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

}  // namespace kestrel
