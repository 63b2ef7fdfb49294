// The decoder layers of a Llama / Qwen2 model in one call (built only with KESTREL_AVX2).
//
// Where every linear runs the FMA kernel, or the quantized one on GGUF blocks of one type, the
// whole stack of decoder layers runs here: the same kernels in the order the Python modules call
// them (engine/models/llama.py), so the result is the same to the bit, without a trip through
// Python and the dispatcher between them (about 300 per step; at one sequence they took a fifth
// of the step). Returns the final norm of the last layer's output plus the residual stream;
// `hidden` (the embeddings) becomes that residual stream, added to in place, as in the modules.
//
// linear_types holds, per layer, for its qkv, o, gate_up and down weights in that order: -1 for
// bf16 FMA panels, else the GGML type id of the blocks (engine/models/fused_stack.py).

#include <ATen/core/dispatch/Dispatcher.h>

#include "cpu_ops.h"

#ifdef KESTREL_AVX2
namespace kestrel {
namespace {

constexpr int64_t kFmaPanels = -1;

// quant_linear lives in quant_ops.cpp, registered in the same library: called through the
// dispatcher (once resolved, a call costs about what a C++ call does next to the kernel).
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype,
                        const c10::optional<at::Tensor>& bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("kestrel::quant_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, const c10::optional<at::Tensor>&)>();
  return op.call(x, blocks, qtype, x.size(1), bias);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, int64_t type, const c10::optional<at::Tensor>& bias) {
  return type == kFmaPanels ? fma_linear(x, weight, bias) : quant_linear(x, weight, type, bias);
}

}  // namespace

at::Tensor decoder_layers(const at::Tensor& hidden_in, const at::TensorList input_norms,
                          const at::TensorList post_norms, const at::TensorList qkv_weights,
                          const c10::List<c10::optional<at::Tensor>>& qkv_biases, const at::TensorList o_weights,
                          const at::TensorList gate_up_weights, const at::TensorList down_weights,
                          at::IntArrayRef linear_types, const at::Tensor& final_norm, double eps, int64_t num_heads, int64_t num_kv_heads,
                          const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                          const at::TensorList k_caches, const at::TensorList v_caches,
                          const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                          const at::Tensor& query_starts, const at::Tensor& context_lens, double scale) {
  const int64_t layers = static_cast<int64_t>(input_norms.size());
  TORCH_CHECK(layers >= 1 && post_norms.size() == input_norms.size() && qkv_weights.size() == input_norms.size() &&
              qkv_biases.size() == input_norms.size() && o_weights.size() == input_norms.size() &&
              gate_up_weights.size() == input_norms.size() && down_weights.size() == input_norms.size() &&
              k_caches.size() == input_norms.size() && v_caches.size() == input_norms.size() &&
              static_cast<int64_t>(linear_types.size()) == 4 * layers,
              "decoder_layers: one of each weight and cache per layer, four linear types per layer");
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
    const int64_t* types = linear_types.data() + 4 * l;  // qkv, o, gate_up, down
    at::Tensor qkv = linear(hidden, qkv_weights[l], types[0], qkv_biases.get(l));
    at::Tensor k_cache = k_caches[l], v_cache = v_caches[l];
    rotary_and_store(qkv, positions, cos, sin, num_heads, num_kv_heads, k_cache, v_cache, slot_mapping);
    const at::Tensor q = qkv.view({tokens, -1, head_dim}).narrow(1, 0, num_heads);
    const at::Tensor attended = attend_paged(q, k_cache, v_cache, block_tables, query_starts, context_lens, scale);
    hidden = linear(attended.view({tokens, num_heads * head_dim}), o_weights[l], types[1], none);
    hidden = rms_norm(hidden, residual, post_norms[l], eps);
    hidden = linear(silu_and_mul(linear(hidden, gate_up_weights[l], types[2], none)), down_weights[l], types[3], none);
  }
  return rms_norm(hidden, residual, final_norm, eps);
}

}  // namespace kestrel
#endif
