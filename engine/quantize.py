"""Quantize a loaded model's linear weights into GGUF blocks (`--quantization int8 | q4`).

The blocks are byte for byte what the `gguf` package's reference quantizer writes, so the same
kernels read them as a GGUF file's (engine/layers/quantized.py):
- int8: Q8_0, 32 weights sharing one fp16 scale (finer than a scale per output channel);
- q4: Q4_1, 32 weights sharing an fp16 scale and an fp16 minimum.
The output projection (lm_head, and the embedding it may be tied to) takes Q8_0 in both, as
llama.cpp keeps it in more bits than the layers.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.linear import Linear
from engine.layers.quantized import QUANTIZED_TYPES, QuantizedEmbedding, QuantizedWeight, interleave

BLOCK = 32
# --quantization -> the block type of the decoder layers' linears.
QUANTIZATIONS = {"none": None, "int8": "Q8_0", "q4": "Q4_1"}


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf, as the reference computes it (x + 0.5 would round 0.49999997 up)."""
    a = x.abs()
    whole = torch.floor(a)
    return torch.sign(x) * (whole + torch.floor(2 * (a - whole)))


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[..., 1] float32 -> [..., 2] uint8, little-endian fp16."""
    return x.to(torch.float16).view(torch.uint8)


def quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> uint8 [out, in / 32 * 34]: per block an fp16 scale d, then 32 int8 q; w = d * q."""
    blocks = weight.float().reshape(weight.shape[0], -1, BLOCK)  # [out, in / 32, 32]
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inverse = torch.where(d == 0, 0.0, 1.0 / d)
    q = _round_half_away(blocks * inverse).to(torch.int8).view(torch.uint8)
    return torch.cat([_fp16_bytes(d), q], dim=-1).reshape(weight.shape[0], -1)


def quantize_q4_1(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> uint8 [out, in / 32 * 20]: per block fp16 scale d and minimum m, then 32
    4-bit q (byte j holds q[j] low, q[j + 16] high); w = d * q + m."""
    blocks = weight.float().reshape(weight.shape[0], -1, BLOCK)
    low, high = blocks.amin(dim=-1, keepdim=True), blocks.amax(dim=-1, keepdim=True)
    d = (high - low) / 15
    inverse = torch.where(d == 0, 0.0, 1.0 / d)
    q = torch.trunc((blocks - low) * inverse + 0.5).clamp(0, 15).to(torch.uint8)
    packed = q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << 4)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(low), packed], dim=-1).reshape(weight.shape[0], -1)


QUANTIZERS = {"Q8_0": quantize_q8_0, "Q4_1": quantize_q4_1}


def quantize_weight(weight: torch.Tensor, qtype: str) -> QuantizedWeight:
    blocks = QUANTIZERS[qtype](weight.detach())
    return QuantizedWeight(blocks.contiguous(), QUANTIZED_TYPES[qtype], weight.shape[1])


def quantize_model(model: nn.Module, quantization: str) -> None:
    """Replace the dense weights of every linear whose input width is a multiple of 32 by
    blocks (the layers' in `quantization`'s type, the output projection's in Q8_0)."""
    layer_type = QUANTIZATIONS[quantization]
    if layer_type is None:
        return
    head = model.lm_head
    for module in model.modules():
        if isinstance(module, Linear) and module.weight is not None and module.in_features % BLOCK == 0:
            tied = module is head and model.config.tie_word_embeddings
            weight = quantize_weight(module.weight, "Q8_0" if module is head else layer_type)
            weight = interleave(weight)
            if tied:  # one copy of the blocks serves both
                model.model.embed_tokens = QuantizedEmbedding(weight, module.weight.dtype)
            module.weight = None
            module.quant_parts = [weight]
