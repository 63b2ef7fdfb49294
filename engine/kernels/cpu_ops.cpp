// Fused CPU kernels for a model step (decodes, draft rows and prompt chunks alike): the eager
// versions cost a few microseconds of dispatch per op, a gather copy of every sequence's keys
// and values per layer, and oneDNN's fixed cost per matmul call.
//
// Every kernel rounds to the model dtype at the same points as the eager torch code it
// replaces (which follows the reference implementation), so bf16 results match it bit for
// bit except for float32 summation order. Each output row depends only on its own inputs,
// never on the rest of the batch.
//
// This file holds the library (TORCH_LIBRARY) and registers the ops of the kernel families,
// which cpu_ops.h lists with their files; simd.h holds what they share. quant_ops.cpp adds its
// own ops as a fragment.

#include <torch/library.h>

#include "cpu_ops.h"

TORCH_LIBRARY(kestrel, m) {
  m.def("rms_norm(Tensor x, Tensor(a!)? residual, Tensor weight, float eps) -> Tensor");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def("rotary_and_store(Tensor(a!) qkv, Tensor positions, Tensor cos, Tensor sin, int num_heads, "
        "int num_kv_heads, Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor slot_mapping) -> ()");
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor query_starts, Tensor context_lens, float scale) -> Tensor");
#ifdef KESTREL_AVX2
  m.def("fma_linear(Tensor x, Tensor w_panels, Tensor? bias) -> Tensor");
  m.def("decoder_layers(Tensor(c!) hidden, Tensor[] input_norms, Tensor[] post_norms, Tensor[] linear_weights, "
        "int[] linear_types, int[] linear_parts, Tensor?[] qkv_biases, Tensor final_norm, float eps, int num_heads, int num_kv_heads, Tensor positions, Tensor cos, "
        "Tensor sin, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor slot_mapping, Tensor block_tables, "
        "Tensor query_starts, Tensor context_lens, float scale) -> Tensor");
#endif
#ifdef KESTREL_AMX
  m.def("amx_linear(Tensor x, Tensor w_tiles, Tensor? bias) -> Tensor");
#endif
}

TORCH_LIBRARY_IMPL(kestrel, CPU, m) {
  m.impl("rms_norm", &kestrel::rms_norm);
  m.impl("silu_and_mul", &kestrel::silu_and_mul);
  m.impl("rotary_and_store", &kestrel::rotary_and_store);
  m.impl("paged_attention", &kestrel::paged_attention);
#ifdef KESTREL_AVX2
  m.impl("fma_linear", &kestrel::fma_linear);
  m.impl("decoder_layers", &kestrel::decoder_layers);
#endif
#ifdef KESTREL_AMX
  m.impl("amx_linear", &kestrel::amx_linear);
#endif
}
