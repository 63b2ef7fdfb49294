"""A Llama-family decoder stack as one call of the fused CPU kernel (`decoder_layers`).

Where every layer linear runs the FMA kernel, the AMX one (engine/layers/linear.py; for steps of
up to AMX_MAX_ROWS rows, beyond which the modules run oneDNN) or the quantized one on GGUF blocks
(engine/layers/quantized.py; a linear whose shards differ in block type, in one part per type),
and only q/k/v carry biases, the kernel runs all decoder layers and the final norm in one call,
with the same kernels in the same order as the modules: the same result to the bit, without ~300
Python and dispatcher round trips per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from engine import kernels
from engine.layers.attention import AttentionMetadata, KVCache
from engine.layers.linear import AMX_MAX_ROWS
from engine.layers.rotary import RotaryInputs


@dataclass(frozen=True, slots=True)
class FusedDecoderStack:
    """The layers' weights as the kernel takes them; one entry per layer in each list."""

    input_norms: list[torch.Tensor]  # [hidden_size]
    post_norms: list[torch.Tensor]  # [hidden_size]
    # Every layer's qkv, o, gate_up and down linears in that order, each in one or more parts:
    # the parts' weights (FMA panels, AMX tiles or GGUF blocks), their types (the
    # GGML type of the blocks, FMA_PANELS or AMX_TILES), and four part counts per layer.
    linear_weights: list[torch.Tensor]
    linear_types: list[int]
    linear_parts: list[int]
    qkv_biases: list[torch.Tensor | None]
    max_rows: int | None  # rows of the largest step it runs as the modules do (None: any)
    final_norm: torch.Tensor
    eps: float
    num_heads: int
    num_kv_heads: int
    scale: float

    @classmethod
    def build(cls, layers: Sequence[nn.Module], final_norm: nn.Module, config) -> FusedDecoderStack | None:
        """The stack for LlamaDecoderLayer `layers`, or None where the kernel cannot run them:
        no FMA kernel, a linear on another path, or a bias other than q/k/v's."""
        library = kernels.ops()
        if library is None or not hasattr(library, "decoder_layers"):
            return None
        attns, mlps = [layer.self_attn for layer in layers], [layer.mlp for layer in layers]
        linears = [(a.qkv_proj, a.o_proj, p.gate_up_proj, p.down_proj) for a, p in zip(attns, mlps, strict=True)]
        parts = [_kernel_parts(m) for layer in linears for m in layer]
        if any(p is None for p in parts):
            return None
        if any(m.bias is not None for layer in linears for m in layer[1:]):
            return None
        return cls(
            input_norms=[layer.input_layernorm.weight for layer in layers],
            post_norms=[layer.post_attention_layernorm.weight for layer in layers],
            linear_weights=[weight for linear in parts for weight, _ in linear],
            linear_types=[kind for linear in parts for _, kind in linear],
            linear_parts=[len(linear) for linear in parts],
            qkv_biases=[a.qkv_proj.bias for a in attns],
            # Beyond AMX_MAX_ROWS the modules run oneDNN in place of the AMX kernel.
            max_rows=AMX_MAX_ROWS if any(kind == AMX_TILES for linear in parts for _, kind in linear) else None,
            final_norm=final_norm.weight,
            eps=config.rms_norm_eps,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            scale=config.attention_scale,
        )

    def takes(self, num_rows: int) -> bool:
        """Whether the stack runs a step of `num_rows` rows as the modules would."""
        return self.max_rows is None or num_rows <= self.max_rows

    def __call__(
        self, hidden: torch.Tensor, rope: RotaryInputs, kv_caches: list[KVCache], meta: AttentionMetadata
    ) -> torch.Tensor:
        """The normed final hidden states [num_tokens, hidden_size]; adds into `hidden`."""
        p = meta.paged
        assert p is not None, "the fused stack reads the paged batch (build_paged_metadata)"
        return kernels.ops().decoder_layers(
            hidden, self.input_norms, self.post_norms, self.linear_weights, self.linear_types,
            self.linear_parts, self.qkv_biases, self.final_norm, self.eps,
            self.num_heads, self.num_kv_heads, rope.positions, rope.cos_table, rope.sin_table,
            [k for k, _ in kv_caches], [v for _, v in kv_caches], meta.slot_mapping,
            p.block_tables, p.query_starts, p.context_lens, self.scale,
        )  # fmt: skip


# linear_types entries besides GGML types: bf16 weights in the FMA kernel's panels, or in the
# AMX kernel's tiles.
FMA_PANELS, AMX_TILES = -1, -2


def _kernel_parts(linear: nn.Module) -> list[tuple[torch.Tensor, int]] | None:
    """The weights a Linear's kernel reads, each with its linear_types entry; None if the stack
    cannot run it (oneDNN's layout alone)."""
    if linear.fma_weight is not None:
        return [(linear.fma_weight, FMA_PANELS)]
    if linear.amx_weight is not None:
        return [(linear.amx_weight, AMX_TILES)]
    if linear.quant_parts is not None:
        return [(part.blocks, part.qtype) for part in linear.quant_parts]
    return None
