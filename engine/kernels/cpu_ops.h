// What the kernel families share beyond SIMD: raw element types of tensors, argument checks,
// and every op's entry point. cpu_ops.cpp registers the ops; decoder_layers.cpp calls the others.
//
//   row_ops.cpp         rms_norm, silu_and_mul, rotary_and_store
//   attention.cpp       paged_attention (attend_paged, check_paged_batch)
//   fma_linear.cpp      fma_linear        (KESTREL_AVX2)
//   decoder_layers.cpp  decoder_layers    (KESTREL_AVX2)
//   amx_linear.cpp      amx_linear        (KESTREL_AMX)

#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "simd.h"

namespace kestrel {

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

inline void check_cpu_contiguous_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

// ---- row_ops.cpp ----------------------------------------------------------------------------

// out = weight * norm(x), or with a residual: residual += x (in place), out = weight * norm(residual).
at::Tensor rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                    double eps);
// silu(gate) * up for gate_up = [gate | up].
at::Tensor silu_and_mul(const at::Tensor& gate_up);
// Rotary embedding of q and k in place, and k / v into the paged cache.
void rotary_and_store(at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                      int64_t num_heads, int64_t num_kv_heads, at::Tensor& k_cache, at::Tensor& v_cache,
                      const at::Tensor& slot_mapping);

// ---- attention.cpp --------------------------------------------------------------------------

// Attention of every new token of a step, read straight from the paged cache.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& query_starts,
                           const at::Tensor& context_lens, double scale);
// The checks of paged_attention that hold for every layer of a step, and the rest of it.
void check_paged_batch(int64_t num_rows, int64_t num_blocks, int64_t block_size, const at::Tensor& block_tables,
                       const at::Tensor& query_starts, const at::Tensor& context_lens);
at::Tensor attend_paged(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& query_starts,
                        const at::Tensor& context_lens, double scale);

#ifdef KESTREL_AVX2
// ---- fma_linear.cpp, decoder_layers.cpp ------------------------------------------------------

// out[M, N] = x[M, K] @ w^T + bias, bf16, with w in panels [N / 16, K, 16].
at::Tensor fma_linear(const at::Tensor& x, const at::Tensor& w_panels, const c10::optional<at::Tensor>& bias);
// The decoder layers of a Llama / Qwen2 model in one call, every linear on fma_linear or on
// quant_linear (quant_ops.cpp) as linear_types says, in one or more parts (linear_parts).
at::Tensor decoder_layers(const at::Tensor& hidden_in, const at::TensorList input_norms,
                          const at::TensorList post_norms, const at::TensorList linear_weights,
                          at::IntArrayRef linear_types, at::IntArrayRef linear_parts,
                          const c10::List<c10::optional<at::Tensor>>& qkv_biases, const at::Tensor& final_norm, double eps, int64_t num_heads, int64_t num_kv_heads,
                          const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                          const at::TensorList k_caches, const at::TensorList v_caches,
                          const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                          const at::Tensor& query_starts, const at::Tensor& context_lens, double scale);
#endif

#ifdef KESTREL_AMX
// ---- amx_linear.cpp -------------------------------------------------------------------------

// out[M, N] = x[M, K] @ w^T + bias, bf16, with w in AMX tiles [N / 16, K / 32, 16, 16, 2].
at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& w_tiles, const c10::optional<at::Tensor>& bias);
#endif

}  // namespace kestrel
