"""A Llama-family decoder stack as one call of the fused CPU kernel (`decoder_layers`).

Where every layer linear runs the FMA kernel (engine/layers/linear.py) and only q/k/v carry
biases, the kernel runs all decoder layers and the final norm in one call, with the same kernels
in the same order as the modules: the same result to the bit, without ~300 Python and dispatcher
round trips per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from engine import kernels
from engine.layers.attention import AttentionMetadata, KVCache
from engine.layers.rotary import RotaryInputs


@dataclass(frozen=True, slots=True)
class FusedDecoderStack:
    """The layers' weights as the kernel takes them; one entry per layer in each list."""

    input_norms: list[torch.Tensor]  # [hidden_size]
    post_norms: list[torch.Tensor]  # [hidden_size]
    qkv_weights: list[torch.Tensor]  # FMA panels, kernels.fma_panels
    qkv_biases: list[torch.Tensor | None]
    o_weights: list[torch.Tensor]
    gate_up_weights: list[torch.Tensor]
    down_weights: list[torch.Tensor]
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
        qkvs = [a.qkv_proj for a in attns]
        others = [a.o_proj for a in attns] + [m for p in mlps for m in (p.gate_up_proj, p.down_proj)]
        if any(m.fma_weight is None for m in qkvs + others) or any(m.bias is not None for m in others):
            return None
        return cls(
            input_norms=[layer.input_layernorm.weight for layer in layers],
            post_norms=[layer.post_attention_layernorm.weight for layer in layers],
            qkv_weights=[m.fma_weight for m in qkvs],
            qkv_biases=[m.bias for m in qkvs],
            o_weights=[a.o_proj.fma_weight for a in attns],
            gate_up_weights=[p.gate_up_proj.fma_weight for p in mlps],
            down_weights=[p.down_proj.fma_weight for p in mlps],
            final_norm=final_norm.weight,
            eps=config.rms_norm_eps,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            scale=config.attention_scale,
        )

    def __call__(
        self, hidden: torch.Tensor, rope: RotaryInputs, kv_caches: list[KVCache], meta: AttentionMetadata
    ) -> torch.Tensor:
        """The normed final hidden states [num_tokens, hidden_size]; adds into `hidden`."""
        p = meta.paged
        assert p is not None, "the fused stack reads the paged batch (build_paged_metadata)"
        return kernels.ops().decoder_layers(
            hidden, self.input_norms, self.post_norms, self.qkv_weights, self.qkv_biases,
            self.o_weights, self.gate_up_weights, self.down_weights, self.final_norm, self.eps,
            self.num_heads, self.num_kv_heads, rope.positions, rope.cos_table, rope.sin_table,
            [k for k, _ in kv_caches], [v for _, v in kv_caches], meta.slot_mapping,
            p.block_tables, p.query_starts, p.context_lens, self.scale,
        )  # fmt: skip
