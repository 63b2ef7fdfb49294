"""Weights kept in GGUF's quantized blocks: linears and embeddings that read the blocks directly.

A weight of `out_features` rows stays as the file stores it, uint8 [out_features, row_bytes],
each row the blocks of one output feature along the input dim. The fused kernels
(engine/kernels/quant_ops.cpp) unpack the blocks in registers: nothing is expanded to bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine import kernels

# GGML block types the kernels read, by GGML type id (gguf.GGMLQuantizationType).
QUANTIZED_TYPES = {
    "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
    "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14,
}  # fmt: skip


# The layout the linears take a weight in where the build has it (quant_pack: AVX-512 BW and VL,
# or AVX2, FMA and F16C), as type id this base + the GGML type id: 16 outputs per group, integer
# dot products on 16-bit activations (quant_interleaved.h), at float quality (SmolLM2's
# perplexity 22.954 -> 22.956), where int8 activations as llama.cpp has them cost SmolLM2 a third
# of its greedy agreement with bf16 (60.1 -> 40.6%, benchmarks/quality.py). With the model's
# linears in model order at one row, AVX-512: SmolLM2's Q4_1 ones take 2.8 ms a step against 4.5
# as floats, Qwen2.5's Q4_K / Q6_K down_proj 123 us a call against 224, its Q5_0 ones 7.1-7.3 ms
# (8.3 on int8 activations); AVX2: all of Qwen2.5's 14.5 ms against 33 as floats.
INTERLEAVED_TYPE_BASE = 2000
INTERLEAVED_TYPES = frozenset(QUANTIZED_TYPES[name] for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K"))
INTERLEAVED_OUTPUTS = 16  # an interleaved weight's out_features must be a multiple of it


@dataclass(frozen=True, slots=True)
class QuantizedWeight:
    """Rows of a weight in GGUF blocks: `blocks` uint8 [out_features, row_bytes]."""

    blocks: torch.Tensor
    qtype: int  # the GGML type id of the blocks, or INTERLEAVED_TYPE_BASE + it once interleaved
    in_features: int

    @property
    def out_features(self) -> int:
        return self.blocks.shape[0]

    @property
    def num_bytes(self) -> int:
        return self.blocks.numel()


def interleave(weight: QuantizedWeight) -> QuantizedWeight:
    """`weight` in the interleaved layout (the same bytes in another order, or 2.8% more for
    Q4_K) where the build has one for its type and shape, else `weight`. Embedding lookups read
    that layout too, so a head tied to the embedding stays one copy."""
    ops = kernels.ops()
    if not (hasattr(ops, "quant_pack") and weight.qtype in INTERLEAVED_TYPES
            and weight.out_features % INTERLEAVED_OUTPUTS == 0):  # fmt: skip
        return weight
    qtype = INTERLEAVED_TYPE_BASE + weight.qtype
    return QuantizedWeight(ops.quant_pack(weight.blocks, qtype, weight.in_features), qtype, weight.in_features)


def quantized_linear(x: torch.Tensor, parts: list[QuantizedWeight], bias: torch.Tensor | None) -> torch.Tensor:
    """x [rows, in_features] times the weight whose rows are `parts` in order (a fused
    projection whose shards differ in block type has one part per run of equal types)."""
    ops = kernels.ops()
    outputs, start = [], 0
    for part in parts:
        part_bias = None if bias is None else bias[start : start + part.out_features]
        outputs.append(ops.quant_linear(x, part.blocks, part.qtype, part.in_features, part_bias))
        start += part.out_features
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


class QuantizedEmbedding(nn.Module):
    """Token embeddings whose looked-up rows are dequantized on the fly."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight_blocks = weight
        self.dtype = dtype

    def weight_tensors(self) -> list[torch.Tensor]:
        return [self.weight_blocks.blocks]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        w = self.weight_blocks
        return kernels.ops().quant_dequantize(w.blocks, w.qtype, w.in_features, input_ids, self.dtype)
