// The decoder layers of a Llama / Qwen2 model in one call (built only with KESTREL_AVX2).
//
// Where every linear runs the FMA kernel, or the quantized one on GGUF blocks of one type, the
// whole stack of decoder layers runs here: the same kernels in the order the Python modules call
// them (engine/models/llama.py), so the result is the same to the bit, without a trip through
// Python and the dispatcher between them (about 300 per step; at one sequence they took a fifth
// of the step). Returns the final norm of the last layer's output plus the residual stream;
// `hidden` (the embeddings) becomes that residual stream, added to in place, as in the modules.
//
// Each linear is one or more parts (a fused projection whose shards differ in block type, as
// Qwen2.5's Q4_K_M qkv: Q5_0 q/k, Q8_0 v), their outputs joined along the features.
// linear_weights and linear_types hold every part in order (layer by layer: qkv, o, gate_up,
// down), linear_types -1 for bf16 FMA panels, -2 for bf16 AMX tiles (amx_linear.cpp, only for
// steps it takes), else the GGML type id of the blocks; linear_parts
// holds four part counts per layer (engine/models/fused_stack.py).

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>

#include <vector>

#include "cpu_ops.h"

#ifdef KESTREL_AVX2
namespace kestrel {
namespace {

constexpr int64_t kFmaPanels = -1, kAmxTiles = -2;

// quant_linear (quant_ops.cpp) and amx_linear (amx_linear.cpp, built only with KESTREL_AMX) are
// registered in the same library: called through the dispatcher (once resolved, a call costs
// about what a C++ call does next to the kernel).
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype,
                        const c10::optional<at::Tensor>& bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("kestrel::quant_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, const c10::optional<at::Tensor>&)>();
  return op.call(x, blocks, qtype, x.size(1), bias);
}

at::Tensor amx_tiles_linear(const at::Tensor& x, const at::Tensor& tiles, const c10::optional<at::Tensor>& bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("kestrel::amx_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&)>();
  return op.call(x, tiles, bias);
}

at::Tensor part_linear(const at::Tensor& x, const at::Tensor& weight, int64_t type, const c10::optional<at::Tensor>& bias) {
  if (type == kFmaPanels) return fma_linear(x, weight, bias);
  if (type == kAmxTiles) return amx_tiles_linear(x, weight, bias);
  return quant_linear(x, weight, type, bias);
}

// The linears in order, each taking its next `count` parts.
class Linears {
 public:
  Linears(at::TensorList weights, at::IntArrayRef types) : weights_(weights), types_(types) {}

  at::Tensor apply(const at::Tensor& x, int64_t count, const c10::optional<at::Tensor>& bias) {
    if (count == 1) {
      const size_t i = next_++;
      return part_linear(x, weights_[i], types_[i], bias);
    }
    std::vector<at::Tensor> outputs;
    int64_t start = 0;
    for (int64_t i = 0; i < count; ++i, ++next_) {
      const int64_t rows = weights_[next_].size(0);
      c10::optional<at::Tensor> part_bias;
      if (bias.has_value()) part_bias = bias->narrow(0, start, rows);
      outputs.push_back(part_linear(x, weights_[next_], types_[next_], part_bias));
      start += rows;
    }
    return at::cat(outputs, 1);
  }

 private:
  at::TensorList weights_;
  at::IntArrayRef types_;
  size_t next_ = 0;
};

}  // namespace

at::Tensor decoder_layers(const at::Tensor& hidden_in, const at::TensorList input_norms,
                          const at::TensorList post_norms, const at::TensorList linear_weights,
                          at::IntArrayRef linear_types, at::IntArrayRef linear_parts,
                          const c10::List<c10::optional<at::Tensor>>& qkv_biases, const at::Tensor& final_norm, double eps, int64_t num_heads, int64_t num_kv_heads,
                          const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                          const at::TensorList k_caches, const at::TensorList v_caches,
                          const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                          const at::Tensor& query_starts, const at::Tensor& context_lens, double scale) {
  const int64_t layers = static_cast<int64_t>(input_norms.size());
  TORCH_CHECK(layers >= 1 && post_norms.size() == input_norms.size() && qkv_biases.size() == input_norms.size() &&
              k_caches.size() == input_norms.size() && v_caches.size() == input_norms.size() &&
              static_cast<int64_t>(linear_parts.size()) == 4 * layers,
              "decoder_layers: one of each norm, bias and cache per layer, four part counts per layer");
  int64_t num_parts = 0;
  for (const int64_t count : linear_parts) {
    TORCH_CHECK(count >= 1, "decoder_layers: every linear has at least one part");
    num_parts += count;
  }
  TORCH_CHECK(static_cast<int64_t>(linear_weights.size()) == num_parts && static_cast<int64_t>(linear_types.size()) == num_parts,
              "decoder_layers: one weight and one type per part");
  const int64_t tokens = hidden_in.size(0), head_dim = k_caches[0].size(3);
  for (int64_t l = 0; l < layers; ++l) {
    TORCH_CHECK(k_caches[l].sizes() == k_caches[0].sizes(), "decoder_layers: every layer's cache shaped alike");
  }
  check_paged_batch(tokens, k_caches[0].size(0), k_caches[0].size(1), block_tables, query_starts, context_lens);
  const c10::optional<at::Tensor> none;
  at::Tensor residual = hidden_in;  // updated in place by each norm that adds it
  at::Tensor hidden = rms_norm(hidden_in, none, input_norms[0], eps);
  Linears linears(linear_weights, linear_types);
  for (int64_t l = 0; l < layers; ++l) {
    if (l > 0) hidden = rms_norm(hidden, residual, input_norms[l], eps);
    const int64_t* parts = linear_parts.data() + 4 * l;  // qkv, o, gate_up, down
    at::Tensor qkv = linears.apply(hidden, parts[0], qkv_biases.get(l));
    at::Tensor k_cache = k_caches[l], v_cache = v_caches[l];
    rotary_and_store(qkv, positions, cos, sin, num_heads, num_kv_heads, k_cache, v_cache, slot_mapping);
    const at::Tensor q = qkv.view({tokens, -1, head_dim}).narrow(1, 0, num_heads);
    const at::Tensor attended = attend_paged(q, k_cache, v_cache, block_tables, query_starts, context_lens, scale);
    hidden = linears.apply(attended.view({tokens, num_heads * head_dim}), parts[1], none);
    hidden = rms_norm(hidden, residual, post_norms[l], eps);
    const at::Tensor gate_up = linears.apply(hidden, parts[2], none);
    hidden = linears.apply(silu_and_mul(gate_up), parts[3], none);
  }
  return rms_norm(hidden, residual, final_norm, eps);
}

}  // namespace kestrel
#endif
